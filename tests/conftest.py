"""Shared test set-up: hypothesis profiles, tiny random models, the real default model (slow tests).

Hypothesis profile from MINIKV_HYPOTHESIS_PROFILE (default: "ci" when CI is set, else "dev"):
  ci    derandomized, no example database, bounded example counts, no deadline
  dev   few examples, for quick local runs
  deep  thousands of examples (run by hand: MINIKV_HYPOTHESIS_PROFILE=deep pytest tests -k property)
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile("ci", derandomize=True, database=None, max_examples=25, deadline=None,
                          print_blob=True, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("deep", max_examples=2000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
settings.load_profile(os.environ.get("MINIKV_HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

REPO = Path(__file__).resolve().parent.parent
GPL3 = Path("/usr/share/common-licenses/GPL-3")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def tiny_config(**overrides):
    """A small random Llama config (GQA by default) for fast tests."""
    from minikv.config import LlamaConfig
    base = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=1024, rope_theta=10000.0, rms_norm_eps=1e-5,
                tie_word_embeddings=True)
    base.update(overrides)
    return LlamaConfig(**base)


def tiny_model(dtype=torch.float32, seed: int = 0, std: float = 0.3, **overrides):
    """A tiny Llama with random weights large enough (std) that attention is far from uniform."""
    from minikv.model import Llama
    torch.manual_seed(seed)
    model = Llama(tiny_config(**overrides))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, std)
    return model.to(dtype).eval()


@pytest.fixture
def tiny():
    return tiny_model()


@pytest.fixture(scope="session")
def default_model_dir():
    """The converted default model in $MINIKV_HOME (default ~/.cache/minikv) or $MINIKV_WEIGHTS, the same folder
    from any working directory; fetched once if missing or unverified (CI fetches it before the tests)."""
    from minikv.io.convert import default_model_dir as _dir, ensure_default_model, is_verified
    folder = _dir()
    if not is_verified(folder):
        if os.environ.get("MINIKV_NO_FETCH"):
            pytest.skip(f"default model not found (or unverified) at {folder} and MINIKV_NO_FETCH is set")
        folder = ensure_default_model()
    return folder


@pytest.fixture(scope="session")
def default_model(default_model_dir):
    from minikv.io.checkpoint import load_model
    return load_model(default_model_dir)


@pytest.fixture(scope="session")
def default_tokenizer(default_model_dir):
    from minikv.io.tokenizer import load_tokenizer
    return load_tokenizer(default_model_dir)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (what byte-level BPE vocabularies are written in)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def write_tiny_model_dir(folder: Path, seed: int = 0, config_overrides: dict | None = None) -> Path:
    """A tiny random Llama in the Hugging Face layout (config.json, model.safetensors, tokenizer.json with the 256
    byte tokens and ChatML specials) that `minikv --model FOLDER` loads in well under a second."""
    import json
    from safetensors.torch import save_file
    from minikv.io.hf_config import config_to_dict
    from minikv.io.tokenizer import build_bpe_tokenizer_json
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens = specials + [bytes_to_unicode()[b] for b in range(256)]
    types = [3] * len(specials) + [1] * 256
    model = tiny_model(seed=seed, vocab_size=len(tokens), bos_token_id=1, eos_token_id=2,
                       **(config_overrides or {}))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config_to_dict(model.cfg), indent=1))
    state = {("lm_head.weight" if k == "lm_head.weight" else "model." + k): v.contiguous()
             for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"))
    spec = build_bpe_tokenizer_json(tokens, [], types, bos_id=1, eos_id=2, unk_id=None)
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
                                                              "add_bos_token": False}))
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama folder (see write_tiny_model_dir), shared by the tests of one session; do not modify it."""
    return write_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama"))
