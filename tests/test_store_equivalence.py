"""The fixed-capacity store against the compacting one it replaces (commit 9851210), and the invariants of a store
whose slot order is not position order:

- golden: every policy keeps exactly the positions the compacting store kept, at every step (golden_selections.py);
- attention over the store equals a dense recomputation over its live entries, whatever slots they occupy;
- selection does not depend on slot order: permuting the slots of a store changes nothing that one more decode step
  keeps, nor its logits."""
from __future__ import annotations

import copy
import math
from functools import lru_cache

import pytest
import torch
from hypothesis import example, given, strategies as st

from golden_selections import CASE_NAMES, CASES, build_model, live_positions, load, run_case
from minikv.attention import attend
from minikv.generate import decode_step, prefill
from minikv.policies import REGISTRY, get_policy
from strategies import seeded_randn

REL = 1e-9          # golden floats (logit statistics, D2O's tau), relative
ATOL = 1e-10        # attention outputs and logits of the property tests, absolute


@pytest.fixture(autouse=True)
def _no_grad_one_thread():
    """No autograd; one thread: on these tiny tensors more threads only add synchronisation (and stall under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with torch.no_grad():
        yield
    torch.set_num_threads(threads)


# ---- golden selections -------------------------------------------------------------------------------------------
@lru_cache(maxsize=None)
def golden() -> dict:
    return load()["cases"]


def close(a: float | None, b: float | None) -> bool:
    """Equal within REL (relative); None (a NaN tau) only equals None."""
    return a is None and b is None or a is not None and b is not None and math.isclose(a, b, rel_tol=REL, abs_tol=1e-12)


def check_step(label: str, want: dict, got: dict) -> None:
    """One step: identical live positions per layer, identical greedy tokens, logit statistics within REL."""
    assert len(got["pos"]) == len(want["pos"]), f"{label}: {len(got['pos'])} layers, golden {len(want['pos'])}"
    for layer, (w, g) in enumerate(zip(want["pos"], got["pos"])):
        assert g == w, f"{label}, layer {layer}: live positions [row][kv head] differ\n golden {w}\n now    {g}"
    assert got["token"] == want["token"], f"{label}: greedy tokens {got['token']}, golden {want['token']}"
    for key in ("max", "lse"):
        assert all(map(close, got[key], want[key])), f"{label}: logit {key} {got[key]}, golden {want[key]}"


@pytest.mark.parametrize("name", CASE_NAMES)
def test_golden_selections(name):
    """Invariant: prefill + greedy decode with the current store keeps, at every step, layer, row and KV head, exactly
    the positions commit 9851210 kept; same tokens; logits and D2O's tau/merged/dropped agree (tau within REL)."""
    c = CASES[CASE_NAMES.index(name)]
    want = golden()[name]
    assert want["case"] == c, "CASES changed since the golden file was written: regenerate it from 9851210"
    got = run_case(c)
    assert len(got["steps"]) == len(want["steps"])
    for s, (w, g) in enumerate(zip(want["steps"], got["steps"])):
        check_step("prefill" if s == 0 else f"decode step {s}", w, g)
    for layer, (w, g) in enumerate(zip(want.get("d2o", []), got.get("d2o", []))):
        assert g["merged"] == w["merged"] and g["dropped"] == w["dropped"], f"d2o layer {layer}: {g}, golden {w}"
        assert all(map(close, g["tau"], w["tau"])), f"d2o layer {layer}: tau {g['tau']}, golden {w['tau']}"


def test_golden_file_covers_every_policy():
    """Every registered policy has golden cases, and the file holds exactly the cases of CASES."""
    assert set(golden()) == set(CASE_NAMES)
    assert {c["policy"] for c in CASES} == set(REGISTRY)


