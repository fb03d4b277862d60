"""CORM (specs/corm.md): the one-integer `last_hit` rule against a literal w-row implementation, exact/oneshot
prefill, the full-cache limit, argument errors."""
from __future__ import annotations

from collections import deque

import pytest
import torch
from hypothesis import given, strategies as st

from minikv.attention import softmax_visible
from minikv.generate import decode_step, generate, prefill
from minikv.policies import get_policy
from minikv.policies.corm import CORM
from minikv.store import LayerStore
from strategies import in_position_order
from tests.conftest import tiny_model
from tests.strategies import seeded_randn


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


# ---- a literal CORM: keep the last w attention rows, decide from them ----------------------------------------------
class LiteralRows:
    """For one (b, h): the last w rows as {position: important?}; evict p iff p <= t-1-r, p >= n_sink and every
    stored row says minor. Written from the definition, sharing no code with minikv.policies.corm."""

    def __init__(self, w: int, r: int, n_sink: int):
        self.w, self.r, self.n_sink = w, r, n_sink
        self.rows: deque[dict[int, bool]] = deque(maxlen=w)

    def step(self, t: int, alive: list[int], alpha: dict[int, float], n_cached_mode: bool) -> list[int]:
        """alpha: position -> max over the group's query heads; returns the positions that survive step t."""
        tau = 1.0 / (len(alive) if n_cached_mode else t)
        self.rows.append({p: alpha[p] >= tau for p in alive})
        survivors = []
        for p in alive:
            evictable = p <= t - 1 - self.r and p >= self.n_sink
            if evictable:
                assert len(self.rows) == self.w and all(p in row for row in self.rows)   # r >= w makes this so
            if not (evictable and not any(row[p] for row in self.rows)):
                survivors.append(p)
        return survivors


def live_positions(store: LayerStore, b: int, h: int) -> list[int]:
    return sorted(store.pos[b, h][store.pos[b, h] >= 0].tolist())


@given(data=st.data())
def test_last_hit_equals_literal_w_rows(data):
    B = data.draw(st.integers(1, 2), label="B")
    Hkv = data.draw(st.integers(1, 3), label="Hkv")
    G = data.draw(st.integers(1, 3), label="G")
    w = data.draw(st.integers(1, 6), label="w")
    r = data.draw(st.integers(w, w + 6), label="r")
    n_steps = data.draw(st.integers(1, 40), label="steps")
    n_sink = data.draw(st.sampled_from([0, 0, 1, 3]), label="n_sink")
    threshold = data.draw(st.sampled_from(["step", "cached"]), label="threshold")
    # scale 0 = uniform attention: alpha == 1/n exactly, which exercises the ">=" at the threshold.
    scale = data.draw(st.sampled_from([0.0, 0.5, 2.0, 6.0]), label="scale")
    seed = data.draw(st.integers(0, 2**16), label="seed")

    policy = CORM(w=w, r=r, n_sink=n_sink, threshold=threshold)
    store = LayerStore.empty(B, Hkv, 2, dtype=torch.float64)
    literal = [[LiteralRows(w, r, n_sink) for _ in range(Hkv)] for _ in range(B)]
    alive = [[[] for _ in range(Hkv)] for _ in range(B)]
    for t in range(1, n_steps + 1):
        store.append(torch.zeros(B, Hkv, 1, 2, dtype=torch.float64), torch.zeros(B, Hkv, 1, 2, dtype=torch.float64),
                     torch.full((B, 1), t - 1))
        S = store.capacity
        scores = seeded_randn(seed + t, B, Hkv, G, 1, S, scale=scale)
        e, r = softmax_visible(scores, store.valid[:, :, None, None, :])
        probs = e / r                                                         # (B, Hkv, G, 1, S)
        pos_before = store.pos.clone()
        policy.after_step(0, store, {"probs": probs})
        for b in range(B):
            for h in range(Hkv):
                alive[b][h].append(t - 1)
                alpha = {int(pos_before[b, h, s]): float(probs[b, h, :, 0, s].max())
                         for s in range(S) if pos_before[b, h, s] >= 0}
                alive[b][h] = literal[b][h].step(t, alive[b][h], alpha, threshold == "cached")
                assert live_positions(store, b, h) == alive[b][h], (t, b, h)


