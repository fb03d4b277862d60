"""What every policy shares: the hook interface the generation loop calls, and budget resolution.

A policy declares which attention statistics it needs (`prefill_needs`, `decode_needs`: subsets of
{"colsum", "last_rows", "probs"}) so the model computes nothing else, and implements
  after_prefill(layer, store, stats)   compression of one layer's prompt cache, right after that layer ran
  after_prompt(cache)                  once on the whole cache after the prompt (what needs every layer: D2O)
  after_step(layer, store, stats)      decode-time compression of one layer after each generated token
A per-layer hook touches only its own layer. A policy is a configuration (budget, options): whatever it decides
per sequence lives in the cache (`LayerStore.rows`), so one policy object serves any number of runs and batches."""
from __future__ import annotations

import inspect
import math
from numbers import Real

import torch

from minikv.budgets import Budget, parse_budget
from minikv.errors import BadInput, is_int
from minikv.store import KVCache, LayerStore

class Policy:
    name = "base"
    summary = ""               # one line for `minikv policies`, distinct for each policy
    takes_budget = True        # True: a budget is required; False: refused (keeps everything, or sizes its own)
    prefill_needs: frozenset = frozenset()
    decode_needs: frozenset = frozenset()
    window = 0                 # rows of the last queries needed as "last_rows"
    decode_evicts = False      # True when decode steps evict (prefill then reserves no decode room)
    prefill_pass = "one_pass"  # or "token_by_token": the prompt as decode steps (after_step, not after_prefill)

    def __init__(self, budget=None):
        self.budget: Budget | None = parse_budget(budget)
        if self.takes_budget and self.budget is None:
            raise BadInput(f"{self.name} needs a budget (a count like 512 or a ratio like 0.2)")

    def budget_entries(self, store: LayerStore) -> torch.Tensor | None:
        """(B,) entries per (layer, head) for each row, or None for no budget (keep everything); kept beside the rows."""
        if self.budget is not None and "budget" not in store.rows:   # once per layer: a decode step only reads it
            store.rows["budget"] = self.budget.entries(store.rows["prompt_len"])
        return store.rows.get("budget")

    def after_prefill(self, layer: int, store: LayerStore, stats: dict) -> None:
        pass

    def after_prompt(self, cache: KVCache) -> None:
        pass

    def after_step(self, layer: int, store: LayerStore, stats: dict) -> None:
        pass

    def report(self, cache: KVCache | None = None) -> dict:
        """The options, and per layer what the policy decided for each row of `cache` (its per-row state)."""
        r = {"policy": self.name, "budget": None if self.budget is None else str(self.budget)}
        r.update({name: getattr(self, name) for name in policy_options(type(self))})
        if cache is not None:
            r["layers"] = [{"layer": l, "entries": s.length.tolist(), **{k: v.tolist() for k, v in s.rows.items()}}
                           for l, s in enumerate(cache.layers)]
        return r

# ---- option checking: every constructor validates its options through these, so messages read alike ----------
def _range_text(lo, hi) -> str:
    """' >= 1', ' in [0, 1]', or '' for an unbounded option."""
    return (f" in [{lo}, {hi}]" if lo is not None and hi is not None else f" >= {lo}" if lo is not None
            else f" <= {hi}" if hi is not None else "")

def _label(policy: str, name: str, what: str) -> str:
    return f"{policy}: {name}" + (f" ({what})" if what else "")

def int_option(policy: str, name: str, value, lo: int | None = None, hi: int | None = None, what: str = "") -> int:
    """`value` as an integer option of `policy`; a bool, a float (2.5 or 2.0) or a string is refused, naming it."""
    if not is_int(value):
        raise BadInput(f"{_label(policy, name, what)} must be an integer{_range_text(lo, hi)}, "
                       f"got {value!r} ({type(value).__name__})")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise BadInput(f"{_label(policy, name, what)} must be{_range_text(lo, hi)}, got {value!r}")
    return int(value)

def float_option(policy: str, name: str, value, lo: float | None = None, hi: float | None = None, what="") -> float:
    """`value` as a finite real option of `policy` (an int is fine, a bool or a string is not), within [lo, hi]."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise BadInput(f"{_label(policy, name, what)} must be a number{_range_text(lo, hi)}, "
                       f"got {value!r} ({type(value).__name__})")
    if not math.isfinite(value) or (lo is not None and value < lo) or (hi is not None and value > hi):
        raise BadInput(f"{_label(policy, name, what)} must be a finite number{_range_text(lo, hi)}, got {value!r}")
    return float(value)

def choice_option(policy: str, name: str, value, choices: tuple[str, ...], what: str = "") -> str:
    """`value` as one of the named `choices` of `policy`."""
    if not isinstance(value, str) or value not in choices:
        raise BadInput(f"{_label(policy, name, what)} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value

def policy_options(cls: type[Policy]) -> dict[str, object]:
    """A policy class's options and their defaults, read from its constructor (the budget is not an option)."""
    params = inspect.signature(cls.__init__).parameters
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {n: p.default for n, p in params.items() if n not in ("self", "budget") and p.kind in kinds}
