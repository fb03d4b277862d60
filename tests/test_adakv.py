"""Ada-KV policies (specs/adakv.md): allocation sums and safeguard, alpha = 1 == uniform, global top >= uniform,
real uneven per-head storage, full budget == full cache (float64 exact), errors, report and views."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from minikv.tools.eval.plots import format_head_budgets, head_budget_matrix, plot_head_budgets
from minikv.generate import generate, prefill
from minikv.ops import select_topk
from minikv.policies import get_policy, policy_names
from minikv.policies.adakv import adakv_allocate, safeguard_floor

from conftest import tiny_model
from strategies import seeded_randn

F64 = torch.float64
ADA = ("adakv-snapkv", "adakv-pyramidkv", "adakv-h2o")
ALPHAS = st.sampled_from([0.0, 0.1, 0.2, 0.25, 0.5, 0.9, 1.0])


@st.composite
def score_cases(draw, max_batch=2, max_kv=4, max_m=24):
    """Prefix scores (B, Hkv, S) with -inf on non-candidate slots (a trailing window), and a prefix budget b <= m."""
    B = draw(st.integers(1, max_batch), label="B")
    H = draw(st.integers(1, max_kv), label="Hkv")
    m = draw(st.integers(1, max_m), label="m")
    w = draw(st.integers(0, 4), label="window slots")
    seed = draw(st.integers(0, 2 ** 30), label="seed")
    temp = draw(st.sampled_from([0.05, 0.5, 3.0]), label="temperature")
    scores = torch.softmax(seeded_randn(seed, B, H, m + w) / temp, dim=-1)
    # Heads on different scales (up to 1000x apart), so the global ranking often starves a head.
    scores = scores * 10 ** (-3 * torch.rand(B, H, 1, generator=torch.Generator().manual_seed(seed), dtype=F64))
    if draw(st.booleans(), label="ties"):
        scores = scores.round(decimals=2)
    scores[..., m:] = float("-inf")                                                  # window / empty slots
    b = draw(st.integers(0, m), label="b")
    return scores, b


def official_slack(H: int, b: int, alpha: float) -> tuple[float, float]:
    """Documented range of sum_i B_i - Hkv*b for the official rounding: [-Hkv(1/2 + frac), Hkv(1/2 - frac)]."""
    frac = b * alpha - math.floor(b * alpha)
    return -H * (0.5 + frac), H * (0.5 - frac)


# ---- allocation ---------------------------------------------------------------------------------------------
@given(case=score_cases(), alpha=ALPHAS)
def test_allocation_sums(case, alpha):
    scores, b = case
    B, H, _ = scores.shape
    exact = adakv_allocate(scores, b, alpha, "exact")
    assert torch.equal(exact.sum(-1), torch.full((B,), H * b))                     # exactly the layer total
    official = adakv_allocate(scores, b, alpha, "official")
    lo, hi = official_slack(H, b, alpha)
    diff = official.sum(-1) - H * b
    assert bool(((diff >= lo - 1e-9) & (diff <= hi + 1e-9)).all()), (diff.tolist(), lo, hi)


@given(case=score_cases(), alpha=ALPHAS, variant=st.sampled_from(["official", "exact"]))
def test_every_head_keeps_the_safeguard(case, alpha, variant):
    scores, b = case
    counts = adakv_allocate(scores, b, alpha, variant)
    m = int((scores > float("-inf")).sum(-1).min())
    assert bool((counts >= int(safeguard_floor(torch.tensor(b), alpha))).all())
    assert bool((counts <= m).all())                                                # never more than candidates


@given(case=score_cases(), alpha=ALPHAS)
def test_global_selection_keeps_at_least_uniform_mass(case, alpha):
    scores, b = case
    valid = scores > float("-inf")
    s = scores.masked_fill(~valid, 0)
    uniform = (s * select_topk(scores, b, valid)).sum((-1, -2))                     # (B,)
    # exact: the best mass under "each head >= floor(alpha b), total Hkv*b", which uniform satisfies: any alpha.
    exact = adakv_allocate(scores, b, alpha, "exact")
    mass = (s * select_topk(scores, exact, valid)).sum((-1, -2))
    assert bool((mass >= uniform - 1e-12).all())
    # official: the total may be smaller than Hkv*b by rounding, so only alpha = 0 (pure global top) is guaranteed.
    official = adakv_allocate(scores, b, 0.0, "official")
    mass = (s * select_topk(scores, official, valid)).sum((-1, -2))
    assert bool((mass >= uniform - 1e-12).all())


def test_alpha_one_is_uniform_allocation():
    scores = torch.softmax(seeded_randn(0, 2, 3, 30) * 3, -1)
    for variant in ("official", "exact"):
        assert torch.equal(adakv_allocate(scores, 7, 1.0, variant), torch.full((2, 3), 7))


def test_allocation_pinned_example():
    # Head 0 holds all the large scores: with alpha = 0 it gets the whole layer budget; the floor protects head 1.
    scores = torch.tensor([[[0.9, 0.8, 0.7, 0.6], [0.05, 0.04, 0.03, 0.02]]], dtype=F64)
    assert adakv_allocate(scores, 2, 0.0, "official").tolist() == [[4, 0]]
    assert adakv_allocate(scores, 2, 0.0, "exact").tolist() == [[4, 0]]
    # alpha = 0.5: floor = 1. official: round(0.5 * 4 + 1) = 3 and round(0.5 * 0 + 1) = 1; exact: 1 each + 2 more.
    assert adakv_allocate(scores, 2, 0.5, "official").tolist() == [[3, 1]]
    assert adakv_allocate(scores, 2, 0.5, "exact").tolist() == [[3, 1]]
    # Rounding (official): b = 3, alpha = 0.5 -> floor 1, f = (4, 2): round(3.0) = 3, round(2.0) = 2 -> sum 5 != 6.
    scores = torch.tensor([[[0.9, 0.8, 0.7, 0.6], [0.85, 0.75, 0.03, 0.02]]], dtype=F64)
    assert adakv_allocate(scores, 3, 0.5, "official").tolist() == [[3, 2]]
    assert adakv_allocate(scores, 3, 0.5, "exact").tolist() == [[4, 2]]


def test_allocation_errors():
    scores = torch.rand(1, 2, 5)
    with pytest.raises(ValueError, match="alpha"):
        adakv_allocate(scores, 2, 1.5)
    with pytest.raises(ValueError, match="variant"):
        adakv_allocate(scores, 2, 0.2, "fast")
    with pytest.raises(ValueError, match="prefix budget"):
        adakv_allocate(scores, -1)
    with pytest.raises(ValueError, match="alpha"):
        get_policy("adakv-snapkv", 64, alpha=-0.1)
    with pytest.raises(ValueError, match="observation window"):
        prefill(tiny_model(), [list(range(50))], get_policy("adakv-snapkv", 8, window=16))
    with pytest.raises(ValueError, match="needs a budget"):
        get_policy("adakv-h2o")


def test_registered():
    assert set(ADA) <= set(policy_names())


# ---- policies on a tiny model -------------------------------------------------------------------------------
def _model():
    return tiny_model(F64, seed=2, hidden_size=96, num_attention_heads=6, num_key_value_heads=3,
                      num_hidden_layers=3)          # 96: the config refuses a hidden size Hq does not divide


def _prompt(n=64, seed=0):
    return torch.randint(0, 101, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _opts(name, **kw):
    return {"window": 8, **kw} if "snapkv" in name or "pyramidkv" in name else kw


@pytest.mark.parametrize("uniform,ada", [("snapkv", "adakv-snapkv"), ("pyramidkv", "adakv-pyramidkv"),
                                         ("h2o", "adakv-h2o")])
@pytest.mark.parametrize("variant", ["official", "exact"])
def test_alpha_one_equals_uniform_method(uniform, ada, variant):
    model, ids = _model(), _prompt()
    ref_logits, ref_cache = prefill(model, [ids], get_policy(uniform, 24, **_opts(uniform)))
    logits, cache = prefill(model, [ids], get_policy(ada, 24, **_opts(ada, alpha=1.0, variant=variant)))
    assert torch.equal(logits, ref_logits)
    for a, b in zip(cache.layers, ref_cache.layers):
        assert torch.equal(a.length, b.length) and torch.equal(a.pos, b.pos)     # same kept positions
    # ... and through decoding (H2O evicts every step).
    r_ref = generate(model, [ids], get_policy(uniform, 24, **_opts(uniform)), max_new_tokens=6, keep_cache=True)
    r = generate(model, [ids], get_policy(ada, 24, **_opts(ada, alpha=1.0, variant=variant)), max_new_tokens=6,
                 keep_cache=True)
    assert r.tokens == r_ref.tokens
    for a, b in zip(r.cache.layers, r_ref.cache.layers):
        assert torch.equal(a.pos[a.valid], b.pos[b.valid])


@pytest.mark.parametrize("name", ADA)
@pytest.mark.parametrize("variant", ["official", "exact"])
def test_each_head_stores_its_own_budget(name, variant):
    model, ids = _model(), _prompt(80)
    policy = get_policy(name, 24, **_opts(name, variant=variant, alpha=0.0))
    _, cache = prefill(model, [ids], policy)
    rep = policy.report(cache)
    window = 8 if name != "adakv-h2o" else 12                                      # h2o: n_recent = 24 // 2
    uneven = False
    for layer, store in enumerate(cache.layers):
        counts = torch.tensor(rep["layers"][layer]["head_prefix"])                   # (B, Hkv)
        assert torch.equal(store.length, counts + window)                          # really stored, no masking
        assert torch.equal(torch.tensor(rep["layers"][layer]["head_budget"]), store.length)
        if variant == "exact":
            assert int(counts.sum()) == 3 * rep["layers"][layer]["prefix_budget"][0]
        valid = store.valid
        assert torch.equal(valid.sum(-1), store.length)                            # live slots = [0, length)
        p = store.pos[0]
        for h in range(3):                                                          # positions strictly increasing
            live = p[h][: int(store.length[0, h])]
            assert bool((live[1:] > live[:-1]).all())
            assert set(range(80 - window, 80)) <= set(live.tolist())                # the window is always kept
        uneven |= bool((store.length != store.length[:, :1]).any())
        assert store.nbytes_live() == int(store.length.sum()) * 2 * store.k.shape[-1] * store.k.element_size()
        assert store.nbytes_allocated() >= store.nbytes_live()
    assert uneven, "alpha = 0 on a random model should give uneven per-head budgets somewhere"


def test_adakv_h2o_decode_keeps_per_head_sizes():
    model, ids = _model(), _prompt(60)
    policy = get_policy("adakv-h2o", 20, alpha=0.0)
    r = generate(model, [ids], policy, max_new_tokens=8, keep_cache=True, stop_ids=[])
    rep = policy.report(r.cache)
    for layer, store in enumerate(r.cache.layers):
        assert store.length[0].tolist() == rep["layers"][layer]["head_budget"][0]            # fixed after prefill
        assert int(store.pos.max()) == 60 + len(r.tokens[0]) - 2                  # the newest token is cached


@pytest.mark.parametrize("name", ADA)
@pytest.mark.parametrize("variant", ["official", "exact"])
def test_budget_at_least_length_is_full_cache(name, variant):
    model, ids = _model(), _prompt(40)
    new = 6
    full = generate(model, [ids], get_policy("full"), max_new_tokens=new, keep_cache=True)
    r = generate(model, [ids], get_policy(name, 40 + new, **_opts(name, variant=variant)), max_new_tokens=new,
                 keep_cache=True)
    assert r.tokens == full.tokens
    ref_logits, _ = prefill(model, [ids], get_policy("full"))
    logits, _ = prefill(model, [ids], get_policy(name, 40 + new, **_opts(name, variant=variant)))
    assert torch.equal(logits, ref_logits)
    for a, b in zip(r.cache.layers, full.cache.layers):
        assert torch.equal(a.k, b.k) and torch.equal(a.v, b.v) and torch.equal(a.pos, b.pos)


def test_batch_rows_are_independent():
    # A short row (fits the budget) beside a long one (compressed): each row matches its own single-row run.
    model = _model()
    long_ids, short_ids = _prompt(70, 1), _prompt(20, 2)
    policy = get_policy("adakv-snapkv", 24, window=8, alpha=0.0)
    _, cache = prefill(model, [long_ids, short_ids], policy)
    _, c_long = prefill(model, [long_ids], get_policy("adakv-snapkv", 24, window=8, alpha=0.0))
    for a, b in zip(cache.layers, c_long.layers):
        assert torch.equal(a.length[0], b.length[0])
        assert torch.equal(a.length[1], torch.full((3,), 20))


# ---- report views -------------------------------------------------------------------------------------------
def test_views(tmp_path):
    model, ids = _model(), _prompt(80)
    policy = get_policy("adakv-snapkv", 24, window=8, alpha=0.0)
    _, cache = prefill(model, [ids], policy)
    rep = policy.report(cache)
    layers, m = head_budget_matrix(rep)
    assert layers == [0, 1, 2] and len(m[0]) == 3
    text = format_head_budgets(rep)
    assert "layer" in text and len(text.splitlines()) == 2 + 3
    import json
    assert format_head_budgets(json.loads(json.dumps(rep))) == text             # survives a JSON round trip
    pytest.importorskip("matplotlib")
    out = plot_head_budgets(rep, tmp_path / "heads.png")
    assert out.exists() and out.stat().st_size > 0
    with pytest.raises(ValueError, match="head_budgets"):
        format_head_budgets(get_policy("snapkv", 24, window=8).report())
