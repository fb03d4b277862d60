"""Golden vectors for kernel authors (train_free.md §11): `minikv oracle export` writes every input and
output of each policy step (store before and after, the attention statistics given, a fixed probe query's attention
output before and after) for small seeded float64 cases and one layer of the default model, one safetensors file per
case plus manifest.json; `minikv oracle check` compares a candidate's files against the manifest's tolerances. It
passes only when at least one tensor was compared and all passed; an unreadable golden set or candidate is a named
error, never a pass."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from safetensors import SafetensorError         # save_file / load_file report I/O failures as this, not OSError
from safetensors.torch import load_file, save_file

from minikv.config import LlamaConfig
from minikv.errors import BadInput, NotFound
from minikv.generate import generate
from minikv.io.checkpoint import load_model
from minikv.io.convert import ensure_default_model
from minikv.io.tokenizer import load_tokenizer
from minikv.model import Llama
from minikv.policies import get_policy
from minikv.tools.common import format_rows, parse_options
from minikv.tools.record import Recorder

FORMAT_VERSION = 1
CHECKED_ROLES = ("out", "probe")               # what a candidate must reproduce; in/stats are its inputs
MAX_SEED = 2 ** 63 - 1                          # torch.manual_seed takes a signed 64-bit seed
TIE_BREAK = ("select_topk: higher score first; equal scores -> the lower slot, i.e. the older position, first "
             "(live slots are in position order); empty slots are never chosen")
TOLERANCES = {"float64": {"atol": 1e-10, "rtol": 1e-8}, "float32": {"atol": 1e-5, "rtol": 1.3e-6},
              "bfloat16": {"atol": 1e-2, "rtol": 1.6e-2}, "integer": "exact"}

# Options that make each policy act on the small seeded cases (48-token prompts, 4 decode steps).
SMALL_CASE = {
    "full": (None, {}), "streaming": (16, {}), "h2o": (16, {}), "snapkv": (16, {"window": 4}),
    "pyramidkv": (16, {"window": 4}), "d2o": (0.3, {}), "corm": (None, {"w": 4, "r": 8}),
    "adakv-snapkv": (16, {"window": 4}), "adakv-pyramidkv": (16, {"window": 4}), "adakv-h2o": (16, {}),
}


def _small_model(seed: int):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=True)
    model = Llama(cfg).double()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.4)
    return model.eval()


def record_case(model, prompt: list[int], policy, new_tokens: int, layers: set[int] | None = None) -> Recorder:
    """Run prefill + greedy decode with a recording policy (reference attention path, no SDPA)."""
    rec = Recorder(policy, model.cfg.num_attention_heads, layers=layers)
    generate(model, [prompt], rec, max_new_tokens=new_tokens + 1, stop_ids=[], use_sdpa=False)
    return rec


def case_tensors(rec: Recorder) -> dict[str, torch.Tensor]:
    """Flatten a recording into named tensors: {phase}/L{layer}/{in|stats|out|probe}/{name}."""
    out = {}
    for ev in rec.events:
        base = f"{ev.phase}/L{ev.layer}"
        out.update({f"{base}/in/{k}": v for k, v in ev.before.items()})
        out.update({f"{base}/stats/{k}": v for k, v in ev.inputs.items()})
        out.update({f"{base}/out/{k}": v for k, v in ev.after.items()})
        out[f"{base}/probe/before"] = ev.probe_out_before
        out[f"{base}/probe/after"] = ev.probe_out_after
    return {k: v.contiguous().cpu() for k, v in out.items()}


def check_export_args(seed: int, n_cases: int, real_model: bool) -> None:
    """Refuse seeds and case counts that would fail later or write an empty golden set."""
    if n_cases < 0:
        raise BadInput(f"--cases must be >= 0, got {n_cases}")
    if n_cases == 0 and not real_model:
        raise BadInput("--cases 0 with --no-real-model would write a golden set with no cases; use --cases 1 or more")
    if seed < 0 or seed + max(n_cases, 1) - 1 > MAX_SEED:
        raise BadInput(f"--seed must be in 0..{MAX_SEED - max(n_cases, 1) + 1} (case i uses seed + i), got {seed}")


def prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Create out_dir; refuse a file, or a folder holding golden vectors unless `overwrite`."""
    if out_dir.exists() and not out_dir.is_dir():
        raise BadInput(f"--out {out_dir} is a file, not a folder; give a new or empty folder")
    held = sorted(f.name for f in out_dir.iterdir() if f.name == "manifest.json" or f.suffix == ".safetensors") \
        if out_dir.is_dir() and not overwrite else []
    if held:
        raise BadInput(f"--out {out_dir} already holds golden vectors ({', '.join(held[:3])}"
                       f"{', ...' if len(held) > 3 else ''}); pass --overwrite to replace them, or choose a new "
                       "or empty folder")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:                         # a parent is a file, no permission, read-only file system...
        raise BadInput(f"--out {out_dir}: cannot create the folder ({e.strerror or e})") from None


