"""Reading a Hugging Face `config.json` into a `LlamaConfig`, checked.

A key absent from `config.json` takes the value Hugging Face's `transformers.LlamaConfig` (or `MistralConfig`, for
model_type "mistral") gives it, so a folder loads the model transformers would load. Every value is checked; a wrong
one, or a feature minikv does not implement (biases, non-SiLU MLPs, partial RoPE, ...), is a BadInput naming the key,
never a silently different model.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from minikv.config import LlamaConfig, check_positive_int
from minikv.errors import BadInput, NotFound

# transformers.MistralConfig differs from LlamaConfig in these defaults only (among the keys minikv reads).
MISTRAL_DEFAULTS = {"intermediate_size": 14336, "num_key_value_heads": 8, "max_position_embeddings": 4096 * 32,
                    "sliding_window": 4096}
SUPPORTED_MODEL_TYPES = ("llama", "mistral")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
SILU_NAMES = ("silu", "swish")       # transformers' ACT2FN maps both to SiLU
TORCH_DTYPE_NAMES = ("float32", "float16", "bfloat16", "float64")
# Keys minikv does not use but transformers type-checks (it refuses e.g. "use_cache": "yes"); so does minikv.
UNUSED_TYPED_KEYS = (("use_cache", (bool,), "true or false"), ("pad_token_id", (int,), "an integer"),
                     ("initializer_range", (float,), "a float"), ("attention_dropout", (int, float), "a number"))


def load_config(path: str | Path) -> LlamaConfig:
    """Read and check a `config.json`; every problem is a NotFound or BadInput naming the file."""
    path = Path(path)
    d = read_json_object(path)
    try:
        return config_from_dict(d)
    except BadInput as e:
        raise BadInput(f"{path}: {str(e).removeprefix('config: ')}") from None


def config_from_dict(d: dict) -> LlamaConfig:
    """A checked config from a `config.json` dict; absent keys take transformers' defaults for the model_type."""
    if not isinstance(d, dict):
        raise BadInput(f"config must be a JSON object (a mapping of keys to values), got {type(d).__name__}")
    d = dict(d)
    model_type = d.get("model_type", "llama")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise BadInput(f"config: model_type {model_type!r} is not a Llama-family model "
                       f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    if model_type == "mistral":
        for key, value in MISTRAL_DEFAULTS.items():
            d.setdefault(key, value)
    _merge_rope_parameters(d)
    known = {f for f in LlamaConfig.__dataclass_fields__ if f != "extra"}
    cfg = LlamaConfig(**{k: v for k, v in d.items() if k in known},
                      extra={k: v for k, v in d.items() if k not in known})
    return check_config(cfg)


def check_config(cfg: LlamaConfig) -> LlamaConfig:
    """Check the values beyond the shape (which LlamaConfig checks itself); rope_scaling comes back normalized."""
    _check_positive_number("rms_norm_eps", cfg.rms_norm_eps, floats_only=True)
    _check_positive_number("rope_theta", cfg.rope_theta)
    if not isinstance(cfg.tie_word_embeddings, bool):
        raise BadInput(f"config: tie_word_embeddings must be true or false, got {cfg.tie_word_embeddings!r}")
    _check_token_id("bos_token_id", cfg.bos_token_id)
    eos = cfg.eos_token_id
    for i, value in enumerate(eos if isinstance(eos, list) else [eos]):
        _check_token_id("eos_token_id" if not isinstance(eos, list) else f"eos_token_id[{i}]", value)
    cfg.rope_scaling = _checked_rope_scaling(cfg.rope_scaling, cfg.max_position_embeddings)
    _check_extra(cfg.extra, cfg.max_position_embeddings)
    return cfg


# ---- reading -----------------------------------------------------------------------------------------------
def read_json_object(path: Path, what: str = "file"):
    """The JSON object in `path`; a missing, unreadable, non-UTF-8, invalid or non-object file raises naming it."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise NotFound(f"{path} not found") from None
    except OSError as e:  # a folder named like the file, no permission, ...
        raise BadInput(f"cannot read {path}: {e.strerror or e}") from None
    try:
        d = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise BadInput(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise BadInput(f"{path} is not valid JSON: {e}") from None
    except RecursionError:
        raise BadInput(f"{path} is not valid JSON: nested too deeply") from None
    if not isinstance(d, dict):
        raise BadInput(f"{path} must hold a JSON object ({{...}}), not {_json_kind(d)}")
    return d


def _json_kind(value) -> str:
    """How JSON would name the kind of `value`, for messages."""
    if value is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list",
            dict: "an object"}.get(type(value), type(value).__name__)


def _merge_rope_parameters(d: dict) -> None:
    """Fold transformers >= 5's `rope_parameters` into rope_theta / rope_scaling, with transformers' priorities."""
    params = d.pop("rope_parameters", None)
    if params is not None and not isinstance(params, dict):
        raise BadInput(f"config: rope_parameters must be an object or null, got {params!r}")
    # transformers: a non-empty `rope_scaling` wins over `rope_parameters`; theta inside the dict wins over the
    # top-level key; an empty or absent one means default RoPE.
    scaling = d.get("rope_scaling") or params or None
    if not isinstance(scaling, dict):
        d["rope_scaling"] = scaling          # None, or a wrong kind that the checks name
        return
    scaling = dict(scaling)
    if "rope_theta" in scaling:
        d["rope_theta"] = scaling.pop("rope_theta")
    if "partial_rotary_factor" in scaling:
        d.setdefault("partial_rotary_factor", scaling.pop("partial_rotary_factor"))
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "llama3" and "original_max_position_embeddings" in d:
        # transformers gives a top-level original_max_position_embeddings priority over the dict's.
        scaling["original_max_position_embeddings"] = d["original_max_position_embeddings"]
    d["rope_scaling"] = None if kind == "default" else scaling


# ---- checks ------------------------------------------------------------------------------------------------
def _check_positive_number(name: str, value, floats_only: bool = False) -> None:
    """A finite number > 0; `floats_only` mirrors transformers' strict float fields (rms_norm_eps: 1 is refused)."""
    kinds = (float,) if floats_only else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value) or value <= 0:
        kind = "float" if floats_only else "number"
        raise BadInput(f"config: {name} must be a positive finite {kind}, got {value!r}")


