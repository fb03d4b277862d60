"""H2O, Heavy-Hitter Oracle (Zhang et al. 2023): keep the most recent entries and the heavy hitters, i.e. the
entries that have received the most attention so far (accumulated over every query that saw them).

Score (store stat "score"): prefill column sums of the attention matrix + each decode step's row, averaged over the
G query heads of a KV group; ranked as is or per query that saw it (`score`). Budget n_heavy + n_recent, default 1:1."""
from __future__ import annotations

import torch

from minikv.ops import first_positions_mask, group_mean, last_ranked, recent_mask, select_topk
from minikv.store import LayerStore
from minikv.policies.base import Policy, choice_option, float_option, int_option

SCORES = ("sum", "mean")       # what ranks: H2O's accumulated attention, or kvpress's ObservedAttentionPress mean

def accumulate_prefill_scores(store: LayerStore, colsum: torch.Tensor) -> None:
    """score_j = sum over prompt queries i of A[i, j], group-averaged. colsum: (B, Hkv, G, S)."""
    store.add_stat("score", dtype=colsum.dtype)
    store.stats["score"] += group_mean(colsum).to(store.stats["score"].dtype)

def accumulate_step_scores(store: LayerStore, probs: torch.Tensor) -> None:
    """score_j += A[t, j] for the new query t (group-averaged). probs: (B, Hkv, G, 1, S)."""
    accumulate_prefill_scores(store, probs.sum(dim=3))

def ranked_scores(store: LayerStore, score: str = "sum") -> torch.Tensor:
    """(B, Hkv, S) what selection ranks: the stat "score" ("sum"), or divided by the number of queries that saw each
    entry, seen - pos ("mean": every query from the entry's own position on, the diagonal included, as kvpress)."""
    s = store.stats["score"]
    return s if score == "sum" else s / (store.seen[:, None, None] - store.pos).clamp_min(1)

def heavy_recent_keep(store: LayerStore, score: torch.Tensor, n_heavy: torch.Tensor, n_recent: torch.Tensor,
                      n_sink: int = 0, one_over: bool = False) -> torch.Tensor:
    """(B, Hkv, S) keep mask: the last n_recent positions, plus the top n_heavy other entries by score.
    The first n_sink positions get score +inf (they count inside n_heavy). n_heavy, n_recent: (B,) or (B, Hkv).
    one_over: at most n_heavy + 1 entries are not recent (a step after a compression): drop the last-ranked, no sort."""
    n_heavy, n_recent = (x if x.dim() == 2 else x[:, None] for x in (n_heavy, n_recent))
    old = store.valid & ~recent_mask(store.pos, n_recent, store.seen)                # (B, Hkv, S) candidates
    score = score.masked_fill(first_positions_mask(store.pos, n_sink), float("inf"))
    return (store.valid & ~last_ranked(score, old, store.pos, n_heavy[..., None]) if one_over
            else (store.valid & ~old) | select_topk(score, n_heavy, valid=old, pos=store.pos))

def split_budget(budget: torch.Tensor, heavy_share: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(n_heavy, n_recent) from a budget: n_heavy = floor(budget * heavy_share), the rest recent."""
    n_heavy = (budget.double() * heavy_share).floor().long()
    return n_heavy, budget - n_heavy

class H2O(Policy):
    name = "h2o"
    summary = "Heavy-Hitter Oracle: the most recent entries plus those with the most accumulated attention"
    prefill_needs = frozenset({"colsum"})
    decode_needs = frozenset({"probs"})
    decode_evicts = True

    def __init__(self, budget, heavy_share: float = 0.5, n_sink: int = 0, score: str = "sum"):
        super().__init__(budget)
        self.heavy_share = float_option(self.name, "heavy_share", heavy_share, 0, 1, what="budget share of heavy hitters")
        self.n_sink = int_option(self.name, "n_sink", n_sink, lo=0, what="first positions always kept")
        self.score = choice_option(self.name, "score", score, SCORES, what="'mean': kvpress's ObservedAttentionPress")

    def _compress(self, store: LayerStore, at_prefill: bool = False) -> None:
        n_heavy, n_recent = split_budget(self.budget_entries(store), self.heavy_share)
        store.keep(heavy_recent_keep(store, ranked_scores(store, self.score), n_heavy, n_recent, self.n_sink,
                                     one_over=store.host.get("step_compressed", False)))

    def after_prefill(self, layer, store, stats):
        accumulate_prefill_scores(store, stats["colsum"])
        self._compress(store, at_prefill=True)      # (Ada-KV's allocation may sync at prefill, never in a step)

    def after_step(self, layer, store, stats):
        accumulate_step_scores(store, stats["probs"])
        self._compress(store)
        store.host["step_compressed"] = True      # a head now holds <= its budget: each later step evicts <= 1
