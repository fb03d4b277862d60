"""Model configuration: one dataclass, read from a Hugging Face `config.json`.

Dimension letters used in shape comments across minikv:
  B batch, T new tokens (queries), S cache slots, Hq query heads, Hkv KV heads, G = Hq // Hkv, d head dim, L layers.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, asdict
from pathlib import Path
from .errors import BadInput, NotFound


@dataclass
class LlamaConfig:
    vocab_size: int = 49152          # tokens in the vocabulary
    hidden_size: int = 576           # model width (Hq * d in Llama)
    intermediate_size: int = 1536    # SwiGLU hidden width
    num_hidden_layers: int = 30      # L
    num_attention_heads: int = 9     # Hq
    num_key_value_heads: int = 3     # Hkv (GQA when < Hq)
    head_dim: int | None = None      # d; defaults to hidden_size // Hq
    rms_norm_eps: float = 1e-5
    rope_theta: float = 100000.0
    rope_scaling: dict | None = None  # None, {"rope_type": "linear", "factor"} or {"rope_type": "llama3", ...}
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = True  # the output head reuses the embedding matrix
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    extra: dict = field(default_factory=dict, repr=False)  # unknown keys kept for round trips

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise BadInput(f"config: {name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise BadInput(f"config: num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise BadInput(f"config: head_dim must be even for RoPE, got {self.head_dim}")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind not in (None, "default", "linear", "llama3"):
                raise BadInput(f"config: unsupported rope_scaling type {kind!r} (supported: linear, llama3)")

    @property
    def n_rep(self) -> int:
        """G: query heads per KV head."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def eos_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, (list, tuple)) else [self.eos_token_id]

    @classmethod
    def from_dict(cls, d: dict) -> "LlamaConfig":
        d = dict(d)
        # transformers >= 5 writes RoPE settings as one `rope_parameters` dict (theta included).
        params = d.pop("rope_parameters", None)
        if params:
            d.setdefault("rope_theta", params.get("rope_theta", 10000.0))
            if params.get("rope_type", "default") != "default":
                d["rope_scaling"] = {k: v for k, v in params.items() if k != "rope_theta"}
        if d.get("rope_scaling") and d["rope_scaling"].get("rope_type", d["rope_scaling"].get("type")) == "default":
            d["rope_scaling"] = None
        known = {f for f in cls.__dataclass_fields__ if f != "extra"}
        kwargs = {k: v for k, v in d.items() if k in known}
        extra = {k: v for k, v in d.items() if k not in known}
        return cls(**kwargs, extra=extra)

    @classmethod
    def from_json(cls, path: str | Path) -> "LlamaConfig":
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise NotFound(f"config.json not found: {path}") from None
        except json.JSONDecodeError as e:
            raise BadInput(f"{path} is not valid JSON: {e}") from None
        arch = d.get("model_type", "llama")
        if arch not in ("llama", "mistral"):
            raise BadInput(f"{path}: model_type {arch!r} is not a Llama-family model")
        return cls.from_dict(d)

    def to_dict(self) -> dict:
        d = asdict(self)
        extra = d.pop("extra")
        d = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **extra, **d}
        return d
