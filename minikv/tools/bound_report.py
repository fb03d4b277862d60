"""`minikv generate --bound-report`: the Ada-KV bound (minikv/bounds.py, Theorem 3.1) against the true L1 error of the
last prompt query's attention output, per layer, for one real prompt and a policy.
"""
from __future__ import annotations

import copy

import torch

from minikv.bounds import (global_bound, kept_mass, kept_positions_mask, o_proj_blocks, per_head_bound,
                           projected_value_norms, true_l1_error)
from minikv.errors import BadInput
from minikv.checks import check_token_row
from minikv.generate import prefill


def layer_bound_row(A: torch.Tensor, V: torch.Tensor, W_o_blocks: torch.Tensor, mask: torch.Tensor) -> dict:
    """One layer's true L1 error and both bounds of Theorem 3.1 (float64), for one query."""
    A, V, W = (t.to(torch.float64) for t in (A, V, W_o_blocks))
    C, F = projected_value_norms(V, W), kept_mass(A, mask)
    return {"true_l1": float(true_l1_error(A, V, W, mask)), "per_head_bound": float(per_head_bound(A, mask, C)),
            "global_bound": float(global_bound(A, mask, C)), "kept_mass_min": float(F.min()),
            "kept_mass_mean": float(F.mean())}


@torch.no_grad()
def record_prefill(model, ids: list[int], policy) -> list[dict]:
    """Prefill one prompt with `policy`, recording per layer the last query's full probabilities, values and keep mask:
    a copy of the policy (also needing "last_rows") has its after_prefill wrapped to copy the last query's attention
    row over the uncompressed store; the positions before and after the prompt give each KV head's kept set."""
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
    """Per layer (one row each), the true L1 error of the last prompt query's attention output (full cache vs the
    renormalised attention over the entries the policy kept, C_i from the layer's o_proj blocks) vs the Theorem 3.1
    bounds."""
    rows = []
    for layer, rec in enumerate(record_prefill(model, tokenizer_ids, policy)):
        W = o_proj_blocks(model.layers[layer].self_attn.o_proj.weight, model.cfg.num_attention_heads)
        rows.append({"layer": layer, **layer_bound_row(rec["A"], rec["V"], W, rec["mask"]),
                     "kept_entries": rec["mask"].sum(-1).tolist()})
    return rows
