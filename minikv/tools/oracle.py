"""Golden vectors for kernel authors (train_free.md §11): `minikv oracle export` writes every input and output of each
policy step, per case a safetensors file, plus manifest.json; `minikv oracle check` compares a candidate's files
within the manifest's tolerances, and passes only when at least one tensor was compared and all passed."""
from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import torch
from safetensors import SafetensorError         # save_file / load_file report I/O failures as this, not OSError
from safetensors.torch import load_file, save_file

from minikv.config import LlamaConfig
from minikv.errors import BadInput, NotFound
from minikv.io.checkpoint import load_model
from minikv.io.convert import ensure_default_model
from minikv.io.tokenizer import load_tokenizer
from minikv.model import Llama
from minikv.policies import get_policy
from minikv.tools.common import count_arg, format_rows, parse_options, seed_arg
from minikv.tools.trace import Recorder, record

FORMAT_VERSION = 1
REAL_LAYER = 15                                 # the default model's layer recorded by the real-model case
CHECKED_ROLES = ("out", "probe")               # what a candidate must reproduce; in/stats are its inputs
TIE_BREAK = ("select_topk: higher score first; equal scores -> the older (smaller) position first (slots are in any "
             "order: the rule reads pos); empty slots are never chosen")
TOLERANCES = {"float64": {"atol": 1e-10, "rtol": 1e-8}, "float32": {"atol": 1e-5, "rtol": 1.3e-6},
              "bfloat16": {"atol": 1e-2, "rtol": 1.6e-2}, "integer": "exact"}
EXACT = {"atol": 0, "rtol": 0}                  # integers (compared as float64: exact below 2**53)
ROLES = {"in": "store before the step (input)", "stats": "attention statistics given to the policy (input)",
         "out": "store after the step (output)", "probe": "a probe query's attention output before/after (output)"}
LAYOUT = ("k, v: (B, Hkv, S, d) post-RoPE; pos: (B, Hkv, S) absolute positions, -1 = empty; length: (B, Hkv); "
          "stat.*: (B, Hkv, S); colsum: (B, Hkv, G, S); last_rows: (B, Hkv, G, w, S); probs: (B, Hkv, G, T, S); "
          "probe: (B, Hq, 1, d)")

# Budget and options that make each policy act on the small seeded cases (48-token prompts, 4 decode steps).
SMALL_CASE = {"full": (None, {}), "streaming": (16, {}), "h2o": (16, {}), "snapkv": (16, {"window": 4}),
              "pyramidkv": (16, {"window": 4}), "d2o": (0.3, {}), "corm": (None, {"w": 4, "r": 8}),
              "adakv-snapkv": (16, {"window": 4}), "adakv-pyramidkv": (16, {"window": 4}), "adakv-h2o": (16, {})}

