"""D2O: every step against a brute-force reference, the reductions the spec pins down, and the
decode-time invariants on tiny float64 models."""
from __future__ import annotations

import math
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from conftest import tiny_model
from minikv.tools.eval.plots import format_d2o_report, plot_d2o_report
from minikv.generate import generate, prefill
from minikv.policies import get_policy
from minikv.policies import d2o as d2o_module
from minikv.policies.base import Policy
from minikv.policies.d2o import (D2O, evict_and_merge, head_variances, heavy_recent_sizes, layer_caps, layer_ratios,
                                 layer_weights, merge_decision, merge_weights_code, merge_weights_paper,
                                 nearest_kept, update_threshold, variance_statistic)
from minikv.policies.h2o import accumulate_prefill_scores, accumulate_step_scores, heavy_recent_keep
from minikv.store import LayerStore
from strategies import seeded_randn

L_TINY = 6          # protected {0, 1, 5}: layers 2-4 are compressed


def _tokens(n: int, seed: int, vocab: int = 101) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def forced_run(model, prompt: list[int], cont: list[int], policy, check=None):
    """Prefill, then teacher-force `cont` one token at a time through the policy's after_step hook.

    Returns (logits (1 + len(cont), vocab), cache). check(layer, store) runs after each layer's hook.
    """
    logits, cache = prefill(model, [prompt], policy)
    out = [logits[0]]

    def hook(layer, store, stats):
        policy.after_step(layer, store, stats)
        if check is not None:
            check(layer, store)

    for t in cont:
        lg = model(torch.tensor([[t]]), cache, hook=hook, need=policy.decode_needs, window=policy.window)
        out.append(lg[0, -1])
    return torch.stack(out), cache


def random_store(seed: int, B: int, Hkv: int, S: int, d: int) -> LayerStore:
    store = LayerStore.empty(B, Hkv, d, capacity=S, dtype=torch.float64)
    k, v = seeded_randn(seed, B, Hkv, S, d), seeded_randn(seed + 1, B, Hkv, S, d)
    store.append(k, v, torch.arange(S).expand(B, S))
    return store


class H2OFixedSizes(Policy):
    """Reference for tau = +inf: H2O machinery (scores, heavy_recent_keep with sinks) with given per-layer sizes."""
    name = "h2o-fixed"
    takes_budget = False
    prefill_needs = frozenset({"colsum"})
    decode_needs = frozenset({"probs"})
    decode_evicts = True

    def __init__(self, S_h: dict[int, int], S_r: dict[int, int], n_sink: int = 4):
        super().__init__(None)
        self.S_h, self.S_r, self.n_sink = S_h, S_r, n_sink

    def after_prefill(self, layer, store, stats):
        accumulate_prefill_scores(store, stats["colsum"])

    def after_step(self, layer, store, stats):
        accumulate_step_scores(store, stats["probs"])
        if layer in self.S_h:
            keep = heavy_recent_keep(store, store.stats["score"], torch.tensor([self.S_h[layer]]),
                                     torch.tensor([self.S_r[layer]]), self.n_sink)
            store.keep(keep)


# ---- Step 1 --------------------------------------------------------------------------------------------------
@settings(deadline=None)
@given(B=st.integers(1, 3), Hkv=st.integers(1, 3), G=st.integers(1, 3), S=st.integers(2, 12),
       seed=st.integers(0, 2**16), data=st.data())
