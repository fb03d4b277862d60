"""Reading a Hugging Face `config.json` into a checked `LlamaConfig`.

A key absent from `config.json` takes the value transformers' `LlamaConfig` gives it, so a folder loads the model
transformers would load. A wrong value, or a feature minikv does not implement (biases, non-SiLU MLPs, partial RoPE,
...), is a BadInput naming the key, never a silently different model."""
from __future__ import annotations

import json
from dataclasses import asdict
import math
from pathlib import Path

from minikv.config import LlamaConfig, check_positive_int
from minikv.errors import BadInput, NotFound, is_int
from minikv.io import require

TORCH_DTYPE_NAMES = ("float32", "float16", "bfloat16", "float64")
# (key, default, allowed kinds, how the message names them, null allowed): type checks transformers makes too (it
# refuses e.g. "use_cache": "yes"), including keys minikv does not use.
TYPED_KEYS = (("tie_word_embeddings", False, (bool,), "true or false", False),
              ("use_cache", None, (bool,), "true or false", True), ("pad_token_id", None, (int,), "an integer", True),
              ("initializer_range", None, (float,), "a float", True),
              ("attention_dropout", None, (int, float), "a number", True))

def load_config(path: str | Path) -> LlamaConfig:
    """Read and check a `config.json`; every problem is a NotFound or BadInput naming the file."""
    path = Path(path)
    d = read_json_object(path)
    try:
        return config_from_dict(d)
    except BadInput as e:
        raise BadInput(f"{path}: {str(e).removeprefix('config: ')}") from None

def config_to_dict(cfg: LlamaConfig) -> dict:
    """config.json's keys, every one written explicitly, so the file means the same whatever the reader's defaults."""
    d = asdict(cfg)
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **d.pop("extra"), **d}   # (pop runs first)

def config_from_dict(d: dict) -> LlamaConfig:
    """A checked config from a `config.json` dict; absent keys take transformers' LlamaConfig defaults."""
    require(isinstance(d, dict), f"config must be a JSON object (a mapping of keys to values), got {type(d).__name__}")
    model_type = d.get("model_type", "llama")
    require(model_type == "llama", f"config: model_type {model_type!r} is not supported (only 'llama')")
    d = dict(d)
    _merge_rope_parameters(d)
    known = {f for f in LlamaConfig.__dataclass_fields__ if f != "extra"}
    cfg = LlamaConfig(**{k: v for k, v in d.items() if k in known}, extra={k: v for k, v in d.items() if k not in known})
    return check_config(cfg)

