"""The KV store: append / keep / merge / fit invariants (stateful), byte accounting, masked == compacted attention.
Slots are not in position order (eviction empties a slot, an append takes the first empty one): the model of the
store is a list per head in position order, and entries are matched to slots by position."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from minikv.attention import attend
from minikv.store import LayerStore
from strategies import gqa_shapes, seeded_randn


class StoreMachine(RuleBasedStateMachine):
    """Random sequences of append / keep / merge; every entry carries an exact tag so survivors are checkable."""

    B, H, d = 2, 2, 4

    def __init__(self):
        super().__init__()
        self.store = LayerStore.empty(self.B, self.H, self.d, capacity=1, dtype=torch.float64)
        self.store.add_stat("tag")
        # The model of the store: per (b, h) a list of (position, key, value, tag), in position order.
        self.model = [[[] for _ in range(self.H)] for _ in range(self.B)]
        self.step = 0

    @rule(n=st.integers(1, 6), pad=st.lists(st.integers(0, 3), min_size=2, max_size=2))
    def append(self, n, pad):
        T = n + max(pad)
        pos = torch.full((self.B, T), -1, dtype=torch.long)
        for b in range(self.B):
            real = T - pad[b]
            pos[b, T - real:] = self.store.seen[b] + torch.arange(real)
        k = seeded_randn(self.step, self.B, self.H, T, self.d)
        v = seeded_randn(self.step + 10_000, self.B, self.H, T, self.d)
        self.step += 1
        slots = self.store.append(k, v, pos)
        for b in range(self.B):
            for h in range(self.H):
                for t in range(T):
                    if pos[b, t] >= 0:
                        tag = float(self.step * 100 + t)
                        self.store.stats["tag"][b, h, slots[b, h, t]] = tag
                        self.model[b][h].append((int(pos[b, t]), k[b, h, t].clone(), v[b, h, t].clone(), tag))

    def slot_of(self, b: int, h: int, p: int) -> int:
        """The slot holding position p in head (b, h)."""
        return int((self.store.pos[b, h] == p).nonzero()[0, 0])

    @rule(data=st.data())
    def keep(self, data):
        mask = torch.zeros(self.store.pos.shape, dtype=torch.bool)
        for b in range(self.B):
            for h in range(self.H):
                n = len(self.model[b][h])
                chosen = data.draw(st.lists(st.booleans(), min_size=n, max_size=n), label=f"keep[{b},{h}]")
                for e, c in zip(self.model[b][h], chosen):
                    mask[b, h, self.slot_of(b, h, e[0])] = c
                self.model[b][h] = [e for e, c in zip(self.model[b][h], chosen) if c]
        self.store.keep(mask)

    @rule(extra=st.integers(0, 5))
    def fit(self, extra):
        self.store.fit(extra)                       # compaction moves entries, never changes them
        assert self.store.capacity >= int(self.store.length.max()) + extra + 1

    @precondition(lambda self: all(len(self.model[b][h]) >= 3 for b in range(2) for h in range(2)))
    @rule(data=st.data())
    def merge(self, data):
        """Sources are entries of the same head that are not destinations (D2O merges evicted into kept ones)."""
        E = data.draw(st.integers(1, 2), label="E")      # 1: one source per head (a decode step's single write)
        dst, src = (torch.zeros(self.B, self.H, E, dtype=torch.long) for _ in range(2))
        w = torch.zeros(self.B, self.H, E, dtype=torch.float64)
        scale = torch.ones(self.store.pos.shape, dtype=torch.float64)
        chunk = data.draw(st.integers(1, 2), label="chunk")
        for b in range(self.B):
            for h in range(self.H):
                entries = self.model[b][h]
                target = data.draw(st.integers(0, len(entries) - 1), label="dst")     # one destination per head
                others = [i for i in range(len(entries)) if i != target]
                source = [data.draw(st.sampled_from(others), label="src") for e in range(E)]
                for e in range(E):
                    dst[b, h, e] = self.slot_of(b, h, entries[target][0])
                    src[b, h, e] = self.slot_of(b, h, entries[source[e]][0])
                    w[b, h, e] = data.draw(st.floats(0, 1), label="w")
                s = scale[b, h, int(dst[b, h, 0])] = data.draw(st.floats(0.5, 1.0), label="scale")
                p, k, v, tag = entries[target]
                k, v = k * s, v * s
                for e in range(E):
                    k, v = k + w[b, h, e] * entries[source[e]][1], v + w[b, h, e] * entries[source[e]][2]
                entries[target] = (p, k, v, tag)
        self.store.merge(dst, src, w, scale, chunk)

    @invariant()
    def consistent(self):
        s = self.store
        assert (s.length <= s.capacity).all()
        for b in range(self.B):
            for h in range(self.H):
                n = int(s.length[b, h])
                entries = self.model[b][h]
                assert n == len(entries) and n <= s.max_len_bound, "the host bound never undercounts"
                pos = s.pos[b, h][s.pos[b, h] >= 0]
                assert (pos < s.seen[b]).all()
                assert sorted(pos.tolist()) == [e[0] for e in entries]
                for p, k, v, tag in entries:
                    i = self.slot_of(b, h, p)
                    assert s.stats["tag"][b, h, i] == tag, "stats move with their entries"
                    assert torch.allclose(s.k[b, h, i], k, atol=1e-12) and torch.allclose(s.v[b, h, i], v, atol=1e-12)

    @invariant()
    def attention_matches_float64_recomputation(self):
        s = self.store
        q = seeded_randn(self.step + 40_000, self.B, self.H * 2, 1, self.d)
        qpos = s.seen[:, None].clone()
        out, _ = attend(q, qpos, s)
        for b in range(self.B):
            for hq in range(self.H * 2):
                entries = self.model[b][hq // 2]
                if not entries:
                    assert torch.all(out[b, hq] == 0)
                    continue
                K = torch.stack([e[1] for e in entries])
                V = torch.stack([e[2] for e in entries])
                p = torch.softmax(K @ q[b, hq, 0] / self.d ** 0.5, dim=0)
                assert torch.allclose(out[b, hq, 0], p @ V, atol=1e-10)


TestStoreMachine = StoreMachine.TestCase


@given(shape=gqa_shapes(), data=st.data())
def test_masked_eviction_equals_compaction(shape, data):
    """Evicting by masking (pos = -1) and by real compaction give the same attention output."""
    B, Hkv, G, T, d = shape
    store = LayerStore.empty(B, Hkv, d, dtype=torch.float64)
    store.append(seeded_randn(1, B, Hkv, T, d), seeded_randn(2, B, Hkv, T, d), torch.arange(T).expand(B, T))
    keep = torch.tensor(data.draw(st.lists(st.booleans(), min_size=B * Hkv * T, max_size=B * Hkv * T)))
    keep = keep.view(B, Hkv, T)
    mask = torch.zeros(store.pos.shape, dtype=torch.bool)
    mask[..., :T] = keep
    q = seeded_randn(3, B, Hkv * G, 2, d)
    qpos = torch.full((B, 2), T)
    masked = LayerStore(store.k.clone(), store.v.clone(), torch.where(mask, store.pos, -1), store.seen.clone())
    out_masked, _ = attend(q, qpos, masked)
    store.keep(mask)
    store.fit()                                                     # real compaction
    out_kept, _ = attend(q, qpos, store)
    assert torch.allclose(out_masked, out_kept, atol=1e-12)


def test_fit_returns_memory_and_bytes_are_counted():
    store = LayerStore.empty(1, 2, 8, capacity=1000)
    store.append(torch.randn(1, 2, 1000, 8), torch.randn(1, 2, 1000, 8), torch.arange(1000)[None])
    before = store.nbytes_allocated()
    assert store.nbytes_live() == 2 * 1000 * 2 * 8 * 4
    mask = torch.zeros(store.pos.shape, dtype=torch.bool)
    mask[0, 0, :100] = True
    mask[0, 1, :50] = True
    store.keep(mask)
    assert store.nbytes_live() == 150 * 2 * 8 * 4                   # uneven heads, counted per entry
    assert store.nbytes_allocated() == before                       # eviction frees slots, not memory
    store.fit()
    assert store.nbytes_allocated() < before / 5                    # the longest head (100) sets the allocation
    assert store.length.tolist() == [[100, 50]]


def test_append_rejects_bad_shapes():
    store = LayerStore.empty(1, 2, 8)
    with pytest.raises(ValueError, match="append"):
        store.append(torch.randn(1, 3, 4, 8), torch.randn(1, 3, 4, 8), torch.arange(4)[None])
    with pytest.raises(ValueError, match="keep"):
        store.keep(torch.ones(1, 2, 3, dtype=torch.bool))
