"""StreamingLLM (Xiao et al. 2023): keep the first `n_sink` positions (attention sinks) and the most recent ones.

Reference: mit-han-lab/streaming-llm `StartRecentKVCache(start_size=n_sink, recent_size=budget - n_sink)`; keys stay
at their true positions (no positional shift, train_free.md §9)."""
from __future__ import annotations

import torch

from minikv.ops import first_positions_mask, recent_mask
from minikv.store import LayerStore
from minikv.policies.base import Policy, int_option
from minikv.errors import BadInput

def sink_window_keep(store: LayerStore, budget: torch.Tensor, n_sink: int) -> torch.Tensor:
    """(B, Hkv, S) keep mask: positions < n_sink, plus the last budget - n_sink positions. budget: (B,)."""
    return first_positions_mask(store.pos, n_sink) | recent_mask(store.pos, (budget - n_sink)[:, None], store.seen)

class Streaming(Policy):
    name = "streaming"
    summary = "StreamingLLM: the first n_sink positions (attention sinks) plus the most recent entries"
    decode_evicts = True

    def __init__(self, budget, n_sink: int = 4):
        super().__init__(budget)
        self.n_sink = int_option("streaming", "n_sink", n_sink, lo=0, what="attention sinks kept")
        if not self.budget.is_ratio and self.budget.value <= self.n_sink:
            raise BadInput(f"streaming: budget {self.budget} must exceed n_sink = {self.n_sink} (the sinks would fill it)")

    def after_prefill(self, layer, store, stats):
        budget = self.budget_entries(store)
        if bool((budget <= self.n_sink).any()):           # checked once, at prefill (a decode step never syncs)
            raise BadInput(f"streaming: budget {int(budget.min())} must exceed n_sink = {self.n_sink}")
        self.after_step(layer, store, stats)

    def after_step(self, layer, store, stats):
        store.keep(sink_window_keep(store, self.budget_entries(store), self.n_sink))
