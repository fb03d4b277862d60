"""Property tests of the Ada-KV bound (specs/adakv.md, Theorem 3.1 and its corollaries), float64 throughout.

Every case draws h = Hkv * G query heads, n entries, d, D and a temperature per head (0.02 .. 30), so peaky and flat
heads occur side by side. Masks are shared per KV head (the GQA rule) unless a test says otherwise.
"""
from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from hypothesis import HealthCheck, find, given, settings
from hypothesis import strategies as st

from minikv.attention import attend
from minikv.tools.bound_report import kept_positions_mask
from minikv.bounds import (expand_kv_heads, global_bound, kept_mass, o_proj_blocks,
                           per_head_bound, projected_value_norms, renormalise, true_l1_error)
from minikv.ops import select_topk
from minikv.policies import get_policy
from minikv.policies.adakv import adakv_allocate
from minikv.store import LayerStore
from minikv.tools.bound_report import bound_report

from conftest import tiny_config, tiny_model
from strategies import seeded_randn

F64 = torch.float64
TEMPERATURES = (0.02, 0.1, 0.3, 1.0, 3.0, 30.0)       # 0.02: one entry takes ~all mass; 30: nearly uniform
TOL = 1e-10                                           # float64 slack for "<=" comparisons of O(1..100) numbers


class Case:
    """One layer, one query: A (h, n), values V (Hkv, n, d), output blocks W (h, d, D), grouping Hkv x G."""

    def __init__(self, Hkv, G, n, d, D, temps, seed, quantize: bool = False):
        self.Hkv, self.G, self.n, self.h = Hkv, G, n, Hkv * G
        logits = seeded_randn(seed, self.h, n)
        if quantize:                                  # few distinct values: ties in A are common
            logits = logits.round()
        self.A = torch.softmax(logits / torch.tensor(temps, dtype=F64)[:, None], dim=-1)   # (h, n)
        self.V = seeded_randn(seed + 1, Hkv, n, d)                                          # (Hkv, n, d)
        self.W = seeded_randn(seed + 2, self.h, d, D)                                       # (h, d, D)
        self.C = projected_value_norms(self.V, self.W)                                      # (h,)
        self.seed = seed

    def group_mean(self) -> torch.Tensor:
        """(Hkv, n): the mean of each group's weights, what a shared-mask policy ranks by."""
        return self.A.view(self.Hkv, self.G, self.n).mean(1)

    def __repr__(self):
        return f"Case(Hkv={self.Hkv}, G={self.G}, n={self.n}, seed={self.seed})"


@st.composite
def cases(draw, max_kv=3, max_group=3, max_n=12, max_d=4, max_D=5, quantize=False):
    Hkv = draw(st.integers(1, max_kv), label="Hkv")
    G = draw(st.integers(1, max_group), label="G")
    n = draw(st.integers(1, max_n), label="n")
    d = draw(st.integers(1, max_d), label="d")
    D = draw(st.integers(1, max_D), label="D")
    temps = draw(st.lists(st.sampled_from(TEMPERATURES), min_size=Hkv * G, max_size=Hkv * G), label="temperatures")
    seed = draw(st.integers(0, 2 ** 30), label="seed")
    return Case(Hkv, G, n, d, D, temps, seed, quantize)


def random_mask(shape, seed: int, p: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g, dtype=F64) < p


def check_bound_chain(case: Case, mask: torch.Tensor) -> None:
    loss = true_l1_error(case.A, case.V, case.W, mask)
    ph = per_head_bound(case.A, mask, case.C)
    gb = global_bound(case.A, mask, case.C)
    assert loss <= ph * (1 + TOL) + TOL, (case, float(loss), float(ph))
    assert ph <= gb * (1 + TOL) + TOL, (case, float(ph), float(gb))


# ---- (1) loss <= per-head bound <= global bound ------------------------------------------------------------
@given(case=cases(), p=st.floats(0, 1), shared=st.booleans(), mseed=st.integers(0, 2 ** 30))
def test_bound_chain_random_masks(case, p, shared, mseed):
    # Any mask, shared per KV head (GQA) or per query head; p = 0 evicts everything (heads output 0).
    mask = random_mask((case.Hkv if shared else case.h, case.n), mseed, p)
    check_bound_chain(case, mask)


