"""The model against transformers, and the cache against recomputation (the tests that catch cache bugs)."""
from __future__ import annotations

import json
from unittest import mock

import pytest
import torch
from hypothesis import given, strategies as st

from conftest import tiny_model
from minikv.attention import attend
from minikv.io.checkpoint import load_model
from minikv.generate import generate, left_pad

transformers = pytest.importorskip("transformers", reason="transformers (test extra) is the parity oracle")


def _hf_checkpoint(tmp_path, n_heads, n_kv_heads, tie, rope_scaling, seed=0):
    """Save a random transformers LlamaForCausalLM to tmp_path; return (hf_model, folder)."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=97, hidden_size=16 * n_heads, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=n_heads, num_key_value_heads=n_kv_heads, max_position_embeddings=512,
        rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=tie, rope_scaling=rope_scaling)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path)
    return hf, tmp_path


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32}


@pytest.mark.parametrize("n_heads,n_kv_heads,tie,rope", [
    (4, 4, False, None),          # MHA, untied, no scaling
    (4, 2, True, None),           # GQA, tied
    (6, 2, False, LLAMA3),        # GQA, llama3 scaling
    (4, 1, True, {"rope_type": "linear", "factor": 2.0}),
])
def test_logits_match_transformers(tmp_path, n_heads, n_kv_heads, tie, rope):
    hf, folder = _hf_checkpoint(tmp_path, n_heads, n_kv_heads, tie, rope)
    ours = load_model(folder)
    x = torch.randint(0, 97, (2, 70))       # 70 > original_max_position_embeddings: exercises llama3 bands
    with torch.no_grad():
        ref = hf(x).logits
        got = ours(x, ours.new_cache(2))
    assert (ref - got).abs().max().item() < 1e-5


def test_cached_decoding_equals_recomputation():
    model = tiny_model(torch.float64)
    ids = torch.randint(0, 101, (2, 30))
    with torch.no_grad():
        cache = model.new_cache(2)
        step_logits = [model(ids[:, :10], cache)[:, -1]]
        for t in range(10, 30):
            step_logits.append(model(ids[:, t:t + 1], cache)[:, -1])
        for i, t in enumerate(range(10, 31)):
            full = model(ids[:, :t], model.new_cache(2))[:, -1]
            assert torch.allclose(step_logits[i], full, rtol=1e-10, atol=1e-10), f"token {t}"


@given(cuts=st.lists(st.integers(1, 39), max_size=5, unique=True))
def test_chunked_prefill_equals_one_shot(cuts):
    model = tiny_model(torch.float64)
    ids = torch.randint(0, 101, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        one = model(ids, model.new_cache(1))
        cache = model.new_cache(1)
        bounds = [0, *sorted(cuts), 40]
        parts = [model(ids[:, a:b], cache) for a, b in zip(bounds, bounds[1:]) if b > a]
    assert torch.allclose(torch.cat(parts, dim=1), one, rtol=1e-10, atol=1e-10)


@given(pieces=st.integers(1, 70), B=st.integers(1, 3), T=st.integers(1, 40), pad=st.integers(0, 5),
       window=st.integers(0, 8), sdpa=st.booleans(), question=st.integers(0, 30))
def test_prompt_in_pieces_equals_one_piece(pieces, B, T, pad, window, sdpa, question):
    """A prompt runs through each block PIECE_TOKENS tokens at a time (prefill memory): the same logits, cache and
    statistics as in one piece, with left padding, through SDPA or the reference, and for a question appended after."""
    import minikv.model as model_module
    model = tiny_model(torch.float64)
    g = torch.Generator().manual_seed(T)
    ids, more = torch.randint(0, 101, (B, T), generator=g), torch.randint(0, 101, (B, question), generator=g)
    pos = torch.arange(T).repeat(B, 1)
    pos[0] = (pos[0] - min(pad, T - 1)).clamp_min(-1)                           # row 0 left-padded
    need = frozenset({"colsum", "last_rows"})

    def run():
        cache, stats = model.new_cache(B), []
        logits = model(ids, cache, pos, lambda l, store, s: stats.append(s), need, window, use_sdpa=sdpa)
        return [logits, model(more, cache, use_sdpa=sdpa) if question else None, cache, stats]

    with torch.no_grad():
        one = run()
        with mock.patch.object(model_module, "PIECE_TOKENS", pieces):
            split = run()
    for a, b in zip(one[:2] + [x for s in one[3] for x in s.values()], split[:2] + [x for s in split[3] for x in s.values()]):
        assert (a is None and b is None) or torch.allclose(a, b, rtol=1e-12, atol=1e-12)
    for a, b in zip(one[2].layers, split[2].layers):              # (padding leaves other data in empty slots)
        live = a.pos >= 0
        assert torch.equal(a.pos, b.pos) and all(torch.allclose(x[live], y[live], atol=1e-12) for x, y in
                                                 ((a.k, b.k), (a.v, b.v)))
    assert [sorted(s) for s in one[3]] == [sorted(s) for s in split[3]]


@given(chunk=st.integers(1, 50), T=st.integers(1, 50))
def test_query_chunking_does_not_change_attention(chunk, T):
    model = tiny_model(torch.float64)
    g = torch.Generator().manual_seed(T)
    cache = model.new_cache(1)
    k = torch.randn(1, 2, T, 16, generator=g, dtype=torch.float64)
    cache.layers[0].append(k, torch.randn_like(k), torch.arange(T)[None])
    q = torch.randn(1, 4, T, 16, generator=g, dtype=torch.float64)
    need = frozenset({"colsum", "last_rows", "probs"})
    a, sa = attend(q, torch.arange(T)[None], cache.layers[0], need, window=5, chunk=chunk)
    b, sb = attend(q, torch.arange(T)[None], cache.layers[0], need, window=5, chunk=T)
    assert torch.allclose(a, b, atol=1e-12)
    for name in need:
        assert torch.allclose(sa[name], sb[name], atol=1e-12), name
    assert torch.allclose(sa["last_rows"], sa["probs"][:, :, :, -min(5, T):])
    assert torch.allclose(sa["colsum"], sa["probs"].sum(3))


@given(S=st.integers(1, 40), T=st.integers(1, 4), G=st.sampled_from([1, 3]), evict=st.booleans(),
       seed=st.integers(0, 2**16))
def test_sdpa_equals_reference_over_any_store(S, T, G, evict, seed):
    """SDPA's masked path (G query heads folded into the query axis) gives the reference attention over a store whose
    heads keep different entries (after an eviction) or the same ones, for queries at any positions (-1: padding)."""
    g = torch.Generator().manual_seed(seed)
    store = tiny_model(torch.float64).new_cache(2).layers[0]
    k = torch.randn(2, 2, S, 16, generator=g, dtype=torch.float64)
    store.append(k, torch.randn_like(k), torch.arange(S).expand(2, S))
    if evict:
        store.keep(torch.rand(store.pos.shape, generator=g) < 0.7)
    q = torch.randn(2, 2 * G, T, 16, generator=g, dtype=torch.float64)
    qpos = torch.randint(-1, S + 1, (2, T), generator=g)
    ref, fast = attend(q, qpos, store)[0], attend(q, qpos, store, use_sdpa=True)[0]
    assert torch.allclose(ref, fast, atol=1e-12)


@given(T=st.integers(1, 12), offset=st.integers(0, 300), G=st.sampled_from([1, 3]), B=st.integers(1, 2),
       seed=st.integers(0, 2**16))
def test_flash_outputs_and_column_sums_equal_reference(T, offset, G, B, seed):
    """A fresh prompt's piece (T queries after `offset` others, no padding) through the fused kernels: outputs from
    the own slots and the earlier slots joined by log-sum-exp, column sums from the transposed attention (earlier
    slots 128 at a time: offsets to 300 take up to 3 calls). Both equal the reference path's (float64), and slots
    past the piece stay 0."""
    g = torch.Generator().manual_seed(seed)
    store = tiny_model(torch.float64).new_cache(B).layers[0]
    store.reserve(offset + T + 5)
    k = torch.randn(B, 2, offset + T, 16, generator=g, dtype=torch.float64)
    store.append(k, torch.randn_like(k), torch.arange(offset + T).expand(B, -1))
    q = torch.randn(B, 2 * G, T, 16, generator=g, dtype=torch.float64) * 3
    qpos = torch.arange(offset, offset + T).expand(B, -1)
    ref, ref_stats = attend(q, qpos, store, frozenset({"colsum"}))
    fast, stats = attend(q, qpos, store, frozenset({"colsum"}), use_sdpa=True, padded=False, offset=offset)
    assert torch.allclose(ref, fast, atol=1e-12)
    assert stats["colsum"].shape == ref_stats["colsum"].shape
    assert torch.allclose(ref_stats["colsum"], stats["colsum"], atol=1e-12)


def test_sdpa_path_matches_reference():
    model = tiny_model(torch.float32)
    ids = torch.randint(0, 101, (2, 33))
    pos = torch.arange(33).expand(2, 33).clone()
    pos[0, :5] = -1                                            # left padding in row 0
    with torch.no_grad():
        ref = model(ids, model.new_cache(2), pos.clone())
        fast = model(ids, model.new_cache(2), pos.clone(), use_sdpa=True)
    assert torch.allclose(ref[0, 5:], fast[0, 5:], atol=1e-5) and torch.allclose(ref[1], fast[1], atol=1e-5)


@pytest.mark.parametrize("need", [{"last_rows"}, {"colsum"}, {"colsum", "last_rows"}])
def test_sdpa_outputs_with_statistics_match_reference(need):
    """With use_sdpa the outputs come from SDPA and the statistics from a second pass: both equal the reference
    path's to float32 rounding (left padding included)."""
    model = tiny_model(torch.float32)
    ids = torch.randint(0, 101, (2, 40))
    pos = torch.arange(40).expand(2, 40).clone()
    pos[0, :6] = -1
    runs = []
    for use_sdpa in (False, True):
        seen = {}
        with torch.no_grad():
            logits = model(ids, model.new_cache(2), pos.clone(), need=frozenset(need), window=7, use_sdpa=use_sdpa,
                           hook=lambda layer, store, stats: seen.__setitem__(layer, stats))
        runs.append((logits, seen))
    (ref, ref_stats), (fast, fast_stats) = runs
    assert torch.allclose(ref[0, 6:], fast[0, 6:], atol=1e-5) and torch.allclose(ref[1], fast[1], atol=1e-5)
    for layer, stats in ref_stats.items():
        for name in need:
            assert torch.allclose(stats[name], fast_stats[layer][name], atol=1e-6), (layer, name)


