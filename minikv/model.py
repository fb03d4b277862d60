"""A self-contained Llama (RMSNorm -> RoPE attention over an explicit KV store -> SwiGLU MLP), in dependency order.

RoPE convention (the only one used inside minikv): Hugging Face "rotate_half", which pairs dimension i with i + d/2.
Checkpoints in the Meta/GGUF interleaved order are converted at load time (minikv/io/convert.py, tested).
The KV store is passed in explicitly; modules hold weights only."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from minikv.attention import attend
from minikv.config import LlamaConfig
from minikv.store import KVCache, LayerStore
from minikv.errors import BadInput

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x * rsqrt(mean(x^2) + eps) * weight, normalised in float32 (float64 in oracle mode), then cast back."""
        h = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
        return self.weight * F.rms_norm(h, (h.shape[-1],), eps=self.eps).to(x.dtype)

# ---- RoPE --------------------------------------------------------------------------------------------------
def rope_inv_freq(cfg: LlamaConfig, dtype=torch.float64) -> torch.Tensor:
    """Inverse frequencies base^(-2i/d), with `linear` or `llama3` scaling applied when the config asks. (d/2,)
    Computed in `dtype` throughout: float32 reproduces Hugging Face's arithmetic, float64 is the oracle mode."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).to(dtype) / d))
    sc = cfg.rope_scaling or {}
    kind = sc.get("rope_type", sc.get("type"))
    if kind == "linear":
        inv = inv / sc["factor"]
    elif kind == "llama3":
        # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
        factor, lo, hi = sc["factor"], sc.get("low_freq_factor", 1.0), sc.get("high_freq_factor", 4.0)
        old_len = sc.get("original_max_position_embeddings", 8192)
        wavelen = 2 * torch.pi / inv
        smooth = (old_len / wavelen - lo) / (hi - lo)
        scaled = torch.where(wavelen > old_len / lo, inv / factor, inv)
        mid = (wavelen <= old_len / lo) & (wavelen >= old_len / hi)
        inv = torch.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled)
    return inv

def rope_cos_sin(inv_freq: torch.Tensor, pos: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for absolute positions pos (B, T) -> each (B, 1, T, d) in rotate_half layout.
    Angles are computed in inv_freq's dtype (float32, or float64 in oracle mode) and cast to the model's dtype."""
    angles = pos.clamp_min(0).to(inv_freq.dtype)[..., None] * inv_freq     # (B, T, d/2)
    angles = torch.cat([angles, angles], dim=-1)[:, None]                 # (B, 1, T, d)
    return angles.cos().to(dtype), angles.sin().to(dtype)

def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (i, i + d/2) of x (B, H, T, d) by the angles of their positions."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin

# ---- attention block ---------------------------------------------------------------------------------------
# hook(layer_index, store, stats) runs right after a layer's attention: layer l is compressed before l+1 runs.
LayerHook = Callable[[int, LayerStore, dict], None]

class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x, pos, cos, sin, store: LayerStore, need: frozenset, window: int, use_sdpa: bool,
                padded: bool = True, offset: int = 0):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)      # (B, Hq, T, d)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)   # (B, Hkv, T, d)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)   # (B, Hkv, T, d)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)      # keys are cached after RoPE, at true positions
        store.append(k, v, pos)
        out, stats = attend(q, pos, store, need, window, use_sdpa=use_sdpa, padded=padded, offset=offset)  # (B,Hq,T,d)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1)), stats

class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        """SwiGLU: down(silu(gate(x)) * up(x))."""
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

PIECE_TOKENS = 8192   # a prompt runs through a block this many tokens (all rows) at a time: prefill's activations

