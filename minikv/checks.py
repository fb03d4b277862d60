"""Checks of what a caller hands to prefill / generate: prompts, token ids, sampling and keyword arguments.

Every refusal is a BadInput that names the argument and the value, so a wrong call fails at the door with a message
instead of deep inside the model (an IndexError from the embedding, a NaN from the sampler, a huge allocation)."""
from __future__ import annotations

import math
from numbers import Real

import torch

from minikv.errors import BadInput, is_int
from minikv.model import Llama

def _is_real(x) -> bool:
    return isinstance(x, Real) and not isinstance(x, bool)

def _short(x) -> str:          # repr(x), cut to 60 characters
    return r[:57] + "..." if len(r := repr(x)) > 60 else r

# Keyword argument -> (accepted?, what it must be); a refusal reads "<name> must be <what>, got <value>".
ARGUMENTS = {
    "temperature": (lambda x: _is_real(x) and math.isfinite(x) and x >= 0, "a finite number >= 0 (0 = greedy)"),
    "top_p": (lambda x: _is_real(x) and 0 < x <= 1, "a number in (0, 1]"),
    "max_new_tokens": (lambda x: is_int(x) and x >= 0, "a non-negative integer"),
    "extra_capacity": (lambda x: is_int(x) and x >= 0, "an integer >= 0"),
    "reserve_tokens": (lambda x: x is None or is_int(x) and x >= 0, "an integer >= 0 or None"),
    "seed": (lambda x: x is None or is_int(x) and 0 <= x < 2 ** 64, "an integer in 0..2**64-1 or None"),
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
    if is_int(row):
        raise BadInput(f"{name} is {row!r}, a single token id; pass one list per prompt, e.g. [[1, 2, 3]]")
    if not isinstance(row, (list, tuple)) or not row:
        raise BadInput(f"{name} is empty: every prompt must hold at least one token" if isinstance(row, (list, tuple))
                       else f"{name} must be a list of token ids, got {type(row).__name__} {_short(row)}")
    for j, t in enumerate(row):
        if not is_int(t):
            raise BadInput(f"{name}[{j}] = {_short(t)} is not a token id (an integer)")
        if not 0 <= t < vocab_size:
            raise BadInput(f"{name}[{j}] = {t} is outside the model's vocabulary (0..{vocab_size - 1})")
    return [int(t) for t in row]

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
    if not is_int(pad_id) or not 0 <= pad_id < vocab:
        raise BadInput(f"pad_id must be a token id in 0..{vocab - 1}, got {pad_id!r}")
    room, context = context_room(model, prompts, question), model.cfg.max_position_embeddings
    if room < 0:
        raise BadInput(f"prompt of {context - room} tokens is longer than the model's context ({context} tokens)")
    return prompts, question

def check_stop_ids(stop_ids) -> set[int]:
    """Stop token ids as a set of ints (a list, tuple or set; an empty one never stops early)."""
    if isinstance(stop_ids, (str, bytes)) or not isinstance(stop_ids, (list, tuple, set, frozenset)) \
            or not all(is_int(t) for t in stop_ids):
        raise BadInput(f"stop_ids must be a list of token ids (integers) or None, got {_short(stop_ids)}")
    return {int(t) for t in stop_ids}

def context_room(model: Llama, prompts: list[list[int]], question: list[list[int]] | None) -> int:
    """New tokens that fit after the longest prompt (+ question) inside the model's context."""
    longest = max(len(p) + (len(question[b]) if question else 0) for b, p in enumerate(prompts))
    return model.cfg.max_position_embeddings - longest