def test_heads_evict_independently():
    """Worked by hand (w=1, r=2): heads of one layer evict different sets and end with uneven lengths."""
    policy = CORM(w=1, r=2)
    store = LayerStore.empty(1, 2, 2, dtype=torch.float64)
    for t in range(1, 5):
        store.append(torch.zeros(1, 2, 1, 2, dtype=torch.float64), torch.zeros(1, 2, 1, 2, dtype=torch.float64),
                     torch.full((1, 1), t - 1))
        probs = torch.zeros(1, 2, 1, 1, store.capacity, dtype=torch.float64)
        probs[0, 0, 0, 0, 0] = 1.0                    # head 0: every query looks at its oldest entry only
        probs[0, 1, 0, 0, int((store.pos[0, 1] == t - 1).nonzero()[0, 0])] = 1.0   # head 1: each query, itself
        policy.after_step(0, store, {"probs": probs})
    assert live_positions(store, 0, 0) == [0, 2, 3]
    assert live_positions(store, 0, 1) == [2, 3]


# ---- model-level: exact prefill, oneshot prefill, full-cache limit ---------------------------------------------------
def tokens(seed: int, n: int, vocab: int = 101) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def teacher_forced(model, policy, prompt, cont, exact: bool = False):
    """Prefill `prompt` (generate.prefill, oneshot or exact = token by token), then feed `cont` token by token with
    after_step. Returns (logits (1 + len(cont), vocab), kept positions per step per layer)."""
    if exact:
        logits, cache = prefill(model, [prompt], exact_mode(policy))
    else:
        logits, cache = prefill(model, [prompt], policy, extra_capacity=len(cont))
    out, kept = [logits[0]], [[layer.pos.clone() for layer in cache.layers]]
    for tok in cont:
        logits = decode_step(model, cache, torch.tensor([tok]), policy, use_sdpa=False)
        out.append(logits[0])
        kept.append([layer.pos.clone() for layer in cache.layers])
    return torch.stack(out), kept, cache


def exact_mode(policy: CORM) -> CORM:
    """The same CORM configuration with prefill_mode="exact" (the prompt as decode steps)."""
    return CORM(w=policy.w, r=policy.r, prefill_mode="exact", threshold=policy.threshold, n_sink=policy.n_sink)


def same_positions(a, b):
    """Kept positions per layer/head are equal (padding slots beyond the live ones ignored)."""
    for pa, pb in zip(a, b):
        for la, lb in zip(pa, pb):
            B, H = la.shape[:2]
            for bb in range(B):
                for h in range(H):
                    assert sorted(la[bb, h][la[bb, h] >= 0].tolist()) == sorted(lb[bb, h][lb[bb, h] >= 0].tolist())


def test_exact_prefill_equals_token_by_token_decode():
    """The exact prefill == the generation loop fed one prompt token at a time (1-token prefill + decode steps)."""
    model = tiny_model(torch.float64, seed=1)
    seq = tokens(1, 40)
    policy_a, policy_b = CORM(w=3, r=5), CORM(w=3, r=5)
    logits_a, cache_a = prefill(model, [seq], exact_mode(policy_a))
    logits_b, cache_b = prefill(model, [seq[:1]], policy_b)
    for tok in seq[1:]:
        logits_b = decode_step(model, cache_b, torch.tensor([tok]), policy_b, use_sdpa=False)
    assert torch.allclose(logits_a, logits_b, rtol=0, atol=1e-12)   # slots differ: sums run in another order
    for la, lb in zip(cache_a.layers, cache_b.layers):
        la, lb = in_position_order(la), in_position_order(lb)
        n = int(la.length.max())
        assert torch.equal(la.length, lb.length)
        assert torch.equal(la.pos[..., :n], lb.pos[..., :n])
        assert torch.equal(la.stats["last_hit"][..., :n], lb.stats["last_hit"][..., :n])
    assert cache_a.cache_ratio() < 1.0                # evictions really happened inside the prompt


