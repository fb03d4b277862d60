"""Prefill and decode over the explicit store: the only place that calls a policy.

  prefill      the prompt through the model with `after_prefill` on every layer as it runs (layer l is compressed
               before layer l+1 is computed), then `after_prompt` once on the whole cache, then the question (if any)
               without eviction. With prefill_pass = "token_by_token" (CORM exact) the prompt runs as decode steps.
  decode_step  one token per row through the model with `after_step` on every layer.
  generate     prefill, then sample and decode_step until max_new_tokens, a stop token or the end of the context."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from minikv.model import Llama
from minikv.policies.full import FullCache
from minikv.store import KVCache
from minikv.checks import check_arguments, check_inputs, check_policy, check_stop_ids, context_room

# Decode room reserved right after prefill when the caller does not say: enough for short answers, small enough
# that a huge max_new_tokens costs nothing up front (the store grows geometrically past it).
RESERVE_CHUNK = 256

# ---- sampling (outside the model, as in nanoGPT / gpt-fast) ---------------------------------------------------
def sample(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token per row from logits (B, vocab): greedy at temperature 0, else nucleus sampling."""
    if temperature == 0:
        return logits.argmax(-1)
    # Shifted by the max and in float64, any finite temperature > 0 works: a tiny one sends the others to -inf
    # (instead of inf - inf = NaN, or a float32 temperature that rounds to 0), a huge one gives a uniform choice.
    z = logits.double()
    probs = torch.softmax((z - z.amax(-1, keepdim=True)) / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token is always kept).
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)

