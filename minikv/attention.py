"""Reference attention of new queries over one layer's KV store.

Query heads are grouped by KV head (GQA) by folding the G query heads of a group into the query axis (keys and
values are never copied G times). A query at position p sees the live entries with position <= p (never decided by
slot). Prompts run in query chunks (no (B, Hq, T, S) tensor), each adding what a policy needs:
  "colsum"     attention each entry received, summed over the queries: (B, Hkv, G, S)       (H2O, D2O)
  "last_rows"  probabilities of the last `window` queries:             (B, Hkv, G, w, S)    (SnapKV, Ada-KV, CORM)
  "probs"      all probabilities (decode steps, small T):               (B, Hkv, G, T, S)
The fast path (use_sdpa) runs fused kernels: a fresh prompt without padding gets "colsum" from them too."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from minikv.store import LayerStore
from minikv.errors import BadInput

_HALF = (torch.bfloat16, torch.float16)        # what torch's flash kernel takes on a GPU (any dtype on a CPU)
_CHUNK_ELEMENTS = {"cuda": 1 << 26, "cpu": 1 << 22}  # scores per query chunk: 256 MiB of float32 on a GPU, 16 on a CPU

def softmax_visible(scores: torch.Tensor, visible: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over the visible entries as (e = exp(score - row max), 0 where not visible; r = row sums), e / r, in
    float32 (float64 in oracle mode; overwrites `scores` if so)."""
    dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32
    s = scores.to(dtype).masked_fill_(~visible, float("-inf"))
    m = s.amax(dim=-1, keepdim=True).clamp_min(torch.finfo(dtype).min)    # finite even for fully masked rows
    e = s.sub_(m).exp_()
    return e, e.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(dtype).tiny)

