"""Policy framework and baselines: registry, budgets, the deterministic top-k, and the properties of issue 3."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, strategies as st

from conftest import tiny_model
from minikv.budgets import Budget, parse_budget, pyramid_prefix_budgets
from minikv.generate import decode_step, generate, prefill
from minikv.ops import last_ranked, select_topk
from minikv.policies import REGISTRY, get_policy

BASELINES = ["streaming", "h2o", "snapkv", "pyramidkv"]


def small_window(name: str) -> dict:
    """Options that make window-based policies meaningful on short test prompts."""
    return {"window": 4} if name in ("snapkv", "pyramidkv", "adakv-snapkv", "adakv-pyramidkv") else {}


def run_teacher_forced(model, ids: list[int], policy, n_prompt: int):
    """Prefill ids[:n_prompt] with the policy, then feed the rest one token at a time; returns logits and cache."""
    logits, cache = prefill(model, [ids[:n_prompt]], policy)
    out = [logits]
    lengths = [[layer.length.clone() for layer in cache.layers]]
    for t in ids[n_prompt:]:
        out.append(decode_step(model, cache, torch.tensor([t]), policy, use_sdpa=False))
        lengths.append([layer.length.clone() for layer in cache.layers])
    return torch.stack(out), cache, lengths


# ---- registry and budgets -----------------------------------------------------------------------------------
def test_unknown_policy_lists_names():
    with pytest.raises(ValueError, match="unknown policy 'nope'.*h2o.*snapkv"):
        get_policy("nope")


@pytest.mark.parametrize("text,expect", [("0.2", 0.2), ("512", 512), (1, 1), ("1.0", 1.0)])
def test_parse_budget(text, expect):
    assert parse_budget(text).value == expect


@pytest.mark.parametrize("bad,why", [("0", "count must be >= 1"), ("-3", "count must be >= 1"),
                                     ("1.5", r"ratio must be in \(0, 1\]"), ("0.0", r"ratio must be in \(0, 1\]"),
                                     ("nan", "ratio"), ("abc", "neither a count")])
def test_bad_budgets_are_errors(bad, why):
    with pytest.raises(ValueError, match=why):
        parse_budget(bad)


def test_snapkv_budget_below_window_is_an_error():
    with pytest.raises(ValueError, match="observation window"):
        prefill(tiny_model(), [list(range(1, 60))], get_policy("snapkv", 8, window=16))


def test_budget_resolution_per_row():
    assert Budget(0.25).entries(torch.tensor([100, 7])).tolist() == [25, 1]
    assert Budget(16).entries(torch.tensor([100, 7])).tolist() == [16, 16]


def test_pyramid_schedule_matches_formula():
    b = torch.tensor([64])
    layers = pyramid_prefix_budgets(b, torch.tensor([1000]), window=8, n_layers=5, beta=20)[:, 0]
    min_b, max_b = 64 // 20, 2 * 64 - 64 // 20
    step = (max_b - min_b) // 4
    assert layers.tolist() == [max_b - l * step for l in range(5)]
    # Floor rounding of `step` can only raise the average, by at most (L - 1) / 2 entries.
    assert 64 <= layers.float().mean() <= 64 + 2


# ---- the one top-k -----------------------------------------------------------------------------------------
def test_select_topk_tie_break_prefers_older():
    scores = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0]])
    assert select_topk(scores, 2).tolist() == [[False, True, True, False, False]]
    valid = torch.tensor([[True, False, True, True, True]])
    assert select_topk(scores, 2, valid).tolist() == [[False, False, True, False, True]]


@given(n=st.integers(1, 30), data=st.data())
def test_select_topk_counts_and_nesting(n, data):
    """Exactly min(k, #valid) chosen; a smaller k keeps a subset of a larger k (ties included)."""
    scores = torch.tensor(data.draw(st.lists(st.integers(0, 3), min_size=n, max_size=n)), dtype=torch.float64)
    valid = torch.tensor(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    k1 = data.draw(st.integers(0, n))
    k2 = data.draw(st.integers(k1, n))
    a, b = select_topk(scores, k1, valid), select_topk(scores, k2, valid)
    assert int(a.sum()) == min(k1, int(valid.sum())) and bool((a <= b).all()) and bool((a <= valid).all())
    if a.any() and (valid & ~a).any():
        assert scores[a].min() >= scores[valid & ~a].max()


@given(n=st.integers(1, 30), data=st.data())
def test_last_ranked_is_what_select_topk_drops_from_one_over(n, data):
    """With at most k + 1 valid entries (a decode step after a compression), dropping last_ranked keeps exactly
    select_topk's k (ties broken by position, in any slot order); with at most k nothing is dropped."""
    scores = torch.tensor(data.draw(st.lists(st.integers(0, 3), min_size=n, max_size=n)), dtype=torch.float64)
    scores[torch.tensor(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)))] = float("inf")   # sinks
    valid = torch.tensor(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    pos = torch.randperm(n, generator=torch.Generator().manual_seed(data.draw(st.integers(0, 99))))   # slot order
    for k in {max(0, int(valid.sum()) - 1), int(valid.sum())}:          # one over, and none over
        kept = valid & ~last_ranked(scores, valid, pos, torch.tensor(k))
        assert kept.tolist() == select_topk(scores, k, valid, pos).tolist()
        assert int((valid & ~kept).sum()) == (1 if int(valid.sum()) > k else 0)

# ---- properties over policies -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", BASELINES + ["full"])
@given(n_prompt=st.integers(5, 40), n_decode=st.integers(0, 6), seed=st.integers(0, 3))
def test_budget_at_least_length_is_bit_identical_to_full(name, n_prompt, n_decode, seed):
    model = tiny_model(torch.float64, seed=seed)
    ids = torch.randint(1, 101, (n_prompt + n_decode,), generator=torch.Generator().manual_seed(seed)).tolist()
    full, _, _ = run_teacher_forced(model, ids, get_policy("full"), n_prompt)
    budget = None if name == "full" else n_prompt + n_decode         # full refuses a budget
    got, cache, _ = run_teacher_forced(model, ids, get_policy(name, budget, **small_window(name)), n_prompt)
    assert torch.equal(full, got)
    assert cache.cache_ratio() == 1.0


@pytest.mark.parametrize("name", BASELINES)
@given(n_prompt=st.integers(12, 50), n_decode=st.integers(1, 6), data=st.data())
def test_budgets_respected_after_prefill_and_every_step(name, n_prompt, n_decode, data):
    budget = data.draw(st.one_of(st.integers(6, 30), st.sampled_from([0.3, 0.5, 0.8])), label="budget")
    model = tiny_model(torch.float32, seed=1)
    ids = torch.randint(1, 101, (n_prompt + n_decode,), generator=torch.Generator().manual_seed(n_prompt)).tolist()
    n_entries = int(Budget(budget).entries(torch.tensor([n_prompt])))
    if name in ("snapkv", "pyramidkv") and n_entries < 4 or name == "streaming" and n_entries <= 4:
        with pytest.raises(ValueError):          # a count is refused at construction, a ratio once resolved
            run_teacher_forced(model, ids, get_policy(name, budget, **small_window(name)), n_prompt)
        return
    policy = get_policy(name, budget, **small_window(name))
    _, cache, lengths = run_teacher_forced(model, ids, policy, n_prompt)
    for step, per_layer in enumerate(lengths):
        for layer, length in enumerate(per_layer):
            if name in ("streaming", "h2o"):
                limit = n_entries                                  # evicts back to the budget every step
            elif name == "snapkv":
                limit = n_entries + step                           # decode tokens are appended, never evicted
            else:
                limit = int(policy.prefix_budgets(layer, cache.layers[layer])[0]) + 4 + step
            assert int(length.max()) <= limit, (step, layer, int(length.max()), limit)


@given(n_prompt=st.integers(10, 40), data=st.data())
def test_streaming_keeps_sinks_and_recent(n_prompt, data):
    budget = data.draw(st.integers(5, 12))
    model = tiny_model(torch.float32)
    _, cache = prefill(model, [list(range(1, n_prompt + 1))], get_policy("streaming", budget))
    expect = sorted(set(range(4)) | set(range(max(0, n_prompt - (budget - 4)), n_prompt)))
    for layer in cache.layers:
        for h in range(layer.pos.shape[1]):
            assert layer.pos[0, h, : layer.length[0, h]].tolist() == expect


def test_h2o_keeps_recent_and_heaviest():
    """On a crafted store the kept set is exactly recent + top scores (ties -> older)."""
    from minikv.policies.h2o import heavy_recent_keep
    from minikv.store import LayerStore
    store = LayerStore.empty(1, 1, 2)
    store.append(torch.zeros(1, 1, 10, 2), torch.zeros(1, 1, 10, 2), torch.arange(10)[None])
    score = torch.tensor([[[5.0, 1.0, 7.0, 7.0, 0.0, 9.0, 0.0, 0.0, 0.0, 0.0]]])
    score = torch.cat([score, torch.zeros(1, 1, store.capacity - 10)], -1)
    keep = heavy_recent_keep(store, score, torch.tensor([3]), torch.tensor([2]))
    assert torch.nonzero(keep[0, 0]).flatten().tolist() == [2, 3, 5, 8, 9]


def test_generation_reports_ratio_and_bytes():
    model = tiny_model()
    prompt = list(range(1, 81))
    full = generate(model, [prompt], max_new_tokens=4, stop_ids=[])
    h2o = generate(model, [prompt], get_policy("h2o", 0.25), max_new_tokens=4, stop_ids=[])
    assert full.cache_ratio == 1.0 and full.kv_bytes_live == full.kv_bytes_full
    assert h2o.kv_bytes_live == int(h2o.cache_ratio * h2o.kv_bytes_full)
    assert 0.2 < h2o.cache_ratio < 0.3 and h2o.kv_bytes_allocated < full.kv_bytes_allocated


def test_question_agnostic_appends_question_uncompressed():
    model = tiny_model()
    context, question = list(range(1, 61)), [7, 8, 9]
    _, cache = prefill(model, [context], get_policy("snapkv", 20, window=4), question=[question])
    for layer in cache.layers:
        assert int(layer.length.max()) == 20 + 3
        assert layer.pos[0, 0, 20:23].tolist() == [60, 61, 62]


def test_every_registered_policy_builds():
    for name in REGISTRY:
        policy = get_policy(name, None if name in ("full", "corm") else 0.5)   # corm is budget-free
        assert policy.name == name


@pytest.mark.parametrize("spec", [("h2o", {}), ("streaming", {}), ("d2o", {"when": "prefill", "protected_layers": [0]}),
                                  ("snapkv", {"window": 4})])
def test_prefill_room_of_an_evicted_layer(spec):
    """A layer compressed at prefill keeps room for one decode step when its policy evicts at every step (the decode
    loop refits the cache at the second step); a policy that does not, or a question to append, keeps the room asked."""
    name, options = spec
    model, policy = tiny_model(), get_policy(name, 0.25, **options)
    prompts = [[(7 * i) % 100 + 1 for i in range(80)]] * 2
    for question in (None, [[5, 6]] * 2):
        _, cache = prefill(model, prompts, policy, question=question, extra_capacity=100)
        evicted = [s for s in cache.layers if not s.heads_aligned]
        assert evicted, "the policy compressed no layer at prefill"
        for store in evicted:
            spare = store.capacity - int(store.length.max())
            if policy.decode_evicts and question is None:
                assert 2 <= spare < 2 + 16                # one step's entry, a padding slot, rounding to 16 slots
            else:
                assert spare >= 100 + 1 - (2 if question else 0)
    res = generate(model, prompts, policy, max_new_tokens=5, stop_ids=[])   # the decode loop takes it from there
    assert all(len(t) == 5 for t in res.tokens)