class LiteralCORM:
    """A literal w-row CORM as a model hook (per layer, batch row and KV head), for the model-level check."""
    decode_needs = frozenset({"probs"})
    window = 0

    def __init__(self, w, r, n_layers, B, Hkv):
        self.lit = [[[LiteralRows(w, r, 0) for _ in range(Hkv)] for _ in range(B)] for _ in range(n_layers)]

    def after_step(self, layer, store, stats):
        probs = stats["probs"]
        keep = torch.zeros_like(store.valid)
        for b in range(store.pos.shape[0]):
            t = int(store.seen[b])
            for h in range(store.pos.shape[1]):
                slot_of = {int(store.pos[b, h, s]): s for s in (store.pos[b, h] >= 0).nonzero().flatten().tolist()}
                alive = sorted(slot_of)
                alpha = {p: float(probs[b, h, :, 0, slot_of[p]].max()) for p in alive}
                survivors = set(self.lit[layer][b][h].step(t, alive, alpha, False))
                for p in alive:
                    keep[b, h, slot_of[p]] = p in survivors
        store.keep(keep)


def test_exact_prefill_equals_literal_model_hook():
    """Through a real (tiny) model with GQA: the policy's exact prefill keeps what a literal w-row hook keeps."""
    model = tiny_model(torch.float64, seed=2)
    seq = tokens(2, 36)
    w, r = 2, 4
    logits, cache = prefill(model, [seq], CORM(w=w, r=r, prefill_mode="exact"))
    lit = LiteralCORM(w, r, model.cfg.num_hidden_layers, 1, model.cfg.num_key_value_heads)
    ref = model.new_cache(1)
    for tok in seq:
        ref_logits = decode_step(model, ref, torch.tensor([tok]), lit, use_sdpa=False)
    for la, lb in zip(cache.layers, ref.layers):
        for h in range(la.pos.shape[1]):
            assert live_positions(la, 0, h) == live_positions(lb, 0, h)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-12, atol=1e-12)
    assert cache.cache_ratio() < 0.8


def test_exact_prefill_batch_with_padding_equals_single_rows():
    """Left-padded rows of unequal lengths give each row what it gets alone (padding steps change nothing)."""
    model = tiny_model(torch.float64, seed=3)
    prompts = [tokens(3, 30), tokens(4, 17)]
    logits, cache = prefill(model, prompts, CORM(w=2, r=3, prefill_mode="exact"))
    for b, p in enumerate(prompts):
        lb, cb = prefill(model, [p], CORM(w=2, r=3, prefill_mode="exact"))
        torch.testing.assert_close(logits[b], lb[0], rtol=1e-10, atol=1e-10)
        for la, lone in zip(cache.layers, cb.layers):
            for h in range(la.pos.shape[1]):
                assert live_positions(la, b, h) == live_positions(lone, 0, h)


@pytest.mark.parametrize("n_prompt,w,r", [(12, 16, 16), (12, 12, 20), (20, 3, 19)])
def test_oneshot_equals_exact_when_nothing_is_evicted_inside_the_prompt(n_prompt, w, r):
    """w >= prompt length (or more generally n <= r + 1): oneshot == exact, at prefill and through 40 decode steps
    during which evictions happen."""
    model = tiny_model(torch.float64, seed=4, std=0.6)      # sharper attention than std=0.3: more keys go unhit
    seq = tokens(5, n_prompt + 40)
    prompt, cont = seq[:n_prompt], seq[n_prompt:]
    la, ka, ca = teacher_forced(model, CORM(w=w, r=r), prompt, cont, exact=True)
    lb, kb, cb = teacher_forced(model, CORM(w=w, r=r), prompt, cont, exact=False)
    torch.testing.assert_close(la, lb, rtol=1e-9, atol=1e-9)
    same_positions(ka, kb)
    assert ca.cache_ratio() < 1.0


