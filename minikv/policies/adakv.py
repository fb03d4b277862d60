"""Ada-KV (Feng et al., arXiv 2407.11550): adaptive head-wise budgets inside a layer.

Theorem 3.1 bounds a layer's eviction error by 2hC - 2C sum_i F_i (F_i = attention mass head i keeps; see
minikv/bounds.py), and the global top-B over all heads' scores maximises sum_i F_i (Thm 3.3). So instead of giving every
KV head the same prefix budget b, the layer's Hkv*b prefix entries go to the heads with the highest scores, each head
keeping at least floor(alpha*b). The allocation (`adakv_allocate`) composes with SnapKV window scores, PyramidKV's
layer schedule and H2O's accumulated scores; each head really stores its own count (no masking).
Budget = average per-head cache size INCLUDING the window: prefix budget b = budget - window (SnapKV family) or
b = n_heavy (H2O family, whose window is the n_recent most recent entries)."""
from __future__ import annotations

import torch

from minikv.ops import first_positions_mask, recent_mask, select_topk
from minikv.store import LayerStore
from minikv.policies.base import choice_option, float_option
from minikv.policies.h2o import H2O, heavy_recent_keep, ranked_scores, split_budget
from minikv.policies.snapkv import PyramidKV, SnapKV
from minikv.errors import BadInput

VARIANTS = ("official", "exact")

def check_allocation_options(alpha: float, variant: str) -> tuple[float, str]:
    """(alpha, variant), refusing an alpha outside [0, 1] (or not a number) and an unknown variant, naming them."""
    return float_option("adakv", "alpha", alpha, 0, 1, what="safeguard share"), \
        choice_option("adakv", "variant", variant, VARIANTS)

def safeguard_floor(prefix_budget: torch.Tensor, alpha: float) -> torch.Tensor:
    """floor(alpha * b) per row (B,): the prefix entries every head keeps whatever the global ranking says."""
    return (prefix_budget.double() * alpha).floor().long()

def adakv_allocate(scores: torch.Tensor, prefix_budget: int | torch.Tensor, alpha: float = 0.2,
                   variant: str = "official", valid: torch.Tensor | None = None,
                   pos: torch.Tensor | None = None) -> torch.Tensor:
    """Ada-KV head-wise prefix budgets (B, Hkv) from scores (B, Hkv, m) and the average prefix budget b per head.
    official: B_i = round((1 - alpha) f_i + floor(alpha b)), f_i = head i's share of the global top-(Hkv*b);
    exact: each head's top floor(alpha b), then a global top fills the rest (sum = Hkv*b); train_free.md §8.1, §9.
    scores: -inf (or `valid` False) marks non-candidates (window, empty); b: int or (B,); pos: (B, Hkv, m) for the
    tie-break (None: slot order); globally, ties break by head, then position."""
    check_allocation_options(alpha, variant)
    B, H, m = scores.shape
    valid = (scores > float("-inf")) if valid is None else valid
    b = torch.as_tensor(prefix_budget, device=scores.device).long().expand(B)              # (B,)
    if b.device.type == "cpu" and bool((b < 0).any()):         # (on GPU this check would sync every step)
        raise BadInput(f"adakv: prefix budget must be >= 0, got {b.tolist()}")
    n_cand = valid.sum(-1)                                                                  # (B, Hkv)
    floor = safeguard_floor(b, alpha)                                                        # (B,)
    # Flattened over heads, the tie-break key is (head, position): head i's positions shifted by i * 2^40.
    flat_pos = None if pos is None else (pos + torch.arange(H, device=pos.device)[:, None] * 2 ** 40).reshape(B, -1)
    if variant == "official":
        top = select_topk(scores.reshape(B, H * m), H * b, valid.reshape(B, H * m), flat_pos)   # (B, Hkv*m)
        f = top.view(B, H, m).sum(-1)                                                       # (B, Hkv)
        counts = torch.round((1 - alpha) * f.double() + floor[:, None].double()).long()
    else:
        safe = select_topk(scores, floor[:, None], valid, pos)                             # (B, Hkv, m)
        n_safe = safe.sum(-1)                                                               # (B, Hkv)
        rest = (H * b - n_safe.sum(-1)).clamp_min(0)                                        # (B,)
        extra = select_topk(scores.reshape(B, H * m), rest, (valid & ~safe).reshape(B, H * m), flat_pos)
        counts = n_safe + extra.view(B, H, m).sum(-1)
    return torch.minimum(counts, n_cand)