def synthetic_layer(case: Case, w: int, seed: int):
    """A one-row store holding the case's n entries (positions 0..n-1) and the statistics policies read.

    last_rows: w causal window rows, the last one is the case's A (the query the bound is about);
    colsum: random accumulated attention (H2O-style). Returns (store, stats).
    """
    Hkv, G, n = case.Hkv, case.G, case.n
    d = case.V.shape[-1]
    store = LayerStore.empty(1, Hkv, d, capacity=n, dtype=F64)
    store.append(seeded_randn(seed, 1, Hkv, n, d), case.V[None], torch.arange(n)[None])
    S = store.capacity
    logits = seeded_randn(seed + 3, Hkv, G, w, n) * 3
    qpos = torch.arange(n - w, n)                                                  # window query positions
    logits = logits.masked_fill(torch.arange(n)[None, :] > qpos[:, None], float("-inf"))
    rows = torch.softmax(logits, dim=-1)                                           # (Hkv, G, w, n)
    rows[:, :, -1] = case.A.view(Hkv, G, n)
    last_rows = torch.zeros(1, Hkv, G, w, S, dtype=F64)
    last_rows[..., :n] = rows
    colsum = torch.zeros(1, Hkv, G, S, dtype=F64)
    colsum[..., :n] = seeded_randn(seed + 4, Hkv, G, n).abs() * 4
    return store, {"last_rows": last_rows, "colsum": colsum}


POLICIES = [("streaming", {}), ("h2o", {}), ("snapkv", {}), ("pyramidkv", {}),
            ("adakv-snapkv", {"variant": "official"}), ("adakv-snapkv", {"variant": "exact"}),
            ("adakv-pyramidkv", {}), ("adakv-h2o", {"variant": "exact"}), ("adakv-h2o", {"alpha": 0.0})]


@given(case=cases(max_n=16), data=st.data())
def test_bound_chain_policy_masks(case, data):
    # Each policy's own after_prefill on a synthetic store; the kept set is read back from the positions.
    w = data.draw(st.integers(1, case.n), label="window")
    layer = data.draw(st.integers(0, 2), label="layer")
    for name, opts in POLICIES:
        low = 5 if name == "streaming" else (w if "snap" in name or "pyramid" in name else 1)
        budget = data.draw(st.integers(low, max(low, case.n + 1)), label=f"budget {name}")
        if "snap" in name or "pyramid" in name:
            opts = {**opts, "window": w, "kernel": data.draw(st.sampled_from([1, 3, 7]), label="kernel")}
        policy = get_policy(name, budget, **opts)
        store, stats = synthetic_layer(case, w, case.seed)
        store.rows["prompt_len"], store.n_layers = torch.tensor([case.n]), tiny_config().num_hidden_layers
        before = store.pos.clone()
        policy.after_prefill(layer, store, stats)
        mask = kept_positions_mask(before, store.pos)[0, :, :case.n]              # (Hkv, n)
        assert torch.equal(mask.sum(-1), store.length[0])                          # the kept set really is stored
        check_bound_chain(case, mask)


# ---- (2) the L1 identity -----------------------------------------------------------------------------------
@given(case=cases(), p=st.floats(0, 1), mseed=st.integers(0, 2 ** 30))
def test_l1_identity(case, p, mseed):
    mask = random_mask((case.h, case.n), mseed, p)
    F = kept_mass(case.A, mask)
    lhs = (case.A - renormalise(case.A, mask)).abs().sum(-1)                      # (h,)
    # ||A_i - Â_i||_1 = 2 (1 - F_i) whenever something is kept; an emptied head outputs 0, so the distance is 1.
    expected = torch.where(F > 0, 2 * (1 - F), torch.ones_like(F))
    torch.testing.assert_close(lhs, expected, rtol=1e-12, atol=1e-12)
    # Renormalised kept weights are a distribution again (when anything is kept).
    torch.testing.assert_close(renormalise(case.A, mask).sum(-1)[F > 0], torch.ones_like(F[F > 0]),
                               rtol=1e-12, atol=1e-12)


