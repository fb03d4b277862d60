"""Small shared operations: the one deterministic top-k, GQA group means, gathers.

Tie-break rule (documented for kernel authors, used by every policy): among equal scores the entry in the lower
slot wins. Live slots are kept in position order, so this is "higher score first, then older position first".
Empty slots never win."""
from __future__ import annotations

import torch
from minikv.errors import BadInput

def select_topk(scores: torch.Tensor, k: int | torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean mask of the top-k entries of `scores` along the last dim, with the documented tie-break.
    scores: (..., S); k: an int or a tensor broadcastable to scores.shape[:-1] (per-head counts);
    valid: (..., S) bool, entries that may be chosen. Returns (..., S) bool with min(k, #valid) True per row."""
    if scores.device.type == "cpu" and torch.isnan(scores).any():   # (on GPU this check would sync every step)
        raise BadInput("select_topk: scores contain NaN")
    s = scores if valid is None else scores.masked_fill(~valid, float("-inf"))
    # A stable descending sort keeps equal scores in slot order, which is the tie-break rule.
    order = torch.sort(s, dim=-1, descending=True, stable=True).indices            # (..., S)
    k = torch.as_tensor(k, device=scores.device)
    chosen = torch.arange(s.shape[-1], device=scores.device) < k[..., None]        # (..., S) by rank
    mask = torch.zeros_like(s, dtype=torch.bool).scatter(-1, order, chosen.expand_as(s))
    return mask if valid is None else mask & valid

def group_mean(x: torch.Tensor) -> torch.Tensor:
    """Average the G query heads of each KV group: (B, Hkv, G, ...) -> (B, Hkv, ...)."""
    return x.mean(dim=2)

def recent_mask(pos: torch.Tensor, n_recent: int | torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
    """(B, Hkv, S) bool: live entries among the last `n_recent` positions. pos: (B, Hkv, S); seen: (B,)."""
    n = torch.as_tensor(n_recent, device=pos.device)
    if n.dim() == 0:
        n = n.expand(pos.shape[:2])
    return (pos >= 0) & (pos >= seen[:, None, None] - n[..., None])

def first_positions_mask(pos: torch.Tensor, n_first: int) -> torch.Tensor:
    """(B, Hkv, S) bool: live entries whose position is among the first `n_first` (attention sinks)."""
    return (pos >= 0) & (pos < n_first)
