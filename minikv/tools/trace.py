"""`minikv trace`: a readable, per-step account of what a policy did to a short prompt, for teaching.

For every recorded hook call: per KV head, which positions were kept, evicted, and merged into, then the policy's
own report (budgets, per-layer ratios, thresholds).
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from minikv.errors import BadInput
from minikv.generate import generate
from minikv.tools.common import (add_model_args, add_policy_args, budget_reading, count_arg, load_model_and_tokenizer,
                                 make_policy, prompt_arg, result_summary)
from minikv.tools.record import Recorder, head_changes


def _compact(positions: list[int], limit: int = 24) -> str:
    """'0-3,7,9-12' style ranges, cut after `limit` numbers."""
    runs: list[list[int]] = []
    for p in positions:
        if runs and p == runs[-1][1] + 1:
            runs[-1][1] = p
        else:
            runs.append([p, p])
    text = ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs) or "-"
    return text if len(positions) <= limit or len(text) < 120 else text[:117] + "..."


def trace_lines(recorder: Recorder, tokens: list[str] | None = None) -> list[str]:
    """The account as text lines, one block per (phase, layer)."""
    lines = []
    for ev in recorder.events:
        changes = head_changes(ev)
        if ev.phase != "prefill" and not any(c["evicted"] or c["merged_into"] for c in changes):
            continue                                          # nothing happened in this layer at this step
        err = (ev.probe_out_after - ev.probe_out_before).abs().max().item()
        lines.append(f"[{ev.phase}] layer {ev.layer}: probe-query attention change max|Δ| = {err:.3g}")
        for c in changes:
            lines.append(f"    head {c['head']}: kept {len(c['kept'])} [{_compact(c['kept'])}]  evicted "
                         f"[{_compact(c['evicted'])}]" + (f"  merged into [{_compact(c['merged_into'])}]"
                                                          if c["merged_into"] else ""))
            if tokens and c["evicted"] and len(c["evicted"]) <= 8:
                lines.append("        evicted tokens: " + " ".join(repr(tokens[p]) for p in c["evicted"]
                                                                  if p < len(tokens)))
    return lines


def run_trace(model, tokenizer, policy, prompt: str, max_new_tokens: int = 4, layers: set[int] | None = None):
    """Generate with a recording policy; returns (recorder, generated text, token strings, result)."""
    rec = Recorder(policy, model.cfg.num_attention_heads, layers=layers)
    ids = tokenizer.encode(prompt)
    res = generate(model, [ids], rec, max_new_tokens=max_new_tokens, stop_ids=[], use_sdpa=False)
    return rec, tokenizer.decode(res.tokens[0]), [tokenizer.decode([i]) for i in ids + res.tokens[0]], res


def layers_arg(text: str) -> set[int] | None:
    """--layers: 'all' (None) or comma-separated layer numbers >= 0 (the upper bound is checked in cmd_trace)."""
    if text.strip() == "all":
        return None
    try:
        out = {int(item) for item in text.split(",")}
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'all' or comma-separated layer numbers (e.g. 0,2), "
                                         f"got {text!r}") from None
    if min(out) < 0:
        raise argparse.ArgumentTypeError(f"layer {min(out)} in {text!r} is negative; layers are numbered from 0")
    return out


def print_run_notes(policy, res, max_new_tokens: int) -> None:
    """How the budget was read and, when generation stopped at the model's context, a line saying so (on stderr,
    after the run, so that a refusal during prefill stays the only stderr line)."""
    print(budget_reading(policy), file=sys.stderr)
    if res.stopped_at_context:
        print(f"stopped at the model's context ({res.context} tokens): prompt {res.prompt_tokens[0]} + "
              f"{len(res.tokens[0])} generated tokens, of the {max_new_tokens} asked for", file=sys.stderr)


def cmd_trace(args) -> int:
    policy = make_policy(args)                       # a bad policy, budget or option fails before the model loads
    model, tok = load_model_and_tokenizer(args)
    n_layers = model.cfg.num_hidden_layers           # a layer the model lacks would silently print nothing
    bad = sorted(l for l in args.layers or () if l >= n_layers)
    if bad:
        raise BadInput(f"--layers: layer {bad[0]} is out of range; the model has {n_layers} layers, "
                       f"0..{n_layers - 1}")
    rec, text, pieces, res = run_trace(model, tok, policy, args.prompt, args.max_new_tokens, args.layers)
    print_run_notes(policy, res, args.max_new_tokens)
    print(f"prompt: {len(tok.encode(args.prompt))} tokens; policy {args.policy} budget {policy.budget}")
    print("\n".join(trace_lines(rec, pieces)))
    print(f"generated: {text!r}")
    print(result_summary(res))
    print("policy report:", json.dumps(res.policy_report, default=lambda x: x.tolist() if isinstance(x, torch.Tensor)
                                       else sorted(x) if isinstance(x, set) else str(x)))
    return 0


def register(sub) -> None:
    p = sub.add_parser("trace", help="per-step account of what a policy kept, evicted and merged")
    p.add_argument("--prompt", required=True, type=prompt_arg)
    p.add_argument("--max-new-tokens", type=count_arg, default=4)
    p.add_argument("--layers", default="0", type=layers_arg,
                   help="comma-separated layers to show, or 'all' (default: 0)")
    add_model_args(p)
    add_policy_args(p)
    p.set_defaults(func=cmd_trace)
