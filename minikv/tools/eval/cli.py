"""`minikv eval`: run a task over policy × budget × length × depth × sample, resumably, print the table, plot.

  minikv eval --task passkey --policies full,streaming,h2o,snapkv --budgets 0.2 --lengths 1500 --depths 0.5
"""
from __future__ import annotations

import os
import re
import shlex
import sys
from pathlib import Path

import torch

from minikv.errors import BadInput, MissingExtra
from minikv.generate import generate
from minikv.tools.common import add_model_args, load_model_and_tokenizer, parse_options
from minikv.tools.eval import plots
from minikv.tools.eval import records as rec
from minikv.tools.eval.runner import EvalConfig, build_grid, example_for, parse_budgets, parse_policies, run_grid
from minikv.tools.eval.tasks import DEPTH_TASKS, RULER_SUBTASKS, TASK_NAMES

DEFAULT_LENGTH = {"passkey": 2000, "needle": 2000, "ruler-lite": 2000, "ppl": 2048}


def register(sub) -> None:
    """Add the `eval` subcommand to minikv's argument parser."""
    p = sub.add_parser("eval", help="quality under a budget: passkey, needle, ruler-lite, ppl",
                       description=__doc__.splitlines()[0])
    p.add_argument("--task", required=True, choices=TASK_NAMES)
    p.add_argument("--policies", default="full,streaming,h2o,snapkv",
                   help="comma-separated; per-policy options after colons, e.g. snapkv:window=16,corm:w=64:r=64")
    p.add_argument("--budgets", default="0.2", help="ratios (0.1,0.2,0.5) or counts (128,256)")
    p.add_argument("--lengths", default=None, help="prompt lengths in tokens (default 2000; ppl 2048)")
    p.add_argument("--depths", default="0.5", help="needle depths in [0, 1] (passkey, needle, ruler multikey/value)")
    p.add_argument("--question-agnostic", action="store_true",
                   help="compress the context first, then append the question (default: question-aware)")
    p.add_argument("--samples", type=int, default=1, help="prompts per cell")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="output folder (default runs/eval/<task>); re-running resumes")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="option given to every policy (repeatable); per-policy options go in --policies")
    p.add_argument("--subtasks", default=",".join(RULER_SUBTASKS), help="ruler-lite subtasks")
    p.add_argument("--chat", choices=["auto", "on", "off"], default="auto",
                   help="wrap prompts in the chat template (auto: the task's default)")
    p.add_argument("--ppl-prefix", type=int, default=512, help="ppl: tokens prefilled before teacher forcing")
    p.add_argument("--plot", action="store_true", help="write PNG plots into the output folder (needs matplotlib)")
    p.add_argument("--view-layer", type=int, default=None, help="layer of the survival strip plot (default L/2)")
    p.add_argument("--view-head", type=int, default=0, help="KV head of the survival strip plot")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--no-progress", action="store_true")
    add_model_args(p)
    p.set_defaults(func=cmd_eval, eval_parser=p)