class AdaSnapKV(SnapKV):
    """SnapKV window scores + Ada-KV head-wise allocation of the layer's prefix budget (prefill only)."""
    name = "adakv-snapkv"
    summary = "Ada-KV over SnapKV: the layer's prefix budget goes to the heads with the highest window scores"

    def __init__(self, budget, window: int = 32, kernel: int = 7, alpha: float = 0.2, variant: str = "official",
                 pooling: str = "max"):
        super().__init__(budget, window, kernel, pooling=pooling)
        self.alpha, self.variant = check_allocation_options(alpha, variant)

    def head_counts(self, score, prefix_budget, store):
        return adakv_allocate(score, prefix_budget, self.alpha, self.variant, pos=store.pos)      # (B, Hkv)

class AdaPyramidKV(PyramidKV, AdaSnapKV):
    """PyramidKV's per-layer prefix budget (PyramidKV.prefix_budgets), then the Ada-KV allocation per layer."""
    name = "adakv-pyramidkv"
    summary = "Ada-KV over PyramidKV: depth-shrinking layer budgets, each split unevenly across heads by score"

    def __init__(self, budget, window: int = 32, kernel: int = 7, beta: int = 20, alpha: float = 0.2,
                 variant: str = "official", pooling: str = "max"):
        super().__init__(budget, window, kernel, beta, pooling=pooling)
        self.alpha, self.variant = check_allocation_options(alpha, variant)

class AdaH2O(H2O):
    """H2O scores + Ada-KV allocation of the heavy share, once per row (train_free.md §9); the window stays uniform."""
    name = "adakv-h2o"
    summary = "Ada-KV over H2O: the heavy-hitter share is split unevenly across heads by accumulated attention"

    def __init__(self, budget, heavy_share: float = 0.5, n_sink: int = 0, alpha: float = 0.2,
                 variant: str = "official", score: str = "sum"):
        super().__init__(budget, heavy_share, n_sink, score)
        self.alpha, self.variant = check_allocation_options(alpha, variant)

    def _compress(self, store: LayerStore, at_prefill: bool = False) -> None:
        budget = self.budget_entries(store)                                                 # (B,)
        n_heavy, n_recent = split_budget(budget, self.heavy_share)                          # (B,), (B,)
        # Heavy counts per head (B, Hkv), -1 until the row first overflows; kept beside the rows, updated in place.
        heavy = store.rows.setdefault("heavy", torch.full(store.pos.shape[:2], -1, device=store.k.device))
        if not store.host.get("adakv_all_allocated"):          # a row may overflow now: allocate, branch-free
            new = (heavy[:, 0] < 0) & (store.seen > budget)                                 # rows that overflow now
            recent = recent_mask(store.pos, n_recent[:, None], store.seen)                  # (B, Hkv, S)
            sinks = first_positions_mask(store.pos, self.n_sink)        # rank first, counted in the heavy share
            score = ranked_scores(store, self.score).masked_fill(sinks, float("inf"))
            counts = adakv_allocate(score, n_heavy, self.alpha, self.variant, store.valid & ~recent, store.pos)
            heavy.copy_(torch.where(new[:, None], counts, heavy))
            if at_prefill:                                     # (prefill may sync; a decode step never does)
                store.host["adakv_all_allocated"] = bool((heavy >= 0).all())
        active, h = heavy[:, 0] >= 0, heavy.clamp_min(0)                                    # (B,), (B, Hkv)
        # The allocation beside the rows (the report): average prefix budget, per-head prefix and total budgets.
        store.rows.update(prefix_budget=n_heavy, head_prefix=h, head_budget=h + n_recent[:, None], compressed=active)
        # Every row compressed at prefill and once since: a head holds <= its budget, a step evicts <= 1 (no sort).
        one_over = store.host.get("adakv_all_allocated", False) and store.host.get("step_compressed", False)
        keep = heavy_recent_keep(store, ranked_scores(store, self.score), h, n_recent, self.n_sink, one_over)
        store.keep(keep | ~active[:, None, None] & store.valid)                            # rows that still fit
