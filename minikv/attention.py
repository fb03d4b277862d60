"""Reference attention of new queries over one layer's KV store.

Query heads are grouped by KV head (GQA) by folding the G query heads of a group into the query axis, so keys and
values are never copied G times (no `repeat_kv`). Visibility is decided by *position*, never by slot: a query at
position p sees the live entries with position <= p. Long prompts are processed in query chunks so the
(B, Hq, T, S) score tensor is never materialised for large T; what a policy needs from the probabilities is
accumulated chunk by chunk:
  "colsum"     attention each entry received, summed over the queries: (B, Hkv, G, S)       (H2O, D2O)
  "last_rows"  probabilities of the last `window` queries:             (B, Hkv, G, w, S)    (SnapKV, Ada-KV, CORM)
  "probs"      all probabilities (decode steps, small T):               (B, Hkv, G, T, S)"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from minikv.store import LayerStore
from minikv.errors import BadInput

# Scores per query chunk (all rows, heads): 256 MiB of float32 on a GPU (few large kernels), 16 MiB on a CPU (cache)
_CHUNK_ELEMENTS = {"cuda": 1 << 26, "cpu": 1 << 22}

def softmax_visible(scores: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """Softmax over the visible entries (float32, or float64 in oracle mode; overwrites `scores` if already so);
    a row that sees nothing gives 0."""
    dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32
    s = scores.to(dtype).masked_fill_(~visible, float("-inf"))
    m = s.amax(dim=-1, keepdim=True).clamp_min(torch.finfo(dtype).min)    # finite even for fully masked rows
    e = s.sub_(m).exp_()
    return e.div_(e.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(dtype).tiny))

def attend(q: torch.Tensor, qpos: torch.Tensor, store: LayerStore, need: frozenset = frozenset(),
           window: int = 0, chunk: int | None = None, use_sdpa: bool = False, padded: bool = True):
    """Attention of queries over the store. Returns (out (B, Hq, T, d), stats dict as requested in `need`).
    q: (B, Hq, T, d) already rotated; qpos: (B, T) absolute positions, -1 for padding queries (output 0).
    need: subset of {"colsum", "last_rows", "probs"}; window: rows kept for "last_rows"; use_sdpa: outputs through
    torch's fused SDPA, statistics (if any) in a second pass; padded: False promises that no query is padding
    (lets the SDPA path use a plain causal mask on a fresh prompt)."""
    B, Hq, T, d = q.shape
    Hkv, S = store.k.shape[1], store.k.shape[2]
    if Hq % Hkv:
        raise BadInput(f"attend: {Hq} query heads is not a multiple of {Hkv} KV heads")
    G = Hq // Hkv
    if qpos.shape != (B, T):
        raise BadInput(f"attend: qpos shape {tuple(qpos.shape)} != (B, T) = {(B, T)}")
    out = _attend_sdpa(q, qpos, store, padded) if use_sdpa else torch.empty_like(q)   # fused outputs, no probs
    if use_sdpa and not need:
        return out, {}
    scale = 1.0 / math.sqrt(d)
    if chunk is None:
        chunk = max(1, _CHUNK_ELEMENTS.get(q.device.type, 1 << 26) // max(1, B * Hq * S))
    w = min(window, T)
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    shapes = {"colsum": (B, Hkv, G, S), "last_rows": (B, Hkv, G, w, S), "probs": (B, Hkv, G, T, S)}
    stats = {name: torch.zeros(shape, dtype=acc_dtype, device=q.device)
             for name, shape in shapes.items() if name in need}
    fresh = store.heads_aligned and store.max_len_bound == T   # only these T tokens, in slot order: t sees slots <= t
    # With SDPA's outputs only the statistics are left to compute: "last_rows" alone needs the last w queries only.
    for t0 in range(T - w if use_sdpa and need == {"last_rows"} else 0, T, chunk):
        t1 = min(T, t0 + chunk)
        tc, Sc = t1 - t0, min(S, t1) if fresh else S
        qc = q[:, :, t0:t1].reshape(B, Hkv, G * tc, d)                      # (B, Hkv, G*tc, d), groups folded
        scores = (qc @ store.k[:, :, :Sc].transpose(-1, -2)).view(B, Hkv, G, tc, Sc).mul_(scale)  # (B,Hkv,G,tc,S)
        pos = store.pos[:, :, None, None, :Sc]                              # (B, Hkv, 1, 1, Sc)
        visible = (pos >= 0) & (pos <= qpos[:, None, None, t0:t1, None])   # (B, Hkv, 1, tc, Sc)
        p = softmax_visible(scores, visible)                                # (B, Hkv, G, tc, Sc)
        if not use_sdpa:
            out[:, :, t0:t1] = (p.to(store.v.dtype).view(B, Hkv, G * tc, Sc) @ store.v[:, :, :Sc]).view(B, Hq, tc, d)
        _accumulate(stats, p, t0, t1, T - w)
    return out, stats

def _accumulate(stats: dict, p: torch.Tensor, t0: int, t1: int, first_row: int) -> None:
    """Add the chunk of queries t0..t1-1 (p: (B, Hkv, G, tc, S)) to the requested statistics; "last_rows" keeps
    the queries from `first_row` on."""
    Sc = p.shape[-1]                                      # a causal chunk may cover only the first Sc slots
    if "colsum" in stats:
        stats["colsum"][..., :Sc] += p.sum(dim=3)
    if "probs" in stats:
        stats["probs"][:, :, :, t0:t1, :Sc] = p
    if "last_rows" in stats and t1 > first_row:
        lo = max(t0, first_row)
        stats["last_rows"][:, :, :, lo - first_row:t1 - first_row, :Sc] = p[:, :, :, lo - t0:]

def _attend_sdpa(q: torch.Tensor, qpos: torch.Tensor, store: LayerStore, padded: bool = True) -> torch.Tensor:
    """The same attention through torch's fused SDPA (no probabilities)."""
    T, G = q.shape[2], q.shape[1] // store.k.shape[1]
    if store.heads_aligned and store.max_len_bound == T and not padded:     # (host-side facts: no GPU sync)
        # The store's first append, without padding: the plain causal mask is exact, and SDPA may use flash.
        return _sdpa(q, store.k[:, :, :T], store.v[:, :, :T], None, G, is_causal=True)
    visible = (store.pos[:, :, None, :] >= 0) & (store.pos[:, :, None, :] <= qpos[:, None, :, None])  # (B, Hkv, T, S)
    # The mask is per KV head; share it while every head holds the same entries, else repeat it per query head.
    mask = visible[:, :1] if store.heads_aligned else visible.repeat_interleave(G, dim=1)  # (B, 1 or Hq, T, S)
    # Rows that see nothing (padding queries) come back NaN from SDPA; the reference returns 0 for them.
    return torch.nan_to_num(_sdpa(q, store.k, store.v, mask, G), nan=0.0)

def _sdpa(q, k, v, mask, G: int, is_causal: bool = False) -> torch.Tensor:
    """SDPA with GQA (enable_gqa: keys and values are not copied G times)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=G > 1)
