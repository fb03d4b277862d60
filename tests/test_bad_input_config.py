"""Bad model folders (config.json, weights, tokenizer files) are refused with a named error, never loaded wrong.

Each bad input goes through `load_model` / `load_tokenizer`; some also through the CLI in-process (one line
`minikv: error: ...`, exit status 2). A config.json with keys left out loads the model transformers loads, and random
config.json dicts either load with transformers' logits or are refused naming a key (hypothesis).
"""
from __future__ import annotations

import json
import re
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given, strategies as st

from minikv.checkpoint import load_model
from minikv.cli import main
from minikv.config import LlamaConfig
from minikv.errors import BadInput, NotFound
from minikv.tokenizer import load_tokenizer

transformers = pytest.importorskip("transformers", reason="transformers (test extra) is the parity oracle")
transformers.logging.set_verbosity_error()


# ---- helpers -----------------------------------------------------------------------------------------------
@pytest.fixture
def folder(tiny_model_dir, tmp_path) -> Path:
    """A private copy of the tiny model folder, free to break."""
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))


def _config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def _write_config(folder: Path, value) -> None:
    """config.json holding `value` (any JSON, NaN allowed), or raw bytes."""
    path = folder / "config.json"
    if isinstance(value, bytes):
        path.write_bytes(value)
    else:
        path.write_text(json.dumps(value))


def _with(folder: Path, **changes) -> None:
    """Set (or, with value ..., delete) config.json keys."""
    cfg = _config(folder)
    for key, value in changes.items():
        if value is ...:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    _write_config(folder, cfg)


