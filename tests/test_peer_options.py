"""Options that reproduce a peer library's definition (issue "Comparable results"; train_free.md §9).

- `pooling` (snapkv, pyramidkv, adakv-snapkv, adakv-pyramidkv): "max" (default; group mean, then max-pool padded with
  -inf, as Ada-KV's code) or "avg" (NVIDIA kvpress's SnapKVPress: avg-pool each query head over the prefix only, zeros
  around it counted, then group mean).
- `score` (h2o, adakv-h2o, d2o): "sum" (default; H2O's accumulated attention) or "mean" (kvpress's
  ObservedAttentionPress: divided by the number of queries that saw the key, its own query included).

Each is checked on a hand-computed example where the two definitions keep different sets, and against a literal
transcription of the peer's code (`kvpress_*` below, line for line)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st

from conftest import tiny_model
from minikv.errors import BadInput
from minikv.generate import decode_step, prefill
from minikv.policies import get_policy, policy_options, REGISTRY
from minikv.policies.h2o import accumulate_prefill_scores, ranked_scores
from minikv.policies.snapkv import window_scores
from minikv.store import LayerStore
from strategies import seeded_randn

F64 = torch.float64
INF = float("inf")
SNAP_FAMILY = ("snapkv", "pyramidkv", "adakv-snapkv", "adakv-pyramidkv")
H2O_FAMILY = ("h2o", "adakv-h2o", "d2o")


# ---- the peer's code, transcribed ------------------------------------------------------------------------------
def kvpress_snapkv_scores(attentions: torch.Tensor, n_kv_heads: int, window_size: int, kernel_size: int):
    """kvpress SnapKVPress.score (kvpress/presses/snapkv_press.py:96-110 at 08a43bf), from the full attention rows of
    the last window_size queries: attentions (bsz, num_heads, window_size, q_len)."""
    bsz, num_heads, _, q_len = attentions.shape
    attn_weights = attentions[..., : -window_size]
    scores = attn_weights.mean(dim=-2)
    scores = F.avg_pool1d(scores, kernel_size=kernel_size, padding=kernel_size // 2, stride=1)
    scores = scores.view(bsz, n_kv_heads, num_heads // n_kv_heads, q_len - window_size)
    scores = scores.mean(2)
    return F.pad(scores, (0, window_size), value=scores.max().item())


def kvpress_observed_scores(attentions: torch.Tensor, n_kv_heads: int) -> torch.Tensor:
    """kvpress ObservedAttentionPress.score (kvpress/presses/observed_attention_press.py:54-58 at a5398cd), from the
    full prompt attention attentions (bsz, num_heads, n_tokens, n_tokens)."""
    scores = attentions.sum(2)
    bsz, n_tokens = attentions.shape[0], attentions.shape[-1]
    n_tokens_in_sum = torch.arange(n_tokens, 0, -1).to(attentions.device, attentions.dtype)
    scores = scores / n_tokens_in_sum
    return scores.view(bsz, n_kv_heads, -1, n_tokens).mean(2)


def kvpress_kept(scores: torch.Tensor, n_kept: int) -> list[set[int]]:
    """ScorerPress.compress: the top n_kept positions of each KV head (batch row 0)."""
    return [set(h.tolist()) for h in scores[0].topk(n_kept, dim=-1).indices]


def assert_same_top(ours: list[set[int]], theirs: list[set[int]], scores: torch.Tensor) -> None:
    """Both are top-k sets of the peer's scores (batch row 0): equal sets, or sets that differ only among tied scores
    (torch.topk breaks ties arbitrarily, minikv by the older position)."""
    for h, (a, b) in enumerate(zip(ours, theirs)):
        if a != b:
            va, vb = (scores[0, h, sorted(x)].sort().values for x in (a, b))
            assert len(a) == len(b) and torch.allclose(va, vb, rtol=1e-12, atol=0), (h, a, b, va, vb)


# ---- stores and statistics -------------------------------------------------------------------------------------
def fresh_store(n: int, n_kv_heads: int, seed: int = 0) -> LayerStore:
    """One batch row holding positions 0..n-1 in slots 0..n-1 (as prefill leaves it), float64."""
    store = LayerStore.empty(1, n_kv_heads, 4, capacity=n, dtype=F64)
    store.append(seeded_randn(seed, 1, n_kv_heads, n, 4), seeded_randn(seed + 1, 1, n_kv_heads, n, 4),
                 torch.arange(n)[None])
    store.rows["prompt_len"] = torch.tensor([n])
    return store


def causal_attention(seed: int, n_kv_heads: int, G: int, n: int) -> torch.Tensor:
    """Causal softmax rows of all n prompt queries: (n_kv_heads, G, n, n), row i sees keys 0..i."""
    logits = seeded_randn(seed, n_kv_heads, G, n, n) * 2
    return torch.softmax(logits.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), -INF), dim=-1)


def padded(x: torch.Tensor, S: int) -> torch.Tensor:
    """x (..., n) zero-padded to the store's S slots, with a batch axis in front."""
    out = torch.zeros(*x.shape[:-1], S, dtype=x.dtype)
    out[..., :x.shape[-1]] = x
    return out[None]