def test_left_padded_batch_equals_single_rows():
    model = tiny_model(torch.float64)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [3, 4], [12, 13, 14, 15]]
    batch = generate(model, prompts, max_new_tokens=6, stop_ids=[])
    for b, p in enumerate(prompts):
        alone = generate(model, [p], max_new_tokens=6, stop_ids=[])
        assert alone.tokens[0] == batch.tokens[b]
    ids, pos = left_pad(prompts, 0, torch.zeros(3, dtype=torch.long), "cpu")
    assert pos[1].tolist() == [-1, -1, -1, -1, -1, 0, 1]


def test_stop_tokens_end_rows_and_freeze_their_cache():
    model = tiny_model(torch.float64)
    free = generate(model, [[1, 2, 3]], max_new_tokens=8, stop_ids=[])
    stop = free.tokens[0][3]
    res = generate(model, [[1, 2, 3], [4, 5, 6, 7]], max_new_tokens=8, stop_ids=[stop], keep_cache=True)
    assert res.tokens[0] == free.tokens[0][:free.tokens[0].index(stop)]
    assert int(res.cache.seen[0]) == 3 + len(res.tokens[0])   # nothing cached after the stop token


def test_sampling_is_seeded_and_top_p_limits_choices():
    model = tiny_model(torch.float32)
    a = generate(model, [[1, 2, 3]], max_new_tokens=10, temperature=1.0, top_p=0.9, seed=3, stop_ids=[])
    b = generate(model, [[1, 2, 3]], max_new_tokens=10, temperature=1.0, top_p=0.9, seed=3, stop_ids=[])
    assert a.tokens == b.tokens
    from minikv.generate import sample
    logits = torch.tensor([[10.0, 9.0, -50.0, -50.0]])
    picks = {int(sample(logits, 1.0, 0.5, torch.Generator().manual_seed(s))) for s in range(50)}
    assert picks == {0}                                       # 0 alone holds > 50% of the mass


