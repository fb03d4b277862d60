"""Golden vectors for kernel authors: `minikv oracle export` and `minikv oracle check`.

export writes, for small seeded cases (a tiny random Llama in float64) and for one layer of the real default model,
every input and output of each policy step: the store before the step (keys, values, positions, statistics),
the attention statistics the policy was given (scores come from these), the store after the step (kept positions
per head, merged keys/values, updated statistics) and the attention output of a fixed probe query before and after.
One safetensors file per case plus manifest.json (shapes, dtypes, roles, tie-break rule, tolerances).

check compares a candidate directory holding safetensors files of the same names (with at least the `out/` and
`probe/` tensors) and prints per-tensor max abs / rel error and PASS/FAIL against the manifest's tolerances.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from .record import Recorder

FORMAT_VERSION = 1
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
    from .config import LlamaConfig
    from .model import Llama
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      rope_theta=10000.0)
    model = Llama(cfg).double()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.4)
    return model.eval()


def record_case(model, prompt: list[int], policy, new_tokens: int, layers: set[int] | None = None) -> Recorder:
    """Run prefill + greedy decode with a recording policy (reference attention path, no SDPA)."""
    from .generate import generate
    rec = Recorder(policy, layers=layers)
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


def export(policy_name: str, out_dir: str | Path, seed: int = 0, n_cases: int = 2, real_model: bool = True,
           real_layer: int = 15, budget=None, options: dict | None = None) -> Path:
    """Write golden vectors for `policy_name` into out_dir; returns the manifest path."""
    from safetensors.torch import save_file
    from .policies import get_policy
    torch.set_num_threads(1)                    # one thread: bit-reproducible float64 reductions
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    default_budget, default_opts = SMALL_CASE.get(policy_name, (0.5, {}))
    budget = default_budget if budget is None else budget
    opts = {**default_opts, **(options or {})}
    cases = []
    for i in range(n_cases):
        case_seed = seed + i
        model = _small_model(case_seed)
        prompt = torch.randint(3, 64, (48,), generator=torch.Generator().manual_seed(case_seed)).tolist()
        rec = record_case(model, prompt, get_policy(policy_name, budget, **opts), new_tokens=4)
        cases.append((f"small_seed{case_seed}", f"tiny random Llama (3 layers, Hq=4, Hkv=2, d=8), float64, seed "
                      f"{case_seed}, 48-token prompt, 4 greedy decode steps", rec, "float64"))
    if real_model:
        from .checkpoint import load_model
        from .convert import ensure_default_model
        from .tokenizer import load_tokenizer
        folder = ensure_default_model()
        model = load_model(folder, dtype=torch.float64)
        tok = load_tokenizer(folder)
        text = Path("/usr/share/common-licenses/GPL-3")
        words = text.read_text() if text.exists() else "The quick brown fox jumps over the lazy dog. " * 40
        prompt = tok.encode(words)[:96]
        rec = record_case(model, prompt, get_policy(policy_name, budget, **opts), new_tokens=2, layers={real_layer})
        cases.append((f"smollm2_layer{real_layer}", f"SmolLM2-135M-Instruct layer {real_layer} (Hq=9, Hkv=3, d=64), "
                      "float64, first 96 GPL-3 tokens, 2 greedy decode steps", rec, "float64"))
    manifest = {"format_version": FORMAT_VERSION, "policy": policy_name, "budget": None if budget is None else
                str(budget), "options": opts, "seed": seed, "tie_break": TIE_BREAK, "tolerances": TOLERANCES,
                "roles": {"in": "store before the step (input)", "stats": "attention statistics given to the policy "
                          "(input)", "out": "store after the step (output)", "probe": "attention output of a fixed "
                          "probe query over the store before/after (output)"},
                "layout": "k, v: (B, Hkv, S, d) post-RoPE; pos: (B, Hkv, S) absolute positions, -1 = empty; "
                          "length: (B, Hkv); stat.*: (B, Hkv, S); colsum: (B, Hkv, G, S); last_rows: "
                          "(B, Hkv, G, w, S); probs: (B, Hkv, G, T, S); probe: (B, Hq, 1, d)",
                "cases": []}
    for name, desc, rec, dtype in cases:
        tensors = case_tensors(rec)
        save_file(tensors, out_dir / f"{name}.safetensors")
        manifest["cases"].append({"file": f"{name}.safetensors", "description": desc, "dtype": dtype,
                                  "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch."),
                                                  "role": k.split("/")[2]} for k, v in sorted(tensors.items())}})
    path = out_dir / "manifest.json"
    path.write_text(json.dumps(manifest, indent=1))
    return path


def compare(golden: torch.Tensor, cand: torch.Tensor, tol: dict | str, live: torch.Tensor | None = None):
    """(max abs error, max rel error, passed) of a candidate tensor; only live rows of k/v when `live` is given."""
    if golden.shape != cand.shape:
        return float("inf"), float("inf"), False
    if not golden.is_floating_point():
        diff = (golden != cand).sum().item()
        return float(diff), float(diff), diff == 0
    g, c = golden.double(), cand.double()
    if live is not None:
        g, c = g[live], c[live]
    if g.numel() == 0:
        return 0.0, 0.0, True
    err = (g - c).abs()
    rel = err / g.abs().clamp_min(1e-30)
    ok = bool(torch.all(err <= tol["atol"] + tol["rtol"] * g.abs()))
    return err.max().item(), rel.max().item(), ok


def check(golden_dir: str | Path, cand_dir: str | Path, allow_missing: bool = False, out=sys.stdout) -> bool:
    """Compare every output tensor of the golden files with the candidate's; print a table; True if all pass."""
    from safetensors.torch import load_file
    golden_dir, cand_dir = Path(golden_dir), Path(cand_dir)
    manifest = json.loads((golden_dir / "manifest.json").read_text())
    all_ok = True
    print(f"| case | tensor | max abs err | max rel err | result |\n|---|---|---|---|---|", file=out)
    for case in manifest["cases"]:
        gold = load_file(golden_dir / case["file"])
        cpath = cand_dir / case["file"]
        cand = load_file(cpath) if cpath.exists() else {}
        tol = manifest["tolerances"][case["dtype"]]
        for name, meta in case["tensors"].items():
            if meta["role"] not in ("out", "probe"):
                continue
            if name not in cand:
                if not allow_missing:
                    all_ok = False
                    print(f"| {case['file']} | {name} | - | - | FAIL (missing) |", file=out)
                continue
            live = None
            if name.endswith("/k") or name.endswith("/v"):
                live = gold[name.rsplit("/", 1)[0] + "/pos"] >= 0
            g = gold[name]
            t = manifest["tolerances"]["integer"] if not g.is_floating_point() else tol
            a, r, ok = compare(g, cand[name], t, live)
            all_ok &= ok
            print(f"| {case['file']} | {name} | {a:.3g} | {r:.3g} | {'PASS' if ok else 'FAIL'} |", file=out)
    print("ALL PASS" if all_ok else "SOME FAILED", file=out)
    return all_ok


def cmd_oracle(args) -> int:
    from .cli import parse_options
    if args.action == "export":
        path = export(args.policy, args.out, seed=args.seed, n_cases=args.cases, real_model=not args.no_real_model,
                      budget=args.budget, options=parse_options(args.option))
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
    e.add_argument("--out", required=True)
    c = osub.add_parser("check", help="compare a candidate's outputs with golden files")
    c.add_argument("golden")
    c.add_argument("candidate")
    c.add_argument("--allow-missing", action="store_true", help="only compare tensors the candidate has")
    p.set_defaults(func=cmd_oracle)
