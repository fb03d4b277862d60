"""The explicit KV store: per layer, per (batch row, KV head), a compacted list of entries.

Layout (padded per head; slots past a head's length are empty):
    k, v   : (B, Hkv, S, d)   keys are stored *after* RoPE at their true position
    pos    : (B, Hkv, S)      absolute token position of each entry, -1 = empty slot
    length : (B, Hkv)         live entries of each head; live entries occupy slots [0, length) in position order
    stats  : name -> (B, Hkv, S) per-entry statistics owned by the policy (accumulated attention, last hit, ...)
    rows   : name -> (B, ...)    per-row state of the layer: the prompt lengths (set by prefill) and what a policy
                                 decided for the row (D2O's threshold and sizes, Ada-KV's head budgets, ...)

Code that needs "how old" or "how recent" reads `pos`, never the slot. Statistics live beside the entries so `keep`
moves them together; per-row state lives beside the rows, so a policy is a configuration only."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from minikv.errors import BadInput, is_int

# Capacity grows in steps of this many slots (and geometrically), so decoding does not reallocate every token.
_ROUND = 16

def _round_up(n: int) -> int:
    return max(_ROUND, -(-n // _ROUND) * _ROUND)

@dataclass
class LayerStore:
    k: torch.Tensor                                   # (B, Hkv, S, d)
    v: torch.Tensor                                   # (B, Hkv, S, d)
    pos: torch.Tensor                                 # (B, Hkv, S) int64, -1 = empty
    length: torch.Tensor                              # (B, Hkv) int64
    seen: torch.Tensor                                # (B,) tokens appended so far = the next token's position
    stats: dict[str, torch.Tensor] = field(default_factory=dict)  # each (B, Hkv, S)
    rows: dict[str, torch.Tensor] = field(default_factory=dict)   # each (B, ...), e.g. "prompt_len" (B,)
    # Host-side bookkeeping, so the decode path never waits for the GPU to learn a length:
    max_len_bound: int = 0        # >= the longest head's length (exact after every keep)
    n_appends: int = 0            # append calls so far (the first one, without padding, is a plain causal prompt)
    heads_aligned: bool = True    # every head holds the same positions (False after any eviction)
    # Geometric growth stops here (the model's context: no head can hold more); 0 = unbounded.
    max_capacity: int = 0
    n_layers: int = 1             # layers of the cache this store belongs to (PyramidKV's schedule reads it)

    @classmethod
    def empty(cls, batch: int, n_kv_heads: int, head_dim: int, capacity: int = _ROUND,
              dtype=torch.float32, device=None, max_capacity: int = 0, n_layers: int = 1) -> "LayerStore":
        S = _round_up(capacity)
        return cls(
            k=torch.zeros(batch, n_kv_heads, S, head_dim, dtype=dtype, device=device),
            v=torch.zeros(batch, n_kv_heads, S, head_dim, dtype=dtype, device=device),
            pos=torch.full((batch, n_kv_heads, S), -1, dtype=torch.long, device=device),
            length=torch.zeros(batch, n_kv_heads, dtype=torch.long, device=device),
            seen=torch.zeros(batch, dtype=torch.long, device=device),
            max_capacity=max_capacity, n_layers=n_layers,
        )

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    @property
    def valid(self) -> torch.Tensor:
        """(B, Hkv, S) bool: slot holds a live entry."""
        return self.pos >= 0

    def add_stat(self, name: str, fill: float = 0.0, dtype=torch.float32) -> torch.Tensor:
        """Create a per-entry statistic (if absent) aligned with the slots."""
        if name not in self.stats:
            self.stats[name] = torch.full(self.pos.shape, fill, dtype=dtype, device=self.pos.device)
        return self.stats[name]

    def _resize(self, new_capacity: int) -> None:
        """Reallocate every slot tensor to `new_capacity` slots (>= the longest head)."""
        S_new = _round_up(new_capacity)
        n = min(S_new, self.capacity)

        def grow(t: torch.Tensor, fill) -> torch.Tensor:
            shape = list(t.shape)
            shape[2] = S_new
            out = torch.full(shape, fill, dtype=t.dtype, device=t.device)
            out[:, :, :n] = t[:, :, :n]
            return out

        self.k, self.v = grow(self.k, 0), grow(self.v, 0)
        self.pos = grow(self.pos, -1)
        self.stats = {name: grow(t, 0) for name, t in self.stats.items()}

    def reserve(self, extra: int) -> None:
        """Make room for `extra` more entries in every head (call before a long decode to avoid regrowth).
        Never beyond max_capacity: room past the context could not be used."""
        if not is_int(extra) or extra < 0:
            raise BadInput(f"reserve: extra entries must be an integer >= 0, got {extra!r}")
        longest = int(self.length.max()) if self.length.numel() else 0
        need = longest + int(extra) + 1               # +1: the spare slot append uses for padding
        if self.max_capacity:
            need = min(need, max(self.max_capacity, longest + 1))
        if need > self.capacity:
            self._resize(need)

    def append(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Append T new tokens to every head of each batch row; tokens with pos < 0 (left padding) are skipped.
        k, v: (B, Hkv, T, d); pos: (B, T). Returns the slot each token went to, (B, Hkv, T) (-1 if skipped)."""
        B, Hkv, T, d = k.shape
        if v.shape != k.shape or pos.shape != (B, T) or (B, Hkv, d) != tuple(self.k.shape[i] for i in (0, 1, 3)):
            raise BadInput(f"append: k {tuple(k.shape)}, v {tuple(v.shape)}, pos {tuple(pos.shape)} do not fit "
                           f"the store's (B, Hkv, S, d) = {tuple(self.k.shape)}")
        real = (pos >= 0)                                             # (B, T)
        n_new = real.sum(-1)                                          # (B,)
        # +1 spare slot: skipped (padding) tokens are written there and left marked empty.
        need = self.max_len_bound + T + 1
        if need > self.capacity:
            # Geometric growth keeps appends amortised O(1); it stops at max_capacity unless `need` is larger.
            grown = int(self.capacity * 1.5)
            if self.max_capacity:
                grown = min(grown, self.max_capacity)
            self._resize(max(need, grown))
        offset = torch.cumsum(real.long(), dim=-1) - 1                # (B, T) rank among the real tokens
        slot = self.length[:, :, None] + offset[:, None, :]           # (B, Hkv, T)
        spare = self.length + n_new[:, None]                          # (B, Hkv) first slot after the new ones
        slot = torch.where(real[:, None, :], slot, spare[:, :, None])
        idx = slot[..., None].expand(B, Hkv, T, d)
        self.k.scatter_(2, idx, k.to(self.k.dtype))
        self.v.scatter_(2, idx, v.to(self.v.dtype))
        new_pos = torch.where(real, pos, -1)[:, None, :].expand(B, Hkv, T)
        self.pos.scatter_(2, slot, new_pos)
        self.pos.scatter_(2, spare[:, :, None], -1)                  # the spare slot stays empty
        for t in self.stats.values():                                 # new entries start with zero statistics
            t.scatter_(2, slot, 0)
        self.length += n_new[:, None]
        self.seen += n_new
        self.max_len_bound += T
        self.n_appends += 1
        return torch.where(real[:, None, :], slot, -1)

    def keep(self, keep_mask: torch.Tensor) -> None:
        """Evict every live entry whose `keep_mask` is False and compact the survivors to the front, in order.
        keep_mask: (B, Hkv, S) bool. Heads may keep different counts (uneven budgets are stored for real).
        When the longest head shrinks below half the capacity the tensors are reallocated, returning memory."""
        if keep_mask.shape != self.pos.shape:
            raise BadInput(f"keep: mask shape {tuple(keep_mask.shape)} != store slots {tuple(self.pos.shape)}")
        keep_mask = keep_mask & self.valid
        new_len = keep_mask.sum(-1)                                   # (B, Hkv)
        S_new = int(new_len.max()) if new_len.numel() else 0
        S_alloc = self.capacity if S_new + 1 > self.capacity // 2 else _round_up(S_new + 1)
        # Stable sort puts kept slots first, preserving their (position) order.
        order = torch.argsort((~keep_mask).to(torch.int8), dim=-1, stable=True)[..., :S_alloc]  # (B, Hkv, S_alloc)
        live = torch.arange(S_alloc, device=order.device) < new_len[..., None]                 # (B, Hkv, S_alloc)
        d = self.k.shape[-1]
        idx = order[..., None].expand(*order.shape, d)
        self.k = torch.where(live[..., None], torch.gather(self.k, 2, idx), 0)
        self.v = torch.where(live[..., None], torch.gather(self.v, 2, idx), 0)
        self.pos = torch.where(live, torch.gather(self.pos, 2, order), -1)
        self.stats = {n: torch.where(live, torch.gather(t, 2, order), 0) for n, t in self.stats.items()}
        self.length = new_len
        self.max_len_bound = S_new
        self.heads_aligned = False

    def merge(self, dst_slot: torch.Tensor, src_k: torch.Tensor, src_v: torch.Tensor,
              src_weight: torch.Tensor, dst_scale: torch.Tensor) -> None:
        """Weighted in-place merge of E source vectors into kept entries (D2O, Step 5).
        k[dst] <- dst_scale[dst] * k[dst] + sum_{e -> dst} src_weight[e] * src_k[e]   (the same for v)
        dst_slot: (B, Hkv, E) int64; src_k, src_v: (B, Hkv, E, d); src_weight: (B, Hkv, E) (0 = not merged);
        dst_scale: (B, Hkv, S), 1 for entries that receive nothing."""
        d = self.k.shape[-1]
        idx = dst_slot[..., None].expand(*dst_slot.shape, d)
        w = src_weight[..., None].to(self.k.dtype)
        scale = dst_scale[..., None].to(self.k.dtype)
        self.k = (self.k * scale).scatter_add(2, idx, w * src_k.to(self.k.dtype))
        self.v = (self.v * scale).scatter_add(2, idx, w * src_v.to(self.v.dtype))

    def nbytes_live(self) -> int:
        """Bytes of keys and values in live entries: sum of lengths x 2 x d x itemsize."""
        return int(self.length.sum()) * 2 * self.k.shape[-1] * self.k.element_size()

    def nbytes_allocated(self) -> int:
        """Bytes the key/value/position/statistic tensors really occupy (padding to the longest head included)."""
        total = self.k.nbytes + self.v.nbytes + self.pos.nbytes + self.length.nbytes
        return total + sum(t.nbytes for t in self.stats.values())