def _cli(folder: Path, capsys) -> str:
    """Run `minikv generate` on the folder; assert the one-line named error and exit status 2; return the line."""
    rc = main(["generate", "--model", str(folder), "--prompt", "hi", "--max-new-tokens", "2", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    # Notes may come before it (e.g. about the policy); the error is one line, the last.
    lines = err.strip().splitlines()
    assert [line for line in lines if "error" in line.lower()] == lines[-1:], err
    assert lines[-1].startswith("minikv: error: "), err
    return lines[-1]


# ---- config.json -------------------------------------------------------------------------------------------
CONFIG_CASES = [
    # (id, change to config.json, message pattern)
    ("list", [1, 2], r"config\.json must hold a JSON object.*not a list"),
    ("string", "llama", r"config\.json must hold a JSON object.*not a string"),
    ("null", None, r"config\.json must hold a JSON object.*not null"),
    ("not-utf8", b'{"vocab_size": "\xff\xfe"}', r"config\.json is not UTF-8"),
    ("not-json", b'{"vocab_size": 12,', r"config\.json is not valid JSON"),
    ("eps-string", {"rms_norm_eps": "1e-5"}, r"rms_norm_eps must be a positive finite float, got '1e-5'"),
    ("eps-negative", {"rms_norm_eps": -1e-5}, r"rms_norm_eps"),
    ("eps-int", {"rms_norm_eps": 1}, r"rms_norm_eps"),
    ("theta-zero", {"rope_theta": 0}, r"rope_theta"),
    ("theta-nan", {"rope_theta": float("nan")}, r"rope_theta"),
    ("theta-null", {"rope_theta": None}, r"rope_theta"),
    ("vocab-float", {"vocab_size": 259.0}, r"vocab_size must be a positive integer, got 259\.0"),
    ("hidden-bool", {"hidden_size": True}, r"hidden_size"),
    ("layers-negative", {"num_hidden_layers": -1}, r"num_hidden_layers"),
    ("layers-string", {"num_hidden_layers": "3"}, r"num_hidden_layers"),
    ("kv-heads", {"num_key_value_heads": 3}, r"num_attention_heads \(4\) must be a multiple of num_key_value_heads"),
    ("hidden-vs-heads", {"num_attention_heads": 5}, r"hidden_size \(64\) must be a multiple of num_attention_heads"),
    ("odd-head-dim", {"head_dim": 7}, r"head_dim"),
    ("context-zero", {"max_position_embeddings": 0}, r"max_position_embeddings"),
    ("eos-string", {"eos_token_id": "2"}, r"eos_token_id"),
    ("eos-list-mixed", {"eos_token_id": [2, "x"]}, r"eos_token_id\[1\]"),
    ("tie-string", {"tie_word_embeddings": "false"}, r"tie_word_embeddings"),
    ("rope-scaling-string", {"rope_scaling": "linear"}, r"rope_scaling"),
    ("rope-scaling-yarn", {"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, r"rope_scaling type 'yarn'"),
    ("rope-linear-no-factor", {"rope_scaling": {"rope_type": "linear"}}, r"'factor'"),
    ("rope-linear-negative", {"rope_scaling": {"type": "linear", "factor": -2.0}}, r"rope_scaling\.factor"),
    ("rope-llama3-partial", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, r"low_freq_factor"),
    ("rope-parameters-list", {"rope_parameters": [1]}, r"rope_parameters"),
    ("torch-dtype", {"torch_dtype": "float99"}, r"torch_dtype 'float99'"),
    ("attention-bias", {"attention_bias": True}, r"attention_bias"),
    ("mlp-bias", {"mlp_bias": True}, r"mlp_bias"),
    ("gelu", {"hidden_act": "gelu"}, r"hidden_act 'gelu'"),
    ("partial-rope", {"partial_rotary_factor": 0.5}, r"partial_rotary_factor"),
    ("quantized", {"quantization_config": {"quant_method": "gptq"}}, r"quantization_config"),
    ("model-type", {"model_type": "gpt2"}, r"model_type 'gpt2'"),
    ("mistral-window", {"model_type": "mistral", "max_position_embeddings": ...}, r"sliding_window"),
    ("use-cache", {"use_cache": "yes"}, r"use_cache"),
]


@pytest.mark.parametrize("change,match", [c[1:] for c in CONFIG_CASES], ids=[c[0] for c in CONFIG_CASES])
def test_bad_config_is_refused_naming_the_key(folder, change, match):
    if isinstance(change, dict):
        _with(folder, **change)
    else:
        _write_config(folder, change)
    with pytest.raises(BadInput, match=match) as err:
        load_model(folder)
    assert str(folder / "config.json") in str(err.value)


def test_config_json_that_is_a_folder(folder):
    (folder / "config.json").unlink()
    (folder / "config.json").mkdir()
    with pytest.raises(BadInput, match=r"cannot read .*config\.json"):
        load_model(folder)


def test_config_folder_that_is_a_file(folder):
    with pytest.raises(BadInput, match=r"model\.safetensors is a file"):
        load_model(folder / "model.safetensors")
    with pytest.raises(BadInput, match=r"is a file"):
        load_tokenizer(folder / "tokenizer.json")


def test_empty_config_takes_transformers_defaults_not_smollm2():
    """`{}` is Llama-2-7B's shape (transformers' defaults), not SmolLM2's."""
    cfg, hf = LlamaConfig.from_dict({}), transformers.LlamaConfig()
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings",
                "tie_word_embeddings", "bos_token_id", "eos_token_id"):
        assert getattr(cfg, key) == getattr(hf, key), key
    assert cfg.rope_theta == hf.rope_parameters["rope_theta"] and cfg.rope_scaling is None


def test_mistral_defaults_are_mistrals():
    cfg = LlamaConfig.from_dict({"model_type": "mistral", "sliding_window": None})
    hf = transformers.MistralConfig(sliding_window=None)
    for key in ("intermediate_size", "num_key_value_heads", "max_position_embeddings", "rms_norm_eps"):
        assert getattr(cfg, key) == getattr(hf, key), key


def test_rope_parameters_theta_wins_like_transformers():
    d = {"rope_theta": 7.0, "rope_parameters": {"rope_type": "default", "rope_theta": 5.0}}
    assert LlamaConfig.from_dict(d).rope_theta == transformers.LlamaConfig(**d).rope_parameters["rope_theta"] == 5.0


# ---- weight files ------------------------------------------------------------------------------------------
def _safetensors_bytes(header: dict, data: bytes) -> bytes:
    """A safetensors file from a header dict and a data blob (to write files whose header lies)."""
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def _one_tensor_changed(folder: Path, name: str, tensor: torch.Tensor) -> None:
    from safetensors.torch import load_file, save_file
    state = load_file(folder / "model.safetensors")
    state[name] = tensor
    save_file(state, folder / "model.safetensors")


def _break_weights(folder: Path, how: str) -> None:
    """Damage the weights of a tiny model folder in one of the ways WEIGHT_CASES names."""
    from safetensors.torch import load_file, save_file
    st = folder / "model.safetensors"
    if how == "zero-byte":
        st.write_bytes(b"")
    elif how == "garbage":
        st.write_bytes(b"this is not a safetensors file at all" * 10)
    elif how == "truncated":
        st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    elif how == "header-lies":
        st.write_bytes(_safetensors_bytes({"model.norm.weight": {"dtype": "F32", "shape": [64],
                                                                 "data_offsets": [0, 1 << 20]}}, b"\0" * 256))
    elif how == "no-tensors":
        save_file({}, st)
    elif how == "int8":
        _one_tensor_changed(folder, "model.norm.weight", torch.ones(64, dtype=torch.int8))
    elif how == "nan":
        _one_tensor_changed(folder, "model.layers.0.mlp.up_proj.weight", torch.full((96, 64), float("nan")))
    elif how == "inf":
        _one_tensor_changed(folder, "model.norm.weight", torch.full((64,), float("inf")))
    elif how == "pickle-only":
        st.unlink()
        torch.save({}, folder / "pytorch_model.bin")
    elif how == "no-weights":
        st.unlink()
    elif how in ("index-missing-shard", "index-not-json", "index-list", "index-outside", "index-duplicate"):
        state = load_file(st)
        names = sorted(state)
        half = len(names) // 2
        save_file({n: state[n] for n in names[:half]}, folder / "a.safetensors")
        save_file({n: state[n] for n in names[half - (how == "index-duplicate"):]}, folder / "b.safetensors")
        st.unlink()
        weight_map = {n: ("a.safetensors" if i < half else "b.safetensors") for i, n in enumerate(names)}
        index = folder / "model.safetensors.index.json"
        if how == "index-missing-shard":
            (folder / "b.safetensors").unlink()
        if how == "index-outside":
            weight_map[names[0]] = "../a.safetensors"
        body = {"index-not-json": "{weight_map", "index-list": json.dumps({"weight_map": ["a.safetensors"]})}
        index.write_text(body.get(how, json.dumps({"metadata": {}, "weight_map": weight_map})))
    else:
        raise AssertionError(how)


WEIGHT_CASES = [
    ("zero-byte", BadInput, r"model\.safetensors: corrupt or truncated|cannot read .*model\.safetensors"),
    ("garbage", BadInput, r"cannot read .*model\.safetensors"),
    ("truncated", BadInput, r"cannot read .*model\.safetensors.*corrupt or truncated"),
    ("header-lies", BadInput, r"cannot read .*model\.safetensors"),
    ("no-tensors", BadInput, r"missing tensor 'model\.embed_tokens\.weight'"),
    ("int8", BadInput, r"tensor 'model\.norm\.weight' has dtype int8"),
    ("nan", BadInput, r"tensor 'model\.layers\.0\.mlp\.up_proj\.weight' holds NaN"),
    ("inf", BadInput, r"tensor 'model\.norm\.weight' holds NaN or infinite"),
    ("pickle-only", BadInput, r"only pickle weights"),
    ("no-weights", NotFound, r"no model\.safetensors"),
    ("index-missing-shard", NotFound, r"names shard b\.safetensors, which is missing"),
    ("index-not-json", BadInput, r"model\.safetensors\.index\.json is not valid JSON"),
    ("index-list", BadInput, r"weight_map"),
    ("index-outside", BadInput, r"shard '\.\./a\.safetensors', which is not a plain file name"),
    ("index-duplicate", BadInput, r"is in both a\.safetensors and b\.safetensors"),
]


@pytest.mark.parametrize("how,error,match", WEIGHT_CASES, ids=[c[0] for c in WEIGHT_CASES])
def test_bad_weights_are_refused_naming_the_file(folder, how, error, match):
    _break_weights(folder, how)
    with pytest.raises(error, match=match):
        load_model(folder)


# ---- tokenizer files ---------------------------------------------------------------------------------------
def _tokenizer_spec(folder: Path) -> dict:
    return json.loads((folder / "tokenizer.json").read_text())


TOKENIZER_CASES = [
    # (id, change: dict spec -> spec | bytes for tokenizer.json | ("config", dict) for tokenizer_config.json, match)
    ("not-json", b'{"model": {"vocab": ', r"tokenizer\.json is not valid JSON"),
    ("not-utf8", b'{"model": "\xff"}', r"tokenizer\.json is not UTF-8"),
    ("list", b"[]", r"tokenizer\.json must hold a JSON object"),
    ("no-model", lambda s: {k: v for k, v in s.items() if k != "model"}, r"tokenizer\.json: 'model' is missing"),
    ("no-vocab", lambda s: {**s, "model": {"type": "BPE", "merges": []}}, r"tokenizer\.json: model\.vocab"),
    ("wordpiece", lambda s: {**s, "model": {**s["model"], "type": "WordPiece"}}, r"model type 'WordPiece'"),
    ("vocab-id-string", lambda s: {**s, "model": {**s["model"], "vocab": {"a": "0"}}}, r"model\.vocab\['a'\]"),
    ("unk-list", lambda s: {**s, "model": {**s["model"], "unk_token": ["a"]}}, r"model\.unk_token"),
    ("merges-dict", lambda s: {**s, "model": {**s["model"], "merges": {"a": "b"}}}, r"model\.merges"),
    ("added-no-id", lambda s: {**s, "added_tokens": [{"content": "x"}]}, r"added_tokens\[0\]"),
    ("metaspace", lambda s: {**s, "pre_tokenizer": {"type": "Metaspace"}}, r"pre_tokenizer Metaspace"),
    ("pre-steps", lambda s: {**s, "pre_tokenizer": {"type": "Sequence", "pretokenizers": "ByteLevel"}},
     r"pre_tokenizer\.pretokenizers"),
    ("bos-number", ("config", {"bos_token": 5}), r"tokenizer_config\.json: bos_token"),
    ("add-bos-string", ("config", {"add_bos_token": "yes"}), r"tokenizer_config\.json: add_bos_token"),
    ("config-list", ("config", [1]), r"tokenizer_config\.json must hold a JSON object"),
]


def _break_tokenizer(folder: Path, change) -> None:
    if isinstance(change, bytes):
        (folder / "tokenizer.json").write_bytes(change)
    elif isinstance(change, tuple):
        (folder / "tokenizer_config.json").write_text(json.dumps(change[1]))
    else:
        (folder / "tokenizer.json").write_text(json.dumps(change(_tokenizer_spec(folder))))


@pytest.mark.parametrize("change,match", [c[1:] for c in TOKENIZER_CASES], ids=[c[0] for c in TOKENIZER_CASES])
def test_bad_tokenizer_is_refused_naming_the_file(folder, change, match):
    _break_tokenizer(folder, change)
    with pytest.raises(BadInput, match=match):
        load_tokenizer(folder)


def test_missing_tokenizer_files(folder):
    (folder / "tokenizer.json").unlink()
    with pytest.raises(NotFound, match="tokenizer.json or tokenizer.model"):
        load_tokenizer(folder)


def test_corrupt_sentencepiece_model(folder):
    (folder / "tokenizer.json").unlink()
    (folder / "tokenizer.model").write_bytes(b"\x00garbage")
    with pytest.raises(BadInput, match=r"tokenizer\.model: not a valid SentencePiece model"):
        load_tokenizer(folder)


# ---- through the command line ------------------------------------------------------------------------------
def test_cli_config_list(folder, capsys):
    _write_config(folder, [])
    assert "config.json must hold a JSON object" in _cli(folder, capsys)


def test_cli_eps_string(folder, capsys):
    _with(folder, rms_norm_eps="1e-5")
    assert "rms_norm_eps" in _cli(folder, capsys)


def test_cli_unsupported_feature(folder, capsys):
    _with(folder, attention_bias=True)
    assert "attention_bias" in _cli(folder, capsys)


def test_cli_zero_byte_weights(folder, capsys):
    _break_weights(folder, "zero-byte")
    assert "model.safetensors" in _cli(folder, capsys)


def test_cli_int8_weights(folder, capsys):
    _break_weights(folder, "int8")
    assert "int8" in _cli(folder, capsys)


def test_cli_missing_shard(folder, capsys):
    _break_weights(folder, "index-missing-shard")
    assert "b.safetensors" in _cli(folder, capsys)


def test_cli_wordpiece_tokenizer(folder, capsys):
    _break_tokenizer(folder, lambda s: {**s, "model": {**s["model"], "type": "WordPiece"}})
    line = _cli(folder, capsys)
    assert "tokenizer.json" in line and "WordPiece" in line


def test_cli_model_is_a_file(folder, capsys):
    assert "is a file" in _cli(folder / "config.json", capsys)


# ---- parity with transformers ------------------------------------------------------------------------------
def _save_hf(folder: Path, d: dict, seed: int = 0, std: float = 0.15):
    """Random transformers weights for config dict `d`, saved with `d` itself (keys left out stay out) as config."""
    torch.manual_seed(seed)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**json.loads(json.dumps(d))))
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, std)
    hf.save_pretrained(folder)
    _write_config(folder, d)


