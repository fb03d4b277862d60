"""Hypothesis strategies that build valid shapes by construction (Hq = Hkv * G), small and capped."""
from __future__ import annotations

import torch
from hypothesis import strategies as st


@st.composite
def gqa_shapes(draw, max_batch=2, max_kv_heads=3, max_group=3, max_len=40, head_dims=(4, 8)):
    """(B, Hkv, G, T, d) with T >= 1."""
    B = draw(st.integers(1, max_batch), label="B")
    Hkv = draw(st.integers(1, max_kv_heads), label="Hkv")
    G = draw(st.integers(1, max_group), label="G")
    T = draw(st.integers(1, max_len), label="T")
    d = draw(st.sampled_from(head_dims), label="d")
    return B, Hkv, G, T, d


def seeded_randn(seed: int, *shape, dtype=torch.float64, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype) * scale


def in_position_order(store):
    """A copy of a LayerStore whose live entries sit in slots [0, n) in position order, as a compacting store
    keeps them (the real store empties slots in place and reuses them, so its slot order is arbitrary)."""
    import copy
    out = copy.deepcopy(store)
    out.heads_aligned = False                  # force the compaction even when nothing was evicted
    out.fit()
    return out
