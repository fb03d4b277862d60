"""Reference attention of new queries over one layer's KV store.

Query heads are grouped by KV head (GQA) by folding the G query heads of a group into the query axis, so keys and
values are never copied G times (no `repeat_kv`). A query at position p sees the live entries with position <= p
(never decided by slot). Prompts run in query chunks (no (B, Hq, T, S) tensor), each adding what a policy needs:
  "colsum"     attention each entry received, summed over the queries: (B, Hkv, G, S)       (H2O, D2O)
  "last_rows"  probabilities of the last `window` queries:             (B, Hkv, G, w, S)    (SnapKV, Ada-KV, CORM)
  "probs"      all probabilities (decode steps, small T):               (B, Hkv, G, T, S)"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from minikv.store import LayerStore
from minikv.errors import BadInput

_CHUNK_ELEMENTS = {"cuda": 1 << 26, "cpu": 1 << 22}  # scores per query chunk: 256 MiB of float32 on a GPU, 16 on a CPU

def softmax_visible(scores: torch.Tensor, visible: torch.Tensor, lo: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over the visible entries as (e = exp(score - row max), 0 where not visible; r = row sums), e / r, in
    float32 (float64 in oracle mode; overwrites `scores` if so). `visible` covers the columns from `lo` on."""
    dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32
    s = scores.to(dtype)
    s[..., lo:].masked_fill_(~visible, float("-inf"))
    m = s.amax(dim=-1, keepdim=True).clamp_min(torch.finfo(dtype).min)    # finite even for fully masked rows
    e = s.sub_(m).exp_()
    return e, e.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(dtype).tiny)

