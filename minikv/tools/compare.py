"""`minikv compare`: policies A and B on one prompt (or an eval task's, averaged) against the full cache: the Jaccard
overlap of their kept positions per layer and KV head, their attention-output errors per layer, the greedy answers.
The JSON (--out) lists kept positions per [layer][KV head], what another library's run (e.g. kvpress) would write."""
from __future__ import annotations

from pathlib import Path

import torch

from minikv.attention import attend
from minikv.checks import context_room
from minikv.generate import decode_loop, generate, prefill
from minikv.model import apply_rope, rope_cos_sin
from minikv.tools.bench import check_out_path, write_json
from minikv.tools.common import (add_model_args, count_arg, format_rows, load_model_and_tokenizer, policy_spec,
                                 prompt_arg, pyplot, save_figure)
from minikv.tools.eval.runner import EvalConfig
from minikv.tools.eval.tasks import make_example

def jaccard(a: list, b: list) -> list[list[float]]:
    """|A ∩ B| / |A ∪ B| per [layer][head] of two [layer][head] lists of positions (1.0 when both are empty)."""
    return [[len(set(x) & set(y)) / len(set(x) | set(y)) if x or y else 1.0 for x, y in zip(la, lb)]
            for la, lb in zip(a, b)]

def compare_policies(model, ids: list[int], a: str, b: str, max_new_tokens: int = 8) -> dict:
    """Policies a and b (policy_spec) on the prompt `ids`: positions kept per [layer][KV head] after prefill, their
    Jaccard overlap |A ∩ B| / |A ∪ B|; per layer, the relative L2 error of the attention output of the full-cache run's
    last prompt query over each store vs the full cache's; the greedy answers (token ids), also the full cache's."""
    found, keep = [], lambda module, args, q: found.append(q[:, -1:])   # each layer's first call: the prompt
    hooks = [blk.self_attn.q_proj.register_forward_hook(keep) for blk in model.layers]
    try:
        full = generate(model, [ids], max_new_tokens=max_new_tokens, keep_cache=True)
    finally:
        for h in hooks:
            h.remove()
    H, d, qpos = model.cfg.num_attention_heads, model.cfg.head_dim, torch.tensor([[len(ids) - 1]], device=model.device)
    cos, sin = rope_cos_sin(model.inv_freq(model.dtype), qpos, model.dtype)
    queries = [apply_rope(q.view(1, 1, H, d).transpose(1, 2), cos, sin) for q in found[:len(model.layers)]]
    rep = {"engine": "minikv", "prompt_ids": ids, "probe": "the last prompt token's query (full-cache run)",
           "full": {"spec": "full", "answer_ids": full.tokens[0], "cache_ratio": full.cache_ratio}}
    n_new = min(max_new_tokens, context_room(model, [ids], None))
    for key, spec in (("a", a), ("b", b)):       # one prefill each: the stores after it, then its greedy answer
        logits, cache = prefill(model, [ids], policy := policy_spec(spec), extra_capacity=n_new)
        kept = [[sorted(s.pos[0, h][s.pos[0, h] >= 0].tolist()) for h in range(s.pos.shape[1])] for s in cache.layers]
        rep[key] = {"spec": spec, "kept": kept, "err": []}
        for q, ref, store in zip(queries, full.cache.layers, cache.layers):   # entries decoded later: after qpos
            want = attend(q, qpos, ref)[0].double()
            rep[key]["err"].append(float((attend(q, qpos, store)[0].double() - want).norm() / want.norm()))
        out = decode_loop(model, cache, logits, policy, n_new, lambda lg: lg.argmax(-1), set(model.cfg.eos_ids), 0,
                          None, None)[0]
        rep[key].update(answer_ids=out[0], cache_ratio=cache.cache_ratio())
    rep["layers"] = [{"layer": i, "jaccard": j, "err_a": rep["a"]["err"][i], "err_b": rep["b"]["err"][i]}
                     for i, j in enumerate(jaccard(rep["a"]["kept"], rep["b"]["kept"]))]
    return rep

def mean_report(reps: list[dict]) -> dict:
    """Per-prompt reports (compare_policies) averaged per layer and KV head: Jaccard, errors; each prompt kept."""
    avg, layers = (lambda xs: sum(xs) / len(xs)), zip(*(r["layers"] for r in reps))    # per layer: one per prompt
    return {**{k: {x: avg([r[k][x] for r in reps]) if x != "spec" else reps[0][k][x] for x in ("spec", "score",
                   "cache_ratio")} for k in ("a", "b", "full")},
            "prompts": reps, "layers": [{"layer": ls[0]["layer"], "jaccard": [avg(h) for h in zip(*(x["jaccard"] for x
            in ls))], **{k: avg([x[k] for x in ls]) for k in ("err_a", "err_b")}} for ls in layers]}

