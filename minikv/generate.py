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
from minikv.errors import BadInput
from minikv.checks import check_arguments, check_inputs, check_policy, check_stop_ids, context_room

RESERVE_CHUNK = 256   # default decode room: enough for short answers; the store grows geometrically past it

# ---- sampling (outside the model, as in nanoGPT / gpt-fast) ---------------------------------------------------
def sample(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token per row from logits (B, vocab): greedy at temperature 0, else nucleus sampling."""
    if temperature == 0:
        return logits.argmax(-1)
    # In float64, shifted by the max, any finite temperature > 0 works (no inf - inf; a huge one is uniform).
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
        ids[b, T - len(s):] = torch.tensor(s)          # (check_prompts refuses an empty row)
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
    stopped_at_context: bool = False               # the context, not max_new_tokens or a stop token, ended it
    context: int = 0                               # the model's context, in tokens (for the message)
    capture_seconds: float = 0.0                   # compiling and capturing, with the first fitted step (in decode)

def full_cache_bytes(cache: KVCache) -> int:
    """Bytes of keys and values a full cache would hold now: every token seen, in every layer and KV head."""
    k = cache.layers[0].k                                                 # (B, Hkv, S, d)
    return int(cache.seen.sum()) * len(cache.layers) * k.shape[1] * 2 * k.shape[-1] * k.element_size()

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
    # Decode room, given with a layer's first allocation; never more than the context leaves (nor allocates).
    room = min(extra_capacity, context_room(model, prompts, question))
    cache = model.new_cache(len(prompts))              # a layer takes its memory when it first runs
    prompt_len = torch.tensor([len(p) for p in prompts], device=model.device)
    for store in cache.layers:
        store.room, store.rows["prompt_len"] = room, prompt_len
    ids, pos = left_pad(prompts, pad_id, cache.seen, model.device)      # (B, T) each; padding has pos -1

    def compress(layer: int, store, stats) -> None:
        policy.after_prefill(layer, store, stats)
        if not store.heads_aligned:   # it evicted: memory back before the next layer runs (one sync), room for step 0
            store.fit(1 if policy.decode_evicts and not question else room)   # (then the decode loop refits it)

    run = lambda c, hook: model(ids, c, pos, hook=hook, need=policy.prefill_needs, window=policy.window,
                                use_sdpa=sdpa, last_only=True)[:, -1]
    if policy.prefill_pass == "statistics_first":      # every layer's statistic, then after_prompt, then compress
        run(model.new_cache(len(prompts)), lambda l, scratch, stats: policy.first_pass(cache.layers[l], scratch, stats))
        policy.after_prompt(cache)                        # (D2O when="prefill": the prompt is run twice)
    if policy.prefill_pass == "token_by_token":                         # the prompt as decode steps (CORM exact)
        for j in range(ids.shape[1]):                                    # left-padded rows skip their padding
            logits = decode_step(model, cache, ids[:, j], policy, pos=pos[:, j], use_sdpa=sdpa)
    else:
        logits = run(cache, compress)
    if policy.prefill_pass != "statistics_first":
        policy.after_prompt(cache)
    if question:
        ids, pos = left_pad(question, pad_id, cache.seen, model.device)
        logits = model(ids, cache, pos, use_sdpa=sdpa, last_only=True)[:, -1]
    return logits, cache

@torch.no_grad()
def generate(model: Llama, prompts: list[list[int]], policy=None, *, max_new_tokens: int = 64,
             temperature: float = 0.0, top_p: float = 1.0, stop_ids: list[int] | None = None,
             question: list[list[int]] | None = None, seed: int | None = None, pad_id: int = 0,
             on_tokens: Callable[[list[int | None]], None] | None = None, use_sdpa: bool | None = None,
             keep_cache: bool = False, reserve_tokens: int | None = None,
             cuda_graph: bool = False, compile: bool = False) -> GenerationResult:
    """Generate up to `max_new_tokens` per prompt; a row that hits a stop token stops growing its cache; nothing runs
    past the context (`stopped_at_context`). The cache has room for `reserve_tokens` decode entries (default
    min(max_new_tokens, RESERVE_CHUNK)) and grows past them. cuda_graph (a CUDA model) and compile: from the second
    step on the cache holds every token left, the step torch.compile'd and/or replayed as a CUDA graph (decode_loop)."""
    policy = FullCache() if policy is None else policy          # (prefill checks it)
    check_arguments(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                    reserve_tokens=reserve_tokens, seed=seed, on_tokens=on_tokens)
    prompts, question = check_inputs(model, prompts, question, pad_id)
    stop = check_stop_ids(model.cfg.eos_ids if stop_ids is None else stop_ids)
    if cuda_graph and model.device.type != "cuda":
        raise BadInput(f"cuda_graph needs the model on a CUDA device; it is on {model.device}")
    n_steps = min(max_new_tokens, context_room(model, prompts, question))     # the context caps the work
    fed = max(n_steps - 1, 0)          # the last sampled token is never fed back
    reserve = min(max_new_tokens, RESERVE_CHUNK, fed) if reserve_tokens is None else min(reserve_tokens, fed)
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
    clock = lambda: (sync(), time.perf_counter())[1]          # honest wall times: the queued GPU work finished
    t0 = clock()
    logits, cache = prefill(model, prompts, policy, question, pad_id, use_sdpa, reserve)
    t1 = clock()
    gen = None if seed is None else torch.Generator(device=model.device).manual_seed(seed)
    sampler = lambda lg: sample(lg, temperature, top_p, gen)
    out, all_stopped, capture_s = decode_loop(model, cache, logits, policy, n_steps, sampler, stop, pad_id, on_tokens,
                                       use_sdpa, cuda_graph, reserve, compile)
    t2 = clock()
    return GenerationResult(
        tokens=out, prompt_tokens=[len(p) for p in prompts], cache_ratio=cache.cache_ratio(),
        kv_bytes_live=cache.nbytes_live(), kv_bytes_allocated=cache.nbytes_allocated(),
        kv_bytes_full=full_cache_bytes(cache), prefill_seconds=t1 - t0, decode_seconds=t2 - t1,
        cache=cache if keep_cache else None, policy_report=policy.report(cache),
        stopped_at_context=n_steps < max_new_tokens and not all_stopped,
        context=model.cfg.max_position_embeddings, capture_seconds=capture_s)

def decode_loop(model: Llama, cache: KVCache, logits: torch.Tensor, policy, n_steps: int, sampler, stop: set[int],
                pad_id: int, on_tokens, use_sdpa, cuda_graph: bool = False, reserve: int = RESERVE_CHUNK,
                compile: bool = False):
    """Sample a token per row from `logits`, feed it back with decode_step, n_steps times at most; from the second
    step on (D2O compresses at the first) through fixed_capacity_step. No host sync but the tokens' read.
    Returns (new tokens per row, stop token excluded; whether every row hit a stop token; capture seconds)."""
    B, capture_s = logits.shape[0], 0.0
    out: list[list[int]] = [[] for _ in range(B)]
    finished, done = [False] * B, torch.zeros(B, dtype=torch.bool, device=model.device)
    stop_ids = torch.tensor(sorted(stop), dtype=torch.long, device=model.device)
    step_fn = lambda tokens, pos: decode_step(model, cache, tokens, policy, pos, use_sdpa, validate=False)
    for step in range(n_steps):
        nxt = sampler(logits)                                                  # (B,)
        done |= torch.isin(nxt, stop_ids)
        if step < n_steps - 1:   # the next step is queued before the host reads this one's tokens (no GPU idling)
            # Finished rows feed a padding token at position -1: nothing is cached for them.
            tokens, pos = torch.where(done, pad_id, nxt), torch.where(done, -1, cache.seen)
            if step == 1:
                step_fn, logits, capture_s = fixed_capacity_step(model, cache, policy, use_sdpa, n_steps - 2, tokens,
                                                                 pos, cuda_graph, reserve, compile)
            else:
                logits = step_fn(tokens, pos)
        new = [None if f or t in stop else t for f, t in zip(finished, nxt.tolist())]   # the step's one sync
        for b in (b for b in range(B) if new[b] is not None):
            out[b].append(new[b])
        if on_tokens is not None:
            on_tokens(new)
        finished = [f or t is None for f, t in zip(finished, new)]
        if all(finished):        # the step queued for it fed padding alone: nothing was cached
            break
    for layer in cache.layers:   # a fixed decode kept no host-side bound: the next append re-reads the lengths
        layer.fixed, layer.max_len_bound = False, layer.capacity
    return out, all(finished), capture_s

def fixed_capacity_step(model: Llama, cache: KVCache, policy, use_sdpa, left: int, tokens: torch.Tensor,
                        pos: torch.Tensor, cuda_graph: bool = False, reserve: int = RESERVE_CHUNK, compile=False):
    """Fit the cache to the `left` tokens still to feed (plain eager: at most `reserve`, then it grows if it must),
    run the first, tokens and pos (B,); return (step(tokens, pos) -> logits, its logits, seconds compiling and capturing
    with that step). compile: torch.compile'd; cuda_graph: then recorded over the cache's tensors and replayed."""
    fixed = cuda_graph or compile       # room for every token left: no host-side bound to guard on or sync for
    cache.fit(left if fixed else min(left, reserve), fixed)
    step = lambda tokens, pos: decode_step(model, cache, tokens, policy, pos, use_sdpa, validate=False)
    # inductor's reorder_for_locality put attention's P @ V after d2o's merge, which then copied whole stores
    step = torch.compile(step, dynamic=False, options={"reorder_for_locality": False}) if compile else step
    t0 = time.perf_counter()
    logits = step(tokens, pos)
    if not cuda_graph:
        return step, logits, time.perf_counter() - t0 if compile else 0.0
    static_tokens, static_pos = tokens.clone(), pos.clone()                   # (B,) inputs of every replay
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_logits = step(static_tokens, static_pos)
    replay = lambda new_tokens, new_pos: (static_tokens.copy_(new_tokens), static_pos.copy_(new_pos), graph.replay(),
                                          static_logits)[-1]          # the inputs copied in, the graph replayed
    return replay, logits, time.perf_counter() - t0

@torch.no_grad()
def decode_step(model: Llama, cache: KVCache, tokens: torch.Tensor, policy, pos: torch.Tensor | None = None,
                use_sdpa: bool | None = None, validate: bool = True) -> torch.Tensor:
    """One new token per row through the model, the policy's `after_step` on every layer; logits (B, vocab). tokens:
    (B,) ids; pos: (B,) positions, default cache.seen (-1: a finished row, nothing cached). SDPA unless the policy needs
    statistics or the model is float64 (the oracle); validate=False skips the token check, the one host sync."""
    sdpa = (model.dtype != torch.float64 if use_sdpa is None else use_sdpa) and not policy.decode_needs
    pos = cache.seen.clone() if pos is None else pos        # a copy: the cache advances `seen` while appending
    return model(tokens.reshape(-1, 1), cache, pos.reshape(-1, 1), hook=policy.after_step, need=policy.decode_needs,
                 window=policy.window, use_sdpa=sdpa, validate=validate)[:, -1]