def attend(q: torch.Tensor, qpos: torch.Tensor, store: LayerStore, need: frozenset = frozenset(),
           window: int = 0, chunk: int | None = None, use_sdpa: bool = False, padded: bool = True, offset: int = 0):
    """Attention of queries over the store. Returns (out (B, Hq, T, d), stats dict as requested in `need`).
    q: (B, Hq, T, d) already rotated; qpos: (B, T) absolute positions, -1 for padding queries (output 0).
    need: subset of {"colsum", "last_rows", "probs"}; window: rows kept for "last_rows"; use_sdpa: outputs through
    torch's fused SDPA, statistics (if any) in a second pass; padded: False promises that no query is padding (a
    causal mask for a fresh prompt); offset: tokens of the same prompt appended before these (a prompt in pieces)."""
    (B, Hq, T, d), (Hkv, S) = q.shape, store.k.shape[1:3]
    G = Hq // Hkv                                        # (LlamaConfig checks that Hkv divides Hq)
    if qpos.shape != (B, T):
        raise BadInput(f"attend: qpos shape {tuple(qpos.shape)} != (B, T) = {(B, T)}")
    fresh = store.heads_aligned and store.max_len_bound == offset + T   # only this prompt: t sees slots <= offset + t
    out = _attend_sdpa(q, qpos, store, offset if fresh and not padded else None) if use_sdpa else torch.empty_like(q)
    if use_sdpa and not need:
        return out, {}
    scale, w = 1.0 / math.sqrt(d), min(window, T)
    chunk = chunk or max(1, _CHUNK_ELEMENTS.get(q.device.type, 1 << 26) // max(1, B * Hq * S))
    shapes = {"colsum": (B, Hkv, G, S), "last_rows": (B, Hkv, G, w, S), "probs": (B, Hkv, G, T, S)}
    stats = {name: torch.zeros(shape, dtype=torch.float64 if q.dtype == torch.float64 else torch.float32,
                               device=q.device) for name, shape in shapes.items() if name in need}
    # With SDPA's outputs only the statistics are left to compute: "last_rows" alone needs the last w queries only.
    for t0 in range(T - w if use_sdpa and need == {"last_rows"} else 0, T, chunk):
        t1 = min(T, t0 + chunk)
        tc, Sc = t1 - t0, min(S, offset + t1) if fresh else S
        qc = (q[:, :, t0:t1] * scale).view(B, Hkv, G, tc, d)               # (B, Hkv, G, tc, d)
        # A fresh prompt without padding: every query of the chunk sees the slots before t0, only the rest is masked.
        e, r = _chunk_exp(qc, qpos[:, t0:t1], store, Sc, offset + t0 if fresh and not padded else 0)  # softmax e / r
        if "colsum" in stats:     # sum_i e_ij / r_i as one product (no divided copy of the chunk): (B, Hkv, G, Sc)
            stats["colsum"][..., :Sc] += (r.reciprocal().transpose(-1, -2) @ e).squeeze(-2)
        if not use_sdpa or need - {"colsum"}:
            e.div_(r)                                                       # the softmax (B, Hkv, G, tc, Sc)
            if not use_sdpa:
                out[:, :, t0:t1] = (e.to(store.v.dtype).flatten(2, 3) @ store.v[:, :, :Sc]).view(B, Hq, tc, d)
            _store_rows(stats, e, t0, t1, T - w)
        del e                   # this chunk's scores go before the next chunk's exist (a long prompt's peak)
    return out, stats

def _chunk_exp(qc: torch.Tensor, qpos: torch.Tensor, store: LayerStore, Sc: int, lo: int):
    """softmax_visible of scaled queries qc (B, Hkv, G, tc, d) at positions qpos (B, tc) over the first Sc slots,
    masked from slot `lo` on. On a GPU a half-precision GEMM writes float32 scores (a memory-bound pass: no copy)."""
    B, Hkv, G, tc, d = qc.shape
    k = store.k[:, :, :Sc]                                                  # (B, Hkv, Sc, d)
    scores = (torch.bmm(qc.reshape(B * Hkv, G * tc, d), k.flatten(0, 1).mT, out_dtype=torch.float32)
              if qc.is_cuda and qc.dtype in (torch.bfloat16, torch.float16) else qc.flatten(2, 3) @ k.mT)
    pos = store.pos[:, :, None, None, lo:Sc]                                # (B, Hkv, 1, 1, Sc-lo)
    visible = (pos >= 0) & (pos <= qpos[:, None, None, :, None])           # (B, Hkv, 1, tc, Sc-lo)
    return softmax_visible(scores.view(B, Hkv, G, tc, Sc), visible, lo)

def _store_rows(stats: dict, p: torch.Tensor, t0: int, t1: int, first_row: int) -> None:
    """Copy the probabilities p (B, Hkv, G, tc, Sc) of queries t0..t1-1 into "probs" / "last_rows" (from first_row)."""
    if "probs" in stats:
        stats["probs"][:, :, :, t0:t1, :p.shape[-1]] = p
    if "last_rows" in stats and t1 > first_row:
        lo = max(t0, first_row)
        stats["last_rows"][:, :, :, lo - first_row:t1 - first_row, :p.shape[-1]] = p[:, :, :, lo - t0:]

def _attend_sdpa(q: torch.Tensor, qpos: torch.Tensor, store: LayerStore, offset: int | None = None) -> torch.Tensor:
    """The same attention through torch's fused SDPA (no probabilities). offset: the store holds only this prompt's
    tokens, none of them padding, these T after `offset` others (host-side facts, no GPU sync): a causal mask."""
    (B, Hq, T, d), Hkv = q.shape, store.k.shape[1]
    if offset == 0:      # the plain causal mask is exact, and SDPA may use flash (enable_gqa: keys not copied G times)
        return F.scaled_dot_product_attention(q, store.k[:, :, :T], store.v[:, :, :T], is_causal=True, enable_gqa=Hq > Hkv)
    S, pos = store.capacity if offset is None else offset + T, store.pos[:, :1] if store.heads_aligned else store.pos
    visible = (torch.ones(T, S, dtype=torch.bool, device=q.device).tril(offset) if offset is not None else   # t <= o+t
               (pos[:, :, None, :] >= 0) & (pos[:, :, None, :] <= qpos[:, None, :, None]))   # (B, 1 or Hkv, T, S)
    # A KV head's G query heads as G*T queries (as `attend` does): SDPA sees no GQA, so a masked kernel can take it.
    out = F.scaled_dot_product_attention(q.reshape(B, Hkv, Hq // Hkv * T, d), store.k[:, :, :S], store.v[:, :, :S],
                                         visible if Hq == Hkv else torch.cat([visible] * (Hq // Hkv), dim=-2))
    return torch.nan_to_num(out.view(B, Hq, T, d), nan=0.0)   # rows that see nothing (padding): NaN from SDPA, 0 here
