"""`minikv eval`: run a task over policy × budget × length × depth × sample, resumably, print the table, plot.
  minikv eval --task passkey --policies full,streaming,h2o,snapkv --budgets 0.2 --lengths 1500 --depths 0.5"""
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
from minikv.tools.eval.runner import (EvalConfig, build_grid, example_for, parse_budgets, parse_policies, refuse,
                                      run_grid, split_list)
from minikv.tools.eval.tasks import DEPTH_TASKS, RULER_SUBTASKS, TASK_NAMES

# The teaching views of a policy's report: file name prefix, tokens to generate, table, plot.
REPORT_VIEWS = {"d2o": ("d2o_layers_", 4, plots.format_d2o_report, plots.plot_d2o_report),
                "adakv": ("adakv_heads_", 1, plots.format_head_budgets, plots.plot_head_budgets)}

def register(sub) -> None:
    """Add the `eval` subcommand to minikv's argument parser."""
    p = sub.add_parser("eval", help="quality under a budget: passkey, needle, ruler-lite, ppl",
                       description=__doc__.splitlines()[0])
    p.add_argument("--task", required=True, choices=TASK_NAMES)
    p.add_argument("--policies", default="full,streaming,h2o,snapkv", help="comma-separated, the first is the "
                   "tables' reference ('*'); per-policy options after colons, e.g. snapkv:window=16,corm:w=64:r=64")
    p.add_argument("--budgets", default="0.2", help="ratios (0.1,0.2,0.5) or counts (128,256)")
    p.add_argument("--lengths", default=None, help="prompt lengths in tokens (default 2000; ppl 2048)")
    p.add_argument("--depths", default="0.5", help="needle depths in [0, 1] (passkey, needle, ruler multikey/value)")
    p.add_argument("--question-agnostic", action="store_true", help="compress the context, then append the question")
    p.add_argument("--samples", type=int, default=1, help="prompts per (length, depth); 50+ for narrow intervals")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="output folder (default runs/eval/<task>); re-running resumes")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="option given to every policy (repeatable); per-policy options go in --policies")
    p.add_argument("--subtasks", default=",".join(RULER_SUBTASKS), help="ruler-lite subtasks")
    p.add_argument("--chat", action="store_true", help="wrap prompts in the chat template (default: plain prompts)")
    p.add_argument("--ppl-prefix", type=int, default=512, help="ppl: tokens prefilled before teacher forcing")
    p.add_argument("--plot", action="store_true", help="write PNG plots into the output folder (needs matplotlib)")
    p.add_argument("--view-layer", type=int, default=None, help="layer of the survival strip plot (default L/2)")
    p.add_argument("--view-head", type=int, default=0, help="KV head of the survival strip plot")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--no-progress", action="store_true")
    add_model_args(p)
    p.set_defaults(func=cmd_eval, eval_parser=p)

def config_from_args(args, model_name: str) -> EvalConfig:
    """The grid the arguments describe, checked (with --threads) before the model loads."""
    cpus = os.cpu_count() or 1
    refuse(args.threads is not None and not 1 <= args.threads <= cpus,
           f"--threads {args.threads}: give a number of threads from 1 to {cpus} (this machine's CPUs), or none")
    budgets = parse_budgets(args.budgets)
    lengths = [2048 if args.task == "ppl" else 2000] if args.lengths is None else \
        split_list(args.lengths, "--lengths", "whole numbers of tokens, e.g. --lengths 1000,2000", int)
    return EvalConfig(task=args.task, policies=parse_policies(args.policies, parse_options(args.option), budgets[0]),
        budgets=budgets, lengths=lengths,
        depths=split_list(args.depths, "--depths", "fractions in [0, 1], e.g. --depths 0,0.5,1", float),
        samples=args.samples, seed=args.seed, question="agnostic" if args.question_agnostic else "aware",
        chat=args.chat or None, ppl_prefix=args.ppl_prefix, model_name=model_name, dtype=args.dtype,
        subtasks=tuple(split_list(args.subtasks, "--subtasks", f"some of {', '.join(RULER_SUBTASKS)}")))

