"""Compare D2O with full / streaming / H2O on the default model: decode-time perplexity and passkey retrieval.

Perplexity: GPL-3 text, the first `--ppl-prompt` tokens are the prompt (prefilled through the policy), the next
`--ppl-score` tokens are scored one by one with teacher forcing: each true token is fed as a single-token forward
call through the policy's `after_step` hook, so eviction (and D2O's merging) is active while scoring.
Passkey: filler sentences repeated to about `--passkey-tokens` tokens, the pass-key sentence inserted at a depth,
the question at the end; greedy decoding; correct if the 5 digits appear in the answer.

    python3 -m minikv.experiments.d2o_compare                     # writes results/d2o.json and results/d2o.md
    python3 -m minikv.experiments.d2o_compare --quick             # a fast smoke run (short texts), results/d2o_quick.*
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch
from minikv.errors import BadInput

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # also runnable as a file

from minikv.io.checkpoint import load_model  # noqa: E402
from minikv.tools.d2o_view import format_d2o_report, plot_d2o_report  # noqa: E402
from minikv.generate import generate, prefill  # noqa: E402
from minikv.policies import get_policy  # noqa: E402
from minikv.io.tokenizer import load_tokenizer  # noqa: E402

GPL3 = Path("/usr/share/common-licenses/GPL-3")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the important information there.")
QUESTION = "What is the pass key? The pass key is"

# name -> (registry name, options); the budget is the ratio under test.
POLICIES = {
    "full": ("full", {}),
    "streaming": ("streaming", {}),
    "h2o": ("h2o", {}),
    "d2o": ("d2o", {}),
}
ABLATIONS = {
    "d2o-nomerge": ("d2o", {"tau_override": math.inf}),     # D2O's layer ratios + H2O with sinks, no merging
    "d2o-paper": ("d2o", {"merge_weights": "paper"}),
    "d2o-uniform-nomerge": ("d2o", {"allocation": "uniform", "tau_override": math.inf}),   # isolates allocation
    "h2o-sinks": ("h2o", {"n_sink": 4}),                     # H2O with D2O's 4 sinks, prompt-time compression
}


def make_policy(name: str, ratio: float):
    reg, opts = {**POLICIES, **ABLATIONS}[name]
    return get_policy(reg, None if reg == "full" else ratio, **opts)


# ---- perplexity ------------------------------------------------------------------------------------------------
@torch.no_grad()
def decode_perplexity(model, ids: list[int], n_prompt: int, n_score: int, policy) -> dict:
    """Teacher-forced NLL of ids[n_prompt : n_prompt + n_score] with the policy active at every decode step."""
    if len(ids) < n_prompt + n_score:
        raise BadInput(f"text has {len(ids)} tokens, need {n_prompt + n_score}")
    t0 = time.perf_counter()
    logits, cache = prefill(model, [ids[:n_prompt]], policy)
    nll, ratios = [], []
    for i in range(n_score):
        target = ids[n_prompt + i]
        nll.append(float(-torch.log_softmax(logits[0].double(), -1)[target]))
        if i == n_score - 1:
            break
        tok = torch.tensor([[target]], device=model.device)
        logits = model(tok, cache, hook=policy.after_step, need=policy.decode_needs, window=policy.window)[:, -1]
        ratios.append(cache.cache_ratio())
    mean = sum(nll) / len(nll)
    return {"ppl": math.exp(mean), "nll": mean, "cache_ratio_first_step": ratios[0] if ratios else 1.0,
            "cache_ratio_mean": sum(ratios) / len(ratios) if ratios else 1.0,
            "cache_ratio_final": cache.cache_ratio(), "seconds": time.perf_counter() - t0,
            "nll_first_half": sum(nll[:len(nll) // 2]) / max(1, len(nll) // 2),
            "nll_second_half": sum(nll[len(nll) // 2:]) / max(1, len(nll) - len(nll) // 2),
            "report": policy.report()}


# ---- passkey ---------------------------------------------------------------------------------------------------
def passkey_prompt(tok, n_tokens: int, depth: float, key: str) -> list[int]:
    """INTRO + filler with the key sentence at `depth` (fraction of the filler) + QUESTION, about n_tokens long."""
    unit = len(tok.encode(" " + FILLER))
    n_fill = max(1, (n_tokens - len(tok.encode(INTRO + " " + QUESTION)) - 30) // unit)
    at = round(depth * n_fill)
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    parts = [FILLER] * at + [needle] + [FILLER] * (n_fill - at)
    return tok.encode(INTRO + " " + " ".join(parts) + " " + QUESTION)


def run_passkey(model, tok, names, ratios, depths, n_tokens, seed, log) -> dict:
    rng = random.Random(seed)
    keys = [f"{rng.randrange(10000, 100000)}" for _ in depths]
    prompts = [passkey_prompt(tok, n_tokens, d, k) for d, k in zip(depths, keys)]
    out = {"depths": depths, "keys": keys, "prompt_tokens": [len(p) for p in prompts], "runs": {}}
    for ratio in ratios:
        for name in names:
            if name == "full" and ratio != ratios[0]:
                out["runs"][f"{name}@{ratio}"] = out["runs"][f"{name}@{ratios[0]}"]
                continue
            rows = []
            for depth, key, prompt in zip(depths, keys, prompts):
                policy = make_policy(name, ratio)
                r = generate(model, [prompt], policy, max_new_tokens=8, stop_ids=[])
                answer = tok.decode(r.tokens[0])
                rows.append({"depth": depth, "key": key, "answer": answer, "correct": key in answer,
                             "cache_ratio": r.cache_ratio})
                log(f"passkey {name:12s} ratio {ratio} depth {depth:.1f}: {answer!r} "
                    f"{'OK' if key in answer else 'wrong'} (cache ratio {r.cache_ratio:.3f})")
            out["runs"][f"{name}@{ratio}"] = {"policy": name, "ratio": ratio, "rows": rows,
                                             "correct": sum(x["correct"] for x in rows), "total": len(rows)}
    return out


def reading(res: dict) -> str:
    """A plain statement of how D2O compares with H2O (no tuning, no spin)."""
    p = res["perplexity"]
    lines = []
    if "d2o" in p and "h2o" in p:
        d, h = p["d2o"], p["h2o"]
        better = "lower (better)" if d["ppl"] < h["ppl"] else "higher (worse)"
        lines.append(f"Perplexity: D2O {d['ppl']:.3f} is {better} than H2O {h['ppl']:.3f} (full {p['full']['ppl']:.3f})"
                     if "full" in p else f"Perplexity: D2O {d['ppl']:.3f} vs H2O {h['ppl']:.3f}")
        lines[-1] += (f", although D2O holds more of the cache (mean measured ratio {d['cache_ratio_mean']:.3f} vs "
                      f"{h['cache_ratio_mean']:.3f}: its protected layers 0, 1, L-1 keep everything).")
        if "d2o-nomerge" in p:
            n = p["d2o-nomerge"]
            lines.append(f"Merging alone (D2O vs D2O with tau = +inf, same layer ratios and sizes): {d['ppl']:.3f} vs "
                         f"{n['ppl']:.3f}.")
    pk = res.get("passkey")
    if pk:
        for ratio in res["args"]["passkey_ratios"]:
            cells = ", ".join(f"{n} {pk['runs'][f'{n}@{ratio}']['correct']}/{pk['runs'][f'{n}@{ratio}']['total']}"
                              for n in res["args"]["policies"])
            lines.append(f"Passkey at ratio {ratio}: {cells}.")
        lines.append("In every passkey run the first answer token comes from the prompt's own (uncompressed) "
                     "attention; the later digits come from the compressed cache, which is where H2O and D2O lose "
                     "the key.")
    return " ".join(lines)


# ---- output ----------------------------------------------------------------------------------------------------
def compact(res: dict) -> dict:
    """Keep the JSON small: tau histories (30 layers x steps) only for "d2o", rounded to 5 decimals."""
    for name, r in res["perplexity"].items():
        hist = r.get("report", {}).get("tau_history")
        if hist is not None:
            r["report"]["tau_history"] = ([[round(x, 5) for x in h] for h in hist] if name == "d2o"
                                          else "(dropped to keep the file small)")
    return res


def render(res: dict, out: Path) -> None:
    """Write the plot (if matplotlib is there), the markdown and the JSON for a finished run."""
    if "d2o" in res["perplexity"]:
        try:
            res["plot"] = str(plot_d2o_report(res["perplexity"]["d2o"]["report"], out.with_suffix(".png")))
        except ImportError as e:
            print(e)
    res["reading"] = reading(res)
    out.with_suffix(".json").write_text(json.dumps(compact(res), indent=1, default=str))
    if res["passkey"] is not None:
        write_markdown(res, out.with_suffix(".md"))


def write_markdown(res: dict, path: Path) -> None:
    a = res["args"]
    L = [f"# D2O vs full / streaming / H2O on {res['model']}", "",
         f"Command: `{res['command']}`", "",
         f"Git commit {res['git']}, torch {res['torch']}, device {res['device']}, dtype float32, "
         f"{res['threads']} thread(s); total {res['seconds']:.0f} s.", "",
         "## Decode-time perplexity (GPL-3, teacher forcing)", "",
         f"Prompt: the first {a['ppl_prompt']} tokens of {GPL3} (tokenized with the model's tokenizer); the next "
         f"{a['ppl_score']} tokens are scored one at a time, each fed back as the true token through the policy's "
         f"`after_step` hook (eviction and merging active). Budget ratio {a['ratio']} of the prompt length. "
         "Cache ratio = live entries / entries of a full cache, averaged over layers and KV heads: at the first "
         "decode step, averaged over the scored steps, and at the end.", "",
         "| policy | ppl | NLL 1st half | NLL 2nd half | cache ratio (first step / mean / final) | seconds |",
         "|---|---|---|---|---|---|"]
    for name, r in res["perplexity"].items():
        L.append(f"| {name} | {r['ppl']:.3f} | {r['nll_first_half']:.4f} | {r['nll_second_half']:.4f} | "
                 f"{r['cache_ratio_first_step']:.3f} / {r['cache_ratio_mean']:.3f} / {r['cache_ratio_final']:.3f} | "
                 f"{r['seconds']:.0f} |")
    pk = res["passkey"]
    L += ["", "## Passkey retrieval", "",
          f"Prompt: \"{INTRO}\" + the filler \"{FILLER}\" repeated, with \"The pass key is NNNNN. Remember it. "
          f"NNNNN is the pass key.\" inserted at each depth, then \"{QUESTION}\"; no chat template; "
          f"{pk['prompt_tokens'][0]}-{max(pk['prompt_tokens'])} tokens; greedy, 8 new tokens; correct if the 5 "
          f"digits appear in the answer. Depths {pk['depths']}, keys {pk['keys']}. The question is part of the "
          "prompt (compressed with it).", "",
          "| policy | " + " | ".join(f"ratio {r}" for r in a["passkey_ratios"]) + " |",
          "|---|" + "---|" * len(a["passkey_ratios"])]
    for name in a["policies"]:
        cells = []
        for ratio in a["passkey_ratios"]:
            run = pk["runs"][f"{name}@{ratio}"]
            cr = sum(x["cache_ratio"] for x in run["rows"]) / len(run["rows"])
            cells.append(f"{run['correct']}/{run['total']} (cache {cr:.3f})")
        L.append(f"| {name} | " + " | ".join(cells) + " |")
    L += ["", "Answers:", ""]
    for key, run in pk["runs"].items():
        L.append(f"- {key}: " + "; ".join(f"{x['depth']:.1f}: {x['answer'].strip()!r}" for x in run["rows"]))
    extra = path.with_name(path.stem + "_ablations.json")
    if extra.exists():
        ab = json.loads(extra.read_text())
        L += ["", "## More perplexity ablations (same setting)", "", f"Command: `{ab['command']}`", "",
              "| policy | ppl | cache ratio (first step / mean / final) |", "|---|---|---|"]
        for name, r in ab["perplexity"].items():
            L.append(f"| {name} | {r['ppl']:.3f} | {r['cache_ratio_first_step']:.3f} / {r['cache_ratio_mean']:.3f} / "
                     f"{r['cache_ratio_final']:.3f} |")
        p = {**res["perplexity"], **ab["perplexity"]}
        if all(n in p for n in ("h2o", "h2o-sinks", "d2o-nomerge", "d2o-uniform-nomerge", "d2o")):
            L += ["", f"One change at a time: 4 sinks added to H2O {p['h2o']['ppl']:.3f} -> "
                  f"{p['h2o-sinks']['ppl']:.3f}; D2O's token level without merging, uniform ratios (protected layers "
                  f"full, sizes fixed at the first decode step) {p['d2o-uniform-nomerge']['ppl']:.3f}; variance-based "
                  f"ratios instead of uniform {p['d2o-nomerge']['ppl']:.3f}; merging on top (= D2O) "
                  f"{p['d2o']['ppl']:.3f}."]
    if "d2o" in res["perplexity"]:
        L += ["", "## What D2O did (perplexity run, batch row 0)", "", "```",
              format_d2o_report(res["perplexity"]["d2o"]["report"]), "```"]
        if res.get("plot"):
            L += ["", f"![D2O per-layer ratios, merges, threshold]({Path(res['plot']).name})"]
    L += ["", "## Reading", "", res.get("reading", "(see the JSON)"), ""]
    path.write_text("\n".join(L))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(REPO / "weights" / "smollm2-135m-instruct"))
    ap.add_argument("--ratio", type=float, default=0.2, help="budget ratio for the perplexity runs")
    ap.add_argument("--ppl-prompt", type=int, default=1024)
    ap.add_argument("--ppl-score", type=int, default=1024)
    ap.add_argument("--passkey-tokens", type=int, default=3000)
    ap.add_argument("--passkey-ratios", type=float, nargs="+", default=[0.2, 0.5])
    ap.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9])
    ap.add_argument("--policies", nargs="+", default=list(POLICIES), choices=[*POLICIES, *ABLATIONS])
    ap.add_argument("--ablations", action="store_true", help="also run d2o-nomerge and d2o-paper (perplexity only); "
                    "the other ablations are chosen with --policies")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--skip-passkey", action="store_true")
    ap.add_argument("--quick", action="store_true", help="short texts, for a smoke test")
    ap.add_argument("--out", default=None, help="output stem (default results/d2o, or results/d2o_quick)")
    ap.add_argument("--render", metavar="JSON", help="only re-render .md/.png/.json from an earlier run's JSON")
    args = ap.parse_args(argv)
    if args.render:
        res = json.loads(Path(args.render).read_text())
        render(res, Path(args.render).with_suffix(""))
        return
    if args.quick:
        args.ppl_prompt, args.ppl_score, args.passkey_tokens, args.depths = 128, 32, 400, [0.5]
    out = Path(args.out) if args.out else REPO / "results" / ("d2o_quick" if args.quick else "d2o")
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    log_lines: list[str] = []

    def log(msg: str) -> None:
        print(msg, flush=True)
        log_lines.append(msg)

    t_start = time.perf_counter()
    model = load_model(args.model, device=args.device)
    tok = load_tokenizer(args.model)
    try:
        git = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True).stdout.strip() + " (+ uncommitted changes)"
    except OSError:
        git = "unknown"
    res = {"command": "python3 -m minikv.experiments.d2o_compare " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
           "args": vars(args), "model": Path(args.model).name, "git": git, "torch": torch.__version__,
           "device": args.device, "threads": args.threads, "perplexity": {}, "passkey": None}
    ids = tok.encode(GPL3.read_text())
    log(f"GPL-3: {len(ids)} tokens")
    names = list(args.policies) + (["d2o-nomerge", "d2o-paper"] if args.ablations else [])
    for name in names:
        r = decode_perplexity(model, ids, args.ppl_prompt, args.ppl_score, make_policy(name, args.ratio))
        res["perplexity"][name] = r
        log(f"ppl {name:12s} {r['ppl']:.3f}  cache ratio first/mean/final {r['cache_ratio_first_step']:.3f}/"
            f"{r['cache_ratio_mean']:.3f}/{r['cache_ratio_final']:.3f}  ({r['seconds']:.0f} s)")
    if "d2o" in res["perplexity"]:
        log(format_d2o_report(res["perplexity"]["d2o"]["report"]))
    if not args.skip_passkey:
        res["passkey"] = run_passkey(model, tok, list(args.policies), args.passkey_ratios, args.depths,
                                     args.passkey_tokens, args.seed, log)
    res["seconds"] = time.perf_counter() - t_start
    res["log"] = log_lines
    render(res, out)
    print(f"wrote {out.with_suffix('.json')}" + ("" if res["passkey"] is None else " and .md"))


if __name__ == "__main__":
    main()