def kept(store: LayerStore) -> list[set[int]]:
    """Live positions of each KV head of batch row 0."""
    return [set(p[p >= 0].tolist()) for p in store.pos[0]]


# ---- pooling: hand-computed ------------------------------------------------------------------------------------
def hand_rows(S: int) -> torch.Tensor:
    """Window w = 2 of a 9-token prompt: both rows give the prefix (positions 0..6) the scores 5 0 0 0 3 3 3 and the
    window (7, 8) 100, so any pooling that reached into the window would show. (1, 1, 1, 2, S)."""
    row = torch.tensor([5.0, 0, 0, 0, 3, 3, 3, 100, 100], dtype=F64)
    return padded(row.expand(1, 1, 2, 9), S)


def test_pooling_hand_example_scores():
    # max, kernel 3, -inf padding: 5 5 0 3 3 3 3; avg, kernel 3, zeros counted: 5/3 5/3 0 1 2 3 2.
    store = fresh_store(9, 1)
    mx = window_scores(store, hand_rows(store.capacity), 2, 3, "max")[0, 0]
    avg = window_scores(store, hand_rows(store.capacity), 2, 3, "avg")[0, 0]
    assert mx[:7].tolist() == [5, 5, 0, 3, 3, 3, 3]
    assert torch.allclose(avg[:7], torch.tensor([5 / 3, 5 / 3, 0, 1, 2, 3, 2], dtype=F64), rtol=0, atol=1e-15)
    assert bool((mx[7:] == -INF).all()) and bool((avg[7:] == -INF).all())       # the window and empty slots


# Budget 4 = window 2 + prefix budget b. Ties go to the older position.
#   snapkv, adakv-snapkv (one head: official round(0.8*2 + 0) = 2): b = 2; max keeps 0 1, avg keeps 5 (3), 4 (2 < 6).
#   pyramidkv (one layer: max_b = 2*2 - 2//20 = 4): b = 4; max keeps 0 1 3 4, avg keeps 5, 4, 6, 0.
#   adakv-pyramidkv: round(0.8*4 + floor(0.2*4)) = round(3.2) = 3 of the pyramid's 4: max keeps 0 1 3, avg 5 4 6.
@pytest.mark.parametrize("name,want_max,want_avg", [
    ("snapkv", {0, 1}, {4, 5}), ("adakv-snapkv", {0, 1}, {4, 5}),
    ("pyramidkv", {0, 1, 3, 4}, {0, 4, 5, 6}), ("adakv-pyramidkv", {0, 1, 3}, {4, 5, 6})])
def test_pooling_hand_example_keeps(name, want_max, want_avg):
    for pooling, want in (("max", want_max), ("avg", want_avg)):
        store = fresh_store(9, 1)
        get_policy(name, 4, window=2, kernel=3, pooling=pooling).after_prefill(0, store, {"last_rows": hand_rows(
            store.capacity)})
        assert kept(store) == [want | {7, 8}], (name, pooling)


def test_group_order_hand_example():
    """Two query heads of one KV head, prefix scores 4 0 0 and 0 0 4, window w = 1 (score 0), kernel 3.
    max (Ada-KV's order): group mean 2 0 2, then max-pool: 2 2 2 (pooling each head first would give 2 4 2).
    avg (kvpress's order): pool each head, 4/3 4/3 0 and 0 4/3 4/3, then group mean: 2/3 4/3 2/3 (linear: the
    order changes nothing but rounding)."""
    store = fresh_store(4, 1)
    rows = padded(torch.tensor([[[4.0, 0, 0, 0]], [[0, 0, 4.0, 0]]], dtype=F64)[None], store.capacity)
    assert window_scores(store, rows, 1, 3, "max")[0, 0, :3].tolist() == [2, 2, 2]
    avg = window_scores(store, rows, 1, 3, "avg")[0, 0, :3]
    assert torch.allclose(avg, torch.tensor([2 / 3, 4 / 3, 2 / 3], dtype=F64), rtol=0, atol=1e-15)


