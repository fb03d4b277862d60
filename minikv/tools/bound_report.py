"""`minikv generate --bound-report`: the Ada-KV bound (minikv/bounds.py, Theorem 3.1) against the true L1 error of the
last prompt query's attention output, per layer, for one real prompt and a policy."""
from __future__ import annotations

import copy

import torch

from minikv.bounds import global_bound, kept_mass, o_proj_blocks, per_head_bound, projected_value_norms, true_l1_error
from minikv.generate import prefill

def kept_positions_mask(pos_before: torch.Tensor, pos_after: torch.Tensor) -> torch.Tensor:
    """(..., S) bool: which live entries of `pos_before` (..., S) are still present in `pos_after` (..., S')."""
    same = pos_before[..., :, None] == pos_after[..., None, :]             # (..., S, S')
    return (pos_before >= 0) & same.any(-1)

def layer_bound_row(A: torch.Tensor, V: torch.Tensor, W_o_blocks: torch.Tensor, mask: torch.Tensor) -> dict:
    """One layer's true L1 error and both bounds of Theorem 3.1 (float64), for one query."""
    A, V, W = (t.to(torch.float64) for t in (A, V, W_o_blocks))
    C, F = projected_value_norms(V, W), kept_mass(A, mask)
    return {"true_l1": float(true_l1_error(A, V, W, mask)), "per_head_bound": float(per_head_bound(A, mask, C)),
            "global_bound": float(global_bound(A, mask, C)), "kept_mass_min": float(F.min()),
            "kept_mass_mean": float(F.mean())}

@torch.no_grad()
def bound_report(model, ids: list[int], policy) -> list[dict]:
    """Per layer, the true L1 error of the last prompt query's attention output (full cache vs renormalised over what
    the policy kept) and the Theorem 3.1 bounds. A copy of `policy`, also asking for "last_rows", records that query's
    attention row, the values and the positions before each after_prefill; the positions left give the keep mask."""
    records: list[dict] = []

    def hook(layer, store, stats):
        last = stats["last_rows"][0, :, :, -1].clone()                   # (Hkv, G, S) last query, before eviction
        v, pos_before = store.v[0].clone(), store.pos[0].clone()           # (Hkv, S, d), (Hkv, S)
        policy.after_prefill(layer, store, stats)
        records.append({"A": last.flatten(0, 1), "V": v, "pos": pos_before})

    capture = copy.copy(policy)                                            # a policy is a configuration: cheap
    capture.after_prefill = hook                     # CORM exact runs the prompt as decode steps: one pass here
    capture.prefill_pass = "one_pass" if policy.prefill_pass == "token_by_token" else policy.prefill_pass
    capture.prefill_needs, capture.window = frozenset(policy.prefill_needs) | {"last_rows"}, max(policy.window, 1)
    _, cache = prefill(model, [ids], capture)
    rows = []
    for layer, (rec, store) in enumerate(zip(records, cache.layers)):
        mask = kept_positions_mask(rec["pos"], store.pos[0])                # (Hkv, S)
        W = o_proj_blocks(model.layers[layer].self_attn.o_proj.weight, model.cfg.num_attention_heads)
        rows.append({"layer": layer, **layer_bound_row(rec["A"], rec["V"], W, mask),
                     "kept_entries": mask.sum(-1).tolist()})
    return rows