def remove_old_set(out_dir: Path) -> None:
    """Delete out_dir's manifest.json and the plain-named case files it lists (what --overwrite replaces)."""
    try:
        cases = json.loads((out_dir / "manifest.json").read_text()).get("cases") or []
    except (OSError, ValueError, AttributeError):  # unreadable or not a JSON object: only our files get replaced
        cases = []
    names = [c["file"] for c in cases if isinstance(c, dict) and isinstance(c.get("file"), str)
             and Path(c["file"]).name == c["file"]]
    for name in names + ["manifest.json"]:
        try:
            (out_dir / name).unlink(missing_ok=True)
        except OSError as e:
            raise BadInput(f"--out {out_dir}: cannot remove the old {name} ({e.strerror or e})") from None


def record_cases(make_policy, seed: int, n_cases: int, real_model: bool, real_layer: int) -> list[tuple]:
    """(name, description, recording, dtype) of each case: n_cases tiny seeded models, then one real-model layer."""
    cases = []
    for case_seed in range(seed, seed + n_cases):
        prompt = torch.randint(3, 64, (48,), generator=torch.Generator().manual_seed(case_seed)).tolist()
        rec = record_case(_small_model(case_seed), prompt, make_policy(), new_tokens=4)
        cases.append((f"small_seed{case_seed}", f"tiny random Llama (3 layers, Hq=4, Hkv=2, d=8), float64, seed "
                      f"{case_seed}, 48-token prompt, 4 greedy decode steps", rec, "float64"))
    if real_model:
        folder = ensure_default_model()
        model = load_model(folder, dtype=torch.float64)
        if not 0 <= real_layer < model.cfg.num_hidden_layers:
            raise BadInput(f"real_layer {real_layer} is not a layer of {folder} (0..{model.cfg.num_hidden_layers - 1})")
        text = Path("/usr/share/common-licenses/GPL-3")
        words = text.read_text() if text.exists() else "The quick brown fox jumps over the lazy dog. " * 40
        prompt = load_tokenizer(folder).encode(words)[:96]
        rec = record_case(model, prompt, make_policy(), new_tokens=2, layers={real_layer})
        cases.append((f"smollm2_layer{real_layer}", f"SmolLM2-135M-Instruct layer {real_layer} (Hq=9, Hkv=3, d=64), "
                      "float64, first 96 GPL-3 tokens, 2 greedy decode steps", rec, "float64"))
    return cases