# ---- pooling: properties and the literal kvpress -----------------------------------------------------------------
@st.composite
def window_cases(draw):
    Hkv, G = draw(st.integers(1, 3), label="Hkv"), draw(st.integers(1, 3), label="G")
    n = draw(st.integers(4, 30), label="n")
    w = draw(st.integers(1, n - 2), label="window")                               # kvpress: q_len > window_size
    kernel = draw(st.sampled_from([1, 3, 5, 7]), label="kernel")
    return Hkv, G, n, w, kernel, draw(st.integers(0, 2 ** 20), label="seed")


@given(case=window_cases(), data=st.data())
def test_avg_pooling_reproduces_kvpress_snapkv(case, data):
    Hkv, G, n, w, kernel, seed = case
    store = fresh_store(n, Hkv, seed)
    rows = causal_attention(seed, Hkv, G, n)[:, :, n - w:]                       # (Hkv, G, w, n) the window rows
    ours = window_scores(store, padded(rows, store.capacity), w, kernel, "avg")[..., :n]
    theirs = kvpress_snapkv_scores(rows.reshape(1, Hkv * G, w, n), Hkv, w, kernel)
    assert torch.allclose(ours[..., :n - w], theirs[..., :n - w], rtol=1e-12, atol=1e-15)
    assert bool((ours[..., n - w:] == -INF).all())                               # kvpress pads its window with max
    # The same kept set, window included (kvpress's budget counts the window, as minikv's does).
    budget = w + data.draw(st.integers(1, n - w - 1), label="prefix budget")
    get_policy("snapkv", budget, window=w, kernel=kernel, pooling="avg").after_prefill(
        0, store, {"last_rows": padded(rows, store.capacity)})
    assert_same_top(kept(store), kvpress_kept(theirs, budget), theirs)


@given(case=window_cases())
def test_kernel_one_avg_equals_max(case):
    """With kernel 1 there is nothing to pool: both poolings give the group mean of the window mean, bit for bit."""
    Hkv, G, n, w, _, seed = case
    store = fresh_store(n, Hkv, seed)
    rows = padded(causal_attention(seed, Hkv, G, n)[:, :, n - w:], store.capacity)
    assert torch.equal(window_scores(store, rows, w, 1, "max"), window_scores(store, rows, w, 1, "avg"))


@given(case=window_cases())
def test_max_pooling_is_the_default(case):
    Hkv, G, n, w, kernel, seed = case
    rows = padded(causal_attention(seed, Hkv, G, n)[:, :, n - w:], fresh_store(n, Hkv).capacity)
    for name in SNAP_FAMILY:
        a, b = fresh_store(n, Hkv, seed), fresh_store(n, Hkv, seed)
        get_policy(name, w + 1, window=w, kernel=kernel).after_prefill(0, a, {"last_rows": rows})
        get_policy(name, w + 1, window=w, kernel=kernel, pooling="max").after_prefill(0, b, {"last_rows": rows})
        assert torch.equal(a.pos, b.pos), name


# ---- score: hand-computed --------------------------------------------------------------------------------------
def test_mean_score_hand_example():
    """Four tokens, accumulated attention 2.0 1.5 1.2 0.5, seen by 4 3 2 1 queries: means 0.5 0.5 0.6 0.5.
    All of the budget heavy (heavy_share = 1, kvpress has no recent window): budget 1 keeps 0 by sum, 2 by mean;
    budget 2 keeps 0 1 by sum, 2 and then 0 (0.5 ties with 1 and 3: the older wins) by mean."""
    colsum = padded(torch.tensor([2.0, 1.5, 1.2, 0.5], dtype=F64)[None, None], 16)
    store = fresh_store(4, 1)
    accumulate_prefill_scores(store, colsum)
    assert torch.allclose(ranked_scores(store, "mean")[0, 0, :4], torch.tensor([0.5, 0.5, 0.6, 0.5], dtype=F64))
    assert torch.equal(ranked_scores(store, "sum"), store.stats["score"])
    for budget, by_sum, by_mean in ((1, {0}, {2}), (2, {0, 1}, {0, 2})):
        for score, want in (("sum", by_sum), ("mean", by_mean)):
            store = fresh_store(4, 1)
            get_policy("h2o", budget, heavy_share=1.0, score=score).after_prefill(0, store, {"colsum": colsum})
            assert kept(store) == [want], (budget, score)