def test_oneshot_keeps_recent_and_window_hits():
    """oneshot at the last prompt step: keep iff pos >= n - r or a query among the last w has alpha >= 1/s."""
    model = tiny_model(torch.float64, seed=5)
    seq = tokens(6, 30)
    w, r, n = 4, 6, 30
    _, cache = prefill(model, [seq], CORM(w=w, r=r))
    # The last w rows of every layer under full attention, captured from a plain forward pass.
    rows = {}
    model(torch.tensor([seq]), model.new_cache(1), hook=lambda l, s, st: rows.__setitem__(l, st["last_rows"]),
          need=frozenset({"last_rows"}), window=w)
    for l, layer in enumerate(cache.layers):
        alpha = rows[l].amax(dim=2)[0]                                    # (Hkv, w, S) max over the group
        steps = torch.arange(n - w + 1, n + 1, dtype=torch.float64)
        hit = (alpha >= (1.0 / steps)[None, :, None]).any(dim=1)          # (Hkv, S)
        for h in range(layer.pos.shape[1]):
            expect = [p for p in range(n) if p >= n - r or bool(hit[h, p])]
            assert live_positions(layer, 0, h) == expect


@pytest.mark.parametrize("exact", [False, True])
def test_large_w_r_is_the_full_cache(exact):
    """w, r >= sequence length: nothing is ever evicted and the logits are bitwise the full cache's (float64)."""
    model = tiny_model(torch.float64, seed=6)
    seq = tokens(7, 50)
    prompt, cont = seq[:20], seq[20:]
    n = len(seq)
    lc, _, cc = teacher_forced(model, CORM(w=n, r=n), prompt, cont, exact=exact)
    full = get_policy("full")
    if exact:       # the full cache fed token by token, as exact prefill does
        cache = model.new_cache(1, capacity=len(prompt) + 1)
        for tok in prompt:
            logits = model(torch.tensor([[tok]]), cache)[:, -1]
        lf = [logits[0]]
        for tok in cont:
            lf.append(model(torch.tensor([[tok]]), cache)[0, -1])
        lf = torch.stack(lf)
    else:
        lf, _, _ = teacher_forced(model, full, prompt, cont)
    assert torch.equal(lc, lf)
    assert cc.cache_ratio() == 1.0


def test_generate_runs_and_measures_a_ratio():
    model = tiny_model(seed=7)
    res = generate(model, [tokens(8, 60), tokens(9, 45)], get_policy("corm", w=4, r=8), max_new_tokens=10,
                   stop_ids=[], keep_cache=True)
    assert all(len(t) == 10 for t in res.tokens)
    assert 0 < res.cache_ratio < 1
    rep = res.policy_report
    assert rep["w"] == 4 and [x["entries"] for x in rep["layers"]] == [s.length.tolist() for s in res.cache.layers]


# ---- errors ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,match", [
    (dict(w=0), "w .* must be >= 1"),
    (dict(w=8, r=4), "r .* must be >= w"),
    (dict(w=2.5), "integer"),
    (dict(n_sink=-1), "n_sink"),
    (dict(threshold="mean"), "threshold"),
    (dict(prefill_mode="chunked"), "prefill_mode"),
])
def test_bad_arguments_are_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        get_policy("corm", **kwargs)


def test_budget_is_refused():
    with pytest.raises(ValueError, match="budget-free"):
        get_policy("corm", budget=0.5)


def test_exact_mode_refuses_one_pass_prefill():
    """A one-pass forward with the exact policy's after_prefill hook is refused (generate.prefill dispatches)."""
    model = tiny_model(seed=8)
    policy = CORM(w=2, r=2, prefill_mode="exact")
    with pytest.raises(RuntimeError, match="prefill_pass"):
        model(torch.tensor([tokens(10, 8)]), model.new_cache(1), hook=policy.after_prefill,
              need=policy.prefill_needs, window=policy.window)


def test_generate_dispatches_exact_prefill():
    """generate() with prefill_mode='exact' runs CORM's token-by-token prefill instead of raising."""
    from conftest import tiny_model
    from minikv.generate import generate
    from minikv.policies import get_policy
    model = tiny_model(torch.float64)
    prompt = list(range(1, 30))
    res = generate(model, [prompt], get_policy("corm", w=2, r=4, prefill_mode="exact"), max_new_tokens=3,
                   stop_ids=[], keep_cache=True)
    logits, cache = prefill(model, [prompt], get_policy("corm", w=2, r=4, prefill_mode="exact"))
    assert res.tokens[0][0] == int(logits.argmax(-1))