def output_folder(args) -> Path:
    """--out (default runs/eval/<task>) as a folder that exists."""
    out = Path(args.out or Path("runs") / "eval" / args.task)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BadInput(f"--out {out} is an existing file; give a folder (it will hold records.jsonl and table.md; "
                       f"re-running with the same folder resumes)" if isinstance(e, FileExistsError) else
                       f"--out {out}: cannot create this folder ({e.strerror or e})") from None
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
    """Run the grid (resuming), print and save the table, plot when asked; inputs are checked before any cell runs.
    One run at a time holds the output folder; Ctrl-C keeps every finished cell and prints how to resume (130)."""
    model_name = Path(args.model).name if args.model else "smollm2-135m-instruct"
    cfg, out, command = config_from_args(args, model_name), output_folder(args), command_line(args)   # arguments first
    try:                                     # around the lock too: Ctrl-C while it is being taken is still one line
        with rec.output_lock(out, command):
            return run_and_report(args, cfg, out, command, model_name)
    except KeyboardInterrupt:
        ids = {c.id for c in build_grid(cfg)}
        print(f"minikv eval: interrupted; {len(ids & rec.finished_ids(rec.read_records(out)))} of {len(ids)} "
              f"cells finished, kept in {out / rec.RECORDS}; resume with: {command_line(args, out)}", file=sys.stderr)
        return 130

def run_and_report(args, cfg: EvalConfig, out: Path, command: str, model_name: str) -> int:
    """Load the model, run the grid, write the table and the plots (the part of `eval` that holds the lock)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_model_and_tokenizer(args)
    for flag, value, n, what in (("--view-layer", args.view_layer, model.cfg.num_hidden_layers, "layers"),
                                 ("--view-head", args.view_head, model.cfg.num_key_value_heads, "KV heads")):
        refuse(value is not None and not 0 <= value < n,        # checked before the grid runs, not at plot time
               f"{flag} {value} is out of range: the model has {n} {what} (0 to {n - 1})")
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

def make_plots(model, tok, cfg: EvalConfig, result: dict, out: Path, view_layer=None, view_head=0) -> list[Path]:
    """Every plot that applies: quality vs ratio, depth heatmaps, and on the grid's first prompt at the first budget
    the positions each policy keeps, D2O's per-layer report and Ada-KV's per-head budgets (PNG and markdown)."""
    try:
        plots._plt()
    except MissingExtra as e:
        print(f"minikv eval: no plots: {e}", file=sys.stderr)
        return []
    if not (records := [r for r in result["records"] if not r.get("error")]):
        return []
    made = [plots.quality_vs_ratio(records, out / "quality_vs_ratio.png", cfg.model_name)]
    if any(r.get("depth") is not None for r in records) and any(c.task in DEPTH_TASKS for c in result["cells"]):
        made.append(plots.depth_heatmaps(records, out / "depth_heatmaps.png"))
    ex = example_for(tok, result["cells"][0], cfg)
    agnostic = cfg.question == "agnostic" and ex.metric != "ppl"
    ids = ex.context[:ex.prefix] if ex.metric == "ppl" else ex.context if agnostic else ex.ids
    question = ex.question if agnostic and ex.question else None
    layer, budget = model.cfg.num_hidden_layers // 2 if view_layer is None else view_layer, cfg.budgets[0]
    rows = []
    for spec in cfg.policies:
        rows.append((spec.label + (f" @ {budget}" if spec.takes_budget else ""),
                     plots.surviving_positions(model, ids, spec.build(budget), layer, view_head, question)))
        if spec.name.split("-")[0] in REPORT_VIEWS:
            prefix, steps, table, plot = REPORT_VIEWS[spec.name.split("-")[0]]
            report = generate(model, [ids], spec.build(budget), max_new_tokens=steps).policy_report
            name = prefix + re.sub(r"[^\w.-]", "_", spec.label)
            made.append(plot(report, out / f"{name}.png"))
            (out / f"{name}.md").write_text(table(report) + "\n")
    n = len(ids) + (len(question) if question else 0) + 1          # + the first generated token
    marks = [(o, o + k, "needle") for o, k in zip(ex.meta.get("needle_offsets", []), ex.meta.get("needle_lengths", []))]
    made.append(plots.survival_strip(rows, n, out / f"survival_L{layer}_H{view_head}.png", layer, view_head, marks,
                                     f"{ex.task}, {n} tokens, budget {budget}: "))
    return made