def small_model(seed: int) -> Llama:
    """A tiny random float64 Llama (3 layers, Hq=4, Hkv=2, d=8), weights ~ N(0, 0.4²) from `seed`."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=True)
    model = Llama(cfg).double()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.4)
    return model.eval()

def case_tensors(rec: Recorder) -> dict[str, torch.Tensor]:
    """Flatten a recording into named tensors: {phase}/L{layer}/{in|stats|out|probe}/{name}."""
    out = {}
    for ev in rec.events:
        probe = {"before": ev.probe_out_before, "after": ev.probe_out_after}
        for role, tensors in (("in", ev.before), ("stats", ev.inputs), ("out", ev.after), ("probe", probe)):
            out.update({f"{ev.phase}/L{ev.layer}/{role}/{k}": v for k, v in tensors.items()})
    return {k: v.contiguous().cpu() for k, v in out.items()}

def record_cases(make_policy, seed: int, n_cases: int, real_model: bool) -> list[tuple]:
    """(name, description, recording) of n_cases tiny seeded models (max_new_tokens 5: 4 decode steps after the
    prefill's token), then of one real-model layer."""
    cases = []
    for s in range(seed, seed + n_cases):
        prompt = torch.randint(3, 64, (48,), generator=torch.Generator().manual_seed(s)).tolist()
        cases.append((f"small_seed{s}", f"tiny random Llama (3 layers, Hq=4, Hkv=2, d=8), float64, seed {s}, "
                      "48-token prompt, 4 greedy decode steps", record(small_model(s), prompt, make_policy(), 5)[0]))
    if real_model:
        folder = ensure_default_model()
        model, text = load_model(folder, dtype=torch.float64), Path("/usr/share/common-licenses/GPL-3")
        words = text.read_text() if text.exists() else "The quick brown fox jumps over the lazy dog. " * 40
        rec, _ = record(model, load_tokenizer(folder).encode(words)[:96], make_policy(), 3, layers={REAL_LAYER})
        cases.append((f"smollm2_layer{REAL_LAYER}", f"SmolLM2-135M-Instruct layer {REAL_LAYER} (Hq=9, Hkv=3, d=64), "
                      "float64, first 96 GPL-3 tokens, 2 greedy decode steps", rec))
    return cases

def write(path: Path, save, what: str = "write") -> None:
    """save(path), with a full disk or a read-only folder reported as a named error."""
    try:
        save(path)
    except (OSError, SafetensorError) as e:
        raise BadInput(f"--out {path.parent}: cannot {what} {path.name} ({getattr(e, 'strerror', 0) or e})") from None

def export(policy_name: str, out_dir: str | Path, seed: int = 0, n_cases: int = 2, real_model: bool = True,
           budget=None, options: dict | None = None, overwrite: bool = False) -> Path:
    """Write golden vectors for `policy_name` into out_dir (one holding some is refused unless `overwrite`: they are
    replaced); returns the manifest path."""
    if n_cases == 0 and not real_model:
        raise BadInput("--cases 0 with --no-real-model would write a golden set with no cases; use --cases 1 or more")
    if seed + n_cases > 2 ** 64:
        raise BadInput(f"--seed {seed} with --cases {n_cases}: case i uses seed + i, which must stay below 2**64")
    torch.set_num_threads(1)                    # one thread: bit-reproducible float64 reductions
    out_dir = Path(out_dir)
    default_budget, opts = SMALL_CASE.get(policy_name, (0.5, {}))
    budget, opts = default_budget if budget is None else budget, {**opts, **(options or {})}
    get_policy(policy_name, budget, **opts)     # unknown policy or bad options: refused before any file is touched
    old_set = sorted(f for f in out_dir.glob("*") if f.name == "manifest.json" or f.suffix == ".safetensors")
    if old_set and not overwrite:
        raise BadInput(f"--out {out_dir} already holds golden vectors ({', '.join(f.name for f in old_set[:3])}); "
                       "pass --overwrite to replace them, or choose a new or empty folder")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:                         # it or a parent is a file, no permission, read-only file system...
        raise BadInput(f"--out {out_dir}: cannot create the folder ({e.strerror or e})") from None
    cases = record_cases(lambda: get_policy(policy_name, budget, **opts), seed, n_cases, real_model)
    manifest = {"format_version": FORMAT_VERSION, "policy": policy_name, "budget": None if budget is None else
                str(budget), "options": opts, "seed": seed, "tie_break": TIE_BREAK, "tolerances": TOLERANCES,
                "roles": ROLES, "layout": LAYOUT, "cases": []}
    for f in old_set:            # only now, with every case recorded: a failed export leaves the old set whole
        write(f, Path.unlink, "remove the old")
    for name, desc, rec in cases:
        tensors = case_tensors(rec)
        write(out_dir / f"{name}.safetensors", lambda f: save_file(tensors, f))
        manifest["cases"].append({"file": f"{name}.safetensors", "description": desc, "dtype": "float64",
                                  "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch."),
                                                  "role": k.split("/")[2]} for k, v in sorted(tensors.items())}})
    path = out_dir / "manifest.json"
    write(path, lambda f: f.write_text(json.dumps(manifest, indent=1)))
    return path