def heatmap(rep: dict, path) -> Path:
    """Layers x KV heads of the Jaccard overlap after prefill."""
    plt, grid = pyplot(), [r["jaccard"] for r in rep["layers"]]
    fig, ax = plt.subplots(figsize=(2.5 + 0.6 * len(grid[0]), 1.5 + 0.22 * len(grid)))
    fig.colorbar(ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto"), ax=ax, label="Jaccard")
    ax.set(xlabel="KV head", ylabel="layer", xticks=range(len(grid[0])), title="kept positions after prefill, |A ∩ B| / "
           f"|A ∪ B| over {len(rep.get('prompts', [0]))} prompt(s)\nA = {rep['a']['spec']}, B = {rep['b']['spec']}")
    return save_figure(fig, plt, path)

def cmd_compare(args) -> int:
    policy_spec(args.a), policy_spec(args.b)          # a bad policy, budget or option fails before the model loads
    out, plot = (check_out_path(Path(p)) if p else None for p in (args.out, args.plot))
    pyplot() if plot else None                        # so do a missing matplotlib and (as `minikv eval`) a bad task
    EvalConfig(args.task, [], [], lengths=[args.length], depths=[args.depth], samples=args.samples) if args.task else None
    model, tok = load_model_and_tokenizer(args)
    exs = [make_example(tok, args.task, args.length, args.depth, s) for s in range(args.samples)] if args.task else [None]
    reps = []
    for i, ex in enumerate(exs):                     # each prompt's lines as soon as it ran: the progress of a task
        reps.append(rep := compare_policies(model, ex.ids if ex else tok.encode(args.prompt), args.a, args.b,
                                            ex.max_new_tokens if ex else args.max_new_tokens))
        print(f"prompt {i}: {len(rep['prompt_ids'])} tokens; probe: {rep['probe']}" + (f"; {ex.answers}" if ex else ""))
        for key, r in ((k, rep[k]) for k in ("a", "b", "full")):
            r["answer"] = tok.decode(r["answer_ids"])
            r["score"] = ex.score(r["answer"]) if ex else None      # the task's metric, as minikv eval scores it
            print(f"{key:>4} = {r['spec']}, cache ratio {r['cache_ratio']:.3f}: {r['answer']!r}" +
                  ("" if ex is None else f" (score {r['score']:g})"), flush=True)
    rep = reps[0] if len(reps) == 1 else mean_report(reps)
    print("" if len(reps) == 1 else f"mean over {len(reps)} prompts: score A {rep['a']['score']:.2f}, B "
          f"{rep['b']['score']:.2f}, full {rep['full']['score']:.2f}; per layer:")
    rows = [{"layer": r["layer"], "jaccard mean": sum(r["jaccard"]) / len(r["jaccard"]), "jaccard min":
             min(r["jaccard"]), "err A": r["err_a"], "err B": r["err_b"]} for r in rep["layers"]]
    print(format_rows(rows + [{"layer": "mean", **{k: sum(r[k] for r in rows) / len(rows) for k in list(rows[0])[1:]}}],
                      digits=3))
    if out:
        write_json(out, rep)
        print(f"saved {out}")
    print(f"saved {heatmap(rep, plot)}") if plot else None
    return 0

def register(sub) -> None:
    p = sub.add_parser("compare", help="policies A and B vs the full cache: kept positions, attention error, answers")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", type=prompt_arg)
    what.add_argument("--task", choices=("passkey", "needle"), help="instead of --prompt: that eval task's prompts "
                      "(--samples of them, --length tokens, the needle at --depth), averaged")
    for flag, kind, default in (("--length", int, 2000), ("--depth", float, 0.5), ("--samples", int, 5)):
        p.add_argument(flag, type=kind, default=default, help=f"with --task (default {default})")
    for key, example in (("a", "snapkv 0.2 pooling=avg"), ("b", "h2o 0.2")):
        p.add_argument(f"--{key}", required=True, metavar="'POLICY [BUDGET] [KEY=VALUE ...]'",
                       help=f"configuration {key.upper()}, e.g. '{example}' (options as generate's --option)")
    p.add_argument("--max-new-tokens", type=count_arg, default=8, help="answer tokens (default 8; --task: its own)")
    p.add_argument("--out", default=None, help="save the JSON here")
    p.add_argument("--plot", default=None, help="save a heatmap PNG (layers x KV heads) here; needs matplotlib")
    add_model_args(p)
    p.set_defaults(func=cmd_compare)