def _logits_diff(folder: Path, vocab: int, max_len: int) -> float:
    """Max |minikv - transformers| logits on a random sequence, both loaded from the folder in float32."""
    hf = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ours = load_model(folder)
    x = torch.randint(0, vocab, (1, min(12, max_len)), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return (hf(x).logits - ours(x, ours.new_cache(1))).abs().max().item()


def test_config_with_keys_left_out_matches_transformers(tmp_path):
    """Only the sizes are given: eps, theta, tying, KV heads, head_dim, context all take transformers' defaults."""
    d = {"vocab_size": 61, "hidden_size": 32, "intermediate_size": 40, "num_hidden_layers": 2,
         "num_attention_heads": 4}
    _save_hf(tmp_path, d)
    ours = LlamaConfig.from_json(tmp_path / "config.json")
    assert (ours.tie_word_embeddings, ours.rope_theta, ours.rms_norm_eps) == (False, 10000.0, 1e-6)
    assert (tmp_path / "model.safetensors").exists()
    assert _logits_diff(tmp_path, 61, 2048) < 1e-5


# ---- random config.json dicts ------------------------------------------------------------------------------
LINEAR = {"rope_type": "linear", "factor": 2.0}
LLAMA3 = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8}
BAD = [None, "x", "4", True, -1, 0, 2.5, float("nan"), [], {}, [1, "a"]]
EXTRAS = {"hidden_act": ["silu", "gelu", 5], "attention_bias": [False, True, "no"], "mlp_bias": [False, True],
          "use_cache": [True, "yes"], "torch_dtype": ["float32", "bfloat16", "float99"], "model_type": ["llama", "gpt2"],
          "pretraining_tp": [1, 2], "initializer_range": [0.02, 3.0], "some_unknown_key": [1, "x"],
          "partial_rotary_factor": [1.0, 0.5], "rope_scaling": [{"rope_type": "yarn", "factor": 2.0}, "linear",
                                                                  {"rope_type": "llama3", "factor": 2.0}]}
