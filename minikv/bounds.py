"""The Ada-KV error bound (Feng et al., arXiv 2407.11550, Theorem 3.1) and the true error it bounds.

One layer, one query, h query heads. Head i: weights A_i (n,), values V_i (n, d), output block W_i (d, D) (the rows of
W_o that multiply head i). Output y = sum_i A_i V_i W_i. Eviction keeps a set per head and *renormalises* the kept
weights, Â_i = I_i A_i / F_i with F_i = sum_j I_i^j A_i^j (kept mass); ŷ = sum_i Â_i V_i W_i. Then
    ||y - ŷ||_1 <= 2 sum_i C_i (1 - F_i) <= 2 h C - 2 C sum_i F_i,   C_i = max_j ||V_i[j] W_i||_1,  C = max_i C_i,
from the identity ||A_i - Â_i||_1 = 2 (1 - F_i). A head left with nothing (F_i = 0) outputs 0 (the bound still holds).

GQA: masks and values may be given per KV head (Hkv rows); KV head k serves query heads k*G .. k*G + G - 1, so they
are expanded to the h query heads before use. Policies select with the group *mean* of the weights.
Everything here works in float64 when given float64 (bound checks should be).
"""
from __future__ import annotations

import copy

import torch

from minikv.errors import BadInput
from minikv.generate import check_token_row, prefill


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
    C = C_i.amax(-1)
    h = A.shape[-2]
    return 2 * h * C - 2 * C * kept_mass(A, mask).sum(-1)


def true_l1_error(A: torch.Tensor, V: torch.Tensor, W_o_blocks: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """||y - ŷ||_1, y = sum_i A_i V_i W_i, ŷ the same with renormalised kept weights Â_i (0 for an emptied head).

    A: (h, n); V: (h|Hkv, n, d); W_o_blocks: (h, d, D); mask: (h|Hkv, n) bool. Computed as the L1 norm of
    sum_i (A_i - Â_i) V_i W_i, which equals y - ŷ and avoids cancelling two nearly equal outputs.
    """
    h = A.shape[-2]
    V = expand_kv_heads(V, h, dim=-3)                                      # (h, n, d)
    diff = A - renormalise(A, mask)                                        # (h, n)
    per_head = (diff[:, None, :] @ V).squeeze(-2)                          # (h, d)
    delta = torch.einsum("hd,hdD->D", per_head, W_o_blocks)                # (D,)
    return delta.abs().sum()


def layer_bound_row(A: torch.Tensor, V: torch.Tensor, W_o_blocks: torch.Tensor, mask: torch.Tensor) -> dict:
    """One layer's true L1 error and both bounds of Theorem 3.1 (float64), for one query."""
    A, V, W = (t.to(torch.float64) for t in (A, V, W_o_blocks))
    C = projected_value_norms(V, W)
    F = kept_mass(A, mask)
    return {"true_l1": float(true_l1_error(A, V, W, mask)), "per_head_bound": float(per_head_bound(A, mask, C)),
            "global_bound": float(global_bound(A, mask, C)), "kept_mass_min": float(F.min()),
            "kept_mass_mean": float(F.mean())}


# ---- the bound on a real prompt --------------------------------------------------------------------------------
def kept_positions_mask(pos_before: torch.Tensor, pos_after: torch.Tensor) -> torch.Tensor:
    """(..., S) bool: which live entries of `pos_before` (..., S) are still present in `pos_after` (..., S')."""
    same = pos_before[..., :, None] == pos_after[..., None, :]             # (..., S, S')
    return (pos_before >= 0) & same.any(-1)


@torch.no_grad()
def record_prefill(model, ids: list[int], policy) -> list[dict]:
    """Prefill one prompt with `policy`, recording per layer the last query's full probabilities, values and keep mask.

    A copy of the policy runs through generate.prefill with its after_prefill wrapped: the wrapper copies the
    attention row of the last prompt query over the uncompressed store ("last_rows" with at least one row is added to
    what the policy needs) and calls the policy. Once the prompt is done (after_prompt included), the positions before
    and after give the kept set of each KV head.
    """
    ids = check_token_row(ids, model.cfg.vocab_size, "bound report prompt")
    if len(ids) > model.cfg.max_position_embeddings:
        raise BadInput(f"bound report prompt of {len(ids)} tokens is longer than the model's context "
                       f"({model.cfg.max_position_embeddings} tokens)")
    records: list[dict] = []

    def hook(layer, store, stats):
        last = stats["last_rows"][0, :, :, -1].clone()                   # (Hkv, G, S) last query, before eviction
        v, pos_before = store.v[0].clone(), store.pos[0].clone()           # (Hkv, S, d), (Hkv, S)
        policy.after_prefill(layer, store, stats)
        records.append({"A": last.flatten(0, 1), "V": v, "pos": pos_before})

    capture = copy.copy(policy)                                            # a policy is a configuration: cheap
    capture.after_prefill, capture.prefill_pass = hook, "one_pass"
    capture.prefill_needs, capture.window = frozenset(policy.prefill_needs) | {"last_rows"}, max(policy.window, 1)
    _, cache = prefill(model, [ids], capture)
    for r, store in zip(records, cache.layers):
        r["mask"] = kept_positions_mask(r["pos"], store.pos[0])          # (Hkv, S)
    return records


@torch.no_grad()
def bound_report(model, tokenizer_ids: list[int], policy) -> list[dict]:
    """Per layer, the true L1 error of the last prompt query's attention output vs the Theorem 3.1 bounds.

    The attention before compression (full cache) is compared with the renormalised attention over the entries the
    policy kept in that layer; C_i uses the layer's o_proj blocks. Returns one row (a dict) per layer.
    """
    rows = []
    n_heads = model.cfg.num_attention_heads
    for layer, rec in enumerate(record_prefill(model, tokenizer_ids, policy)):
        W = o_proj_blocks(model.layers[layer].self_attn.o_proj.weight, n_heads)
        row = {"layer": layer, **layer_bound_row(rec["A"], rec["V"], W, rec["mask"])}
        row["kept_entries"] = rec["mask"].sum(-1).tolist()
        rows.append(row)
    return rows