def attend(q: torch.Tensor, qpos: torch.Tensor, store: LayerStore, need: frozenset = frozenset(),
           window: int = 0, chunk: int | None = None, use_sdpa: bool = False, padded: bool = True, offset: int = 0):
    """Attention of queries over the store. Returns (out (B, Hq, T, d), stats dict as requested in `need`).
    q: (B, Hq, T, d) already rotated; qpos: (B, T) absolute positions, -1 for padding queries (output 0).
    need: subset of {"colsum", "last_rows", "probs"}; window: rows kept for "last_rows"; use_sdpa: outputs through
    torch's fused kernels, statistics (if any) in a second pass; padded: False promises that no query is padding;
    offset: tokens of the same prompt appended before these (a prompt in pieces)."""
    (B, Hq, T, d), (Hkv, S) = q.shape, store.k.shape[1:3]
    G = Hq // Hkv                                        # (LlamaConfig checks that Hkv divides Hq)
    if qpos.shape != (B, T):
        raise BadInput(f"attend: qpos shape {tuple(qpos.shape)} != (B, T) = {(B, T)}")
    fresh = store.heads_aligned and store.max_len_bound == offset + T   # only this prompt: t sees slots <= offset + t
    if use_sdpa and fresh and not padded and (q.device.type == "cpu" or q.is_cuda and q.dtype in _HALF):
        out, lse = _attend_flash(q, store, offset)        # a fresh prompt, no padding: outputs, then column sums
        stats = {"colsum": _colsum_flash(q, lse, store, offset)} if "colsum" in need else {}
        need = need - {"colsum"}
    else:
        out, stats = _attend_sdpa(q, qpos, store) if use_sdpa else torch.empty_like(q), {}
    if use_sdpa and not need:
        return out, stats
    scale, w = 1.0 / math.sqrt(d), min(window, T)
    chunk = chunk or max(1, _CHUNK_ELEMENTS.get(q.device.type, 1 << 26) // max(1, B * Hq * S))
    shapes = {"colsum": (B, Hkv, G, S), "last_rows": (B, Hkv, G, w, S), "probs": (B, Hkv, G, T, S)}
    stats |= {name: torch.zeros(shape, dtype=torch.float64 if q.dtype == torch.float64 else torch.float32,
                               device=q.device) for name, shape in shapes.items() if name in need}
    # With SDPA's outputs only the statistics are left to compute: "last_rows" alone needs the last w queries only.
    for t0 in range(T - w if use_sdpa and need == {"last_rows"} else 0, T, chunk):
        t1 = min(T, t0 + chunk)
        tc, Sc = t1 - t0, min(S, offset + t1) if fresh else S
        qc = (q[:, :, t0:t1] * scale).view(B, Hkv, G, tc, d)               # (B, Hkv, G, tc, d)
        e, r = _chunk_exp(qc, qpos[:, t0:t1], store, Sc)                   # the softmax is e / r
        if "colsum" in need:      # sum_i e_ij / r_i as one product (no divided copy of the chunk): (B, Hkv, G, Sc)
            stats["colsum"][..., :Sc] += (r.reciprocal().transpose(-1, -2) @ e).squeeze(-2)
        if not use_sdpa or need - {"colsum"}:
            e.div_(r)                                                       # the softmax (B, Hkv, G, tc, Sc)
            if not use_sdpa:
                out[:, :, t0:t1] = (e.to(store.v.dtype).flatten(2, 3) @ store.v[:, :, :Sc]).view(B, Hq, tc, d)
            _store_rows(stats, e, t0, t1, T - w)
        del e                   # this chunk's scores go before the next chunk's exist (a long prompt's peak)
    return out, stats

def _chunk_exp(qc: torch.Tensor, qpos: torch.Tensor, store: LayerStore, Sc: int):
    """softmax_visible of scaled queries qc (B, Hkv, G, tc, d) at positions qpos (B, tc) over the first Sc slots.
    On a GPU a half-precision GEMM writes float32 scores (a memory-bound pass: no copy)."""
    B, Hkv, G, tc, d = qc.shape
    k = store.k[:, :, :Sc]                                                  # (B, Hkv, Sc, d)
    scores = (torch.bmm(qc.reshape(B * Hkv, G * tc, d), k.flatten(0, 1).mT, out_dtype=torch.float32)
              if qc.is_cuda and qc.dtype in _HALF else qc.flatten(2, 3) @ k.mT)
    pos = store.pos[:, :, None, None, :Sc]                                  # (B, Hkv, 1, 1, Sc)
    visible = (pos >= 0) & (pos <= qpos[:, None, None, :, None])           # (B, Hkv, 1, tc, Sc)
    return softmax_visible(scores.view(B, Hkv, G, tc, Sc), visible)

def _store_rows(stats: dict, p: torch.Tensor, t0: int, t1: int, first_row: int) -> None:
    """Copy the probabilities p (B, Hkv, G, tc, Sc) of queries t0..t1-1 into "probs" / "last_rows" (from first_row)."""
    for name, first in (("probs", 0), ("last_rows", first_row)):
        if name in stats and t1 > first:
            lo = max(t0, first)
            stats[name][:, :, :, lo - first:t1 - first, :p.shape[-1]] = p[:, :, :, lo - t0:]

def _attend_sdpa(q: torch.Tensor, qpos: torch.Tensor, store: LayerStore) -> torch.Tensor:
    """The same attention through torch's fused SDPA (no probabilities), under the mask of the store's positions."""
    (B, Hq, T, d), Hkv = q.shape, store.k.shape[1]
    pos = store.pos[:, :1] if store.heads_aligned else store.pos                     # (B, 1 or Hkv, S)
    visible = (pos[:, :, None, :] >= 0) & (pos[:, :, None, :] <= qpos[:, None, :, None])   # (B, 1 or Hkv, T, S)
    # A KV head's G query heads as G*T queries (as `attend` does): SDPA sees no GQA, so a masked kernel can take it.
    out = F.scaled_dot_product_attention(q.reshape(B, Hkv, Hq // Hkv * T, d), store.k, store.v,
                                         visible if Hq == Hkv else torch.cat([visible] * (Hq // Hkv), dim=-2))
    return torch.nan_to_num(out.view(B, Hq, T, d), nan=0.0)   # rows that see nothing (padding): NaN from SDPA, 0 here

def _flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float | None = None):
    """(out, lse) of fused attention: lse (B, H, Tq) = log sum_j exp(score_ij), each query's log-sum-exp, a by-product
    the public SDPA does not return, hence torch's private flash ops. `causal`: query t sees keys <= t."""
    if q.is_cuda:
        return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)[:2]
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)

def _attend_flash(q: torch.Tensor, store: LayerStore, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Outputs (B, Hq, T, d) and log-sum-exps (B, Hq, T) of a fresh prompt's T queries (no padding) after `offset`
    others: the piece's own slots under a causal mask, the earlier slots whole, the two joined by their weights."""
    (B, Hq, T, d), Hkv = q.shape, store.k.shape[1]
    out, lse = _flash(q, store.k[:, :, offset:offset + T], store.v[:, :, offset:offset + T], causal=True)  # GQA
    if offset:           # earlier slots: a KV head's G query heads as G*T queries (as `attend` does)
        out0, lse0 = _flash(q.reshape(B, Hkv, -1, d), store.k[:, :, :offset], store.v[:, :, :offset], causal=False)
        lse, own = torch.logaddexp(lse, lse0.reshape(B, Hq, T)), lse   # w out + (1 - w) out0, w the own slots' share:
        out = torch.lerp(out0.reshape(B, Hq, T, d), out, (own - lse).exp()[..., None].to(q.dtype))   # exp(own - lse)
    return out, lse

def _colsum_flash(q: torch.Tensor, lse: torch.Tensor, store: LayerStore, offset: int) -> torch.Tensor:
    """"colsum" (B, Hkv, G, S): sum_i exp(s_ij - lse_i) is exp of the log-sum-exp of a transposed attention, whose
    queries are the keys and whose keys are the queries with -lse_i as one more dimension; a fused kernel adds it up
    and no score lives in memory. Slot j sees query i iff offset + i >= j: the earlier slots see every query."""
    (B, Hq, T, d), (Hkv, S) = q.shape, store.k.shape[1:3]
    keys = q.new_zeros(B, Hq, T, d + 8)        # [q, -lse_i sqrt(d) as two half-precision parts (hi + lo), 0 ...]
    keys[..., :d], keys[..., d] = q, -lse * math.sqrt(d)                       # scaled by 1/sqrt(d) in the kernel
    keys[..., d + 1] = -lse * math.sqrt(d) - keys[..., d].to(lse.dtype)
    colsum, n = torch.zeros(B, Hq, S, dtype=lse.dtype, device=q.device), max(T, 128)   # n: earlier slots per call
    for s0 in (*range(0, offset, n), offset):     # the earlier slots n at a time (bounded copies), then the own ones
        own = s0 == offset                         # the own slots reversed on both axes: a causal mask
        k = store.k[:, :, s0:offset + T].flip(2) if own else store.k[:, :, s0:min(offset, s0 + n)]   # (B,Hkv,n,d)
        kq = k.new_zeros(*k.shape[:3], d + 8)                                # [k, 1, 1, 0 ...]: (B, Hkv, n, d + 8)
        kq[..., :d], kq[..., d:d + 2] = k, 1
        kq = kq[:, :, None].expand(-1, -1, Hq // Hkv, -1, -1).flatten(1, 2)  # (B, Hq, n, d + 8), a view when G = 1
        lse_t = _flash(kq, *[keys.flip(2) if own else keys] * 2, own, scale=1 / math.sqrt(d))[1]
        colsum[..., s0:s0 + k.shape[2]] = (lse_t.flip(-1) if own else lse_t).exp()
    return colsum.view(B, Hkv, Hq // Hkv, S)