# Keys whose transformers default would make the weights large (hidden_size 4096): never left out.
ALWAYS_PRESENT = {"hidden_size"}
KEY_NAMES = set(LlamaConfig.__dataclass_fields__) | set(EXTRAS) | {"rope_parameters", "sliding_window"}


@st.composite
def config_dicts(draw):
    """Tiny valid Llama config.json dicts, then some keys left out, some given wrong values, some extra keys."""
    head_dim, kv = draw(st.sampled_from([4, 8]), label="head_dim"), draw(st.sampled_from([1, 2]), label="kv")
    heads = kv * draw(st.sampled_from([1, 2]), label="group")
    valid = {
        "vocab_size": draw(st.integers(5, 40)), "hidden_size": heads * head_dim,
        "intermediate_size": draw(st.integers(4, 24)), "num_hidden_layers": draw(st.integers(1, 2)),
        "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": head_dim,
        "rms_norm_eps": draw(st.sampled_from([1e-6, 1e-5, 0.1])),
        "rope_theta": draw(st.sampled_from([10000.0, 500.0, 10000, 1e6])),
        "max_position_embeddings": draw(st.sampled_from([8, 64, 2048])),
        "tie_word_embeddings": draw(st.booleans()), "bos_token_id": 1,
        "eos_token_id": draw(st.sampled_from([2, [2, 3], None])),
        "rope_scaling": draw(st.sampled_from([None, LINEAR, LLAMA3, {"rope_type": "default"}])),
    }
    bad = draw(st.sets(st.sampled_from(sorted(valid)), max_size=2), label="bad keys")
    d = {}
    for key, value in valid.items():
        if key in bad:
            d[key] = draw(st.sampled_from(BAD), label=key)
        elif key in ALWAYS_PRESENT or draw(st.integers(0, 3), label=f"keep {key}"):
            d[key] = value
    for key in draw(st.sets(st.sampled_from(sorted(EXTRAS)), max_size=2), label="extra keys"):
        d[key] = draw(st.sampled_from(EXTRAS[key]), label=key)
    return d


def _transformers_error(d: dict) -> Exception | None:
    """What transformers raises for this config dict (None when it accepts it)."""
    try:
        transformers.LlamaConfig(**json.loads(json.dumps(d)))
    except Exception as e:  # noqa: BLE001 - any refusal by the oracle counts
        return e
    return None


@given(d=config_dicts())
def test_random_config_loads_like_transformers_or_is_refused_by_name(d):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        _write_config(folder, d)
        theirs = _transformers_error(d)
        try:
            cfg = LlamaConfig.from_json(folder / "config.json")
        except (BadInput, NotFound) as e:
            named = [k for k in KEY_NAMES | set(d) if re.search(rf"\b{re.escape(k)}\b", str(e))]
            assert named, f"error names no key: {e}"
            return
        assert theirs is None, f"transformers refuses {d} ({theirs}) but minikv loads it"
        _save_hf(folder, d)
        diff = _logits_diff(folder, cfg.vocab_size, cfg.max_position_embeddings)
        assert diff < 1e-5, f"logits differ by {diff} for {d}"
