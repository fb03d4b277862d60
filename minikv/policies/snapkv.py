"""SnapKV (Li et al. 2024) and PyramidKV (Cai et al. 2024): prefill-only compression from an observation window.

The last `window` prompt queries vote: score_j = mean over window queries of A[i, j] (then the GQA group mean),
pooled along positions (kernel 7; max, or kvpress's avg). Keep the window plus the top (budget - window) earlier ones.
PyramidKV uses the same scores with a per-layer budget that decreases linearly with depth.
Decode tokens are appended without eviction."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from minikv.budgets import pyramid_prefix_budgets
from minikv.ops import group_mean, recent_mask, select_topk
from minikv.store import LayerStore
from minikv.policies.base import Policy, choice_option, int_option
from minikv.errors import BadInput

def window_scores(store: LayerStore, last_rows: torch.Tensor, window: int, kernel: int = 7,
                  pooling: str = "max") -> torch.Tensor:
    """SnapKV prefix scores (B, Hkv, S): window-mean attention, pooled along positions; -inf outside the prefix.
    "max": group mean, then max-pool padded with -inf (Ada-KV's code); "avg": avg-pool of each query head's prefix,
    the zeros around it counted (F.avg_pool1d's count_include_pad), then group mean (kvpress's SnapKVPress).
    last_rows: (B, Hkv, G, w, S), the last w prompt queries' rows. Pooling runs along the slots: at prefill they hold
    the prompt in position order."""
    prefix = store.valid & ~recent_mask(store.pos, window, store.seen)     # earlier entries, not the window
    mx, s = pooling == "max", last_rows.mean(dim=3)                        # s: (B, Hkv, G, S)
    s = (group_mean(s)[:, :, None] if mx else s).masked_fill(~prefix[:, :, None], float("-inf") if mx else 0.0)
    p = (F.max_pool1d if mx else F.avg_pool1d)(s.flatten(0, 2)[:, None], kernel, stride=1, padding=kernel // 2)
    return group_mean(p.view_as(s)).masked_fill(~prefix, float("-inf"))

def window_plus_topk_keep(store: LayerStore, score: torch.Tensor, prefix_budget: torch.Tensor, window: int):
    """(B, Hkv, S): the last `window` positions plus the top prefix_budget earlier entries ((B,) or (B, Hkv))."""
    k = prefix_budget if prefix_budget.dim() == 2 else prefix_budget[:, None]
    win = recent_mask(store.pos, window, store.seen)
    return win | select_topk(score, k.clamp_min(0), valid=store.valid & ~win, pos=store.pos)

class SnapKV(Policy):
    name = "snapkv"
    summary = "SnapKV: the last `window` prompt queries vote (pooled) for the prompt entries to keep; prefill only"
    prefill_needs = frozenset({"last_rows"})

    def __init__(self, budget, window: int = 32, kernel: int = 7, pooling: str = "max"):
        super().__init__(budget)
        self.window = int_option(self.name, "window", window, lo=1, what="observation window of last prompt queries")
        self.kernel = int_option(self.name, "kernel", kernel, lo=1, what="pooling width")
        self.pooling = choice_option(self.name, "pooling", pooling, ("max", "avg"), what="'avg': kvpress's SnapKVPress")
        if self.kernel % 2 == 0:
            raise BadInput(f"{self.name}: kernel (pooling width) must be odd, got {kernel!r}")
        if not self.budget.is_ratio and self.budget.value < self.window:
            raise BadInput(f"{self.name}: budget {self.budget} is smaller than the observation window "
                           f"({self.window}); use a budget >= window or a smaller window")

    def prefix_budgets(self, layer: int, store: LayerStore) -> torch.Tensor:
        """Prefix entries each row keeps in this layer (B,)."""
        budget = self.budget_entries(store)
        if bool((budget < self.window).any()):
            raise BadInput(f"{self.name}: budget {int(budget.min())} is smaller than the observation window "
                             f"({self.window}); use a budget >= window or a smaller window")
        return budget - self.window

    def head_counts(self, score: torch.Tensor, prefix_budget: torch.Tensor, store: LayerStore) -> torch.Tensor:
        """Prefix entries each KV head keeps: the layer's prefix budget for every head (B,); Ada-KV splits it."""
        return prefix_budget

    def after_prefill(self, layer, store, stats):
        n = store.seen
        budget = self.prefix_budgets(layer, store)                         # (B,)
        fits = n <= budget + self.window                                   # (B,) the prompt already fits
        counts = (n - self.window)[:, None].expand(store.pos.shape[:2])    # (B, Hkv) prefix entries if it fits
        if not bool(fits.all()):
            score = window_scores(store, stats["last_rows"], self.window, self.kernel, self.pooling)
            heads = self.head_counts(score, budget, store)                 # (B,) or (B, Hkv)
            keep = window_plus_topk_keep(store, score, heads, self.window)
            store.keep(keep | fits[:, None, None] & store.valid)           # rows that fit keep everything
            counts = torch.where(fits[:, None], counts, heads if heads.dim() == 2 else heads[:, None])
        store.rows.update(prefix_budget=budget, compressed=~fits, head_prefix=counts, head_budget=counts + self.window)

class PyramidKV(SnapKV):
    name = "pyramidkv"
    summary = "PyramidKV: SnapKV scores with per-layer budgets that shrink linearly with depth (min = budget/beta)"

    def __init__(self, budget, window: int = 32, kernel: int = 7, beta: int = 20, pooling: str = "max"):
        super().__init__(budget, window, kernel, pooling=pooling)
        self.beta = int_option(self.name, "beta", beta, lo=1, what="the last layer keeps 1/beta of the average")

    def prefix_budgets(self, layer, store):
        b = super().prefix_budgets(layer, store)
        n = store.rows["prompt_len"].to(b.device)
        return pyramid_prefix_budgets(b, n, self.window, store.n_layers, self.beta)[layer].clamp_min(0)
