"""CORM, Cache Optimization with Recent Message (Dai et al. 2024, arXiv 2404.15949): budget-free eviction of the keys
that all of the last w queries ignored.

Step s (1-indexed) is the query at position s-1. Key i is *important* at step s iff alpha_{s,i} >= 1/s (alpha: the
softmax over the entries still cached; s: the absolute step even after evictions). Key i is evicted at step t iff
pos_i <= t-1-r and it was minor at every step t-w+1 .. t: permanently, per (layer, KV head), with no budget.
State: one integer per entry, the stat `last_hit` = the last step at which it was important (initially pos + 1), so
the rule is  evict iff pos_i <= t-1-r and last_hit_i <= t-w ; with r >= w these are exactly the decisions of storing
the last w attention rows (tests/test_corm.py checks it against a literal w-row implementation).
prefill_mode "oneshot" (default) applies the rule once with the last w prompt rows; "exact" feeds the prompt as
decode steps (prefill_pass = "token_by_token"). GQA union rule, oneshot, threshold="cached", n_sink: train_free.md §9."""
from __future__ import annotations

import torch

from minikv.ops import first_positions_mask
from minikv.store import LayerStore
from minikv.policies.base import Policy, choice_option, int_option
from minikv.errors import BadInput

THRESHOLDS = ("step", "cached")
PREFILL_MODES = ("oneshot", "exact")

def init_last_hit(store: LayerStore) -> torch.Tensor:
    """last_hit_i = pos_i + 1 (the entry's own step) for entries appended since the last call; returns the stat."""
    last_hit = store.add_stat("last_hit", 0, dtype=torch.long)            # (B, Hkv, S); append zero-fills new ones
    new = store.valid & (last_hit == 0)                                   # a live entry's own step is >= 1
    last_hit.copy_(torch.where(new, store.pos + 1, last_hit))
    return last_hit

def step_thresholds(store: LayerStore, qpos: torch.Tensor, threshold: str, dtype) -> torch.Tensor:
    """tau = 1/s with s = qpos + 1 (absolute step; "step") or s = entries visible to the query ("cached"). (B, Hkv, Tq)
    qpos: (B, Tq) query positions. Padding queries (s < 1) get tau = +inf, so they never mark a hit."""
    B, Hkv = store.pos.shape[:2]
    if threshold == "step":
        s = (qpos + 1)[:, None, :].expand(B, Hkv, -1)                     # (B, Hkv, Tq)
    else:
        visible = store.valid[:, :, None, :] & (store.pos[:, :, None, :] <= qpos[:, None, :, None])  # (B,Hkv,Tq,S)
        s = visible.sum(-1)                                               # (B, Hkv, Tq)
    return torch.where(s >= 1, 1.0 / s.to(dtype).clamp_min(1), float("inf"))

def important_mask(probs: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """important_{s,i} = OR over the G query heads of (alpha_{s,i} >= tau_s). probs (B,Hkv,G,Tq,S) -> (B,Hkv,Tq,S)."""
    return (probs >= tau[:, :, None, :, None].to(probs.dtype)).any(dim=2)

def record_hits(last_hit: torch.Tensor, important: torch.Tensor, steps: torch.Tensor) -> None:
    """last_hit_i <- max(last_hit_i, max{s : key i important at step s}). important (B,Hkv,Tq,S); steps (B, Tq)."""
    hit_step = torch.where(important, steps[:, None, :, None], 0).amax(dim=2)   # (B, Hkv, S), 0 = no hit
    torch.maximum(last_hit, hit_step, out=last_hit)

def corm_keep(store: LayerStore, last_hit: torch.Tensor, w: int, r: int, n_sink: int = 0) -> torch.Tensor:
    """(B, Hkv, S) keep mask at step t = seen: evict iff pos_i <= t-1-r and last_hit_i <= t-w (and pos_i >= n_sink)."""
    t = store.seen[:, None, None]                                         # (B, 1, 1) the step just taken
    old = store.pos <= t - 1 - r                                          # outside the recent-r protection
    long_term_minor = last_hit <= t - w                                   # no hit during steps t-w+1 .. t
    evict = store.valid & old & long_term_minor & ~first_positions_mask(store.pos, n_sink)
    return store.valid & ~evict

class CORM(Policy):
    name = "corm"
    summary = "CORM (budget-free): evicts keys that all of the last w queries ignored, except the r most recent"
    takes_budget = False
    prefill_needs = frozenset({"last_rows"})
    decode_needs = frozenset({"probs"})
    decode_evicts = True       # every step may evict (the size still follows the input: no fixed budget)

    def __init__(self, budget=None, w: int = 256, r: int = 256, prefill_mode: str = "oneshot",
                 threshold: str = "step", n_sink: int = 0):
        if budget is not None:
            raise BadInput(f"corm is budget-free (got budget={budget!r}): its cache size follows from w and r; "
                             f"compare at the measured cache ratio and sweep (w, r) instead")
        super().__init__(None)
        # window: the rows of the last prompt queries that oneshot needs ("last_rows")
        w = self.w = self.window = int_option("corm", "w", w, lo=1, what="the window of recent queries that vote")
        r = self.r = int_option("corm", "r", r, what="recent positions never evicted")
        self.n_sink = int_option("corm", "n_sink", n_sink, lo=0, what="first positions never evicted")
        if r < w:
            raise BadInput(f"corm: r (recent positions never evicted) must be >= w, got r={r} < w={w}; "
                             f"with r < w a key could be judged by queries issued before it existed")
        self.threshold = choice_option("corm", "threshold", threshold, THRESHOLDS,
                                       what="'step' = 1/s as in the paper, 'cached' = 1/(entries cached), an ablation")
        self.prefill_mode = choice_option("corm", "prefill_mode", prefill_mode, PREFILL_MODES)
        self.prefill_pass = "token_by_token" if prefill_mode == "exact" else "one_pass"

    def after_prefill(self, layer, store, stats):
        if self.prefill_mode == "exact":     # a one-pass forward would silently apply the oneshot rule
            raise RuntimeError("corm prefill_mode='exact' needs the prompt token by token: run it through "
                               "minikv.generate.prefill, which reads policy.prefill_pass")
        rows = stats["last_rows"]                                         # (B, Hkv, G, w', S), w' = min(w, T)
        last_hit = init_last_hit(store)
        # (B, w'): the steps of the last w' prompt queries (<= 0 for left-padding rows)
        steps = store.seen[:, None] - rows.shape[3] + torch.arange(1, rows.shape[3] + 1, device=store.seen.device)
        tau = step_thresholds(store, steps - 1, self.threshold, rows.dtype)
        record_hits(last_hit, important_mask(rows, tau), steps)
        store.keep(corm_keep(store, last_hit, self.w, self.r, self.n_sink))

    def after_step(self, layer, store, stats):
        last_hit = init_last_hit(store)
        steps = store.seen[:, None]                                       # (B, 1): step t = position t-1 + 1
        tau = step_thresholds(store, steps - 1, self.threshold, stats["probs"].dtype)
        record_hits(last_hit, important_mask(stats["probs"], tau), steps)
        store.keep(corm_keep(store, last_hit, self.w, self.r, self.n_sink))