@dataclass
class KVCache:
    """One LayerStore per layer."""
    layers: list[LayerStore]

    @classmethod
    def empty(cls, n_layers: int, batch: int, n_kv_heads: int, head_dim: int, capacity: int = _ROUND,
              dtype=torch.float32, device=None, max_capacity: int = 0) -> "KVCache":
        return cls([LayerStore.empty(batch, n_kv_heads, head_dim, capacity, dtype, device, max_capacity, n_layers)
                    for _ in range(n_layers)])

    def set_rows(self, name: str, value: torch.Tensor) -> None:
        """Give every layer the same per-row tensor (B, ...), e.g. the prompt lengths."""
        for layer in self.layers:
            layer.rows[name] = value

    @property
    def seen(self) -> torch.Tensor:
        """(B,) tokens each batch row has seen so far (the next token's position)."""
        return self.layers[0].seen

    @property
    def prompt_len(self) -> torch.Tensor:
        """(B,) prompt length of each row (set by prefill; budgets given as a ratio are ratios of it)."""
        return self.layers[0].rows["prompt_len"]

    @property
    def capacity(self) -> int:
        """Slots allocated per head (the largest over layers)."""
        return max(layer.capacity for layer in self.layers)

    def nbytes_live(self) -> int:
        return sum(layer.nbytes_live() for layer in self.layers)

    def nbytes_allocated(self) -> int:
        return sum(layer.nbytes_allocated() for layer in self.layers)

    def entries(self) -> int:
        return sum(int(layer.length.sum()) for layer in self.layers)

    def cache_ratio(self) -> float:
        """Measured ratio: live entries / entries a full cache would hold (averaged over layers and heads)."""
        B, Hkv = self.layers[0].length.shape
        full = int(self.seen.sum()) * Hkv * len(self.layers)
        return self.entries() / full if full else 1.0

    def reserve(self, extra: int) -> None:
        for layer in self.layers:
            layer.reserve(extra)
