"""Model configuration: one dataclass holding a Llama's shape; `minikv.io.hf_config` reads it from `config.json`.

Dimension letters used in shape comments across minikv:
  B batch, T new tokens (queries), S cache slots, Hq query heads, Hkv KV heads, G = Hq // Hkv, d head dim, L layers."""
from __future__ import annotations

from dataclasses import dataclass, field
from minikv.errors import BadInput

POSITIVE_INT_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "max_position_embeddings")

@dataclass
class LlamaConfig:
    # Defaults are transformers.LlamaConfig's (Llama-2-7B), so an absent config.json key means what it means there.
    vocab_size: int = 32000          # tokens in the vocabulary
    hidden_size: int = 4096          # model width
    intermediate_size: int = 11008   # SwiGLU hidden width
    num_hidden_layers: int = 32      # L
    num_attention_heads: int = 32    # Hq
    num_key_value_heads: int | None = None  # Hkv (GQA when < Hq); defaults to Hq
    head_dim: int | None = None      # d; defaults to hidden_size // Hq
    rms_norm_eps: float = 1e-6       # RMSNorm's epsilon
    rope_theta: float = 10000.0      # RoPE base
    rope_scaling: dict | None = None  # None, {"rope_type": "linear", "factor"} or {"rope_type": "llama3", ...}
    max_position_embeddings: int = 2048  # the context the model was trained for
    tie_word_embeddings: bool = False  # True: the output head reuses the embedding matrix
    bos_token_id: int | None = 1     # beginning-of-sequence token
    eos_token_id: int | list[int] | None = 2  # end-of-sequence token(s)
    extra: dict = field(default_factory=dict, repr=False)  # other config.json keys, kept for round trips

    def __post_init__(self):
        """The shape invariants (config.json's other values are checked by `minikv.io.hf_config`)."""
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        for name in ("hidden_size", "num_attention_heads"):
            check_positive_int(name, getattr(self, name))
        if self.hidden_size % self.num_attention_heads:
            # transformers' LlamaConfig refuses this even when head_dim is given explicitly.
            raise BadInput(f"config: hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                           f"({self.num_attention_heads})")
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        for name in POSITIVE_INT_KEYS:
            check_positive_int(name, getattr(self, name))
        if self.num_attention_heads % self.num_key_value_heads:
            raise BadInput(f"config: num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                           f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise BadInput(f"config: head_dim must be even for RoPE, got {self.head_dim}")

    @property
    def eos_ids(self) -> list[int]:
        """The end-of-sequence ids as a list (empty when the config has none)."""
        eos = self.eos_token_id
        return [] if eos is None else list(eos) if isinstance(eos, (list, tuple)) else [eos]

def check_positive_int(name: str, value) -> None:
    """Sizes are JSON integers > 0 (not booleans, not 4096.0: transformers refuses floats here too)."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise BadInput(f"config: {name} must be a positive integer, got {value!r}")