def _numbers(text: str, what: str, cast, kind: str, example: str) -> list:
    """A comma-separated list of numbers, refused (naming the flag) when an item is not one or the list is empty."""
    try:
        values = [cast(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise BadInput(f"--{what} must be comma-separated {kind}, got {text!r}") from None
    if not values:
        raise BadInput(f"--{what} {text!r} lists no {what[:-1]}; give {example}")
    return values


def config_from_args(args, model_name: str) -> EvalConfig:
    """The grid the arguments describe (and --threads, --view-layer/--view-head), checked before loading."""
    cpus = os.cpu_count() or 1
    if args.threads is not None and not 1 <= args.threads <= cpus:
        raise BadInput(f"--threads {args.threads}: give a number of threads from 1 to {cpus} (this machine's CPUs), "
                       f"or leave it out")
    for flag, value in (("--view-layer", args.view_layer), ("--view-head", args.view_head)):
        if value is not None and value < 0:
            raise BadInput(f"{flag} {value}: give a layer / KV head index from 0 (default: the middle layer, head 0)")
    budgets = parse_budgets(args.budgets)
    specs = parse_policies(args.policies, parse_options(args.option), probe_budget=budgets[0])
    lengths = [DEFAULT_LENGTH.get(args.task)] if args.lengths is None else \
        _numbers(args.lengths, "lengths", int, "whole numbers", "prompt lengths in tokens, e.g. --lengths 1000,2000")
    depths = _numbers(args.depths, "depths", float, "numbers", "fractions in [0, 1], e.g. --depths 0,0.5,1")
    subtasks = tuple(s.strip() for s in args.subtasks.split(",") if s.strip())
    if not subtasks:
        raise BadInput(f"--subtasks {args.subtasks!r} lists no subtask; give some of {', '.join(RULER_SUBTASKS)}")
    return EvalConfig(
        task=args.task, policies=specs, budgets=budgets, lengths=lengths, depths=depths,
        samples=args.samples, seed=args.seed, question="agnostic" if args.question_agnostic else "aware",
        chat={"auto": None, "on": True, "off": False}[args.chat], ppl_prefix=args.ppl_prefix,
        subtasks=subtasks, model_name=model_name, dtype=args.dtype)


def output_folder(args) -> Path:
    """--out (default runs/eval/<task>) as a folder that exists and is writable."""
    out = Path(args.out or Path("runs") / "eval" / args.task)
    if out.exists() and not out.is_dir():
        raise BadInput(f"--out {out} is an existing file; give a folder (it will hold records.jsonl and "
                       f"table.md; re-running with the same folder resumes)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BadInput(f"--out {out}: cannot create this folder ({e.strerror or e})") from None
    if (out / rec.RECORDS).exists() and not (out / rec.RECORDS).is_file():
        raise BadInput(f"--out {out}: {out / rec.RECORDS} is not a file; give another folder")
    return out


def command_line(args, resume: Path | None = None) -> str:
    """The `minikv eval` command that reproduces this run (options that differ from their defaults); with `resume`
    (the output folder), the command that resumes it, as it was invoked (`python3 -m minikv` or `minikv`)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    parts = ["python3 -m minikv" if resume and getattr(spec, "name", "") == "minikv.__main__" else "minikv", "eval"]
    for action in args.eval_parser._actions:
        value = getattr(args, action.dest, None)
        if not action.option_strings or action.dest in ("help", "no_progress") or \
                value == action.default or value in (None, [], False) and action.dest != "task" or \
                action.dest == "device" and not resume:
            continue
        flag = action.option_strings[-1]
        parts += [flag] if value is True else [x for v in (value if isinstance(value, list) else [value])
                                               for x in (flag, shlex.quote(str(v)))]
    return " ".join(parts) + (f" --out {shlex.quote(str(resume))}" if resume and not args.out else "")


def cmd_eval(args) -> int:
    """Run the grid (resuming), print and save the table, and plot when asked. Every input is checked before the
    model loads where it can be, and before the first cell runs otherwise. One run at a time holds the output
    folder; Ctrl-C keeps every finished cell and prints the command that resumes (exit status 130)."""
    model_name = Path(args.model).name if args.model else "smollm2-135m-instruct"
    cfg = config_from_args(args, model_name)
    out = output_folder(args)
    command = command_line(args)
    try:                                     # around the lock too: Ctrl-C while it is being taken is still one line
        with rec.OutputLock(out, command):
            return run_and_report(args, cfg, out, command, model_name)
    except KeyboardInterrupt:
        ids = {c.id for c in build_grid(cfg)}
        print(f"minikv eval: interrupted; {len(ids & rec.finished_ids(rec.read_records(out)))} of {len(ids)} "
              f"cells finished, kept in {out / rec.RECORDS}; resume with: {command_line(args, out)}",
              file=sys.stderr)
        return 130


def run_and_report(args, cfg: EvalConfig, out: Path, command: str, model_name: str) -> int:
    """Load the model, run the grid, write the table and the plots (the part of `eval` that holds the lock)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_model_and_tokenizer(args)
    for flag, value, n, what in (("--view-layer", args.view_layer, model.cfg.num_hidden_layers, "layers"),
                                 ("--view-head", args.view_head, model.cfg.num_key_value_heads, "KV heads")):
        if value is not None and not 0 <= value < n:        # checked before the grid runs, not at plot time
            raise BadInput(f"{flag} {value} is out of range: the model has {n} {what} (0 to {n - 1})")
    result = run_grid(model, tok, cfg, out, progress=not args.no_progress)
    print(f"{len(result['cells'])} cells: ran {result['ran']}, skipped {result['skipped']} already in "
          f"{out / rec.RECORDS}", file=sys.stderr)
    table = rec.markdown_table(result["records"], cfg.budgets, [s.label for s in cfg.policies])
    header = f"`{command}` — model {model_name}, {args.dtype}, {model.device}, minikv {rec.minikv_version()}\n\n"
    (out / "table.md").write_text(header + table)
    print(table)
    print(f"table: {out / 'table.md'}", file=sys.stderr)
    for path in make_plots(model, tok, cfg, result, out, args.view_layer, args.view_head) if args.plot else []:
        print(f"plot: {path}", file=sys.stderr)
    return 0


# ---- plots ----------------------------------------------------------------------------------------------------------
def make_plots(model, tok, cfg: EvalConfig, result: dict, out: Path, view_layer: int | None = None,
               view_head: int = 0) -> list[Path]:
    """Every plot that applies: quality vs ratio, depth heatmaps, survival strip, D2O layers / Ada-KV head budgets."""
    try:
        plots._plt()
    except MissingExtra as e:
        print(f"minikv eval: no plots: {e}", file=sys.stderr)
        return []
    records = [r for r in result["records"] if not r.get("error")]
    if not records:
        return []
    made = [plots.quality_vs_ratio(records, out / "quality_vs_ratio.png", f"{cfg.model_name}")]
    if any(r.get("depth") is not None for r in records) and any(c.task in DEPTH_TASKS for c in result["cells"]):
        made.append(plots.depth_heatmaps(records, out / "depth_heatmaps.png"))
    return made + policy_views(model, tok, cfg, result["cells"][0], out, view_layer, view_head)


def policy_views(model, tok, cfg, first, out: Path, view_layer, view_head) -> list[Path]:
    """Teaching views on the grid's first prompt at the first budget: surviving positions per policy, and the
    reports of D2O (per-layer ratios, evictions, tau: a PNG and a markdown table) and Ada-KV (per-head budgets)."""
    ex = example_for(tok, first, cfg)
    ids = ex.context[:ex.prefix] if ex.metric == "ppl" else ex.context if cfg.question == "agnostic" else ex.ids
    question = ex.question if (cfg.question == "agnostic" and ex.question and ex.metric != "ppl") else None
    layer, budget = model.cfg.num_hidden_layers // 2 if view_layer is None else view_layer, cfg.budgets[0]
    rows, made = [], []
    for spec in cfg.policies:
        rows.append((spec.label + (f" @ {budget}" if spec.takes_budget else ""),
                     plots.surviving_positions(model, ids, spec.build(budget), layer, view_head, question)))
        if spec.name == "d2o" or spec.name.startswith("adakv"):
            d2o = spec.name == "d2o"
            report = generate(model, [ids], spec.build(budget), max_new_tokens=4 if d2o else 1).policy_report
            name = ("d2o_layers_" if d2o else "adakv_heads_") + re.sub(r"[^\w.-]", "_", spec.label)
            made.append((plots.plot_d2o_report if d2o else plots.plot_head_budgets)(report, out / f"{name}.png"))
            (out / f"{name}.md").write_text((plots.format_d2o_report if d2o else plots.format_head_budgets)(report)
                                            + "\n")
    n = len(ids) + (len(question) if question else 0) + 1          # + the first generated token
    marks = [(o, o + k, "needle") for o, k in zip(ex.meta.get("needle_offsets", []), ex.meta.get("needle_lengths", []))]
    made.append(plots.survival_strip(rows, n, out / f"survival_L{layer}_H{view_head}.png", layer, view_head, marks,
                                     f"{ex.task}, {n} tokens: positions kept in layer {layer}, KV head {view_head} "
                                     f"after prefill + 1 decode step (budget {budget})"))
    return made
