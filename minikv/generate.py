"""Prefill and decode over the explicit store: the only place that calls a policy.

  prefill      the prompt through the model with `after_prefill` on every layer as it runs (layer l is compressed
               before layer l+1 is computed, which keeps the prefill peak low), then `after_prompt` once on the whole
               cache, then the question (if any) without eviction. A policy that declares
               prefill_pass = "token_by_token" (CORM's exact mode) gets the prompt as decode steps instead.
  decode_step  one token per row through the model with `after_step` on every layer.
  generate     prefill, then sample and decode_step until max_new_tokens, a stop token or the end of the context."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from numbers import Integral, Real
from typing import Callable

import torch

from minikv.model import Llama
from minikv.policies.full import FullCache
from minikv.store import KVCache
from minikv.errors import BadInput


# Decode room reserved right after prefill when the caller does not say: enough for short answers, small enough
# that a huge max_new_tokens costs nothing up front (the store grows geometrically past it).
RESERVE_CHUNK = 256


# ---- checking the caller's input (every refusal names the value) -----------------------------------------------
def _is_int(x) -> bool:
    return isinstance(x, Integral) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, Real) and not isinstance(x, bool)


def _short(x) -> str:
    """repr(x), cut to 60 characters."""
    r = repr(x)
    return r if len(r) <= 60 else r[:57] + "..."


# Keyword argument -> (accepted?, what it must be); a refusal reads "<name> must be <what>, got <value>".
ARGUMENTS = {
    "temperature": (lambda x: _is_real(x) and math.isfinite(x) and x >= 0, "a finite number >= 0 (0 = greedy)"),
    "top_p": (lambda x: _is_real(x) and 0 < x <= 1, "a number in (0, 1]"),
    "max_new_tokens": (lambda x: _is_int(x) and x >= 0, "a non-negative integer"),
    "extra_capacity": (lambda x: _is_int(x) and x >= 0, "an integer >= 0"),
    "reserve_tokens": (lambda x: x is None or _is_int(x) and x >= 0, "an integer >= 0 or None"),
    "seed": (lambda x: x is None or _is_int(x) and 0 <= x < 2 ** 64, "an integer in 0..2**64-1 or None"),
    "on_tokens": (lambda x: x is None or callable(x), "a callable or None"),
}


def check_arguments(**values) -> None:
    """Refuse any keyword argument that ARGUMENTS does not accept, naming it and its value."""
    for name, value in values.items():
        accepted, what = ARGUMENTS[name]
        if not accepted(value):
            raise BadInput(f"{name} must be {what}, got {_short(value)}")


def check_token_row(row, vocab_size: int, name: str) -> list[int]:
    """One prompt: a non-empty list of token ids in [0, vocab_size), as a list of ints."""
    if isinstance(row, torch.Tensor) and row.dim() == 1 and not row.is_floating_point():
        row = row.tolist()
    if _is_int(row):
        raise BadInput(f"{name} is {row!r}, a single token id; pass one list per prompt, e.g. [[1, 2, 3]]")
    if not isinstance(row, (list, tuple)):
        raise BadInput(f"{name} must be a list of token ids, got {type(row).__name__} {_short(row)}")
    if not row:
        raise BadInput(f"{name} is empty: every prompt must hold at least one token")
    bad = next((j for j, t in enumerate(row) if type(t) is not int and not _is_int(t)), None)
    if bad is not None:
        raise BadInput(f"{name}[{bad}] = {_short(row[bad])} is not a token id (an integer)")
    row = [int(t) for t in row]
    lo, hi = min(row), max(row)
    if lo < 0 or hi >= vocab_size:
        j = row.index(lo if lo < 0 else hi)
        raise BadInput(f"{name}[{j}] = {row[j]} is outside the model's vocabulary (0..{vocab_size - 1})")
    return list(row)


def check_prompts(prompts, vocab_size: int, name: str = "prompts") -> list[list[int]]:
    """A non-empty list of prompts, each a non-empty list of token ids in the vocabulary; anything else is refused."""
    if isinstance(prompts, torch.Tensor) and prompts.dim() == 2 and not prompts.is_floating_point():
        prompts = prompts.tolist()
    if isinstance(prompts, (str, bytes)):
        raise BadInput(f"{name} must be a list of token-id lists, got the text {_short(prompts)}; "
                       f"encode it with the tokenizer first, e.g. [tokenizer.encode(text)]")
    if not isinstance(prompts, (list, tuple)):
        raise BadInput(f"{name} must be a list of token-id lists (e.g. [[1, 2, 3]]), got "
                       f"{type(prompts).__name__} {_short(prompts)}")
    if not prompts:
        raise BadInput(f"{name} is an empty list: give at least one token-id list")
    return [check_token_row(row, vocab_size, f"{name}[{b}]") for b, row in enumerate(prompts)]


def check_policy(policy) -> None:
    """Refuse something that is not a policy object (a name, a class), pointing at get_policy."""
    hooks = ("after_prefill", "after_prompt", "after_step")
    if isinstance(policy, type) or not all(callable(getattr(policy, h, None)) for h in hooks):
        raise BadInput(f"policy must be a policy object such as get_policy('h2o', 0.2), got "
                       f"{type(policy).__name__} {_short(policy)}")


def check_inputs(model: Llama, prompts, question, pad_id) -> tuple[list[list[int]], list[list[int]] | None]:
    """Prompts and question (None, or one non-empty list per prompt) as token-id lists that fit the context."""
    vocab = model.cfg.vocab_size
    prompts = check_prompts(prompts, vocab)
    if question is not None:
        question = check_prompts(question, vocab, "question")
        if len(question) != len(prompts):
            raise BadInput(f"question has {len(question)} rows for {len(prompts)} prompts: give one per prompt")
    if not _is_int(pad_id) or not 0 <= pad_id < vocab:
        raise BadInput(f"pad_id must be a token id in 0..{vocab - 1}, got {pad_id!r}")
    room, context = context_room(model, prompts, question), model.cfg.max_position_embeddings
    if room < 0:
        raise BadInput(f"prompt of {context - room} tokens is longer than the model's context ({context} tokens)")
    return prompts, question


def check_stop_ids(stop_ids) -> set[int]:
    """Stop token ids as a set of ints (a list, tuple or set; an empty one never stops early)."""
    if isinstance(stop_ids, (str, bytes)) or not isinstance(stop_ids, (list, tuple, set, frozenset)) \
            or not all(_is_int(t) for t in stop_ids):
        raise BadInput(f"stop_ids must be a list of token ids (integers) or None, got {_short(stop_ids)}")
    return {int(t) for t in stop_ids}


def context_room(model: Llama, prompts: list[list[int]], question: list[list[int]] | None) -> int:
    """New tokens that fit after the longest prompt (+ question) inside the model's context."""
    longest = max(len(p) + (len(question[b]) if question else 0) for b, p in enumerate(prompts))
    return model.cfg.max_position_embeddings - longest


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
    sdpa = _sdpa_default(model) if use_sdpa is None else use_sdpa
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
                       window=policy.window, use_sdpa=sdpa and not policy.prefill_needs, last_only=True)[:, -1]
    policy.after_prompt(cache)
    if question:
        ids, pos = left_pad(question, pad_id, cache.seen, model.device)
        logits = model(ids, cache, pos, use_sdpa=sdpa, last_only=True)[:, -1]
    if not policy.decode_evicts:
        cache.reserve(room)                      # a no-op when the room was allocated up front
    return logits, cache


def _sdpa_default(model: Llama) -> bool:
    """Fused SDPA when no policy needs probabilities, except in float64 oracle mode (one code path, exact)."""
    return model.dtype != torch.float64


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
    sdpa = (_sdpa_default(model) if use_sdpa is None else use_sdpa) and not policy.decode_needs
    pos = cache.seen.clone() if pos is None else pos        # a copy: the cache advances `seen` while appending
    return model(tokens.reshape(-1, 1), cache, pos.reshape(-1, 1), hook=policy.after_step, need=policy.decode_needs,
                 window=policy.window, use_sdpa=sdpa)[:, -1]


def _sync(model: Llama) -> None:
    if model.device.type == "cuda":
        torch.cuda.synchronize()