def _check_token_id(name: str, value) -> None:
    """Token ids are non-negative integers or null."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise BadInput(f"config: {name} must be a non-negative integer or null, got {value!r}")


def _checked_rope_scaling(sc, max_positions: int) -> dict | None:
    """rope_scaling as model.rope_inv_freq reads it: None, linear {factor} or llama3 with all four fields."""
    if sc is None:
        return None
    if not isinstance(sc, dict):
        raise BadInput(f"config: rope_scaling must be an object or null, got {sc!r}")
    kind = sc.get("rope_type", sc.get("type"))
    if kind not in SUPPORTED_ROPE_TYPES:
        raise BadInput(f"config: unsupported rope_scaling type {kind!r} (supported: linear, llama3)")
    if kind == "default":
        return None
    sc = {**sc, "rope_type": kind}
    if "factor" not in sc:
        raise BadInput(f"config: rope_scaling of type {kind!r} needs a 'factor'")
    _check_positive_number("rope_scaling.factor", sc["factor"])
    if kind == "llama3":
        # transformers fills the pre-scaling context from max_position_embeddings when the key is absent.
        sc.setdefault("original_max_position_embeddings", max_positions)
        check_positive_int("rope_scaling.original_max_position_embeddings", sc["original_max_position_embeddings"])
        for key in ("low_freq_factor", "high_freq_factor"):
            if key not in sc:
                raise BadInput(f"config: rope_scaling of type 'llama3' needs {key!r}")
            _check_positive_number(f"rope_scaling.{key}", sc[key])
        if sc["high_freq_factor"] <= sc["low_freq_factor"]:
            raise BadInput(f"config: rope_scaling.high_freq_factor ({sc['high_freq_factor']}) must be greater than "
                           f"low_freq_factor ({sc['low_freq_factor']})")
    return sc


def _check_extra(extra: dict, max_positions: int) -> None:
    """Keys outside the dataclass that transformers acts on: refuse the values that would change the model."""
    act = extra.get("hidden_act", "silu")
    if act not in SILU_NAMES:
        raise BadInput(f"config: hidden_act {act!r} is not supported (minikv's MLP is SwiGLU: 'silu')")
    for key in ("attention_bias", "mlp_bias"):
        value = extra.get(key, False)
        if not isinstance(value, bool):
            raise BadInput(f"config: {key} must be true or false, got {value!r}")
        if value:
            raise BadInput(f"config: {key}=true is not supported (minikv's projections have no bias)")
    tp = extra.get("pretraining_tp", 1)
    # pretraining_tp > 1 only split the same matmuls into slices (transformers >= 5 ignores it): any positive int.
    if tp is not None:
        check_positive_int("pretraining_tp", tp)
    prf = extra.get("partial_rotary_factor", 1.0)
    if prf is not None and prf != 1.0:
        raise BadInput(f"config: partial_rotary_factor={prf!r} is not supported (minikv rotates the whole head)")
    if extra.get("quantization_config") is not None:
        raise BadInput("config: quantization_config is set; minikv reads unquantized float weights only")
    window = extra.get("sliding_window")
    if window is not None:
        check_positive_int("sliding_window", window)
        if window < max_positions:
            raise BadInput(f"config: sliding_window={window} is smaller than max_position_embeddings "
                           f"({max_positions}); minikv has no sliding-window attention")
    for key, kinds, meaning in UNUSED_TYPED_KEYS:
        value = extra.get(key)
        if value is not None and (not isinstance(value, kinds) or (bool not in kinds and isinstance(value, bool))):
            raise BadInput(f"config: {key} must be {meaning} or null, got {value!r}")
    if extra.get("initializer_range") is not None and not 0.0 <= extra["initializer_range"] <= 1.0:
        raise BadInput(f"config: initializer_range must be between 0 and 1, got {extra['initializer_range']!r}")
    for key in ("torch_dtype", "dtype"):
        value = extra.get(key)
        if value is not None and value not in TORCH_DTYPE_NAMES:
            raise BadInput(f"config: {key} {value!r} is not a floating-point dtype "
                           f"(expected one of {', '.join(TORCH_DTYPE_NAMES)} or null)")
