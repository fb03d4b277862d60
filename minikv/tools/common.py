"""What the `minikv` subcommands share: argument types and groups, option parsing, loading the model, run notes,
the markdown table renderer, matplotlib and the progress display."""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

from minikv.budgets import parse_budget
from minikv.errors import BadInput, MissingExtra
from minikv.io import require
from minikv.io.checkpoint import load_model, resolve_device
from minikv.io.convert import ensure_default_model
from minikv.io.tokenizer import load_tokenizer
from minikv.policies import get_policy

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}

def _checked(cast, ok, want: str):
    """An argparse type: a bad value is refused at parse time, naming it (argparse prints one line)."""
    def parse(text: str):
        try:
            value = cast(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}")
        return value
    return parse

count_arg = _checked(int, lambda v: v >= 0, "a whole number >= 0")
seed_arg = _checked(int, lambda v: 0 <= v < 2 ** 64, "a whole number in 0..2**64-1")      # what torch.Generator takes
temperature_arg = _checked(float, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0 (0 = greedy)")
top_p_arg = _checked(float, lambda v: 0 < v <= 1, "a number in (0, 1]")
prompt_arg = _checked(str, bool, "at least one character (the prompt is empty)")

def budget_arg(text: str) -> str:
    """The budget as written, checked now (a count or a ratio) so a typo fails before the model loads."""
    try:
        parse_budget(text)
    except BadInput as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text

def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="Hugging Face Llama folder (default: the embedded SmolLM2-135M)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda, cuda:N or mps (default: cuda when available)")

def add_policy_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--policy", default="full", help="cache policy (minikv policies lists them)")
    p.add_argument("--budget", default=None, type=budget_arg,
                   help="entries per (layer, KV head): a count (512) or a ratio with a decimal point (0.2)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="policy option, e.g. --option window=16 (repeatable; a,b,c gives a list)")

def parse_value(text: str):
    """One option value: true/false -> bool, none/null -> None, an int, a float, a,b,c or [a,b] -> a list, else text."""
    low = text.strip().lower()
    if low in ("true", "false", "none", "null"):
        return {"true": True, "false": False}.get(low)
    bracketed = text.startswith("[") and text.endswith("]")
    if bracketed or "," in text:
        items = [item.strip() for item in (text[1:-1] if bracketed else text).split(",")]
        require("" not in items or items == [""], f"list value {text!r} has an empty item; write e.g. 0,1,29")
        return [parse_value(item) for item in items if item]
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text

def parse_options(pairs: list[str]) -> dict:
    """KEY=VALUE strings -> dict (values through parse_value); a malformed pair or a key given twice is refused."""
    out = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        key = key.strip()
        problem = ("is not KEY=VALUE (e.g. --option window=16)" if not eq else
                   "has an empty key; write KEY=VALUE (e.g. --option window=16)" if not key else
                   "has an empty value; write KEY=VALUE (an empty list is KEY=[])" if not value.strip() else None)
        require(not problem, f"--option {pair!r} {problem}")
        if key in out:
            raise BadInput(f"--option {key!r} is given twice ({key}={out[key]!r} and {pair!r}); give it once")
        out[key] = parse_value(value)
    return out

def spec_words(text: str) -> list[str]:
    """A policy spec's words, split at spaces or colons (every command takes both): 'd2o:when=prefill'."""
    return text.replace(":", " ").split() or [""]

def policy_spec(text: str):
    """'POLICY [BUDGET] [KEY=VALUE ...]' (spec_words; 'snapkv 0.2 kernel=7') -> the policy; BadInput names a bad part."""
    name, *rest = spec_words(text)
    budget = " ".join(w for w in rest if "=" not in w) or None         # two budgets: refused as one bad budget
    return get_policy(name, budget, **parse_options([w for w in rest if "=" in w]))

def make_policy(args):
    return get_policy(args.policy, args.budget, **parse_options(args.option))

def load_model_and_tokenizer(args):
    """The model and tokenizer named by --model, fetching the default model when it is missing."""
    device = resolve_device(args.device)             # before any file is read: a missing GPU fails fast
    folder = ensure_default_model() if args.model is None else Path(args.model)
    return load_model(folder, dtype=DTYPES[args.dtype], device=device), load_tokenizer(folder)

def format_rows(rows: list[dict], keys: list[str] | None = None, digits: int = 4) -> str:
    """A markdown table from dicts (columns: `keys`, default the first row's keys); floats to `digits` figures."""
    if not rows and keys is None:
        return "(no rows)"
    keys, fmt = keys or list(rows[0]), (lambda v: f"{v:.{digits}g}" if isinstance(v, float) else str(v))
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)