def test_layer_variance_statistic_matches_loop(B, Hkv, G, S, seed, data):
    colsum = seeded_randn(seed, B, Hkv, G, S).abs()
    n = [data.draw(st.integers(2, S), label=f"live slots row {b}") for b in range(B)]
    valid = torch.arange(S)[None, None, :] < torch.tensor(n)[:, None, None]        # (B, 1, S)
    valid = valid.expand(B, Hkv, S)
    var = head_variances(colsum.masked_fill(~valid[:, :, None], 123.0), valid)
    got = variance_statistic(var.sum(dim=0) / var.shape[0])
    v = torch.zeros(Hkv * G, dtype=torch.float64)
    for j in range(Hkv * G):              # query head j reads KV head j // G
        v[j] = sum(torch.var(colsum[b, j // G, j % G, :n[b]], unbiased=True) for b in range(B)) / B
    want = ((v - v.min()) / (v.max() - v.min() + 1e-6)).mean()
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)
    assert 0 <= float(got) <= 1


# ---- Step 2 --------------------------------------------------------------------------------------------------
@settings(deadline=None)
@given(F_=st.lists(st.floats(0, 1), min_size=1, max_size=40), rho=st.floats(0.01, 1.0))
def test_layer_ratios_sum_weights_bounds_and_protection(F_, rho):
    Fl = torch.tensor(F_, dtype=torch.float64)
    L = len(F_)
    w = layer_weights(Fl)
    assert math.isclose(float((w * L * rho).sum()), L * rho, rel_tol=1e-12)          # before clamping: L * rho
    assert bool(((L * w >= 1 / math.e - 1e-12) & (L * w <= math.e + 1e-12)).all())
    protected = {0, L - 1}
    r = layer_ratios(Fl, torch.tensor([rho], dtype=torch.float64), protected)
    assert r.shape == (L, 1)
    assert all(float(r[p, 0]) == 1.0 for p in protected)
    others = [l for l in range(L) if l not in protected]
    raw = (w * L * rho)[others]
    assert torch.equal(r[others, 0], raw.clamp(0.01, 1.0))
    assert torch.equal(layer_ratios(Fl, torch.tensor([rho], dtype=torch.float64), set(), "uniform")[:, 0],
                       torch.full((L,), rho, dtype=torch.float64).clamp(0.01, 1.0))


@settings(deadline=None)
@given(F_=st.lists(st.floats(0, 1), min_size=2, max_size=40), count=st.integers(1, 5000))
def test_layer_caps_for_count_budgets(F_, count):
    Fl = torch.tensor(F_, dtype=torch.float64)
    L = len(F_)
    caps = layer_caps(Fl, count, {0}, "variance", n_rows=2)
    assert caps.shape == (L, 2) and bool((caps[0] == -1).all())
    raw = layer_weights(Fl) * L * count                                   # sums to L * count before flooring
    assert torch.equal(caps[1:, 0], raw[1:].floor().clamp_min(1).long())
    assert bool((caps[1:] >= max(1, math.floor(count / math.e) - 1)).all())
    assert bool((caps[1:] <= math.ceil(count * math.e)).all())
    assert bool((layer_caps(Fl, count, set(), "uniform") == count).all())


def test_heavy_recent_sizes_are_int_of_products():
    S_h, S_r = heavy_recent_sizes(torch.tensor([101, 7]), torch.tensor([0.3, 0.5], dtype=torch.float64), 0.75)
    assert S_h.tolist() == [int(101 * 0.3 * 0.75), int(7 * 0.5 * 0.75)]
    assert S_r.tolist() == [int(101 * 0.3 * 0.25), int(7 * 0.5 * 0.25)]


# ---- Step 4 --------------------------------------------------------------------------------------------------
@settings(deadline=None)
@given(B=st.integers(1, 2), Hkv=st.integers(1, 3), S=st.integers(2, 10), d=st.sampled_from([2, 4]),
       E=st.integers(0, 7), chunk=st.sampled_from([1, 2, 3, 256]), seed=st.integers(0, 2**16))
def test_nearest_kept_is_max_cosine_over_kept(B, Hkv, S, d, E, chunk, seed):
    """Against cosine_similarity, whatever the number of evicted keys compared at once (SIMILARITY_CHUNK)."""
    k = seeded_randn(seed, B, Hkv, S, d)
    keep = seeded_randn(seed + 7, B, Hkv, S) > 0
    keep[..., 0] = True
    src = torch.randint(0, S, (B, Hkv, E), generator=torch.Generator().manual_seed(seed))
    pos = torch.randperm(S, generator=torch.Generator().manual_seed(seed)).expand(B, Hkv, S)  # slots in any order
    with mock.patch.object(d2o_module, "SIMILARITY_CHUNK", chunk):
        m, j = nearest_kept(k, src, keep, pos)
    assert m.shape == j.shape == (B, Hkv, E)
    for b in range(B):
        for h in range(Hkv):
            for e in range(E):
                u = F.cosine_similarity(k[b, h, src[b, h, e]][None], k[b, h], dim=-1)
                u[~keep[b, h]] = -math.inf
                assert math.isclose(float(m[b, h, e]), float(u.max()), rel_tol=1e-12, abs_tol=1e-12)
                assert bool(keep[b, h, j[b, h, e]])
                assert math.isclose(float(u[j[b, h, e]]), float(u.max()), rel_tol=1e-12, abs_tol=1e-12)


@settings(deadline=None)
@given(S=st.integers(2, 9), copies=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_nearest_kept_ties_go_to_the_older_position_in_both_paths(S, copies, seed):
    """Kept keys repeated (exact ties): slots in position order (in_order, first maximum) and slots in any order
    (smallest position among the maxima) pick the same entry, the oldest of the tied ones."""
    g = torch.Generator().manual_seed(seed)
    base = seeded_randn(seed, 1, 1, S, 3)
    k = torch.cat([base] * copies + [seeded_randn(seed + 1, 1, 1, 1, 3)], dim=2)   # (1, 1, S * copies + 1, 3)
    n = k.shape[2]
    keep = torch.ones(1, 1, n, dtype=torch.bool)
    keep[..., -1] = False                                                   # the evicted key is the last one
    src = torch.full((1, 1, 1), n - 1)
    m0, j0 = nearest_kept(k, src, keep, torch.arange(n).view(1, 1, n), in_order=True)
    perm = torch.randperm(n, generator=g)                                   # slot s holds entry perm[s]
    kp, keepp, posp = k[:, :, perm], keep[:, :, perm], perm.view(1, 1, n)
    m1, j1 = nearest_kept(kp, torch.full((1, 1, 1), int((perm == n - 1).nonzero())), keepp, posp)
    assert torch.equal(m0, m1) and int(perm[j1]) == int(j0)
    assert int(j0) < S                                                      # the first copy: the oldest


@settings(deadline=None)
@given(B=st.integers(1, 3), Hkv=st.integers(1, 3), E=st.integers(1, 4), seed=st.integers(0, 2**16),
       alpha=st.floats(0, 1), beta=st.floats(0, 1), first=st.booleans())
def test_update_threshold_rules(B, Hkv, E, seed, alpha, beta, first):
    m = seeded_randn(seed, B, Hkv, E).tanh()
    real = seeded_randn(seed + 1, B, Hkv, E) > -0.5
    real[-1] = False                                       # the last row evicted nothing: tau must not move
    tau = torch.full((B,), math.nan, dtype=torch.float64) if first else seeded_randn(seed + 2, B).tanh()
    code = update_threshold(tau, m, real, alpha, beta, "code")
    paper = update_threshold(tau, m, real, alpha, beta, "paper")
    for b in range(B):
        vals = m[b][real[b]]
        if vals.numel() == 0:
            assert torch.equal(code[b], tau[b]) or (math.isnan(code[b]) and math.isnan(tau[b]))
            continue
        if first:
            assert math.isclose(float(code[b]), float(vals.mean()), rel_tol=1e-12, abs_tol=1e-12)
            assert float(code[b]) == float(paper[b])
        else:
            want_code = alpha * float(tau[b]) + beta * float(vals.mean())
            want_paper = beta * float(vals.max()) + (1 - beta) * float(tau[b])
            assert math.isclose(float(code[b]), want_code, rel_tol=1e-12, abs_tol=1e-12)
            assert math.isclose(float(paper[b]), want_paper, rel_tol=1e-12, abs_tol=1e-12)
            lo, hi = sorted([float(tau[b]), float(vals.max())])      # paper: a convex step towards max(m)
            assert lo - 1e-12 <= float(paper[b]) <= hi + 1e-12


def test_merge_decision_averages_over_heads_per_slot_index():
    m = torch.tensor([[[0.9, 0.1], [0.5, 0.2]]], dtype=torch.float64)       # (B=1, Hkv=2, E=2)
    real = torch.ones_like(m, dtype=torch.bool)
    got = merge_decision(m, real, torch.tensor([0.7], dtype=torch.float64))
    assert got.tolist() == [[[True, False], [True, False]]]                  # mean 0.7 >= 0.7; mean 0.15 < 0.7


# ---- Step 5: merges against brute force ----------------------------------------------------------------------
def brute_force_merge(store: LayerStore, keep: torch.Tensor, tau: torch.Tensor, alpha: float, beta: float,
                      rule: str):
    """A plain loop over evicted entries: returns (kept k, kept v per (b, h) as lists, new tau)."""
    B, Hkv, S, d = store.k.shape
    k, v = store.k.clone(), store.v.clone()
    new_k, new_v, new_tau = k.clone(), v.clone(), tau.clone()
    for b in range(B):
        ev = [[s for s in range(S) if store.pos[b, h, s] >= 0 and not keep[b, h, s]] for h in range(Hkv)]
        info = {}                                              # (h, idx) -> (m, j*)
        for h in range(Hkv):
            kept = [s for s in range(S) if keep[b, h, s] and store.pos[b, h, s] >= 0]
            for i, e in enumerate(ev[h]):
                if kept:
                    u = [float(F.cosine_similarity(k[b, h, e], k[b, h, c], dim=0)) for c in kept]
                    best = max(range(len(kept)), key=lambda t: (u[t], -t))
                    info[h, i] = (u[best], kept[best])
        ms = [mv for mv, _ in info.values()]
        if ms:
            if math.isnan(float(tau[b])):
                new_tau[b] = sum(ms) / len(ms)
            elif rule == "code":
                new_tau[b] = alpha * tau[b] + beta * (sum(ms) / len(ms))
            else:
                new_tau[b] = beta * max(ms) + (1 - beta) * tau[b]
        E = max(map(len, ev))
        groups: dict[tuple[int, int], list[tuple[int, float]]] = {}
        for i in range(E):
            heads = [h for h in range(Hkv) if (h, i) in info]
            if not heads or sum(info[h, i][0] for h in heads) / len(heads) < float(new_tau[b]):
                continue
            for h in heads:
                mv, c = info[h, i]
                groups.setdefault((h, c), []).append((ev[h][i], mv))
        for (h, c), members in groups.items():
            if rule == "code":
                acc_k = k[b, h, c] + sum(mv * k[b, h, e] for e, mv in members)
                acc_v = v[b, h, c] + sum(mv * v[b, h, e] for e, mv in members)
                new_k[b, h, c], new_v[b, h, c] = acc_k / (1 + len(members)), acc_v / (1 + len(members))
            else:
                denom = sum(math.exp(mv) for _, mv in members) + math.e
                new_k[b, h, c] = math.e / denom * k[b, h, c] + sum(math.exp(mv) / denom * k[b, h, e]
                                                                   for e, mv in members)
                new_v[b, h, c] = math.e / denom * v[b, h, c] + sum(math.exp(mv) / denom * v[b, h, e]
                                                                   for e, mv in members)
    kept_k = [[new_k[b, h][keep[b, h] & (store.pos[b, h] >= 0)] for h in range(Hkv)] for b in range(B)]
    kept_v = [[new_v[b, h][keep[b, h] & (store.pos[b, h] >= 0)] for h in range(Hkv)] for b in range(B)]
    return kept_k, kept_v, new_tau


@settings(deadline=None)
@given(B=st.integers(1, 2), Hkv=st.integers(1, 3), S=st.integers(2, 12), d=st.sampled_from([2, 4, 8]),
       seed=st.integers(0, 2**16), rule=st.sampled_from(["code", "paper"]), first=st.booleans(),
       tau_level=st.floats(-1, 1))
def test_merge_equals_brute_force_loop(B, Hkv, S, d, seed, rule, first, tau_level):
    store = random_store(seed, B, Hkv, S, d)
    keep = (seeded_randn(seed + 3, *store.pos.shape) > 0) & store.valid   # uneven per-head evictions allowed
    tau = torch.full((B,), math.nan if first else tau_level, dtype=torch.float64)
    beta = 0.5 if rule == "code" else 0.7
    want_k, want_v, want_tau = brute_force_merge(store, keep, tau, 0.5, beta, rule)
    n_evicted = int((store.valid & ~keep).sum())
    got_tau, n_merged, n_dropped = evict_and_merge(store, keep, tau, 0.5, beta, rule)
    assert n_merged.shape == n_dropped.shape == (B,) and int((n_merged + n_dropped).sum()) == n_evicted
    assert torch.allclose(got_tau, want_tau, rtol=1e-12, atol=1e-12, equal_nan=True)
    for b in range(B):
        for h in range(Hkv):
            live = store.pos[b, h] >= 0                             # eviction is in place: slots do not move
            assert int(live.sum()) == len(want_k[b][h])
            assert torch.allclose(store.k[b, h][live], want_k[b][h], rtol=1e-12, atol=1e-12)
            assert torch.allclose(store.v[b, h][live], want_v[b][h], rtol=1e-12, atol=1e-12)


@settings(deadline=None)
@given(Hkv=st.integers(1, 3), S=st.integers(2, 8), E=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_paper_weights_are_convex(Hkv, S, E, seed):
    m = seeded_randn(seed, 1, Hkv, E).tanh()
    dst = torch.randint(0, S, (1, Hkv, E), generator=torch.Generator().manual_seed(seed))
    merged = seeded_randn(seed + 1, 1, Hkv, E) > -0.3
    w_src, w_dst = merge_weights_paper(m, dst, merged, S)
    assert bool((w_src >= 0).all()) and bool((w_dst > 0).all())
    total = w_dst.clone().scatter_add(2, dst, w_src)           # w_c + sum of w_e into c
    assert torch.allclose(total, torch.ones_like(total), rtol=0, atol=1e-12)
    assert bool((w_src[~merged] == 0).all())
    # "code" weights are not convex: w_c + sum w_e = (1 + sum m_e) / (1 + |I_c|)
    c_src, c_dst = merge_weights_code(m, dst, merged, S)
    count = torch.zeros(1, Hkv, S, dtype=torch.float64).scatter_add(2, dst, merged.double())
    assert torch.allclose(c_dst, 1 / (1 + count))


@settings(deadline=None)
@given(S=st.integers(3, 10), d=st.sampled_from([2, 4]), seed=st.integers(0, 2**16))
def test_paper_merged_key_is_convex_combination_in_hull(S, d, seed):
    store = random_store(seed, 1, 1, S, d)
    keep = torch.zeros_like(store.valid)
    keep[..., 0] = True                                         # every evicted entry merges into slot 0
    k0 = store.k[:, :, :S].clone()
    evict_and_merge(store, keep, torch.tensor([0.0], dtype=torch.float64), 0.5, 0.7, "paper", tau_override=-math.inf)
    u = F.cosine_similarity(k0[0, 0, 1:], k0[0, 0, :1], dim=-1)           # (S-1,)
    w = torch.cat([torch.tensor([math.e], dtype=torch.float64), u.exp()])
    w = w / w.sum()
    assert torch.allclose(store.k[0, 0, 0], (w[:, None] * k0[0, 0]).sum(0), rtol=1e-12, atol=1e-12)
    lo, hi = k0[0, 0].min(0).values, k0[0, 0].max(0).values            # inside the bounding box of the inputs
    assert bool(((store.k[0, 0, 0] >= lo - 1e-12) & (store.k[0, 0, 0] <= hi + 1e-12)).all())
    assert int(store.length[0, 0]) == 1


# ---- the policy on a tiny model ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny64():
    return tiny_model(torch.float64, num_hidden_layers=L_TINY)


def test_tau_inf_is_h2o_with_sinks(tiny64):
    prompt, cont = _tokens(40, 1), _tokens(16, 2)
    d2o = D2O(0.3, tau_override=math.inf)
    got, cache = forced_run(tiny64, prompt, cont, d2o)
    rep = d2o.report(cache)
    assert sum(sum(x["merged"]) for x in rep["layers"]) == 0 and sum(sum(x["dropped"]) for x in rep["layers"]) > 0
    sizes = {x["layer"]: (x["S_h"][0], x["S_r"][0]) for x in rep["layers"] if not x["full"][0]}
    assert sorted(sizes) == [2, 3, 4]
    ref = H2OFixedSizes({l: s[0] for l, s in sizes.items()}, {l: s[1] for l, s in sizes.items()}, n_sink=4)
    want, ref_cache = forced_run(tiny64, prompt, cont, ref)
    assert torch.equal(got, want)
    for a, b in zip(cache.layers, ref_cache.layers):
        assert torch.equal(a.pos, b.pos) and torch.equal(a.k, b.k) and torch.equal(a.v, b.v)
    # and generation: the same tokens
    r1 = generate(tiny64, [prompt], D2O(0.3, tau_override=math.inf), max_new_tokens=12, stop_ids=[])
    r2 = generate(tiny64, [prompt], H2OFixedSizes(ref.S_h, ref.S_r), max_new_tokens=12, stop_ids=[])
    assert r1.tokens == r2.tokens


def test_merging_changes_the_cache(tiny64):
    """Sanity: with tau = -inf every evicted entry is merged, so D2O is no longer H2O."""
    prompt, cont = _tokens(48, 1), _tokens(8, 2)
    d2o = D2O(0.3, tau_override=-math.inf)
    got, cache = forced_run(tiny64, prompt, cont, d2o)
    want, _ = forced_run(tiny64, prompt, cont, D2O(0.3, tau_override=math.inf))
    assert sum(sum(x["dropped"]) for x in d2o.report(cache)["layers"]) == 0
    assert not torch.equal(got[2:], want[2:])
    assert torch.equal(got[:2], want[:2])       # prefill logits and the first step's output precede any merge


@pytest.mark.parametrize("when", d2o_module.WHENS)
def test_kept_key_norms_are_the_live_keys_norms_after_every_step(tiny64, when):
    """Step 4 reads the norms kept beside the keys (the stat "key_norm") instead of recomputing them: after every
    step and compressed layer they equal the norms of the live keys, the newest entry's and the merged ones' included
    (tau = -inf merges every evicted entry into its nearest kept one)."""
    checked = []

    def check(layer, store):
        if "key_norm" in store.stats:
            live = store.valid
            assert torch.equal(store.stats["key_norm"][live], store.k.norm(dim=-1)[live])
            checked.append(layer)
    forced_run(tiny64, _tokens(48, 5), _tokens(10, 6), D2O(0.3, tau_override=-math.inf, when=when), check)
    assert sorted(set(checked)) == [2, 3, 4] and len(checked) == 3 * 10


@pytest.mark.parametrize("opts", [{}, {"merge_weights": "paper"},
                                  {"allocation": "uniform", "heavy_share": 0.75}])
def test_compressed_heads_hold_exactly_S_h_plus_S_r(tiny64, opts):
    prompt, cont = _tokens(60, 3), _tokens(20, 4)
    d2o = D2O(0.25, **opts)
    lengths = []

    def check(layer, store):
        lengths.append((layer, store.length.clone(), int(store.seen[0])))

    _, cache = forced_run(tiny64, prompt, cont, d2o, check)
    rep = d2o.report(cache)
    assert [x["layer"] for x in rep["layers"] if x["protected"][0]] == [0, 1, L_TINY - 1]
    for layer, length, seen in lengths:
        x = rep["layers"][layer]
        if x["protected"][0]:
            assert bool((length == seen).all()), "protected layers keep everything"
        else:
            assert bool((length == x["S_h"][0] + x["S_r"][0]).all()), f"layer {layer}"
    T0 = len(prompt) + 1                                 # first compressed at the first decode step
    for x in rep["layers"]:
        if not x["protected"][0]:
            share = opts.get("heavy_share", 0.5)
            assert x["S_h"][0] == int(T0 * x["ratio"][0] * share)
            assert x["S_r"][0] == int(T0 * x["ratio"][0] * (1 - share))
            assert len(x["tau_history"][0]) == len(cont)
    assert cache.cache_ratio() < 1.0


@pytest.mark.parametrize("budget", [1.0, 200, 500])       # a count c gives every layer >= floor(c / e) >= 72
def test_full_budget_is_identical_to_full_cache(tiny64, budget):
    prompt, cont = _tokens(60, 5), _tokens(12, 6)
    got, cache = forced_run(tiny64, prompt, cont, D2O(budget))
    want, full = forced_run(tiny64, prompt, cont, get_policy("full"))
    assert torch.equal(got, want)
    assert cache.cache_ratio() == 1.0


@pytest.mark.parametrize("count,n_prompt", [(40, 30), (24, 50)])
def test_count_budget_caps_each_layer_while_decoding(tiny64, count, n_prompt):
    """A count budget bounds every compressed layer at S_h + S_r entries from the step it first holds more, even
    when the count exceeds the prompt (a ratio of the prompt could not)."""
    prompt, cont = _tokens(n_prompt, 7), _tokens(30, 8)
    d2o = D2O(count)
    seen_lengths = []
    _, cache = forced_run(tiny64, prompt, cont, d2o, lambda layer, store: seen_lengths.append(
        (layer, int(store.length.max()), int(store.seen[0]))))
    rep = d2o.report(cache)
    F = torch.tensor([x["F"][0] for x in rep["layers"]], dtype=torch.float64)
    caps = layer_caps(F, count, {x["layer"] for x in rep["layers"] if x["protected"][0]})[:, 0]
    for layer, length, seen in seen_lengths:
        x = rep["layers"][layer]
        if x["protected"][0]:
            assert length == seen
        else:
            assert (x["S_h"][0], x["S_r"][0]) == (int(caps[layer]) // 2, int(caps[layer]) // 2)
            assert length == min(seen, x["S_h"][0] + x["S_r"][0]), (layer, length, seen)
    compressed = [l for l in range(L_TINY) if not rep["layers"][l]["protected"][0]]
    assert any(int(cache.layers[l].length.max()) < n_prompt + len(cont) for l in compressed)


def test_batch_rows_have_their_own_threshold(tiny64):
    """Uniform allocation makes rows independent: a batch of two prompts = each prompt alone (tau per row)."""
    prompts = [_tokens(32, 7), _tokens(41, 8)]
    batch = generate(tiny64, prompts, D2O(0.3, allocation="uniform"), max_new_tokens=8, stop_ids=[])
    rep = batch.policy_report
    for b, p in enumerate(prompts):
        alone = generate(tiny64, [p], D2O(0.3, allocation="uniform"), max_new_tokens=8, stop_ids=[])
        assert batch.tokens[b] == alone.tokens[0]
        for x, y in zip(rep["layers"], alone.policy_report["layers"]):
            assert x["S_h"][b] == y["S_h"][0] and x["merged"][b] >= 0
            assert math.isclose(x["tau"][b], y["tau"][0], rel_tol=1e-9) or math.isnan(y["tau"][0])


def test_new_sequence_resets_threshold(tiny64):
    d2o = D2O(0.3)
    r1 = generate(tiny64, [_tokens(48, 1)], d2o, max_new_tokens=6, stop_ids=[])
    r2 = generate(tiny64, [_tokens(48, 1)], d2o, max_new_tokens=6, stop_ids=[])
    assert r1.tokens == r2.tokens and repr(r1.policy_report) == repr(r2.policy_report)   # NaN-safe


def test_registry_errors_and_report_view(tiny64, tmp_path):
    assert isinstance(get_policy("d2o", 0.2), D2O)
    for bad in [dict(merge_weights="mean"), dict(allocation="pyramid"), dict(heavy_share=2.0),
                dict(n_sink=-1), dict(tau_override=math.nan)]:
        with pytest.raises(ValueError):
            get_policy("d2o", 0.2, **bad)
    with pytest.raises(ValueError, match="budget"):
        D2O(None)
    with pytest.raises(ValueError, match="protected_layers"):
        generate(tiny64, [_tokens(20, 1)], D2O(0.2, protected_layers=[9]), max_new_tokens=2)
    r = generate(tiny64, [_tokens(48, 1)], D2O(0.3), max_new_tokens=8, stop_ids=[])
    text = format_d2o_report(r.policy_report)
    assert "merged" in text and len(text.splitlines()) == 3 + L_TINY + 1
    with pytest.raises(ValueError, match="not a D2O report"):
        format_d2o_report({"policy": "h2o"})
    pytest.importorskip("matplotlib")
    assert plot_d2o_report(r.policy_report, tmp_path / "d2o.png").stat().st_size > 0


# ---- when="prefill": Step 1 in a first pass, each layer compressed as the second pass runs ----------------------
def _d2o_prompts(seed: int, lengths=(60, 47)) -> list[list[int]]:
    return [_tokens(n, seed + i) for i, n in enumerate(lengths)]


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 10_000), budget=st.sampled_from([0.3, 0.5, 12]),
       merge_weights=st.sampled_from(["code", "paper"]))
def test_when_prefill_equals_compressing_the_whole_prompt_cache(seed, budget, merge_weights):
    """The two-pass prefill keeps, merges and thresholds exactly as one pass followed by compressing every layer
    (T = the prompt): a layer's prompt attention never depends on another layer's cache."""
    model = tiny_model(torch.float64, seed=seed % 7, num_hidden_layers=4)
    kw = dict(protected_layers=[0], merge_weights=merge_weights)
    reference = get_policy("d2o", budget, **kw)
    _, want = prefill(model, _d2o_prompts(seed), reference)
    for store in want.layers:
        reference._compress(store)
    _, got = prefill(model, _d2o_prompts(seed), get_policy("d2o", budget, when="prefill", **kw))
    for a, b in zip(want.layers, got.layers):
        a.fit(), b.fit()
        assert torch.equal(a.pos, b.pos) and torch.equal(a.k, b.k) and torch.equal(a.v, b.v)
        assert torch.allclose(a.rows["tau"], b.rows["tau"], rtol=0, atol=0, equal_nan=True)
    assert (got.layers[1].length < 47).all()                       # it did compress


def test_when_prefill_never_holds_the_whole_prompt_cache(monkeypatch):
    """Key and value bytes of every store (the first pass's too), read after each layer's hook: the whole prompt's
    cache with when="first_decode"; with when="prefill" at most the compressed cache plus two layers' prompt (the
    layer being compressed and the first pass's layer, emptied after its hook)."""
    model, prompts = tiny_model(num_hidden_layers=6), [_tokens(400, 1), _tokens(400, 2)]
    caches, peaks, final = [], {}, {}
    real_new_cache = model.new_cache
    monkeypatch.setattr(model, "new_cache", lambda *a, **k: caches.append(real_new_cache(*a, **k)) or caches[-1])
    kv_bytes = lambda stores: sum(s.k.nbytes + s.v.nbytes for s in stores)
    for when in ("first_decode", "prefill"):
        policy, peak = get_policy("d2o", 0.2, protected_layers=[0], when=when), [0]
        for hook in ("first_pass", "after_prefill"):
            def spy(*a, inner=getattr(policy, hook)):
                inner(*a)
                peak[0] = max(peak[0], kv_bytes([s for c in caches for s in c.layers]))
            monkeypatch.setattr(policy, hook, spy)
        caches.clear()
        _, cache = prefill(model, prompts, policy)
        peaks[when], final[when] = peak[0], cache
    one_layer = kv_bytes(final["first_decode"].layers[:1])          # a layer's whole prompt (never compressed)
    assert peaks["first_decode"] >= 6 * one_layer
    assert peaks["prefill"] <= kv_bytes(final["prefill"].layers) + 2 * one_layer, (peaks, one_layer)
    assert peaks["prefill"] < 0.6 * peaks["first_decode"], peaks


def test_when_prefill_then_each_step_evicts_to_the_same_sizes():
    """After a prefill compression a head holds S_h + S_r entries; a question appended without eviction is evicted
    at the first decode step (its bound read then), and after every later step the sizes hold."""
    model = tiny_model(torch.float64, num_hidden_layers=4)
    policy = get_policy("d2o", 0.3, protected_layers=[0], when="prefill")
    _, cache = prefill(model, _d2o_prompts(3), policy)
    sizes = [(s.rows["S_h"] + s.rows["S_r"]).clone() for s in cache.layers]
    res = generate(model, _d2o_prompts(3), policy, question=[[5, 6, 7], [8, 9, 10]], max_new_tokens=6,
                   stop_ids=[], keep_cache=True)
    for store, size in zip(res.cache.layers[1:], sizes[1:]):
        assert torch.equal(store.rows["S_h"] + store.rows["S_r"], size)   # fixed at the prefill compression
        assert (store.length == size[:, None]).all()
        assert store.rows["compressions"].tolist() == [6, 6]           # the prefill, then 5 fed tokens