@pytest.mark.parametrize("kwargs,match", [
    ({"temperature": -1.0}, "temperature"), ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"),
    ({"max_new_tokens": -2}, "max_new_tokens"),
])
def test_invalid_sampling_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate(tiny_model(), [[1, 2]], **kwargs)


def test_prompt_longer_than_context_is_an_error():
    model = tiny_model(max_position_embeddings=32)
    with pytest.raises(ValueError, match="longer than the model's context"):
        generate(model, [list(range(1, 40))], max_new_tokens=1)


# ---- checkpoint errors -------------------------------------------------------------------------------------
def _save_tiny(tmp_path):
    hf, folder = _hf_checkpoint(tmp_path, 4, 2, False, None)
    return folder


def test_missing_folder_names_fetch(tmp_path):
    with pytest.raises(FileNotFoundError, match="minikv fetch"):
        load_model(tmp_path / "nope")


def test_truncated_safetensors(tmp_path):
    folder = _save_tiny(tmp_path)
    f = folder / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_model(folder)


def test_missing_unexpected_and_misshaped_tensors(tmp_path):
    from safetensors.torch import load_file, save_file
    folder = _save_tiny(tmp_path)
    state = load_file(folder / "model.safetensors")
    name = "model.layers.1.mlp.up_proj.weight"
    cases = [
        ({k: v for k, v in state.items() if k != name}, f"missing tensor '{name}'"),
        ({**state, "model.layers.1.extra.weight": torch.zeros(2)}, "unexpected tensor 'model.layers.1.extra.weight'"),
        ({**state, name: torch.zeros(3, 3)}, f"tensor '{name}' has shape"),
    ]
    for broken, message in cases:
        save_file(broken, folder / "model.safetensors")
        with pytest.raises(ValueError, match=message):
            load_model(folder)


def test_bad_config(tmp_path):
    folder = _save_tiny(tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["num_key_value_heads"] = 3
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="multiple of"):
        load_model(folder)