def compare(golden: torch.Tensor, cand: torch.Tensor, tol: dict, live: torch.Tensor | None = None):
    """(max abs error, max rel error, passed) of a candidate tensor of the golden one's shape; only live rows of k/v
    when `live` is given. A NaN or infinity in the candidate passes only where the golden tensor holds the same."""
    g, c = (golden.double(), cand.double()) if live is None else (golden.double()[live], cand.double()[live])
    if g.numel() == 0:
        return 0.0, 0.0, True
    err, same = (g - c).abs(), (g == c) | (g.isnan() & c.isnan())
    # Only finite pairs go through the tolerance: atol + rtol * |inf| would let any value "match" an infinity.
    close = g.isfinite() & c.isfinite() & (err <= tol["atol"] + tol["rtol"] * g.abs())
    return err.max().item(), (err / g.abs().clamp_min(1e-30)).max().item(), bool(torch.all(same | close))

def read_manifest(golden_dir: Path) -> dict:
    """The golden set's manifest.json, checked for every key check() reads; a named error otherwise."""
    path = golden_dir / "manifest.json"
    if not path.is_file():
        raise NotFound(f"{path} not found: {golden_dir} is not a folder written by `minikv oracle export`")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:           # unreadable, not UTF-8, not JSON
        raise BadInput(f"{path}: not valid JSON, or unreadable ({e})") from None

    def require(cond: bool, what: str) -> None:
        if not cond:
            raise BadInput(f"{path}: {what} (is this a manifest written by `minikv oracle export`?)")
    keys = manifest.keys() if isinstance(manifest, dict) else ()
    missing = [k for k in ("format_version", "tolerances", "cases") if k not in keys]
    require(not missing, f"expected a JSON object with the key(s) {', '.join(missing)}, got {type(manifest).__name__}")
    require(manifest["format_version"] == FORMAT_VERSION,
            f"format_version {manifest['format_version']!r}; this minikv reads format_version {FORMAT_VERSION}")
    require(isinstance(manifest["cases"], list) and manifest["cases"], "'cases' must be a non-empty list")
    for i, case in enumerate(manifest["cases"]):
        try:                                     # a file name, numeric tolerances >= 0 for its dtype, tensor roles
            tol, roles = manifest["tolerances"][case["dtype"]], {m["role"] for m in case["tensors"].values()}
            f, tol_ok = case["file"], tol["atol"] >= 0 and tol["rtol"] >= 0
        except (LookupError, TypeError, AttributeError) as e:
            raise BadInput(f"{path}: cases[{i}] is malformed ({type(e).__name__}: {e}); a case needs file, dtype "
                           "(a key of tolerances, with atol and rtol) and tensors with roles") from None
        require(tol_ok, f"tolerances for cases[{i}].dtype {case['dtype']!r} must be >= 0")
        require(isinstance(f, str) and f.endswith(".safetensors") and Path(f).name == f,
                f"cases[{i}].file {f!r} must be a file name ending in .safetensors, inside the golden folder")
        require(roles & set(CHECKED_ROLES), f"cases[{i}] ({f}) lists no out/ or probe/ tensor, so it checks nothing")
    return manifest