# ---- score: the literal kvpress and properties -----------------------------------------------------------------
@given(Hkv=st.integers(1, 3), G=st.integers(1, 3), n=st.integers(2, 30), seed=st.integers(0, 2 ** 20),
       data=st.data())
def test_mean_score_reproduces_kvpress_observed_attention(Hkv, G, n, seed, data):
    attn = causal_attention(seed, Hkv, G, n)                                      # (Hkv, G, n, n)
    colsum = padded(attn.sum(dim=2), fresh_store(n, Hkv).capacity)                # (1, Hkv, G, S)
    theirs = kvpress_observed_scores(attn.reshape(1, Hkv * G, n, n), Hkv)
    store = fresh_store(n, Hkv, seed)
    accumulate_prefill_scores(store, colsum)
    assert torch.allclose(ranked_scores(store, "mean")[..., :n], theirs, rtol=1e-12, atol=0)
    # ObservedAttentionPress keeps the top n_kept of all keys: minikv's h2o with every entry heavy.
    budget = data.draw(st.integers(1, n), label="budget")
    store = fresh_store(n, Hkv, seed)
    get_policy("h2o", budget, heavy_share=1.0, score="mean").after_prefill(0, store, {"colsum": colsum})
    assert_same_top(kept(store), kvpress_kept(theirs, budget), theirs)


@given(n_prompt=st.integers(4, 24), n_decode=st.integers(1, 5), budget=st.integers(2, 10), seed=st.integers(0, 3))
def test_mean_score_counts_the_queries_that_saw_each_entry(n_prompt, n_decode, budget, seed):
    """Through prefill and decode steps (with evictions) on a tiny model: "mean" = accumulated attention / the number
    of queries q with q >= pos (every query from the entry's own on: the causal mask includes the diagonal)."""
    model = tiny_model(F64, seed=seed)
    ids = torch.randint(1, 101, (n_prompt + n_decode,), generator=torch.Generator().manual_seed(seed)).tolist()
    policy = get_policy("h2o", budget, score="mean")
    _, cache = prefill(model, [ids[:n_prompt]], policy)
    for t in ids[n_prompt:]:
        decode_step(model, cache, torch.tensor([t]), policy, use_sdpa=False)
    for store in cache.layers:
        live = store.valid
        seen = int(store.seen[0])
        queries = (torch.arange(seen)[:, None, None, None] >= store.pos[None]).sum(0)    # literal count per slot
        want = store.stats["score"] / queries.clamp_min(1)
        assert torch.equal(ranked_scores(store, "mean")[live], want[live])
        assert int(store.length.max()) <= budget


def first_diff(name: str, **options) -> bool:
    """Whether score="mean" keeps other positions than score="sum" on a 48-token prompt and 4 decode steps."""
    model = tiny_model(F64, seed=1)
    ids = torch.randint(1, 101, (52,), generator=torch.Generator().manual_seed(5)).tolist()
    out = []
    for score in ("sum", "mean"):
        policy = get_policy(name, 0.25, score=score, **options)
        _, cache = prefill(model, [ids[:48]], policy)
        for t in ids[48:]:
            decode_step(model, cache, torch.tensor([t]), policy, use_sdpa=False)
        out.append([sorted(kept(store)[h]) for store in cache.layers for h in range(store.pos.shape[1])])
    return out[0] != out[1]


@pytest.mark.parametrize("name,options", [("h2o", {}), ("adakv-h2o", {}), ("d2o", {"tau_override": INF, "protected_layers": [0]})])
def test_score_option_reaches_the_selection(name, options):
    """Every policy of the H2O family ranks by the chosen score (kept sets differ on this prompt)."""
    assert first_diff(name, **options)


# ---- options: defaults, listing, refusals ----------------------------------------------------------------------
def test_options_are_listed_with_the_papers_defaults():
    for name in SNAP_FAMILY:
        assert policy_options(REGISTRY[name])["pooling"] == "max" and get_policy(name, 64).pooling == "max"
    for name in H2O_FAMILY:
        assert policy_options(REGISTRY[name])["score"] == "sum" and get_policy(name, 0.5).score == "sum"


@pytest.mark.parametrize("name,option,bad", [
    *[(name, "pooling", bad) for name in SNAP_FAMILY for bad in ("mean", "MAX", 1, None)],
    *[(name, "score", bad) for name in H2O_FAMILY for bad in ("avg", "Sum", 0, None)]])
def test_bad_values_are_refused_by_name(name, option, bad):
    with pytest.raises(BadInput, match=f"{name}: {option} .*must be one of .*got {bad!r}"):
        get_policy(name, 64 if option == "pooling" else 0.5, **{option: bad})
