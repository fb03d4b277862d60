"""Recording what a policy does at every hook call (store, statistics and a probe query's attention output, before and
after), for `minikv oracle` and `minikv trace`: per KV head, the positions kept, evicted and merged into."""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from itertools import groupby

import torch

from minikv.attention import attend
from minikv.errors import BadInput
from minikv.generate import generate
from minikv.store import LayerStore, position_order
from minikv.tools.common import (add_model_args, add_policy_args, count_arg, load_model_and_tokenizer, make_policy,
                                 print_run_notes, prompt_arg, result_summary)

PROBE_SEED = 1234

def in_order(t: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """t (B, Hkv, ..., S) with its last (slot) axis taken in `order` (B, Hkv, n): (B, Hkv, ..., n)."""
    idx = order.view(*order.shape[:2], *[1] * (t.dim() - 3), order.shape[-1])
    return torch.gather(t, -1, idx.expand(*t.shape[:-1], order.shape[-1]))

def snapshot(store: LayerStore) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The live part of a layer store in position order (the store's slots are in any order): k, v, pos, length and
    every statistic, copies trimmed to the longest head; and the order, (B, Hkv, n) slots, to reorder other tensors."""
    n = max(1, int(store.length.max()))
    order = position_order(store.pos, store.valid)[:, :, :n]                        # (B, Hkv, n)
    snap = {"k": in_order(store.k.transpose(-1, -2), order).transpose(-1, -2),
            "v": in_order(store.v.transpose(-1, -2), order).transpose(-1, -2),
            "pos": in_order(store.pos, order), "length": store.length}
    snap.update({f"stat.{name}": in_order(t, order) for name, t in store.stats.items()})
    return {name: t.detach().clone().contiguous() for name, t in snap.items()}, order

@dataclass
class Event:
    phase: str                                   # "prefill" or "step<N>"
    layer: int
    before: dict[str, torch.Tensor]
    after: dict[str, torch.Tensor]
    inputs: dict[str, torch.Tensor]              # attention statistics handed to the policy
    probe_out_before: torch.Tensor               # (B, Hq, 1, d) attention of the probe query over the full store
    probe_out_after: torch.Tensor                # the same query over the compressed store

@dataclass
class Recorder:
    """Wraps a policy; calls it unchanged and records every hook call (optionally only some layers)."""
    policy: object
    n_q_heads: int                               # the model's query heads (the probe query has one per head)
    layers: set[int] | None = None
    events: list[Event] = field(default_factory=list)
    step: int = 0

    def __getattr__(self, name):                 # needs, window, report... come from the policy
        return getattr(self.policy, name)

    def _probe(self, store: LayerStore) -> torch.Tensor:
        B, Hkv, _, d = store.k.shape
        g = torch.Generator().manual_seed(PROBE_SEED)
        q = torch.randn(B, self.n_q_heads, 1, d, generator=g, dtype=torch.float64).to(store.k.dtype)
        out, _ = attend(q.to(store.k.device), store.seen[:, None].clone(), store)
        return out.detach().clone()

    def _record(self, phase: str, hook, layer: int, store: LayerStore, stats: dict) -> None:
        if self.layers is not None and layer not in self.layers:
            return hook(layer, store, stats)
        (before, order), probe_before = snapshot(store), self._probe(store)
        # Statistics (last dim = slots) in the snapshot's position order, taken before the hook moves anything.
        inputs = {name: in_order(t, order).detach().clone().contiguous() for name, t in stats.items()}
        hook(layer, store, stats)
        self.events.append(Event(phase, layer, before, snapshot(store)[0], inputs, probe_before, self._probe(store)))

    def after_prefill(self, layer, store, stats):
        self._record("prefill", self.policy.after_prefill, layer, store, stats)

    def after_step(self, layer, store, stats):
        self.step += layer == 0                      # a decode step starts at layer 0
        self._record(f"step{self.step}", self.policy.after_step, layer, store, stats)

def record(model, prompt: list[int], policy, max_new_tokens: int, layers: set[int] | None = None):
    """(recorder, result) of a greedy run of one prompt with `policy` recorded (reference attention, no early stop)."""
    rec = Recorder(policy, model.cfg.num_attention_heads, layers=layers)
    return rec, generate(model, [prompt], rec, max_new_tokens=max_new_tokens, stop_ids=[], use_sdpa=False)

def head_changes(event: Event, b: int = 0) -> list[dict]:
    """Per KV head: positions kept, evicted, and merged into (kept entries whose key changed) in this event."""
    out, before, after = [], event.before, event.after
    for h in range(before["pos"].shape[1]):
        pb = before["pos"][b, h, : int(before["length"][b, h])].tolist()
        pa = after["pos"][b, h, : int(after["length"][b, h])].tolist()
        kept, slot_before = set(pa), {p: i for i, p in enumerate(pb)}
        merged = [p for i, p in enumerate(pa) if p in slot_before and
                  not torch.equal(after["k"][b, h, i], before["k"][b, h, slot_before[p]])]
        out.append({"head": h, "kept": pa, "evicted": [p for p in pb if p not in kept], "merged_into": merged})
    return out

def _compact(positions: list[int]) -> str:
    """Increasing positions as '0-3,7,9-12' style ranges (a run keeps p - i constant), cut at 120 characters."""
    runs = [[p for _, p in run] for _, run in groupby(enumerate(positions), key=lambda ip: ip[1] - ip[0])]
    text = ",".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs) or "-"
    return text if len(text) <= 120 else text[:117] + "..."

def layers_arg(text: str) -> set[int] | None:
    """--layers: 'all' (None) or comma-separated layer numbers >= 0 (the upper bound is checked in cmd_trace)."""
    if text.strip() != "all" and not all(item.strip().isdecimal() for item in text.split(",")):
        raise argparse.ArgumentTypeError(f"expected 'all' or layer numbers >= 0 like 0,2, got {text!r}")
    return None if text.strip() == "all" else {int(item) for item in text.split(",")}

def cmd_trace(args) -> int:
    policy = make_policy(args)                       # a bad policy, budget or option fails before the model loads
    model, tok = load_model_and_tokenizer(args)
    n_layers = model.cfg.num_hidden_layers           # a layer the model lacks would silently print nothing
    bad = sorted(l for l in args.layers or () if l >= n_layers)
    if bad:
        raise BadInput(f"--layers: layer {bad[0]} is out of range; the model has {n_layers} layers, 0..{n_layers - 1}")
    ids = tok.encode(args.prompt)
    rec, res = record(model, ids, policy, args.max_new_tokens, args.layers)
    tokens = [tok.decode([i]) for i in ids + res.tokens[0]]
    print_run_notes(policy, res, args.max_new_tokens)
    print(f"prompt: {len(ids)} tokens; policy {args.policy} budget {policy.budget}")
    for ev in rec.events:                            # one block per (phase, layer) in which something happened
        changes = head_changes(ev)
        if ev.phase != "prefill" and not any(c["evicted"] or c["merged_into"] for c in changes):
            continue
        err = (ev.probe_out_after - ev.probe_out_before).abs().max().item()
        print(f"[{ev.phase}] layer {ev.layer}: probe-query attention change max|Δ| = {err:.3g}")
        for c in changes:
            merged = f"  merged into [{_compact(c['merged_into'])}]" if c["merged_into"] else ""
            print(f"    head {c['head']}: kept {len(c['kept'])} [{_compact(c['kept'])}]  evicted "
                  f"[{_compact(c['evicted'])}]{merged}")
            if c["evicted"] and len(c["evicted"]) <= 8:
                print("        evicted tokens: " + " ".join(repr(tokens[p]) for p in c["evicted"]))
    print(f"generated: {tok.decode(res.tokens[0])!r}")
    print(result_summary(res))
    print("policy report:", json.dumps(res.policy_report, default=lambda x: x.tolist() if isinstance(x, torch.Tensor)
                                       else sorted(x) if isinstance(x, set) else str(x)))
    return 0

def register(sub) -> None:
    p = sub.add_parser("trace", help="per-step account of what a policy kept, evicted and merged")
    p.add_argument("--prompt", required=True, type=prompt_arg)
    p.add_argument("--max-new-tokens", type=count_arg, default=4)
    p.add_argument("--layers", default="0", type=layers_arg, help="comma-separated layers to show, or 'all' (default: 0)")
    add_model_args(p)
    add_policy_args(p)
    p.set_defaults(func=cmd_trace)
