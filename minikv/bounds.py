"""The Ada-KV error bound (Feng et al., arXiv 2407.11550, Theorem 3.1) and the true error it bounds.

One layer, one query, h query heads. Head i: weights A_i (n,), values V_i (n, d), output block W_i (d, D) (the rows of
W_o that multiply head i). Output y = sum_i A_i V_i W_i. Eviction keeps a set per head and *renormalises* the kept
weights, Â_i = I_i A_i / F_i with F_i = sum_j I_i^j A_i^j (kept mass); ŷ = sum_i Â_i V_i W_i. Then
    ||y - ŷ||_1 <= 2 sum_i C_i (1 - F_i) <= 2 h C - 2 C sum_i F_i,   C_i = max_j ||V_i[j] W_i||_1,  C = max_i C_i,
from the identity ||A_i - Â_i||_1 = 2 (1 - F_i). A head left with nothing (F_i = 0) outputs 0 (the bound still holds).

GQA: masks and values may be given per KV head (Hkv rows); KV head k serves query heads k*G .. k*G + G - 1, so they
are expanded to the h query heads before use. Policies select with the group *mean* of the weights.
Everything here works in float64 when given float64 (bound checks should be)."""
from __future__ import annotations

import torch

from minikv.errors import BadInput

def expand_kv_heads(x: torch.Tensor, n_heads: int, dim: int) -> torch.Tensor:
    """Repeat each KV head's slice G = n_heads // Hkv times along `dim` (no-op when it already has n_heads)."""
    hkv = x.shape[dim]
    if hkv == n_heads:
        return x
    if n_heads % hkv:
        raise BadInput(f"{n_heads} query heads is not a multiple of {hkv} KV heads")
    return x.repeat_interleave(n_heads // hkv, dim=dim)

def o_proj_blocks(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """W_i^O blocks (h, d, D) from an o_proj weight (D, h*d): y = sum_i out_i @ W_i (nn.Linear computes x @ W.T)."""
    D, hd = weight.shape
    if hd % n_heads:
        raise BadInput(f"o_proj input width {hd} is not a multiple of {n_heads} heads")
    return weight.T.reshape(n_heads, hd // n_heads, D)                    # (h, d, D)

def projected_value_norms(V: torch.Tensor, W_o_blocks: torch.Tensor) -> torch.Tensor:
    """C_i = max_j ||V_i[j] W_i^O||_1 over all n entries, evicted ones included (Thm 3.1). V: (h|Hkv, n, d) -> (h,)."""
    h = W_o_blocks.shape[0]
    V = expand_kv_heads(V, h, dim=-3)                                      # (h, n, d)
    if V.shape[-2] == 0:
        return V.new_zeros(h)
    return (V @ W_o_blocks).abs().sum(-1).amax(-1)                         # (h, n, D) -> (h,)

def kept_mass(A: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """F_i = sum_j I_i^j A_i^j, the attention mass each head keeps. A: (..., h, n); mask: (..., h|Hkv, n) -> (..., h)."""
    mask = expand_kv_heads(mask, A.shape[-2], dim=-2)
    return (A * mask).sum(-1)

def renormalise(A: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Â_i = I_i A_i / F_i (the kept weights renormalised, as attention over the kept entries gives); 0 if F_i = 0."""
    mask = expand_kv_heads(mask, A.shape[-2], dim=-2)
    kept = A * mask
    F = kept.sum(-1, keepdim=True)
    return torch.where(F > 0, kept / torch.where(F > 0, F, 1), 0)

def per_head_bound(A: torch.Tensor, mask: torch.Tensor, C_i: torch.Tensor) -> torch.Tensor:
    """2 sum_i C_i (1 - F_i), the per-head form of Theorem 3.1. A: (..., h, n); C_i: (h,) -> (...)."""
    return 2 * (C_i * (1 - kept_mass(A, mask))).sum(-1)

def global_bound(A: torch.Tensor, mask: torch.Tensor, C_i: torch.Tensor) -> torch.Tensor:
    """2 h C - 2 C sum_i F_i with C = max_i C_i, the looser form of Theorem 3.1 that Ada-KV minimises (Thm 3.3)."""
    C, h = C_i.amax(-1), A.shape[-2]
    return 2 * h * C - 2 * C * kept_mass(A, mask).sum(-1)

def true_l1_error(A: torch.Tensor, V: torch.Tensor, W_o_blocks: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """||y - ŷ||_1, y = sum_i A_i V_i W_i, ŷ the same with renormalised kept weights Â_i (0 for an emptied head).
    A: (h, n); V: (h|Hkv, n, d); W_o_blocks: (h, d, D); mask: (h|Hkv, n) bool. Computed as the L1 norm of
    sum_i (A_i - Â_i) V_i W_i, which equals y - ŷ and avoids cancelling two nearly equal outputs."""
    h = A.shape[-2]
    V = expand_kv_heads(V, h, dim=-3)                                      # (h, n, d)
    diff = A - renormalise(A, mask)                                        # (h, n)
    per_head = (diff[:, None, :] @ V).squeeze(-2)                          # (h, d)
    return torch.einsum("hd,hdD->D", per_head, W_o_blocks).abs().sum()     # |delta| summed over the D outputs