def load_tensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file; a missing, unreadable or corrupt file is a named error."""
    try:
        return load_file(path)
    except (SafetensorError, OSError) as e:      # missing, truncated, not safetensors, a folder, unreadable
        raise BadInput(f"{what} file {path}: not found or not a readable safetensors file ({e})") from None

def compare_case(golden_dir: Path, cand_dir: Path, case: dict, tol: dict, allow_missing: bool):
    """Rows (case, tensor, abs, rel, result) and counts for one case; a missing candidate file is one row."""
    f, gpath, cpath = case["file"], golden_dir / case["file"], cand_dir / case["file"]
    gold = load_tensors(gpath, "golden")
    names = [n for n, m in case["tensors"].items() if m["role"] in CHECKED_ROLES]
    for name in names:
        if name not in gold:
            raise BadInput(f"golden file {gpath} lacks tensor {name!r} that manifest.json lists; re-export the set")
    if not cpath.exists():
        rows = [] if allow_missing else [(f, "(whole file)", "-", "-", f"FAIL (file missing: {len(names)} tensors)")]
        return rows, Counter(missing=len(names))
    cand, rows = load_tensors(cpath, "candidate"), []
    counts = Counter(ignored=len(set(cand) - set(case["tensors"])))
    for name in names:
        g, c = gold[name], cand.get(name)
        if c is None:
            counts["missing"] += 1
            rows += [] if allow_missing else [(f, name, "-", "-", "FAIL (missing)")]
            continue
        why = (f"shape {list(c.shape)} != golden {list(g.shape)}" if g.shape != c.shape else
               f"dtype {str(c.dtype)[6:]} != golden {str(g.dtype)[6:]}" if g.dtype != c.dtype else None)
        pos = gold.get(name.rsplit("/", 1)[0] + "/pos")
        live = pos >= 0 if name.endswith(("/k", "/v")) and pos is not None else None   # empty slots: garbage
        a, r, ok = ("-", "-", False) if why else compare(g, c, tol if g.is_floating_point() else EXACT, live)
        counts["pass" if ok else "fail"] += 1
        rows.append((f, name, a, r, "PASS" if ok else f"FAIL ({why})" if why else "FAIL"))
    return rows, counts

def check(golden_dir: str | Path, cand_dir: str | Path, allow_missing: bool = False, out=None) -> bool:
    """Print a table comparing the candidate's out/ and probe/ tensors with the golden ones, and a summary. True when
    at least one tensor was compared, none failed and none is missing (unless allow_missing)."""
    golden_dir, cand_dir = Path(golden_dir), Path(cand_dir)
    manifest = read_manifest(golden_dir)
    if not cand_dir.is_dir():
        error, what = (BadInput, "is a file") if cand_dir.exists() else (NotFound, "not found")
        raise error(f"candidate folder {cand_dir} {what}; give the folder that holds the candidate's "
                    f"{manifest['cases'][0]['file']} and other case files")
    n, table = Counter(), []
    for case in manifest["cases"]:            # every file is read before anything is printed: an error stands alone
        rows, counts = compare_case(golden_dir, cand_dir, case, manifest["tolerances"][case["dtype"]], allow_missing)
        table, n = table + rows, n + counts
    compared = n["pass"] + n["fail"]
    text = f"{compared} tensors compared: {n['pass']} PASS, {n['fail']} FAIL"
    if n["missing"]:
        text += f"; {n['missing']} not in the candidate ({'skipped: --allow-missing' if allow_missing else 'FAIL'})"
    if n["ignored"]:
        text += f"; {n['ignored']} candidate tensors not in the golden set ignored (misnamed?)"
    ok = compared > 0 and n["fail"] == 0 and (allow_missing or n["missing"] == 0)
    text += ("\nNOTHING COMPARED: the candidate holds none of the golden out/ and probe/ tensors" if compared == 0 else
             "\nALL PASS" if ok else "\nSOME FAILED")
    columns = ["case", "tensor", "max abs err", "max rel err", "result"]
    print(format_rows([dict(zip(columns, row)) for row in table], columns, digits=3), text, sep="\n",
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
    e.add_argument("--seed", type=seed_arg, default=0, help="small case i uses seed + i")
    e.add_argument("--cases", type=count_arg, default=2, help="number of small seeded cases")
    e.add_argument("--budget", default=None)
    e.add_argument("--option", action="append", default=[], metavar="KEY=VALUE")
    e.add_argument("--no-real-model", action="store_true", help="skip the real-model layer case")
    e.add_argument("--out", required=True, help="a new or empty folder")
    e.add_argument("--overwrite", action="store_true", help="replace the manifest.json and *.safetensors in --out")
    c = osub.add_parser("check", help="compare a candidate's outputs with golden files")
    c.add_argument("golden")
    c.add_argument("candidate")
    c.add_argument("--allow-missing", action="store_true", help="only compare tensors the candidate has")
    p.set_defaults(func=cmd_oracle)
