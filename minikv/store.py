"""The explicit KV store: per layer, per (batch row, KV head), a fixed set of slots holding entries in any order.

Layout: k, v (B, Hkv, S, d), keys stored after RoPE at their true position; pos (B, Hkv, S), each entry's absolute
position, -1 = empty slot; stats: name -> (B, Hkv, S) per-entry statistics of the policy (accumulated attention, last
hit); rows: name -> (B, ...) per-row state (the prompt lengths, D2O's threshold and sizes, Ada-KV's head budgets);
host: name -> value, facts a policy decided once (Python values, read without a GPU sync).

Eviction empties slots in place (pos = -1) and an appended entry takes the first empty slot, so a decode step moves
no data and never waits for the GPU: slot order is NOT position order, and every tie-break reads `pos`. `fit`
compacts the entries to the front in position order and sizes the tensors (one host sync; after prefill, before a
fixed-capacity decode). State lives beside the entries and rows, so a policy is a configuration only."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from minikv.errors import BadInput, is_int

_ROUND = 16           # capacity grows in steps of this many slots (and geometrically: amortised O(1) appends)
NO_POS = 2 ** 62      # the sort key of an empty slot: after every real position

def _round_up(n: int) -> int:
    return max(_ROUND, -(-n // _ROUND) * _ROUND)

def position_order(pos: torch.Tensor, among: torch.Tensor) -> torch.Tensor:
    """Slots sorted by position, the slots `among` first (B, Hkv, S) -> (B, Hkv, S) slot indices."""
    return torch.argsort(torch.where(among, pos, NO_POS), dim=-1, stable=True)

@dataclass
class LayerStore:
    k: torch.Tensor                                   # (B, Hkv, S, d)
    v: torch.Tensor                                   # (B, Hkv, S, d)
    pos: torch.Tensor                                 # (B, Hkv, S) int64, -1 = empty
    seen: torch.Tensor                                # (B,) tokens appended so far = the next token's position
    stats: dict[str, torch.Tensor] = field(default_factory=dict)  # each (B, Hkv, S)
    rows: dict[str, torch.Tensor] = field(default_factory=dict)   # each (B, ...), e.g. "prompt_len" (B,)
    host: dict[str, object] = field(default_factory=dict)
    max_len_bound: int = 0        # host-side, >= the longest head's entries (exact after `fit`; keep does not lower it)
    heads_aligned: bool = True    # every head holds the same positions in the same slots (False after any keep)
    max_capacity: int = 0         # geometric growth stops here (the context: no head holds more); 0 = unbounded
    room: int = 0                 # slots a growth adds at least beyond the entries (prefill sets the decode room)
    n_layers: int = 1             # layers of the cache this store belongs to (PyramidKV's schedule reads it)
    fixed: bool = False           # fitted for every token still to come (see fit): appends keep no host bound

    @classmethod
    def empty(cls, batch: int, n_kv_heads: int, head_dim: int, capacity: int = _ROUND,
              dtype=torch.float32, device=None, max_capacity: int = 0, n_layers: int = 1) -> "LayerStore":
        S = _round_up(capacity)
        return cls(
            k=torch.zeros(batch, n_kv_heads, S, head_dim, dtype=dtype, device=device),
            v=torch.zeros(batch, n_kv_heads, S, head_dim, dtype=dtype, device=device),
            pos=torch.full((batch, n_kv_heads, S), -1, dtype=torch.long, device=device),
            seen=torch.zeros(batch, dtype=torch.long, device=device),
            max_capacity=max_capacity, n_layers=n_layers)

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    @property
    def valid(self) -> torch.Tensor:
        """(B, Hkv, S) bool: slot holds a live entry."""
        return self.pos >= 0

    @property
    def length(self) -> torch.Tensor:
        """(B, Hkv) live entries of each head."""
        return self.valid.sum(-1)

    def add_stat(self, name: str, fill: float = 0.0, dtype=torch.float32) -> torch.Tensor:
        """Create a per-entry statistic (if absent) aligned with the slots."""
        if name not in self.stats:
            self.stats[name] = torch.full(self.pos.shape, fill, dtype=dtype, device=self.pos.device)
        return self.stats[name]

    def fit(self, extra: int = 0, spare: int = 0, fixed: bool = False) -> None:
        """Room for exactly `extra` more entries per head (+ `spare`, never past max_capacity, the context): the
        live entries compacted to the front in position order, the tensors reallocated. One host sync.
        fixed: `extra` covers every token to come (a compiled or captured decode): appends keep no host-side bound."""
        if not is_int(extra) or extra < 0:
            raise BadInput(f"fit: extra entries must be an integer >= 0, got {extra!r}")
        self.fixed = fixed
        n = self.length                                                  # (B, Hkv)
        longest = self.max_len_bound = int(n.max()) if n.numel() else 0
        need = longest + int(extra) + 1                                  # +1: a free slot for a padding token
        S_new = _round_up(need + spare)
        if self.max_capacity:                    # spare room past the context could never be used
            S_new = max(need, min(S_new, self.max_capacity))
        if S_new == self.capacity and self.heads_aligned:
            return                                                       # never evicted: compact and sized already
        order = position_order(self.pos, self.valid)[..., :S_new]        # (B, Hkv, min(S, S_new))
        live = torch.arange(order.shape[-1], device=order.device) < n[..., None]

        def move(t: torch.Tensor, fill) -> torch.Tensor:
            idx = order if t.dim() == 3 else order[..., None].expand(*order.shape, t.shape[-1])
            out = torch.full((*t.shape[:2], S_new, *t.shape[3:]), fill, dtype=t.dtype, device=t.device)
            out[:, :, :order.shape[-1]] = torch.where(live if t.dim() == 3 else live[..., None],
                                                      torch.gather(t, 2, idx), fill)
            return out

        self.k, self.v, self.pos = move(self.k, 0), move(self.v, 0), move(self.pos, -1)
        self.stats = {name: move(t, 0) for name, t in self.stats.items()}

    def reserve(self, T: int) -> None:
        """Room for T more entries per head (a free slot for padding too): grows the tensors when it must."""
        if not self.fixed and self.max_len_bound + T + 1 > self.capacity:   # the host bound says it may not fit:
            self.max_len_bound = int(self.length.max())                  # one sync reads the real lengths
            if self.max_len_bound + T + 1 > self.capacity:
                self.fit(T, spare=max(self.capacity // 2, self.room))    # geometric growth: amortised O(1)

    def append(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Write T new tokens into empty slots of every head of each batch row; tokens with pos < 0 (left padding)
        are not cached. k, v: (B, Hkv, T, d); pos: (B, T). Returns the slot of each token, (B, Hkv, T) (-1 if not)."""
        B, Hkv, T, d = k.shape
        if v.shape != k.shape or pos.shape != (B, T) or (B, Hkv, d) != tuple(self.k.shape[i] for i in (0, 1, 3)):
            raise BadInput(f"append: k {tuple(k.shape)}, v {tuple(v.shape)}, pos {tuple(pos.shape)} do not fit "
                           f"the store's (B, Hkv, S, d) = {tuple(self.k.shape)}")
        self.reserve(T)
        real = (pos >= 0)                                                # (B, T)
        if T == 1:                                                       # a decode step: the first empty slot
            slot = self.pos.argmin(-1, keepdim=True)                     # (B, Hkv, 1): pos -1 is the minimum
        else:      # real tokens take the first empty slots in order, padding tokens the next ones (left empty)
            rank = torch.where(real, real.cumsum(-1) - 1, real.sum(-1, keepdim=True) + (~real).cumsum(-1) - 1)
            first_empty = torch.argsort(self.valid.to(torch.int8), dim=-1, stable=True)[..., :T]   # (B, Hkv, T)
            slot = torch.gather(first_empty, 2, rank[:, None, :].expand(B, Hkv, T))   # (B, Hkv, T)
        b, h = self._row_head(slot)
        self.k[b, h, slot] = k.to(self.k.dtype)     # indexed writes: torch.compile keeps them in place (not scatter_)
        self.v[b, h, slot] = v.to(self.v.dtype)
        self.pos[b, h, slot] = torch.where(real, pos, -1)[:, None, :].expand(B, Hkv, T)
        for t in self.stats.values():                                    # new entries start with zero statistics
            t[b, h, slot] = t.new_zeros(())          # (a device scalar: a graph capture copies no host value)
        self.seen += real.sum(-1)
        self.max_len_bound += 0 if self.fixed else T     # fixed: host state a compiled step would guard on stays put
        return torch.where(real[:, None, :], slot, -1)

    def keep(self, keep_mask: torch.Tensor) -> None:
        """Evict every live entry whose `keep_mask` is False: its slot is emptied in place (nothing moves, no sync).
        keep_mask: (B, Hkv, S) bool. Heads may keep different counts (uneven budgets are stored for real)."""
        if keep_mask.shape != self.pos.shape:
            raise BadInput(f"keep: mask shape {tuple(keep_mask.shape)} != store slots {tuple(self.pos.shape)}")
        self.pos.masked_fill_(~keep_mask, -1)
        for t in self.stats.values():
            t.masked_fill_(~keep_mask, 0)
        self.heads_aligned = False

    def merge(self, dst_slot: torch.Tensor, src_slot: torch.Tensor, src_weight: torch.Tensor,
              dst_scale: torch.Tensor, chunk: int = 256) -> None:
        """Weighted in-place merge of E entries into kept entries of the same head (D2O, Step 5).
        k[dst] <- dst_scale[dst] * k[dst] + sum_{e -> dst} src_weight[e] * k[src_e]   (the same for v)
        dst_slot, src_slot: (B, Hkv, E), no source a destination; src_weight: (B, Hkv, E) (0: not merged); dst_scale:
        (B, Hkv, S), 1 where nothing arrives. E > 1: all entries scaled, then sources added `chunk` at a time."""
        (b, h), w = self._row_head(dst_slot), src_weight[..., None]          # w: (B, Hkv, E, 1)
        scale = torch.gather(dst_scale, 2, dst_slot)[..., None] if dst_slot.shape[-1] == 1 else None   # (B, Hkv, 1, 1)
        for t in (self.k, self.v):
            if scale is not None:             # one source per head: one write, kept in place when compiled
                t[b, h, dst_slot] = t[b, h, dst_slot] * scale.to(t.dtype) + w.to(t.dtype) * t[b, h, src_slot]
            else:                             # a repeated destination is scaled once, then receives every source
                t.mul_(dst_scale[..., None].to(t.dtype))
                for dst, src, wc in zip(dst_slot.split(chunk, -1), src_slot.split(chunk, -1), w.split(chunk, -2)):
                    t.index_put_((b, h, dst), wc.to(t.dtype) * t[b, h, src], accumulate=True)   # (B, Hkv, c, d)

    def _row_head(self, slot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Row and head indices (B, 1, 1), (1, Hkv, 1) that broadcast against slots (B, Hkv, n) for indexed writes."""
        B, Hkv = slot.shape[:2]
        return torch.arange(B, device=slot.device)[:, None, None], torch.arange(Hkv, device=slot.device)[None, :, None]

    def nbytes_live(self) -> int:
        """Bytes of keys and values in live entries: sum of lengths x 2 x d x itemsize."""
        return int(self.length.sum()) * 2 * self.k.shape[-1] * self.k.element_size()

    def nbytes_allocated(self) -> int:
        """Bytes the key/value/position/statistic tensors really occupy (empty slots included)."""
        return self.k.nbytes + self.v.nbytes + self.pos.nbytes + sum(t.nbytes for t in self.stats.values())

@dataclass
class KVCache:
    """One LayerStore per layer."""
    layers: list[LayerStore]

    @property
    def seen(self) -> torch.Tensor:
        """(B,) tokens each batch row has seen so far (the next token's position)."""
        return self.layers[0].seen

    @property
    def capacity(self) -> int:
        """Slots allocated per head (the largest over layers)."""
        return max(layer.capacity for layer in self.layers)

    def nbytes_live(self) -> int:
        return sum(layer.nbytes_live() for layer in self.layers)

    def nbytes_allocated(self) -> int:
        return sum(layer.nbytes_allocated() for layer in self.layers)

    def cache_ratio(self) -> float:
        """Measured ratio: live entries / entries a full cache would hold (averaged over layers and heads)."""
        full = int(self.seen.sum()) * self.layers[0].pos.shape[1] * len(self.layers)
        return sum(int(layer.length.sum()) for layer in self.layers) / full if full else 1.0

    def fit(self, extra: int, fixed: bool = False) -> None:
        """Every layer compacted, with room for exactly `extra` more entries per head (see LayerStore.fit)."""
        for layer in self.layers:
            layer.fit(extra, fixed=fixed)