class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, pos, cos, sin, store: LayerStore, need: frozenset, window: int, use_sdpa: bool,
                padded: bool = True) -> tuple[torch.Tensor, dict]:
        """x + attn(norm(x)), then + mlp(norm(.)): the pre-norm residual block, written into x (B, T, D) in place,
        PIECE_TOKENS tokens at a time: a piece of queries sees the earlier ones through the store, so a prompt's
        activations are one piece's. The last piece holds the `window` last queries; "colsum" adds up over pieces."""
        T, stats = x.shape[1], {}
        size = T if "probs" in need else max(1, window, PIECE_TOKENS // x.shape[0])      # queries per piece
        store.reserve(T)                                                      # one allocation for all pieces
        for t1 in reversed(range(T, 0, -size)):                              # the last piece is a whole one
            p = slice(max(0, t1 - size), t1)
            a, s = self.self_attn(self.input_layernorm(x[:, p]), pos[:, p], cos[:, :, p], sin[:, :, p], store,
                                  need if t1 == T else need - {"last_rows"}, window, use_sdpa, padded, p.start)
            x[:, p] += a
            x[:, p] += self.mlp(self.post_attention_layernorm(x[:, p]))
            stats = {name: stats[name] + v if name in stats else v for name, v in s.items()}
        return x, stats

class Llama(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self._inv_freq: dict = {}          # (dtype, device) -> rope inverse frequencies, built on first use

    def inv_freq(self, dtype) -> torch.Tensor:
        """RoPE inverse frequencies for activations of `dtype`: float64 in oracle mode, else float32."""
        key = (torch.float64 if dtype == torch.float64 else torch.float32, self.device)     # (rope dtype, device)
        if key not in self._inv_freq:
            self._inv_freq[key] = rope_inv_freq(self.cfg, key[0]).to(self.device)
        return self._inv_freq[key]

    @property
    def dtype(self):
        return self.embed_tokens.weight.dtype

    @property
    def device(self):
        return self.embed_tokens.weight.device

    def new_cache(self, batch: int, capacity: int = 16) -> KVCache:
        """An empty cache for `batch` rows with `capacity` slots per head; it grows as needed, up to the context."""
        c, ctx = self.cfg, self.cfg.max_position_embeddings
        return KVCache([LayerStore.empty(batch, c.num_key_value_heads, c.head_dim, min(capacity, ctx), self.dtype,
                                         self.device, ctx, c.num_hidden_layers) for _ in range(c.num_hidden_layers)])

    def forward(self, tokens: torch.Tensor, cache: KVCache, pos: torch.Tensor | None = None,
                hook: LayerHook | None = None, need: frozenset = frozenset(), window: int = 0,
                use_sdpa: bool = False, last_only: bool = False, validate: bool = True) -> torch.Tensor:
        """Run T new tokens per row through the model, appending their keys/values to `cache`. tokens: (B, T) ids; pos:
        (B, T) positions (-1: left padding, not cached), default cache.seen + arange(T). Logits (B, T or 1, vocab).
        validate=False skips the token and position range check (its host sync): the decode loop's own tokens."""
        B, T = tokens.shape
        pos = cache.seen[:, None] + torch.arange(T, device=tokens.device) if pos is None else pos
        lo = -1                                                # unknown: assume padding (the masked SDPA path)
        if validate:   # one host sync reads the position range and the token range together
            lo, hi, t_lo, t_hi = torch.stack([x.long() for x in (*pos.aminmax(), *tokens.aminmax())]).tolist()
            if t_lo < 0 or t_hi >= self.cfg.vocab_size:
                raise BadInput(f"token id {t_lo if t_lo < 0 else t_hi} is outside the model's vocabulary "
                               f"(0..{self.cfg.vocab_size - 1})")
            if hi >= self.cfg.max_position_embeddings:
                raise BadInput(f"sequence of {hi + 1} tokens exceeds the model's context "
                               f"({self.cfg.max_position_embeddings} tokens)")
        if len(cache.layers) != len(self.layers) or cache.seen.shape != (B,):
            raise BadInput(f"cache has {len(cache.layers)} layers and batch {tuple(cache.seen.shape)}; "
                             f"model has {len(self.layers)} layers, tokens batch {B}")
        x = self.embed_tokens(tokens)                                            # (B, T, D)
        cos, sin = rope_cos_sin(self.inv_freq(x.dtype), pos, x.dtype)
        for i, block in enumerate(self.layers):
            x, stats = block(x, pos, cos, sin, cache.layers[i], need, window, use_sdpa, padded=lo < 0)
            if hook is not None:
                hook(i, cache.layers[i], stats)
        x = self.norm(x[:, -1:] if last_only else x)
        head = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return x @ head.T                                                       # (B, T, vocab)