# ---- (3) per-head top-k is optimal for fixed counts (Thm 3.2) ----------------------------------------------
@given(case=cases(max_kv=2, max_group=2, max_n=7), data=st.data())
def test_topk_optimal_for_fixed_counts(case, data):
    counts = data.draw(st.lists(st.integers(0, case.n), min_size=case.Hkv, max_size=case.Hkv), label="counts")
    scores = case.group_mean()                                                   # (Hkv, n)
    top = select_topk(scores, torch.tensor(counts))                              # (Hkv, n)
    group_F = kept_mass(case.A, top).view(case.Hkv, case.G).sum(-1)              # sum over each group's heads
    for k in range(case.Hkv):
        best = max((float(case.A.view(case.Hkv, case.G, case.n)[k][:, list(s)].sum())
                    for s in itertools.combinations(range(case.n), counts[k])), default=0.0)
        assert float(group_F[k]) >= best - 1e-12                                 # masses, not indices (ties)
    # ... so no other subset with the same counts has a smaller bound (brute force over all of them).
    ph_top = float(per_head_bound(case.A, top, case.C))
    gb_top = float(global_bound(case.A, top, case.C))
    subsets = [list(itertools.combinations(range(case.n), c)) for c in counts]
    for choice in itertools.islice(itertools.product(*subsets), 400):
        mask = torch.zeros(case.Hkv, case.n, dtype=torch.bool)
        for k, s in enumerate(choice):
            mask[k, list(s)] = True
        # Per query head C_i differ, so only the group-sum statement (global bound) is exact with shared masks;
        # with G = 1 the per-head bound is minimised head by head too.
        assert gb_top <= float(global_bound(case.A, mask, case.C)) + 1e-12
        if case.G == 1:
            assert ph_top <= float(per_head_bound(case.A, mask, case.C)) + 1e-12


# ---- (4) global top-B >= uniform and >= any allocation (Thm 3.3) ---------------------------------------------
def compositions(total: int, parts: int, cap: int):
    """Every (k_1..k_parts) with sum = total and 0 <= k_i <= cap."""
    if parts == 1:
        if 0 <= total <= cap:
            yield (total,)
        return
    for k in range(min(total, cap) + 1):
        for rest in compositions(total - k, parts - 1, cap):
            yield (k,) + rest