def export(policy_name: str, out_dir: str | Path, seed: int = 0, n_cases: int = 2, real_model: bool = True,
           real_layer: int = 15, budget=None, options: dict | None = None, overwrite: bool = False) -> Path:
    """Write golden vectors for `policy_name` into out_dir; returns the manifest path."""
    check_export_args(seed, n_cases, real_model)
    torch.set_num_threads(1)                    # one thread: bit-reproducible float64 reductions
    out_dir = Path(out_dir)
    default_budget, default_opts = SMALL_CASE.get(policy_name, (0.5, {}))
    budget = default_budget if budget is None else budget
    opts = {**default_opts, **(options or {})}
    get_policy(policy_name, budget, **opts)     # unknown policy or bad options: refused before any file is touched
    prepare_out_dir(out_dir, overwrite)
    cases = record_cases(lambda: get_policy(policy_name, budget, **opts), seed, n_cases, real_model, real_layer)
    manifest = {"format_version": FORMAT_VERSION, "policy": policy_name, "budget": None if budget is None else
                str(budget), "options": opts, "seed": seed, "tie_break": TIE_BREAK, "tolerances": TOLERANCES,
                "roles": {"in": "store before the step (input)", "stats": "attention statistics given to the policy "
                          "(input)", "out": "store after the step (output)", "probe": "attention output of a fixed "
                          "probe query over the store before/after (output)"},
                "layout": "k, v: (B, Hkv, S, d) post-RoPE; pos: (B, Hkv, S) absolute positions, -1 = empty; "
                          "length: (B, Hkv); stat.*: (B, Hkv, S); colsum: (B, Hkv, G, S); last_rows: "
                          "(B, Hkv, G, w, S); probs: (B, Hkv, G, T, S); probe: (B, Hq, 1, d)",
                "cases": []}
    # Only now, with every case recorded, does an old set go: a failed export leaves it whole, a finished one leaves
    # no stale case file of it behind.
    remove_old_set(out_dir)
    for name, desc, rec, dtype in cases:
        tensors = case_tensors(rec)
        write(out_dir / f"{name}.safetensors", lambda f: save_file(tensors, f))
        manifest["cases"].append({"file": f"{name}.safetensors", "description": desc, "dtype": dtype,
                                  "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch."),
                                                  "role": k.split("/")[2]} for k, v in sorted(tensors.items())}})
    path = out_dir / "manifest.json"
    write(path, lambda f: Path(f).write_text(json.dumps(manifest, indent=1)))
    return path


def write(path: Path, save) -> None:
    """save(path), with a full disk or a read-only folder reported as a named error."""
    try:
        save(path)
    except (OSError, SafetensorError) as e:
        raise BadInput(f"--out {path.parent}: cannot write {path.name} ({getattr(e, 'strerror', None) or e})") \
            from None


def compare(golden: torch.Tensor, cand: torch.Tensor, tol: dict | str, live: torch.Tensor | None = None):
    """(max abs error, max rel error, passed) of a candidate tensor; only live rows of k/v when `live` is given.
    A NaN or infinity in the candidate passes only where the golden tensor holds the same value."""
    if golden.shape != cand.shape:
        return float("inf"), float("inf"), False
    if not golden.is_floating_point():
        diff = (golden != cand).sum().item()
        return float(diff), float(diff), diff == 0
    g, c = (golden.double(), cand.double()) if live is None else (golden.double()[live], cand.double()[live])
    if g.numel() == 0:
        return 0.0, 0.0, True
    err = (g - c).abs()
    same = (g == c) | (g.isnan() & c.isnan())
    # Only finite pairs go through the tolerance: atol + rtol * |inf| would let any value "match" an infinity.
    close = g.isfinite() & c.isfinite() & (err <= tol["atol"] + tol["rtol"] * g.abs())
    return err.max().item(), (err / g.abs().clamp_min(1e-30)).max().item(), bool(torch.all(same | close))