def read_json_object(path: Path):
    """The JSON object in `path`; a missing, unreadable, non-UTF-8, invalid or non-object file raises naming it."""
    try:
        d = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise NotFound(f"{path} not found") from None
    except OSError as e:  # a folder named like the file, no permission, ...
        raise BadInput(f"cannot read {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise BadInput(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise BadInput(f"{path} is not valid JSON: {e}") from None
    except RecursionError:
        raise BadInput(f"{path} is not valid JSON: nested too deeply") from None
    kind = "null" if d is None else {bool: "a boolean", int: "a number", float: "a number", str: "a string",
                                     list: "a list"}.get(type(d), type(d).__name__)
    require(isinstance(d, dict), f"{path} must hold a JSON object ({{...}}), not {kind}")
    return d

def _merge_rope_parameters(d: dict) -> None:
    """Fold transformers >= 5's `rope_parameters` into rope_theta / rope_scaling, with transformers' priorities."""
    params = d.pop("rope_parameters", None)
    require(params is None or isinstance(params, dict), f"config: rope_parameters must be an object or null, "
            f"got {params!r}")
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

def check_config(cfg: LlamaConfig) -> LlamaConfig:
    """Check the values beyond the shape (which LlamaConfig checks itself); rope_scaling comes back normalized."""
    _check_positive_number("rms_norm_eps", cfg.rms_norm_eps, floats_only=True)
    _check_positive_number("rope_theta", cfg.rope_theta)
    eos, ids = cfg.eos_token_id, [("bos_token_id", cfg.bos_token_id)]
    ids += [(f"eos_token_id[{i}]", e) for i, e in enumerate(eos)] if isinstance(eos, list) else [("eos_token_id", eos)]
    for name, value in ids:
        require(value is None or (is_int(value) and value >= 0),
                f"config: {name} must be a non-negative integer or null, got {value!r}")
    cfg.rope_scaling = _checked_rope_scaling(cfg.rope_scaling, cfg.max_position_embeddings)
    _check_extra(cfg.extra | {"tie_word_embeddings": cfg.tie_word_embeddings})
    return cfg

def _check_positive_number(name: str, value, floats_only: bool = False) -> None:
    """A finite number > 0; `floats_only` mirrors transformers' strict float fields (rms_norm_eps: 1 is refused)."""
    ok = isinstance(value, float) or (not floats_only and is_int(value))
    require(ok and math.isfinite(value) and value > 0,
            f"config: {name} must be a positive finite {'float' if floats_only else 'number'}, got {value!r}")

def _checked_rope_scaling(sc, max_positions: int) -> dict | None:
    """rope_scaling as model.rope_inv_freq reads it: None, linear {factor} or llama3 with all four fields."""
    if sc is None:
        return None
    require(isinstance(sc, dict), f"config: rope_scaling must be an object or null, got {sc!r}")
    kind = sc.get("rope_type", sc.get("type"))
    require(kind in ("default", "linear", "llama3"),
            f"config: unsupported rope_scaling type {kind!r} (supported: linear, llama3)")
    if kind == "default":
        return None
    sc = {**sc, "rope_type": kind}
    require("factor" in sc, f"config: rope_scaling of type {kind!r} needs a 'factor'")
    _check_positive_number("rope_scaling.factor", sc["factor"])
    if kind == "llama3":
        # transformers fills the pre-scaling context from max_position_embeddings when the key is absent.
        sc.setdefault("original_max_position_embeddings", max_positions)
        check_positive_int("rope_scaling.original_max_position_embeddings", sc["original_max_position_embeddings"])
        for key in ("low_freq_factor", "high_freq_factor"):
            require(key in sc, f"config: rope_scaling of type 'llama3' needs {key!r}")
            _check_positive_number(f"rope_scaling.{key}", sc[key])
        require(sc["high_freq_factor"] > sc["low_freq_factor"], f"config: rope_scaling.high_freq_factor "
                f"({sc['high_freq_factor']}) must be greater than low_freq_factor ({sc['low_freq_factor']})")
    return sc

def _check_extra(extra: dict) -> None:
    """Keys transformers acts on beyond the shape: wrong kinds, and values that would change the model, are refused."""
    for key, default, kinds, meaning, nullable in TYPED_KEYS:
        value = extra.get(key, default)
        right_kind = isinstance(value, kinds) and (bool in kinds or not isinstance(value, bool))
        ok = (value is None and nullable) or right_kind
        require(ok, f"config: {key} must be {meaning}{' or null' if nullable else ''}, got {value!r}")
    act = extra.get("hidden_act", "silu")
    require(act in ("silu", "swish"),  # transformers' ACT2FN maps both to SiLU
            f"config: hidden_act {act!r} is not supported (minikv's MLP is SwiGLU: 'silu')")
    for key in ("attention_bias", "mlp_bias"):
        require(extra.get(key, False) is False, f"config: {key} must be false (minikv's projections have no bias), "
                f"got {extra.get(key)!r}")
    # pretraining_tp > 1 only split the same matmuls into slices (transformers >= 5 ignores it): any positive int.
    if extra.get("pretraining_tp") is not None:
        check_positive_int("pretraining_tp", extra["pretraining_tp"])
    prf = extra.get("partial_rotary_factor")
    require(prf in (None, 1.0), f"config: partial_rotary_factor={prf!r} is not supported (minikv rotates the whole "
            "head)")
    require(extra.get("quantization_config") is None,
            "config: quantization_config is set; minikv reads unquantized float weights only")
    ir = extra.get("initializer_range")
    require(ir is None or 0.0 <= ir <= 1.0, f"config: initializer_range must be between 0 and 1, got {ir!r}")
    for key in ("torch_dtype", "dtype"):
        value = extra.get(key)
        require(value is None or value in TORCH_DTYPE_NAMES, f"config: {key} {value!r} is not a floating-point dtype "
                f"(expected one of {', '.join(TORCH_DTYPE_NAMES)} or null)")