# ---- runs for the property tests ---------------------------------------------------------------------------------
# Options that make each policy evict on prompts of 12-24 tokens.
SMALL_OPTIONS = {"snapkv": {"window": 4}, "pyramidkv": {"window": 4}, "adakv-snapkv": {"window": 4},
                 "adakv-pyramidkv": {"window": 4}, "streaming": {"n_sink": 2}, "corm": {"w": 4, "r": 4},
                 "d2o": {"protected_layers": [0]}}
VARIANTS = {"variant": ["official", "exact"]}
EXTRA_OPTIONS = {"adakv-snapkv": VARIANTS, "adakv-pyramidkv": VARIANTS,
                 "adakv-h2o": {"variant": ["official", "exact"], "n_sink": [0, 4]}, "h2o": {"n_sink": [0, 2, 4]},
                 "corm": {"prefill_mode": ["oneshot", "exact"]}, "d2o": {"merge_weights": ["code", "paper"]}}
NO_BUDGET = ("full", "corm")


@st.composite
def policy_runs(draw):
    """A policy from the registry with a budget and options, a tiny float64 model (uniform attention sometimes, so
    scores tie), 1-2 prompts of 12-24 tokens, 0-3 decode steps. A dict; `run_policy` runs it."""
    name = draw(st.sampled_from(sorted(REGISTRY)), label="policy")
    budget = None if name in NO_BUDGET else draw(st.one_of(st.integers(6, 12), st.sampled_from([0.5, 0.75])),
                                                 label="budget")
    options = dict(SMALL_OPTIONS.get(name, {}))
    options.update({k: draw(st.sampled_from(v), label=k) for k, v in EXTRA_OPTIONS.get(name, {}).items()})
    lengths = draw(st.lists(st.integers(12, 24), min_size=1, max_size=2), label="prompt lengths")
    return dict(policy=name, budget=budget, options=options, lengths=lengths,
                steps=draw(st.integers(0, 3), label="steps"), seed=draw(st.integers(0, 2 ** 16), label="seed"),
                model=dict(seed=draw(st.integers(0, 1), label="model"), layers=3,
                           uniform=draw(st.booleans(), label="uniform")))


def run_policy(run: dict):
    """Prefill + run["steps"] greedy decode steps. Returns (model, policy, cache, logits (B, vocab))."""
    model = build_model(**run["model"])
    policy = get_policy(run["policy"], budget=run["budget"], **run["options"])
    g = torch.Generator().manual_seed(run["seed"])
    prompts = [torch.randint(1, 101, (n,), generator=g).tolist() for n in run["lengths"]]
    logits, cache = prefill(model, prompts, policy)
    for _ in range(run["steps"]):
        logits = decode_step(model, cache, logits.argmax(-1), policy)
    return model, policy, cache, logits