@given(case=cases(max_kv=3, max_group=2, max_n=5), data=st.data())
def test_global_topB_beats_every_allocation(case, data):
    Hkv, n = case.Hkv, case.n
    B = data.draw(st.integers(0, Hkv * n), label="B")
    scores = case.group_mean()                                                   # (Hkv, n)
    top = select_topk(scores.reshape(1, -1), B).view(Hkv, n)
    f = top.sum(-1)
    assert int(f.sum()) == B
    best = float(kept_mass(case.A, top).sum())
    gb = float(global_bound(case.A, top, case.C))
    for alloc in compositions(B, Hkv, n):
        other = select_topk(scores, torch.tensor(alloc))
        assert best >= float(kept_mass(case.A, other).sum()) - 1e-12, alloc
        assert gb <= float(global_bound(case.A, other, case.C)) + 1e-12, alloc
    if B % Hkv == 0:                                                             # uniform is one allocation
        uniform = select_topk(scores, B // Hkv)
        assert best >= float(kept_mass(case.A, uniform).sum()) - 1e-12
    # adakv_allocate with no safeguard reproduces the global top-B counts' mass (both variants).
    if B % Hkv == 0:
        for variant in ("official", "exact"):
            counts = adakv_allocate(scores[None], B // Hkv, alpha=0.0, variant=variant)[0]
            assert int(counts.sum()) == B
            mass = float(kept_mass(case.A, select_topk(scores, counts)).sum())
            assert abs(mass - best) <= 1e-12


# ---- (5) the bound of the top-B selection is monotone in B ---------------------------------------------------
@given(case=cases(max_n=10))
def test_topB_bound_monotone(case):
    scores = case.group_mean().reshape(1, -1)
    prev_ph = prev_gb = -math.inf
    for B in range(case.Hkv * case.n, -1, -1):                                   # shrinking budget
        mask = select_topk(scores, B).view(case.Hkv, case.n)
        ph = float(per_head_bound(case.A, mask, case.C))
        gb = float(global_bound(case.A, mask, case.C))
        assert ph >= prev_ph - 1e-12 and gb >= prev_gb - 1e-12, B
        prev_ph, prev_gb = ph, gb


# ---- (6) masked eviction == real compaction; both == the renormalised weights of the bound ------------------
@given(case=cases(max_n=24), p=st.floats(0, 1), mseed=st.integers(0, 2 ** 30), T=st.integers(1, 3))
def test_masked_equals_compacted(case, p, mseed, T):
    n, d = case.n, case.V.shape[-1]
    store = LayerStore.empty(1, case.Hkv, d, capacity=n, dtype=F64)
    store.append(seeded_randn(case.seed + 5, 1, case.Hkv, n, d) * 2, case.V[None], torch.arange(n)[None])
    mask = random_mask(store.pos.shape, mseed, p) & store.valid                   # uneven per head, maybe empty
    fake = copy.deepcopy(store)
    fake.pos = torch.where(mask, fake.pos, -1)                                   # masked ("fake") eviction
    real = copy.deepcopy(store)
    real.keep(mask)                                                              # real compaction
    assert torch.equal(real.length, mask.sum(-1))
    q = seeded_randn(case.seed + 6, 1, case.h, T, d) * 2
    qpos = torch.arange(n - T, n).clamp_min(0)[None].expand(1, T)
    out_fake, _ = attend(q, qpos, fake)
    out_real, st_real = attend(q, qpos, real, need=frozenset({"probs"}))
    # Bit equality is not guaranteed: the two layouts sum over different slot counts (differences ~1 ulp).
    torch.testing.assert_close(out_real, out_fake, rtol=1e-12, atol=1e-13)
    # Attention over the kept entries == the bound's renormalised weights applied to the full attention row.
    out_full, st_full = attend(q, qpos, store, need=frozenset({"probs"}))
    A_full = st_full["probs"][0, :, :, -1, :n].reshape(case.h, n)                # last query, (h, n)
    m = mask[0, :, :n]
    y_hat = (renormalise(A_full, m)[:, None, :] @ expand_kv_heads(case.V, case.h, -3)).squeeze(1)   # (h, d)
    torch.testing.assert_close(out_real[0, :, -1], y_hat, rtol=1e-12, atol=1e-13)
    # So the true error computed by bounds.py is the error of the really compacted layer output.
    delta = torch.einsum("hd,hdD->D", out_full[0, :, -1] - out_real[0, :, -1], case.W)
    torch.testing.assert_close(delta.abs().sum(), true_l1_error(A_full, case.V, case.W, m), rtol=1e-10, atol=1e-12)


# ---- (7) ties: compare kept masses, not indices -------------------------------------------------------------
@given(case=cases(max_kv=3, max_group=2, max_n=5, quantize=True), data=st.data())
def test_ties_compare_masses(case, data):
    Hkv, n = case.Hkv, case.n
    b = data.draw(st.integers(0, n), label="b")
    scores = case.group_mean().round(decimals=2)                                 # coarse: ties are common
    perm = torch.tensor(data.draw(st.permutations(range(n)), label="perm"))
    # The same scores in another slot order: the tie-break may pick other indices, never another mass.
    for variant in ("official", "exact"):
        for alpha in (0.0, 0.2, 1.0):
            c1 = adakv_allocate(scores[None], b, alpha, variant)[0]
            c2 = adakv_allocate(scores[None, :, perm], b, alpha, variant)[0]
            m1 = (scores * select_topk(scores, c1)).sum()
            m2 = (scores[:, perm] * select_topk(scores[:, perm], c2)).sum()
            assert torch.equal(c1, c2)                  # per-head counts depend on values, not slot order
            torch.testing.assert_close(m1, m2, rtol=0, atol=1e-12)
    # Global top-B kept mass equals the brute-force optimum even with ties.
    B = data.draw(st.integers(0, Hkv * n), label="B")
    flat = scores.reshape(-1)
    values = flat.tolist()
    best = max(sum(values[i] for i in s) for s in itertools.combinations(range(Hkv * n), B))
    assert abs(float((flat * select_topk(flat, B)).sum()) - best) <= 1e-12


# ---- negative controls: a wrong identity / bound must FAIL on some generated example -----------------------
NEG = settings(database=None, derandomize=True, max_examples=2000, deadline=None,
               suppress_health_check=list(HealthCheck))   # a search budget for find(), not a property test


def _identity_gap(case, mask, renorm: bool, factor: float) -> float:
    A_hat = renormalise(case.A, mask) if renorm else case.A * mask                 # zeroing keeps I_i A_i as is
    F = kept_mass(case.A, mask)
    lhs = (case.A - A_hat).abs().sum(-1)
    keep = F > 0
    return float((lhs[keep] - factor * (1 - F[keep])).abs().max()) if bool(keep.any()) else 0.0


masked_cases = st.tuples(cases(max_n=6), st.integers(0, 2 ** 30), st.floats(0.1, 0.9))


def _with_mask(t):
    case, mseed, p = t
    return case, random_mask((case.h, case.n), mseed, p)


def test_negative_control_zeroing_breaks_identity():
    # Zeroing evicted weights without renormalising gives ||A_i - I_i A_i||_1 = 1 - F_i, half the identity:
    # checking the true identity against it must find a counterexample ...
    ex = find(masked_cases, lambda t: _identity_gap(*_with_mask(t), renorm=False, factor=2.0) > 1e-6, settings=NEG)
    assert _identity_gap(*_with_mask(ex), renorm=False, factor=2.0) > 1e-6
    # ... while the zeroing version (1 - F_i) holds on that example, so the two are really told apart.
    assert _identity_gap(*_with_mask(ex), renorm=False, factor=1.0) < 1e-12


def test_negative_control_wrong_factor_in_identity():
    # Renormalised weights with (1 - F_i) instead of 2 (1 - F_i): fails as soon as something is evicted.
    ex = find(masked_cases, lambda t: _identity_gap(*_with_mask(t), renorm=True, factor=1.0) > 1e-6, settings=NEG)
    assert _identity_gap(*_with_mask(ex), renorm=True, factor=1.0) > 1e-6
    assert _identity_gap(*_with_mask(ex), renorm=True, factor=2.0) < 1e-12


def test_negative_control_bound_without_factor_two():
    # sum_i C_i (1 - F_i) (the factor 2 dropped) is violated by the true error on some generated example.
    def violated(t):
        case, mask = _with_mask(t)
        return float(true_l1_error(case.A, case.V, case.W, mask)) > float(per_head_bound(case.A, mask, case.C)) / 2 + 1e-9
    ex = find(masked_cases, violated, settings=NEG)
    case, mask = _with_mask(ex)
    assert float(true_l1_error(case.A, case.V, case.W, mask)) <= float(per_head_bound(case.A, mask, case.C)) + 1e-9


def test_bound_is_tight_pinned_example():
    # Pinned by hand: one head, A = (1/2, 1/2), values projecting to +1 and -1, keep the first entry.
    # y = 0, ŷ = +1: the error 1 equals 2 C (1 - F) = 2 * 1 * 1/2, so the factor 2 cannot be dropped.
    A = torch.tensor([[0.5, 0.5]], dtype=F64)
    V = torch.tensor([[[1.0], [-1.0]]], dtype=F64)
    W = torch.ones(1, 1, 1, dtype=F64)
    mask = torch.tensor([[True, False]])
    C = projected_value_norms(V, W)
    assert float(true_l1_error(A, V, W, mask)) == 1.0 == float(per_head_bound(A, mask, C))


# ---- the bound on a (tiny) model prompt ---------------------------------------------------------------------
@pytest.mark.parametrize("name,opts", [("snapkv", {"window": 4}), ("adakv-snapkv", {"window": 4}),
                                       ("adakv-pyramidkv", {"window": 4}), ("h2o", {}), ("adakv-h2o", {}),
                                       ("streaming", {})])
def test_bound_report_tiny_model(name, opts):
    model = tiny_model(F64, seed=1, hidden_size=96, num_attention_heads=6, num_key_value_heads=3)
    ids = torch.randint(0, 101, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    rows = bound_report(model, ids, get_policy(name, 12, **opts))
    assert [r["layer"] for r in rows] == list(range(model.cfg.num_hidden_layers))
    for r in rows:
        assert 0 <= r["true_l1"] <= r["per_head_bound"] * (1 + TOL) + TOL <= r["global_bound"] * (1 + TOL) + 2 * TOL
        assert sum(r["kept_entries"]) < 3 * 40                                    # something was evicted
    # A budget that holds the prompt evicts nothing: zero error and zero bound.
    full = bound_report(model, ids, get_policy(name, 64, **opts))
    assert all(r["true_l1"] < 1e-12 and abs(r["per_head_bound"]) < 1e-12 for r in full)


def test_o_proj_blocks_reproduce_o_proj():
    model = tiny_model(F64, num_attention_heads=4, num_key_value_heads=2)
    W = model.layers[0].self_attn.o_proj.weight
    out = seeded_randn(3, 4, model.cfg.head_dim)                                 # (h, d)
    blocks = o_proj_blocks(W, 4)
    torch.testing.assert_close(torch.einsum("hd,hdD->D", out, blocks), model.layers[0].self_attn.o_proj(out.reshape(-1)))


def test_bound_report_of_d2o_compressing_at_prefill():
    """D2O when="prefill" (two prefill passes) compresses during the report's prefill; its merges change the values,
    so the bound (of eviction alone) is not asserted, only that the report runs and sees the evictions."""
    model = tiny_model(F64, seed=1, num_hidden_layers=4, hidden_size=96, num_attention_heads=6, num_key_value_heads=3)
    ids = torch.randint(0, 101, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    rows = bound_report(model, ids, get_policy("d2o", 0.3, protected_layers=[0], when="prefill"))
    assert [sum(r["kept_entries"]) == 3 * 40 for r in rows] == [True, False, False, False]
