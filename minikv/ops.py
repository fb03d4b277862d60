"""Small shared operations: the one deterministic top-k, GQA group means, gathers.

Tie-break rule (documented for kernel authors, used by every policy): among equal scores the entry with the older
(smaller) position wins; empty slots never win. Slots are not in position order (store.py), so the rule reads `pos`."""
from __future__ import annotations

import torch
from minikv.errors import BadInput
from minikv.store import position_order

def select_topk(scores: torch.Tensor, k: int | torch.Tensor, valid: torch.Tensor | None = None,
                pos: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean mask (..., S) of the top-k entries of `scores` (..., S) along the last dim, with the tie-break: k, an int or
    a tensor broadcastable to scores.shape[:-1]; valid: (..., S) the entries that may be chosen; pos: (..., S)
    positions for the tie-break (None: the slot index). min(k, #valid) True per row."""
    if scores.device.type == "cpu" and torch.isnan(scores).any():   # (on GPU this check would sync every step)
        raise BadInput("select_topk: scores contain NaN")
    s = scores if valid is None else scores.masked_fill(~valid, float("-inf"))
    # Slots by position, then a stable descending sort by score: equal scores stay in position order.
    by_pos = None if pos is None else position_order(pos, pos >= 0 if valid is None else valid)   # (..., S)
    order = torch.sort(s if by_pos is None else torch.gather(s, -1, by_pos), dim=-1, descending=True,
                       stable=True).indices                                           # (..., S)
    order = order if by_pos is None else torch.gather(by_pos, -1, order)
    k = k.to(scores.device)[..., None] if torch.is_tensor(k) else k               # (a host int stays on the host)
    chosen = torch.arange(s.shape[-1], device=scores.device) < k                   # (..., S) by rank
    mask = torch.zeros_like(s, dtype=torch.bool).scatter(-1, order, chosen.expand_as(s))
    return mask if valid is None else mask & valid

def last_ranked(scores: torch.Tensor, valid: torch.Tensor, pos: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """(..., S) bool: in rows with more than k `valid` entries, the one select_topk ranks last (the lowest score; among
    equal scores the newest position). Where a row has at most k + 1, dropping it leaves select_topk's k, no sort."""
    s = scores.masked_fill(~valid, float("inf"))
    low = valid & (s == s.amin(-1, keepdim=True))                                   # (..., S) the lowest scores
    newest = torch.where(low, pos, -1).amax(-1, keepdim=True)                       # (..., 1)
    return low & (pos == newest) & (valid.sum(-1, keepdim=True) > k)

def group_mean(x: torch.Tensor) -> torch.Tensor:
    """Average the G query heads of each KV group: (B, Hkv, G, ...) -> (B, Hkv, ...)."""
    return x.mean(dim=2)

def recent_mask(pos: torch.Tensor, n_recent: int | torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
    """(B, Hkv, S) bool: live entries among the last `n_recent` positions. pos: (B, Hkv, S); seen: (B,)."""
    n = n_recent[..., None] if torch.is_tensor(n_recent) else n_recent            # (B, Hkv or 1, 1) or an int
    return (pos >= 0) & (pos >= seen[:, None, None] - n)

def first_positions_mask(pos: torch.Tensor, n_first: int) -> torch.Tensor:
    """(B, Hkv, S) bool: live entries whose position is among the first `n_first` (attention sinks)."""
    return (pos >= 0) & (pos < n_first)