def read_manifest(golden_dir: Path) -> dict:
    """The golden set's manifest.json, checked for every key check() reads; a named error otherwise."""
    path, make = golden_dir / "manifest.json", "(make one with `minikv oracle export --out DIR`)"
    if not golden_dir.exists():
        raise NotFound(f"golden folder {golden_dir} not found {make}")
    if not golden_dir.is_dir():
        raise BadInput(f"golden folder {golden_dir} is a file, not a folder written by `minikv oracle export`")
    if not path.is_file():
        raise NotFound(f"{golden_dir} has no manifest.json, so it is not a golden set {make}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadInput(f"{path}: not valid JSON ({e})") from None
    except OSError as e:                         # unreadable (permissions, I/O error)
        raise BadInput(f"{path}: cannot read ({e.strerror or e})") from None

    def require(cond: bool, what: str) -> None:
        if not cond:
            raise BadInput(f"{path}: {what} (is this a manifest written by `minikv oracle export`?)")
    require(isinstance(manifest, dict), f"expected a JSON object, got {type(manifest).__name__}")
    missing = [k for k in ("format_version", "tolerances", "cases") if k not in manifest]
    require(not missing, f"missing key(s) {', '.join(missing)}")
    require(manifest["format_version"] == FORMAT_VERSION,
            f"format_version {manifest['format_version']!r}; this minikv reads format_version {FORMAT_VERSION}")
    require(isinstance(manifest["cases"], list) and manifest["cases"],
            "'cases' must be a non-empty list; a golden set with no cases checks nothing")
    tolerances = manifest["tolerances"] if isinstance(manifest["tolerances"], dict) else {}
    for i, case in enumerate(manifest["cases"]):         # a plain file name, numeric tolerances, tensors with roles
        require(isinstance(case, dict), f"cases[{i}] must be an object, got {type(case).__name__}")
        missing = [k for k in ("file", "dtype", "tensors") if k not in case]
        require(not missing, f"cases[{i}] is missing key(s) {', '.join(missing)}")
        f = case["file"]
        require(isinstance(f, str) and f.endswith(".safetensors") and Path(f).name == f,
                f"cases[{i}].file {f!r} must be a file name ending in .safetensors, inside the golden folder")
        tol = tolerances.get(case["dtype"]) if isinstance(case["dtype"], str) else None
        require(isinstance(tol, dict) and all(isinstance(tol.get(k), (int, float)) and tol[k] >= 0
                                              for k in ("atol", "rtol")),
                f"tolerances for cases[{i}].dtype {case['dtype']!r} must be an object with numbers atol, rtol >= 0")
        require(isinstance(case["tensors"], dict), f"cases[{i}].tensors must be an object")
        for name, meta in case["tensors"].items():
            require(isinstance(meta, dict) and isinstance(meta.get("role"), str),
                    f"cases[{i}].tensors[{name!r}] must be an object with a 'role'")
        require(any(m["role"] in CHECKED_ROLES for m in case["tensors"].values()),
                f"cases[{i}] ({f}) lists no out/ or probe/ tensor, so it checks nothing")
    return manifest


def load_tensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file; a missing, unreadable or corrupt file is a named error."""
    if not path.exists():
        raise NotFound(f"{what} file {path} not found")
    try:
        return load_file(path)
    except (SafetensorError, OSError) as e:      # truncated, not safetensors, a folder, unreadable
        raise BadInput(f"{what} file {path} is not a readable safetensors file ({e})") from None


def compare_case(golden_dir: Path, cand_dir: Path, case: dict, tol: dict, allow_missing: bool):
    """Rows (tensor, abs, rel, result) and counts for one case; a missing candidate file is one row."""
    gpath, cpath = golden_dir / case["file"], cand_dir / case["file"]
    gold = load_tensors(gpath, "golden")
    names = [n for n, m in case["tensors"].items() if m["role"] in CHECKED_ROLES]
    for name in names:                           # the golden file holds every checked tensor, with the listed shape
        if name not in gold:
            raise BadInput(f"golden file {gpath} lacks tensor {name!r} that manifest.json lists; re-export the set")
        if "shape" in case["tensors"][name] and list(gold[name].shape) != case["tensors"][name]["shape"]:
            raise BadInput(f"golden file {gpath}: tensor {name!r} has shape {list(gold[name].shape)}, manifest.json "
                           f"says {case['tensors'][name]['shape']}; re-export the set")
    counts = {"pass": 0, "fail": 0, "missing": 0, "ignored": 0}
    if not cpath.exists():
        counts["missing"] = len(names)
        return ([] if allow_missing else [("(whole file)", None, None, f"FAIL (file missing: {len(names)} tensors)")],
                counts)
    cand = load_tensors(cpath, "candidate")
    counts["ignored"] = len(set(cand) - set(case["tensors"]))
    rows = []
    for name in names:
        if name not in cand:
            counts["missing"] += 1
            rows += [] if allow_missing else [(name, None, None, "FAIL (missing)")]
            continue
        g, c = gold[name], cand[name]
        dt = lambda t: str(t.dtype).removeprefix("torch.")
        why = (f"shape {list(c.shape)} != golden {list(g.shape)}" if tuple(g.shape) != tuple(c.shape) else
               f"dtype {dt(c)} != golden {dt(g)}" if g.dtype != c.dtype else None)
        if why:
            counts["fail"] += 1
            rows.append((name, None, None, f"FAIL ({why})"))
            continue
        pos = gold.get(name.rsplit("/", 1)[0] + "/pos")
        live = pos >= 0 if name.endswith(("/k", "/v")) and pos is not None else None   # empty slots: garbage
        a, r, ok = compare(g, c, tol if g.is_floating_point() else "exact", live)
        counts["pass" if ok else "fail"] += 1
        nan = int((c if live is None else c[live]).isnan().sum()) if c.is_floating_point() and not ok else 0
        rows.append((name, a, r, "PASS" if ok else f"FAIL ({nan} NaN)" if nan else "FAIL"))
    return rows, counts


def check(golden_dir: str | Path, cand_dir: str | Path, allow_missing: bool = False, out=None) -> bool:
    """Compare every output tensor of the golden files with the candidate's; print a table and a summary; True if
    all pass: at least one tensor compared, none failed, none missing (unless allow_missing)."""
    golden_dir, cand_dir = Path(golden_dir), Path(cand_dir)
    manifest = read_manifest(golden_dir)
    if not cand_dir.exists():
        raise NotFound(f"candidate folder {cand_dir} not found (it should hold the candidate's "
                       f"{manifest['cases'][0]['file']} and the other case files)")
    if not cand_dir.is_dir():
        raise BadInput(f"candidate folder {cand_dir} is a file; give the folder that holds the .safetensors files")
    n = {"pass": 0, "fail": 0, "missing": 0, "ignored": 0}
    table = []
    for case in manifest["cases"]:            # every file is read before anything is printed: an error stands alone
        rows, counts = compare_case(golden_dir, cand_dir, case, manifest["tolerances"][case["dtype"]], allow_missing)
        table += [{"case": case["file"], "tensor": name, "max abs err": "-" if a is None else f"{a:.3g}",
                   "max rel err": "-" if r is None else f"{r:.3g}", "result": result} for name, a, r, result in rows]
        n = {k: n[k] + counts[k] for k in n}
    compared = n["pass"] + n["fail"]
    text = f"{compared} tensors compared: {n['pass']} PASS, {n['fail']} FAIL"
    if n["missing"]:
        text += f"; {n['missing']} not in the candidate ({'skipped: --allow-missing' if allow_missing else 'FAIL'})"
    if n["ignored"]:
        text += f"; {n['ignored']} candidate tensors not in the golden set ignored (misnamed?)"
    ok = compared > 0 and n["fail"] == 0 and (allow_missing or n["missing"] == 0)
    text += ("\nNOTHING COMPARED: the candidate holds none of the golden out/ and probe/ tensors" if compared == 0 else
             "\nALL PASS" if ok else "\nSOME FAILED")
    print(format_rows(table, ["case", "tensor", "max abs err", "max rel err", "result"]), text, sep="\n",
          file=out or sys.stdout)                # sys.stdout looked up now: callers may redirect it
    return ok


def cmd_oracle(args) -> int:
    if args.action == "export":
        path = export(args.policy, args.out, seed=args.seed, n_cases=args.cases, real_model=not args.no_real_model,
                      budget=args.budget, options=parse_options(args.option), overwrite=args.overwrite)
        print(f"wrote golden vectors: {path}")
        return 0
    return 0 if check(args.golden, args.candidate, allow_missing=args.allow_missing) else 1


def register(sub) -> None:
    p = sub.add_parser("oracle", help="golden vectors for kernel authors: export / check")
    osub = p.add_subparsers(dest="action", required=True)
    e = osub.add_parser("export", help="write golden inputs/outputs of every policy step")
    e.add_argument("--policy", required=True)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--cases", type=int, default=2, help="number of small seeded cases")
    e.add_argument("--budget", default=None)
    e.add_argument("--option", action="append", default=[], metavar="KEY=VALUE")
    e.add_argument("--no-real-model", action="store_true", help="skip the real-model layer case")
    e.add_argument("--out", required=True, help="a new or empty folder")
    e.add_argument("--overwrite", action="store_true",
                   help="replace the golden vectors already in --out (its manifest and the case files it lists)")
    c = osub.add_parser("check", help="compare a candidate's outputs with golden files")
    c.add_argument("golden")
    c.add_argument("candidate")
    c.add_argument("--allow-missing", action="store_true", help="only compare tensors the candidate has")
    p.set_defaults(func=cmd_oracle)