# ---- attention equals recomputation over the live entries -----------------------------------------------------------
def dense_attention(q: torch.Tensor, qpos: torch.Tensor, store) -> torch.Tensor:
    """softmax(q K^T / sqrt(d)) V over the live entries visible at qpos, gathered head by head, whatever their slots.
    q: (B, Hq, 1, d); qpos: (B, 1); query head j reads KV head j // G. Returns (B, Hq, 1, d)."""
    B, Hq, _, d = q.shape
    G = Hq // store.k.shape[1]
    out = torch.zeros_like(q)
    for b in range(B):
        for j in range(Hq):
            live = (store.pos[b, j // G] >= 0) & (store.pos[b, j // G] <= qpos[b, 0])      # (S,)
            k, v = store.k[b, j // G, live], store.v[b, j // G, live]                       # (n, d) each
            out[b, j] = torch.softmax(q[b, j] @ k.T / math.sqrt(d), dim=-1) @ v            # (1, d)
    return out


@given(run=policy_runs())
def test_attend_equals_dense_recomputation(run):
    """Invariant: after any policy's prefill and decode steps, attend(q, qpos, store) for a query at position seen
    equals softmax(q k^T / sqrt(d)) v over exactly the live entries (pos >= 0), gathered per KV head (GQA: query head
    j uses KV head j // G), to 1e-10: empty slots and slot order contribute nothing."""
    model, _, cache, _ = run_policy(run)
    qpos = cache.seen[:, None]                                                             # (B, 1)
    for layer, store in enumerate(cache.layers):
        B, Hkv, S, d = store.k.shape
        assert bool((store.pos < qpos[:, :, None]).all()), "a cached position is not older than the next token"
        q = seeded_randn(run["seed"] + layer, B, model.cfg.num_attention_heads, 1, d)      # (B, Hq, 1, d)
        out, _ = attend(q, qpos, store)
        torch.testing.assert_close(out, dense_attention(q, qpos, store), rtol=0, atol=ATOL)


# ---- selection does not depend on slot order ----------------------------------------------------------------------
def permute_slots(store, g: torch.Generator) -> None:
    """Permute the slot axis (dim 2) of every per-slot tensor (k, v, pos, each stat) in place, with one random
    permutation per (row, KV head) shared by all of them."""
    B, Hkv, S = store.pos.shape
    perm = torch.stack([torch.randperm(S, generator=g) for _ in range(B * Hkv)]).view(B, Hkv, S)
    per_slot = [t for t in vars(store).values() if torch.is_tensor(t) and t.shape[:3] == (B, Hkv, S)]
    for t in per_slot + list(store.stats.values()):
        t.copy_(torch.gather(t, 2, perm.view(B, Hkv, S, *[1] * (t.dim() - 3)).expand_as(t)))
    store.heads_aligned = False          # heads no longer hold their positions in the same slots


def assert_same_live(got, want, label: str) -> None:
    """Same sorted live positions in every (layer, row, KV head); the message names the first that differs."""
    for layer, (g, w) in enumerate(zip(live_positions(got), live_positions(want))):
        for b, (gb, wb) in enumerate(zip(g, w)):
            for h, (gh, wh) in enumerate(zip(gb, wb)):
                assert gh == wh, f"{label}: layer {layer}, row {b}, KV head {h} keeps {gh}, unpermuted {wh}"


def tied_sinks(policy: str, lengths: list[int], steps: int, **options) -> dict:
    """A run whose next step is its first eviction, with budget 6: a heavy share smaller than the 4 sinks, which all
    score +inf, so the sinks tie and the tie-break decides which stay (and, for Ada-KV, which heads get them)."""
    return dict(policy=policy, budget=6, options=options, lengths=lengths, steps=steps, seed=0,
                model=dict(seed=0, layers=3, uniform=False))


@example(run=tied_sinks("h2o", [5], 1, n_sink=4), perm_seed=0)                # 7 entries > budget 6 at the next step
@example(run=tied_sinks("adakv-h2o", [5], 1, n_sink=4), perm_seed=0)
@example(run=tied_sinks("d2o", [12, 10], 0, protected_layers=[0]), perm_seed=0)   # D2O compresses from step 1
@given(run=policy_runs(), perm_seed=st.integers(0, 2 ** 16))
def test_selection_does_not_depend_on_slot_order(run, perm_seed):
    """Invariant: permuting the slots of a store (the same permutation for k, v, pos and the statistics of a (row,
    KV head)) is invisible: one more decode step keeps the same positions in every (layer, row, KV head) and gives
    the same logits (to 1e-10) as on the unpermuted store."""
    model, policy, cache, logits = run_policy(run)
    permuted = copy.deepcopy(cache)
    g = torch.Generator().manual_seed(perm_seed)
    for store in permuted.layers:
        permute_slots(store, g)
    assert_same_live(permuted, cache, "after the permutation")
    tokens = logits.argmax(-1)                                                             # (B,)
    want = decode_step(model, cache, tokens, policy)
    got = decode_step(model, permuted, tokens, policy)
    assert_same_live(permuted, cache, "after a decode step on the permuted store")
    torch.testing.assert_close(got, want, rtol=0, atol=ATOL)
