"""Record what a policy does at every hook call: the store before and after, the statistics it was given, and the
attention output of a fixed probe query before and after. `minikv oracle` (golden vectors) and `minikv trace`
(a readable account) are both built on this.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from minikv.attention import attend
from minikv.store import LayerStore


def snapshot(store: LayerStore) -> dict[str, torch.Tensor]:
    """The live part of a layer store: k, v, pos, length, and every statistic (copies, trimmed to the longest head)."""
    n = max(1, store.max_length())
    snap = {"k": store.k[:, :, :n], "v": store.v[:, :, :n], "pos": store.pos[:, :, :n], "length": store.length}
    snap.update({f"stat.{name}": t[:, :, :n] for name, t in store.stats.items()})
    return {name: t.detach().clone().contiguous() for name, t in snap.items()}


@dataclass
class Event:
    phase: str                                   # "prefill" or "step<N>"
    layer: int
    before: dict[str, torch.Tensor]
    after: dict[str, torch.Tensor]
    inputs: dict[str, torch.Tensor]              # attention statistics handed to the policy
    probe_out_before: torch.Tensor | None = None  # (B, Hq, 1, d) attention of the probe query over the full store
    probe_out_after: torch.Tensor | None = None   # the same query over the compressed store


@dataclass
class Recorder:
    """Wraps a policy; calls it unchanged and records every hook call (optionally only some layers)."""
    policy: object
    n_q_heads: int                               # the model's query heads (the probe query has one per head)
    layers: set[int] | None = None
    probe_seed: int = 1234
    events: list[Event] = field(default_factory=list)
    step: int = 0
    # The prompt's events with their stores: after_prompt (once on the whole cache) may still change them (D2O
    # when="prefill" compresses every layer there), so their "after" is taken again once it has run.
    _open: list[tuple[Event, LayerStore]] = field(default_factory=list, repr=False)

    def __getattr__(self, name):                 # needs, window, report... come from the policy
        return getattr(self.policy, name)

    def _probe(self, store: LayerStore) -> torch.Tensor:
        B, Hkv, _, d = store.k.shape
        g = torch.Generator().manual_seed(self.probe_seed)
        q = torch.randn(B, self.n_q_heads, 1, d, generator=g, dtype=torch.float64).to(store.k.dtype)
        out, _ = attend(q.to(store.k.device), store.seen[:, None].clone(), store)
        return out.detach().clone()

    def _record(self, phase: str, hook, layer: int, store: LayerStore, stats: dict) -> None:
        if self.layers is not None and layer not in self.layers:
            return hook(layer, store, stats)
        before, probe_before = snapshot(store), self._probe(store)
        hook(layer, store, stats)
        n = before["pos"].shape[-1]         # statistics are trimmed to the same slots as the snapshot (last dim = S)
        inputs = {name: t[..., :n].detach().clone().contiguous() for name, t in stats.items()}
        event = Event(phase, layer, before, snapshot(store), inputs, probe_before, self._probe(store))
        self.events.append(event)
        if phase == "prefill":
            self._open.append((event, store))

    def after_prefill(self, layer, store, stats):
        self._record("prefill", self.policy.after_prefill, layer, store, stats)

    def after_prompt(self, cache):
        self.policy.after_prompt(cache)
        for event, s in self._open:                  # the prompt is done: take its events' "after" again
            event.after, event.probe_out_after = snapshot(s), self._probe(s)
        self._open.clear()

    def after_step(self, layer, store, stats):
        if layer == 0:
            self.step += 1
        self._record(f"step{self.step}", self.policy.after_step, layer, store, stats)


def head_changes(event: Event, b: int = 0) -> list[dict]:
    """Per KV head: positions kept, evicted, and merged into (kept entries whose key changed) in this event."""
    out = []
    before, after = event.before, event.after
    for h in range(before["pos"].shape[1]):
        pb = before["pos"][b, h, : int(before["length"][b, h])].tolist()
        pa = after["pos"][b, h, : int(after["length"][b, h])].tolist()
        kept = set(pa)
        slot_before = {p: i for i, p in enumerate(pb)}
        merged = [p for i, p in enumerate(pa) if p in slot_before and
                  not torch.equal(after["k"][b, h, i], before["k"][b, h, slot_before[p]])]
        out.append({"head": h, "kept": pa, "evicted": [p for p in pb if p not in kept], "merged_into": merged})
    return out
