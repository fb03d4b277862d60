"""Ada-KV vs uniform budgets on the default model: passkey and needle retrieval, question-aware and -agnostic.

For each average budget (entries per KV head, window included) it runs SnapKV vs Ada-SnapKV and PyramidKV vs
Ada-PyramidKV on
  passkey: ~3k tokens of filler with "The pass key is NNNNN. Remember it. NNNNN is the pass key." at 5 depths;
           correct iff the key appears in the first 8 generated tokens (greedy);
  needle:  "The secret ingredient of the recipe is cardamom." hidden at 5 depths in GPL-3 text (~3k tokens);
           correct iff "cardamom" appears in the first 8 generated tokens.
Question-aware = the question is inside the compressed prompt; question-agnostic = the context is compressed and
the question appended afterwards (generate(..., question=...)). Both modes see the same token sequence.
It also records, for the passkey at depth 0.5 (question-aware), the Ada-KV bound report (Theorem 3.1) per policy.

    python -m minikv.experiments.adakv_compare                      # CPU, one thread, writes results/adakv.{json,md}
    python -m minikv.experiments.adakv_compare --device cuda --out-dir /tmp/x
    python -m minikv.experiments.adakv_compare --render results/adakv.json    # re-render the markdown from a JSON record
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import re
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # also runnable as a file

from minikv.bounds import bound_report                      # noqa: E402
from minikv.generate import generate                        # noqa: E402
from minikv.policies import get_policy                      # noqa: E402

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
PASSKEY = "The pass key is {key}. Remember it. {key} is the pass key. "
PASSKEY_Q = "What is the pass key? The pass key is"
NEEDLE = " The secret ingredient of the recipe is cardamom. "
NEEDLE_Q = "\n\nQuestion: What is the secret ingredient of the recipe?\nAnswer: The secret ingredient of the recipe is"
NEEDLE_ANSWER = "cardamom"
GPL3 = Path("/usr/share/common-licenses/GPL-3")
PAIRS = [("snapkv", "adakv-snapkv"), ("pyramidkv", "adakv-pyramidkv")]


# ---- prompts ------------------------------------------------------------------------------------------------
def passkey_prompt(tok, n_tokens: int, depth: float, key: str) -> tuple[list[int], list[int]]:
    """(context ids, question ids): filler repeated to ~n_tokens, the key sentence after a fraction `depth` of it."""
    per = len(tok.encode(FILLER))
    reps = max(1, (n_tokens - len(tok.encode(PASSKEY.format(key=key) + PASSKEY_Q))) // per)
    at = round(depth * reps)
    context = FILLER * at + PASSKEY.format(key=key) + FILLER * (reps - at)
    return tok.encode(context), tok.encode(PASSKEY_Q)


def needle_prompt(tok, n_tokens: int, depth: float, text: str) -> tuple[list[int], list[int]]:
    """(context ids, question ids): GPL-3 sentences up to ~n_tokens, the needle inserted at a sentence boundary."""
    sentences = [s + "." for s in text.replace("\n", " ").split(".") if s.strip()]
    budget = n_tokens - len(tok.encode(NEEDLE + NEEDLE_Q))
    kept, used = [], 0
    for s in sentences:
        c = len(tok.encode(s))
        if used + c > budget:
            break
        kept.append(s)
        used += c
    at = round(depth * len(kept))
    context = "".join(kept[:at]) + NEEDLE + "".join(kept[at:])
    return tok.encode(context.strip()), tok.encode(NEEDLE_Q)


def haystack_text() -> str:
    if GPL3.exists():
        return " ".join(GPL3.read_text().split())
    # No license file on this machine: a generated haystack (noted in the record).
    rng = random.Random(0)
    words = "system data value model record table user file network process memory signal output".split()
    return " ".join(" ".join(rng.choice(words) for _ in range(12)).capitalize() + "." for _ in range(2000))


# ---- one run ------------------------------------------------------------------------------------------------
def parse_policy(spec: str) -> tuple[str, dict]:
    """'adakv-snapkv:variant=exact,alpha=0.1' -> ('adakv-snapkv', {'variant': 'exact', 'alpha': 0.1})."""
    name, _, rest = spec.partition(":")
    opts = {}
    for kv in filter(None, rest.split(",")):
        k, _, v = kv.partition("=")
        try:
            opts[k] = int(v)
        except ValueError:
            try:
                opts[k] = float(v)
            except ValueError:
                opts[k] = v
    return name, opts


def matched_digits(key: str, text: str) -> int:
    """How many leading characters of the key the first number in `text` reproduces (a finer passkey score)."""
    m = re.search(r"\d+", text)
    if m is None:
        return 0
    n = 0
    for a, b in zip(key, m.group()):
        if a != b:
            break
        n += 1
    return n


def run_one(model, tok, ctx: list[int], q: list[int], spec: str, budget, mode: str, answer: str) -> dict:
    name, opts = parse_policy(spec)
    policy = get_policy(name, budget, **opts)
    t0 = time.perf_counter()
    if mode == "aware":
        r = generate(model, [ctx + q], policy, max_new_tokens=8, stop_ids=[])
    else:
        r = generate(model, [ctx], policy, max_new_tokens=8, stop_ids=[], question=[q])
    text = tok.decode(r.tokens[0])
    rec = {"policy": spec, "budget": budget, "mode": mode, "correct": answer.lower() in text.lower(),
           "output": text, "prompt_tokens": len(ctx) + len(q), "cache_ratio": round(r.cache_ratio, 5),
           "kv_bytes_live": r.kv_bytes_live, "kv_bytes_allocated": r.kv_bytes_allocated,
           "kv_bytes_full": r.kv_bytes_full, "seconds": round(time.perf_counter() - t0, 3)}
    if answer.isdigit():
        rec["matched_digits"] = matched_digits(answer, text)
    heads = r.policy_report.get("head_budgets")
    if heads:   # spread of Ada-KV's per-head budgets: mean over layers of (max - min) across KV heads
        spreads = [max(v[0]) - min(v[0]) for v in heads.values()]
        rec["head_budget_spread_mean"] = round(sum(spreads) / len(spreads), 2)
        rec["head_budget_min"] = min(min(v[0]) for v in heads.values())
        rec["head_budget_max"] = max(max(v[0]) for v in heads.values())
    return rec


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(REPO / "weights" / "smollm2-135m-instruct"))
    ap.add_argument("--budgets", type=int, nargs="+", default=[128, 256, 512])
    ap.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    ap.add_argument("--length", type=int, default=3000, help="approximate prompt length in tokens")
    ap.add_argument("--tasks", nargs="+", default=["passkey", "needle"])
    ap.add_argument("--modes", nargs="+", default=["aware", "agnostic"])
    ap.add_argument("--extra", nargs="*", default=[], help="more policy specs, e.g. adakv-snapkv:variant=exact")
    ap.add_argument("--no-bounds", action="store_true", help="skip the bound report")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--out-dir", default=str(REPO / "results"))
    ap.add_argument("--render", help="only re-render the markdown from this JSON record")
    args = ap.parse_args(argv)
    if args.render:
        record = json.loads(Path(args.render).read_text())
        out = Path(args.render).with_suffix(".md")
        out.write_text(render_markdown(record))
        print(f"wrote {out}")
        return 0

    from minikv.io.checkpoint import load_model
    from minikv.io.tokenizer import load_tokenizer
    torch.set_num_threads(args.threads)
    model = load_model(args.model).to(args.device)
    tok = load_tokenizer(args.model)
    rng = random.Random(args.seed)
    haystack = haystack_text()
    specs = [p for pair in PAIRS for p in pair] + list(args.extra)
    runs, bounds = [], []
    t_start = time.perf_counter()
    for task in args.tasks:
        for depth in args.depths:
            key = str(rng.randint(10000, 99999))
            if task == "passkey":
                ctx, q = passkey_prompt(tok, args.length, depth, key)
                answer = key
            else:
                ctx, q = needle_prompt(tok, args.length, depth, haystack)
                answer = NEEDLE_ANSWER
            base = {"task": task, "depth": depth, "answer": answer}
            full = run_one(model, tok, ctx, q, "full", None, "aware", answer)
            runs.append({**base, **full, "mode": "both"})   # the full cache is the same in both modes
            print(f"{task} depth {depth:.2f} ({len(ctx) + len(q)} tok) full: {full['correct']} {full['output']!r}",
                  flush=True)
            for budget in args.budgets:
                for mode in args.modes:
                    for spec in specs:
                        rec = {**base, **run_one(model, tok, ctx, q, spec, budget, mode, answer)}
                        runs.append(rec)
                        print(f"  {mode:8s} {budget:4d} {spec:18s} {rec['correct']!s:5s} {rec['output']!r}",
                              flush=True)
            if task == "passkey" and depth == 0.5 and not args.no_bounds:
                for budget in args.budgets:
                    for spec in specs:
                        name, opts = parse_policy(spec)
                        rows = bound_report(model, ctx + q, get_policy(name, budget, **opts))
                        bounds.append({"policy": spec, "budget": budget, "depth": depth,
                                       "true_l1_sum": sum(r["true_l1"] for r in rows),
                                       "per_head_bound_sum": sum(r["per_head_bound"] for r in rows),
                                       "global_bound_sum": sum(r["global_bound"] for r in rows),
                                       "kept_mass_mean": sum(r["kept_mass_mean"] for r in rows) / len(rows),
                                       "layers": rows})
    record = {
        "command": "python -m minikv.experiments.adakv_compare " + " ".join(sys.argv[1:]),
        "model": Path(args.model).name, "device": _device_name(args.device), "threads": args.threads,
        "torch": torch.__version__, "python": platform.python_version(), "dtype": str(model.dtype),
        "length": args.length, "budgets": args.budgets, "depths": args.depths, "seed": args.seed,
        "haystack": str(GPL3) if GPL3.exists() else "generated", "policies": specs,
        "adakv_defaults": {"alpha": 0.2, "variant": "official", "window": 32, "kernel": 7},
        "wall_seconds": round(time.perf_counter() - t_start, 1), "runs": runs, "bounds": bounds,
    }
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "adakv.json").write_text(json.dumps(record, indent=1))
    (out_dir / "adakv.md").write_text(render_markdown(record))
    print(f"wrote {out_dir / 'adakv.json'} and {out_dir / 'adakv.md'} in {record['wall_seconds']} s")
    return 0


def _device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()})"


# ---- markdown -----------------------------------------------------------------------------------------------
def render_markdown(record: dict) -> str:
    runs = record["runs"]
    depths = record["depths"]
    lines = ["# Ada-KV vs uniform per-head budgets (SmolLM2-135M-Instruct)", "",
             f"Command: `{record['command']}`  ",
             f"Device: {record['device']}, {record['dtype']}, torch {record['torch']}; prompts ~{record['length']} "
             f"tokens; greedy, 8 new tokens; haystack {record['haystack']}; Ada-KV alpha "
             f"{record['adakv_defaults']['alpha']}, variant {record['adakv_defaults']['variant']}, window 32, "
             f"kernel 7. Budget = average entries per KV head per layer, window included.", ""]
    if record.get("notes"):                 # interpretation, added to the JSON record by hand after the run
        lines += ["## Summary", ""] + [f"- {n}" for n in record["notes"]] + [""]
    for task in dict.fromkeys(r["task"] for r in runs):
        full = [r for r in runs if r["task"] == task and r["policy"] == "full"]
        lines += [f"## {task}", "",
                  f"Full cache: {sum(r['correct'] for r in full)}/{len(full)} correct "
                  f"(depths {', '.join(f'{d:g}' for d in depths)}; prompt {full[0]['prompt_tokens']} tokens).", ""]
        for mode in ("aware", "agnostic"):
            sel = [r for r in runs if r["task"] == task and r["mode"] == mode]
            if not sel:
                continue
            budgets = sorted({r["budget"] for r in sel})
            policies = list(dict.fromkeys(r["policy"] for r in sel))

            def policy_by_budget(cell) -> list[str]:
                """A policy x budget table whose entries are cell(records of that policy and budget)."""
                rows = ["| policy | " + " | ".join(f"budget {b}" for b in budgets) + " |",
                        "|---|" + "---|" * len(budgets)]
                for p in policies:
                    rows.append(f"| {p} | " + " | ".join(
                        cell([r for r in sel if r["policy"] == p and r["budget"] == b]) for b in budgets) + " |")
                return rows

            lines += [f"### question-{mode}: correct / {len(depths)} depths (cache ratio)", ""]
            lines += policy_by_budget(lambda rs: f"{sum(r['correct'] for r in rs)}/{len(rs)} "
                                                 f"({sum(r['cache_ratio'] for r in rs) / len(rs):.3f})")
            if all("matched_digits" in r for r in sel):
                lines += ["", f"Mean leading key digits reproduced (of {len(sel[0]['answer'])}):", ""]
                lines += policy_by_budget(lambda rs: f"{sum(r['matched_digits'] for r in rs) / len(rs):.1f}")
            lines += ["", "Per depth (1 = correct):", "",
                      "| policy | budget | " + " | ".join(f"{d:g}" for d in depths) + " |",
                      "|---|---|" + "---|" * len(depths)]
            for p in policies:
                for b in budgets:
                    marks = []
                    for d in depths:
                        rs = [r for r in sel if r["policy"] == p and r["budget"] == b and r["depth"] == d]
                        marks.append(str(int(rs[0]["correct"])) if rs else "-")
                    lines.append(f"| {p} | {b} | " + " | ".join(marks) + " |")
            lines.append("")
    # memory: live vs allocated (padded to the longest head) for one prompt
    lines += ["## KV memory (passkey, depth 0.5, question-aware)", "",
              "| policy | budget | live MiB | allocated MiB | full MiB | per-head budget min..max (mean spread) |",
              "|---|---|---|---|---|---|"]
    mib = 1 << 20
    for r in runs:
        if r["task"] == "passkey" and r["depth"] == 0.5 and r["mode"] in ("aware", "both"):
            spread = (f"{r['head_budget_min']}..{r['head_budget_max']} ({r['head_budget_spread_mean']})"
                      if "head_budget_min" in r else "uniform")
            lines.append(f"| {r['policy']} | {r['budget'] or '-'} | {r['kv_bytes_live'] / mib:.2f} | "
                         f"{r['kv_bytes_allocated'] / mib:.2f} | {r['kv_bytes_full'] / mib:.2f} | {spread} |")
    if record.get("bounds"):
        lines += ["", "## Theorem 3.1 on the real prompt (passkey depth 0.5, question-aware, last prompt query)", "",
                  f"Sums over the {len(record['bounds'][0]['layers'])} layers of the true L1 error of the attention "
                  "output, the per-head bound and the global bound, and the mean kept attention mass F_i.", "",
                  "| policy | budget | true L1 | per-head bound | global bound | mean F_i |", "|---|---|---|---|---|---|"]
        for b in record["bounds"]:
            lines.append(f"| {b['policy']} | {b['budget']} | {b['true_l1_sum']:.3f} | {b['per_head_bound_sum']:.2f} | "
                         f"{b['global_bound_sum']:.2f} | {b['kept_mass_mean']:.4f} |")
    lines += ["", f"Total wall time {record['wall_seconds']} s.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