# How each policy spreads its budget, appended to the budget reading.
BUDGET_NOTES = {"d2o": ", on average over layers (weighted by attention variance)",
                "pyramidkv": ", on average over layers (deeper layers get less)",
                "adakv-snapkv": ", on average over the heads of a layer",
                "adakv-pyramidkv": ", on average over layers and heads",
                "adakv-h2o": ", on average over the heads of a layer"}

def describe_budget(budget) -> str:
    """How a budget was read, e.g. 'budget 0.2 = 20% of each prompt's tokens per (layer, KV head)'."""
    return (f"budget {budget} = {budget.value * 100:.4g}% of each prompt's tokens per (layer, KV head)" if budget.is_ratio
            else f"budget {budget} = {budget.value} entr{'y' if budget.value == 1 else 'ies'} per (layer, KV head)")

def print_run_notes(policy, res, max_new_tokens: int) -> None:
    """On stderr, after the run (so a refusal during prefill stays the only stderr line): how the policy read its
    budget and, when generation stopped at the model's context, a line saying so."""
    reading = ("no budget: the full cache keeps every entry" if policy.name == "full" else
               f"no budget: corm's cache size follows from w={policy.w} and r={policy.r}" if policy.name == "corm" else
               f"no budget: {policy.name} sizes its cache without one" if policy.budget is None else
               describe_budget(policy.budget) + BUDGET_NOTES.get(policy.name, ""))
    print(reading, file=sys.stderr)
    if res.stopped_at_context:
        print(f"stopped at the model's context ({res.context} tokens): prompt {res.prompt_tokens[0]} + "
              f"{len(res.tokens[0])} generated tokens, of the {max_new_tokens} asked for", file=sys.stderr)

def result_summary(res) -> str:
    """A GenerationResult's cache ratio, KV bytes and timings (compiling/capturing inside the decode) on one line."""
    mib, cap = 1 << 20, f" ({res.capture_seconds:.2f}s compiling/capturing)" if res.capture_seconds else ""
    return (f"cache ratio {res.cache_ratio:.3f} | KV live {res.kv_bytes_live / mib:.2f} MiB, "
            f"allocated {res.kv_bytes_allocated / mib:.2f} MiB, full cache {res.kv_bytes_full / mib:.2f} MiB | "
            f"prefill {res.prefill_seconds:.2f}s, decode {sum(map(len, res.tokens))} tok in {res.decode_seconds:.2f}s"
            + cap)

def pyplot():
    """matplotlib.pyplot on the Agg backend, or MissingExtra naming how to install it."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MissingExtra("plots need matplotlib: pip install matplotlib (or pip install minikv[plot])") from None
    return plt

def save_figure(fig, plt, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")   # keeps a legend placed beside the axes
    plt.close(fig)
    return path

def duration(seconds: float) -> str:
    """'7s', '3m05s', '2h14m'."""
    s = int(seconds)
    return f"{s}s" if s < 60 else f"{s // 60}m{s % 60:02d}s" if s < 3600 else f"{s // 3600}h{s % 3600 // 60:02d}m"

class Counter:
    """tqdm's stand-in on stderr: done/total, elapsed and time left; rewritten in place on a terminal, else one line."""

    def __init__(self, total: int, initial: int, desc: str):
        self.n, self.total, self.desc, self.initial, self.note = initial, total, desc, initial, ""
        self.start = time.perf_counter()
        self.update(0)

    def set_postfix_str(self, s: str) -> None:
        self.note = s

    def update(self, k: int = 1) -> None:
        self.n += k
        elapsed, ran = time.perf_counter() - self.start, self.n - self.initial
        left = f", ~{duration(elapsed / ran * (self.total - self.n))} left" if ran else ""
        text = f"{self.desc}: {self.n}/{self.total} [{duration(elapsed)}{left}] {self.note}".rstrip()
        tty = sys.stderr.isatty()                     # \x1b[K: erase the longer old line
        print(f"\r{text}\x1b[K" if tty else text, end="" if tty else "\n", file=sys.stderr, flush=True)

    def write(self, line: str, file=None) -> None:
        print(line, file=file or sys.stderr)

    def close(self) -> None:
        if sys.stderr.isatty():
            print(file=sys.stderr)

def progress_bar(total: int, initial: int, desc: str, enabled: bool = True):
    """tqdm when installed, else a plain stderr Counter (None when disabled)."""
    if not enabled:
        return None
    try:
        from tqdm import tqdm
        return tqdm(total=total, initial=initial, desc=desc, file=sys.stderr, dynamic_ncols=True)
    except ImportError:
        return Counter(total, initial, desc)

def note(bar, line: str) -> None:
    """One line on stderr that does not garble the progress bar."""
    (print if bar is None else bar.write)(line, file=sys.stderr)
