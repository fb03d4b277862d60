"""What every policy shares: the hook interface the generation loop calls, and budget resolution.

A policy declares which attention statistics it needs (`prefill_needs`, `decode_needs`: subsets of
{"colsum", "last_rows", "probs"}) so the model computes nothing else, and implements
  after_prefill(layer, store, stats)   one-shot compression of the prompt's cache
  after_step(layer, store, stats)      decode-time compression after each generated token
Per-sequence state (budgets, thresholds) is set in `start` and reset for every new batch of prompts.
"""
from __future__ import annotations

import copy

import torch

from ..budgets import Budget, parse_budget
from ..store import LayerStore


class Policy:
    name = "base"
    # Per-row state: attribute -> its batch dimension. Prefill in row groups runs one copy of the policy per group
    # and joins them with `concat_rows`, which concatenates exactly these attributes.
    row_state: dict[str, int] = {"prompt_lengths": 0}
    prefill_needs: frozenset = frozenset()
    decode_needs: frozenset = frozenset()
    window = 0                 # rows of the last queries needed as "last_rows"
    decode_evicts = False      # True when the cache keeps a fixed size during decoding

    def __init__(self, budget=None):
        self.budget: Budget | None = parse_budget(budget)

    def start(self, cfg, batch: int, prompt_lengths: list[int]) -> None:
        """Called once per batch of prompts, before prefill."""
        self.cfg = cfg
        self.n_layers = cfg.num_hidden_layers
        self.prompt_lengths = torch.tensor(prompt_lengths, dtype=torch.long)
        self.layer_log: dict[int, dict] = {}

    def budget_entries(self, device) -> torch.Tensor | None:
        """(B,) entries per (layer, head) for each row, or None for no budget (keep everything)."""
        if self.budget is None:
            return None
        return self.budget.entries(self.prompt_lengths).to(device)

    def after_prefill(self, layer: int, store: LayerStore, stats: dict) -> None:
        pass

    def after_step(self, layer: int, store: LayerStore, stats: dict) -> None:
        pass

    @classmethod
    def concat_rows(cls, parts: list["Policy"]) -> "Policy":
        """One policy for the rows of several started copies (in order), concatenating every `row_state` tensor."""
        joined = copy.copy(parts[0])
        for name, dim in cls.row_state.items():
            values = [getattr(p, name) for p in parts]
            setattr(joined, name, None if values[0] is None else torch.cat(values, dim=dim))
        return joined

    def report(self) -> dict:
        """What the policy decided (per-layer budgets, thresholds, ...), for printing and records."""
        return {"policy": self.name, "budget": None if self.budget is None else str(self.budget)}

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(budget={self.budget})"


def apply_keep(store: LayerStore, keep: torch.Tensor) -> bool:
    """Compact the store to `keep` unless it keeps every live entry (no reallocation then). Returns True if evicted."""
    if bool((keep | ~store.valid).all()):
        return False
    store.keep(keep)
    return True
