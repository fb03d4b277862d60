"""What every policy shares: the hook interface the generation loop calls, and budget resolution.

A policy declares which attention statistics it needs (`prefill_needs`, `decode_needs`: subsets of
{"colsum", "last_rows", "probs"}) so the model computes nothing else, and implements
  after_prefill(layer, store, stats)   one-shot compression of the prompt's cache
  after_step(layer, store, stats)      decode-time compression after each generated token
Per-sequence state (budgets, thresholds) is set in `start` and reset for every new batch of prompts.
"""
from __future__ import annotations

import copy
import inspect
import math
from numbers import Integral, Real

import torch

from minikv.budgets import Budget, parse_budget
from minikv.errors import BadInput
from minikv.store import LayerStore


class Policy:
    name = "base"
    summary = ""               # one line for `minikv policies`, distinct for each policy
    takes_budget = True        # False: the policy refuses a budget (it keeps everything, or sizes its own cache)
    budget_note = ""           # how the policy spreads its budget, appended to the reading (", on average ...")
    # Per-row state: attribute -> its batch dimension. Prefill in row groups runs one copy of the policy per group
    # and joins them with `concat_rows`, which concatenates exactly these attributes.
    row_state: dict[str, int] = {"prompt_lengths": 0}
    prefill_needs: frozenset = frozenset()
    decode_needs: frozenset = frozenset()
    window = 0                 # rows of the last queries needed as "last_rows"
    decode_evicts = False      # True when the cache keeps a fixed size during decoding

    def __init__(self, budget=None):
        self.budget: Budget | None = parse_budget(budget)

    def start(self, cfg, batch: int, prompt_lengths: list[int]) -> None:
        """Called once per batch of prompts, before prefill."""
        self.cfg = cfg
        self.n_layers = cfg.num_hidden_layers
        self.prompt_lengths = torch.tensor(prompt_lengths, dtype=torch.long)
        self.layer_log: dict[int, dict] = {}

    def budget_entries(self, device) -> torch.Tensor | None:
        """(B,) entries per (layer, head) for each row, or None for no budget (keep everything)."""
        if self.budget is None:
            return None
        return self.budget.entries(self.prompt_lengths).to(device)

    def after_prefill(self, layer: int, store: LayerStore, stats: dict) -> None:
        pass

    def after_step(self, layer: int, store: LayerStore, stats: dict) -> None:
        pass

    @classmethod
    def concat_rows(cls, parts: list["Policy"]) -> "Policy":
        """One policy for the rows of several started copies (in order), concatenating every `row_state` tensor."""
        joined = copy.copy(parts[0])
        for name, dim in cls.row_state.items():
            values = [getattr(p, name) for p in parts]
            setattr(joined, name, None if values[0] is None else torch.cat(values, dim=dim))
        return joined

    def budget_reading(self) -> str:
        """One line saying how the budget was read (printed by `minikv generate` and `minikv trace`)."""
        if self.budget is None:
            return f"no budget: {self.name} sizes its cache without one"
        return self.budget.describe() + self.budget_note

    def report(self) -> dict:
        """What the policy decided (per-layer budgets, thresholds, ...), for printing and records."""
        return {"policy": self.name, "budget": None if self.budget is None else str(self.budget)}

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(budget={self.budget})"


def apply_keep(store: LayerStore, keep: torch.Tensor) -> bool:
    """Compact the store to `keep` unless it keeps every live entry (no reallocation then). Returns True if evicted."""
    if bool((keep | ~store.valid).all()):
        return False
    store.keep(keep)
    return True


# ---- option checking: every constructor validates its options through these, so messages read alike ----------
def _range_text(lo, hi) -> str:
    """' >= 1', ' in [0, 1]', or '' for an unbounded option."""
    if lo is not None and hi is not None:
        return f" in [{lo}, {hi}]"
    if lo is not None:
        return f" >= {lo}"
    return f" <= {hi}" if hi is not None else ""


def _label(policy: str, name: str, what: str) -> str:
    return f"{policy}: {name}" + (f" ({what})" if what else "")


def int_option(policy: str, name: str, value, lo: int | None = None, hi: int | None = None, what: str = "") -> int:
    """`value` as an integer option of `policy`; a bool, a float (2.5 or 2.0) or a string is refused, naming it."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise BadInput(f"{_label(policy, name, what)} must be an integer{_range_text(lo, hi)}, "
                       f"got {value!r} ({type(value).__name__})")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise BadInput(f"{_label(policy, name, what)} must be{_range_text(lo, hi)}, got {value!r}")
    return int(value)


def float_option(policy: str, name: str, value, lo: float | None = None, hi: float | None = None,
                 what: str = "") -> float:
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