# ---- batching ----------------------------------------------------------------------------------------------
def left_pad(seqs: list[list[int]], pad_id: int, start: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists into (B, T) ids and (B, T) positions continuing from `start` (B,); padding gets -1."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    pos = torch.full((len(seqs), T), -1, dtype=torch.long)
    for b, s in enumerate(seqs):
        if s:
            ids[b, T - len(s):] = torch.tensor(s)
            pos[b, T - len(s):] = int(start[b]) + torch.arange(len(s))
    return ids.to(device), pos.to(device)

@dataclass
class GenerationResult:
    tokens: list[list[int]]                        # new tokens per row (stop token excluded)
    prompt_tokens: list[int]
    cache_ratio: float                             # live entries / entries of a full cache, averaged
    kv_bytes_live: int
    kv_bytes_allocated: int
    kv_bytes_full: int                             # what the full cache would hold now (same dtype)
    prefill_seconds: float
    decode_seconds: float
    cache: KVCache | None = field(default=None, repr=False)
    policy_report: dict = field(default_factory=dict)
    # True when generation stopped because the context was full, before max_new_tokens and any stop token.
    stopped_at_context: bool = False
    context: int = 0                               # the model's context, in tokens (for the message)

def full_cache_bytes(model: Llama, cache: KVCache) -> int:
    c = model.cfg
    return int(cache.seen.sum()) * c.num_hidden_layers * c.num_key_value_heads * 2 * c.head_dim * \
        model.embed_tokens.weight.element_size()

@torch.no_grad()
def prefill(model: Llama, prompts: list[list[int]], policy=None, question: list[list[int]] | None = None,
            pad_id: int = 0, use_sdpa: bool | None = None, extra_capacity: int = 0):
    """Run the prompts through the model (compressing with `policy`), then the question if given.
    Question-aware use puts the question inside `prompts`; question-agnostic use passes it as `question`, which is
    appended after compression without eviction. Returns (last logits (B, vocab), cache)."""
    policy = FullCache() if policy is None else policy
    check_policy(policy)
    prompts, question = check_inputs(model, prompts, question, pad_id)
    check_arguments(extra_capacity=extra_capacity)
    sdpa = model.dtype != torch.float64 if use_sdpa is None else use_sdpa     # float64 = the oracle: one exact path
    # A cache that keeps everything gets its decode room now, avoiding a reallocation right after prefill.
    # Never more room than the context leaves (a huge request must not allocate what can never be used).
    room = min(extra_capacity, context_room(model, prompts, question))
    evicts = policy.decode_evicts or policy.prefill_needs or policy.prefill_pass != "one_pass"
    cache = model.new_cache(len(prompts), capacity=max(map(len, prompts)) + 1 + (0 if evicts else room))
    cache.set_rows("prompt_len", torch.tensor([len(p) for p in prompts]))
    ids, pos = left_pad(prompts, pad_id, cache.seen, model.device)      # (B, T) each; padding has pos -1
    if policy.prefill_pass == "token_by_token":                         # the prompt as decode steps (CORM exact)
        for j in range(ids.shape[1]):                                    # left-padded rows skip their padding
            logits = decode_step(model, cache, ids[:, j], policy, pos=pos[:, j], use_sdpa=sdpa)
    else:
        logits = model(ids, cache, pos, hook=policy.after_prefill, need=policy.prefill_needs,
                       window=policy.window, use_sdpa=sdpa, last_only=True)[:, -1]
    policy.after_prompt(cache)
    if question:
        ids, pos = left_pad(question, pad_id, cache.seen, model.device)
        logits = model(ids, cache, pos, use_sdpa=sdpa, last_only=True)[:, -1]
    if not policy.decode_evicts:
        cache.reserve(room)                      # a no-op when the room was allocated up front
    return logits, cache

@torch.no_grad()
def generate(model: Llama, prompts: list[list[int]], policy=None, *, max_new_tokens: int = 64,
             temperature: float = 0.0, top_p: float = 1.0, stop_ids: list[int] | None = None,
             question: list[list[int]] | None = None, seed: int | None = None, pad_id: int = 0,
             on_tokens: Callable[[list[int | None]], None] | None = None, use_sdpa: bool | None = None,
             keep_cache: bool = False, reserve_tokens: int | None = None) -> GenerationResult:
    """Generate up to `max_new_tokens` per prompt. Rows that hit a stop token stop growing their cache.
    Generation never runs past the model's context: at most context - (longest prompt) new tokens, and the result's
    `stopped_at_context` says when that limit, not max_new_tokens or a stop token, ended it. The cache reserves room
    for `reserve_tokens` decode entries right after prefill (default: min(max_new_tokens, RESERVE_CHUNK)), never
    more than the context leaves, and grows geometrically beyond that as tokens really arrive."""
    policy = FullCache() if policy is None else policy
    check_policy(policy)
    check_arguments(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens)
    prompts, question = check_inputs(model, prompts, question, pad_id)
    stop = check_stop_ids(model.cfg.eos_ids if stop_ids is None else stop_ids)
    check_arguments(reserve_tokens=reserve_tokens, seed=seed, on_tokens=on_tokens)
    n_steps = min(max_new_tokens, context_room(model, prompts, question))     # the context caps the work
    fed = max(n_steps - 1, 0)          # the last sampled token is never fed back
    reserve = min(max_new_tokens, RESERVE_CHUNK, fed) if reserve_tokens is None else min(reserve_tokens, fed)
    t0 = time.perf_counter()
    logits, cache = prefill(model, prompts, policy, question, pad_id, use_sdpa, reserve)
    _sync(model)
    t1 = time.perf_counter()
    gen = None if seed is None else torch.Generator(device=model.device).manual_seed(seed)
    sampler = lambda lg: sample(lg, temperature, top_p, gen)
    out, done = decode_loop(model, cache, logits, policy, n_steps, sampler, stop, pad_id, on_tokens, use_sdpa)
    _sync(model)
    t2 = time.perf_counter()
    return GenerationResult(
        tokens=out, prompt_tokens=[len(p) for p in prompts], cache_ratio=cache.cache_ratio(),
        kv_bytes_live=cache.nbytes_live(), kv_bytes_allocated=cache.nbytes_allocated(),
        kv_bytes_full=full_cache_bytes(model, cache), prefill_seconds=t1 - t0, decode_seconds=t2 - t1,
        cache=cache if keep_cache else None, policy_report=policy.report(cache),
        stopped_at_context=n_steps < max_new_tokens and not bool(done.all()),
        context=model.cfg.max_position_embeddings)

def decode_loop(model: Llama, cache: KVCache, logits: torch.Tensor, policy, n_steps: int, sampler, stop: set[int],
                pad_id: int, on_tokens, use_sdpa) -> tuple[list[list[int]], torch.Tensor]:
    """Sample a token per row from `logits`, feed it back with decode_step, n_steps times at most.
    Returns (new tokens per row, stop token excluded; (B,) bool: the row hit a stop token)."""
    B = logits.shape[0]
    out: list[list[int]] = [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool, device=model.device)
    for step in range(n_steps):
        nxt = sampler(logits)                                                  # (B,)
        is_stop = torch.tensor([int(t) in stop for t in nxt.tolist()], device=model.device)
        newly = ~done & ~is_stop
        for b in torch.nonzero(newly).flatten().tolist():
            out[b].append(int(nxt[b]))
        if on_tokens is not None:
            on_tokens([int(nxt[b]) if newly[b] else None for b in range(B)])
        done |= is_stop
        if bool(done.all()) or step == n_steps - 1:
            break
        # Finished rows feed a padding token at position -1: nothing is cached for them.
        logits = decode_step(model, cache, torch.where(done, pad_id, nxt), policy,
                             pos=torch.where(done, -1, cache.seen), use_sdpa=use_sdpa)
    return out, done

@torch.no_grad()
def decode_step(model: Llama, cache: KVCache, tokens: torch.Tensor, policy, pos: torch.Tensor | None = None,
                use_sdpa: bool | None = None) -> torch.Tensor:
    """One new token per row through the model, the policy's `after_step` running on every layer; logits (B, vocab).
    tokens: (B,) ids; pos: (B,) absolute positions, default cache.seen (-1 = a finished row: nothing is cached).
    SDPA is used unless the policy needs attention statistics or the model runs in float64 (the oracle path)."""
    sdpa = (model.dtype != torch.float64 if use_sdpa is None else use_sdpa) and not policy.decode_needs
    pos = cache.seen.clone() if pos is None else pos        # a copy: the cache advances `seen` while appending
    return model(tokens.reshape(-1, 1), cache, pos.reshape(-1, 1), hook=policy.after_step, need=policy.decode_needs,
                 window=policy.window, use_sdpa=sdpa)[:, -1]

def _sync(model: Llama) -> None:
    if model.device.type == "cuda":
        torch.cuda.synchronize()
