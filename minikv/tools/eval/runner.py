"""The evaluation grid: policy × budget × length × depth × sample, one record per cell, resumable.

`full` and other budget-free policies (e.g. corm, sized by its own w / r options) run once per cell whatever the
budgets. Every record names the question mode: "aware" (the question is inside the compressed prompt) or
"agnostic" (the context is compressed, then the question is appended with `generate(..., question=...)`).

Perplexity (task ppl) is teacher-forced with decode-time eviction active: the prefix is prefilled with the policy,
then every further token is fed one at a time through the model with `hook=policy.after_step`, scoring each next
token. Policies without an `after_step` (prefill-only: snapkv, pyramidkv, adakv-snapkv, ...) compress the prefix
only; the rest is fed in chunks, which computes the same numbers faster. A ratio budget means, for policies that
evict while decoding, that ratio of the whole text (converted to a count of entries); for prefill-only policies,
that ratio of the prefix. The measured cache ratio at the end is recorded either way.
"""
from __future__ import annotations

import inspect
import itertools
import math
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

import torch

from minikv.budgets import parse_budget
from minikv.errors import BadInput
from minikv.generate import decode_step, generate, prefill
from minikv.io.tokenizer import chat_stop_ids
from minikv.policies import REGISTRY, get_policy
from minikv.policies.base import Policy
from minikv.tools.common import note, parse_options, progress_bar
from minikv.tools.eval import records as rec
from minikv.tools.eval.tasks import DEPTH_TASKS, RULER_SUBTASKS, TASK_NAMES, Example, make_example

MAX_CELLS = 1_000_000                             # far beyond any useful grid; more is a typo (e.g. --samples 1e9)
MAX_SEED = 2**64 - 1                              # the largest seed torch.Generator.manual_seed takes


# ---- what to run -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PolicySpec:
    """One entry of --policies: a registry name with its options."""
    label: str                   # as written in --policies, e.g. "snapkv:window=16"
    name: str                    # registry name
    options: tuple               # sorted (key, value) pairs: --option values, then the spec's own
    takes_budget: bool           # False for full and budget-free policies (run once per cell)

    def build(self, budget: str | int | None) -> Policy:
        """A fresh policy object at `budget` (ignored when the policy is budget-free)."""
        return get_policy(self.name, budget if self.takes_budget else None, **dict(self.options))


def accepts_option(name: str, key: str) -> bool:
    """Whether the policy's constructor takes the keyword `key`."""
    params = inspect.signature(REGISTRY[name].__init__).parameters
    return key in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def parse_policies(text: str, common: dict | None = None, probe_budget: str | None = "0.5") -> list[PolicySpec]:
    """'full,h2o,snapkv:window=16:kernel=5' -> specs. Options after ':' apply to that policy only; `common`
    (--option) to every listed policy that takes that keyword. Refuses an unknown policy, an option no listed policy
    takes, or a bad option, naming it."""
    labels, known = [s.strip() for s in text.split(",") if s.strip()], ", ".join(sorted(REGISTRY))
    common = common or {}
    if not labels:
        raise BadInput(f"--policies {text!r} lists no policy; known policies: {known}")
    for label in labels:
        if label.split(":")[0] not in REGISTRY:
            raise BadInput(f"unknown policy {label.split(':')[0]!r}; known policies: {known}")
    for key in common:
        if not any(accepts_option(label.split(":")[0], key) for label in labels):
            raise BadInput(f"--option {key}: none of the policies {', '.join(labels)} takes that option")
    specs = []
    for label in labels:
        name, *pairs = label.split(":")
        opts = {k: v for k, v in common.items() if accepts_option(name, k)}
        for pair in pairs:
            if "=" not in pair:
                raise BadInput(f"policy option {pair!r} in {label!r} is not KEY=VALUE")
            k, v = pair.split("=", 1)
            opts[k] = parse_options([f"x={v}"])["x"]
        specs.append(PolicySpec(label, name, tuple(sorted(opts.items())), _takes_budget(name, opts, probe_budget)))
    if len({s.label for s in specs}) != len(specs):
        raise BadInput(f"--policies lists a policy twice: {text}")
    return specs


def _takes_budget(name: str, opts: dict, probe: str | None) -> bool:
    """full never takes one; another policy is budget-free when it refuses a budget but accepts none."""
    if name == "full":
        return False
    try:
        get_policy(name, probe, **opts)
        return True
    except ValueError as with_budget:
        try:
            get_policy(name, None, **opts)
        except ValueError:
            raise with_budget from None
        return False


def parse_budgets(text: str) -> list[str]:
    """'0.1,0.2' or '128,256' -> the budget strings, each checked by parse_budget; none twice."""
    out, seen = [s.strip() for s in str(text).split(",") if s.strip()], {}
    if not out:
        raise BadInput(f"--budgets {text!r} lists no budget; give ratios (0.1,0.2) or counts (128,256)")
    for b in out:
        value = parse_budget(b)
        if value in seen:                         # '0.2,0.20' would run every cell twice
            raise BadInput(f"--budgets {text!r} lists the budget {value} twice ({seen[value]!r} and {b!r}); "
                           f"give each budget once")
        seen[value] = b
    return out


def _whole(v, lo: int, hi: float = math.inf) -> bool:
    return not isinstance(v, bool) and isinstance(v, int) and lo <= v <= hi


def _first(problems) -> None:
    """Raise BadInput with the message of the first (bad, message) pair that is bad."""
    for bad, message in problems:
        if bad:
            raise BadInput(message)


def no_duplicates(values: list, flag: str) -> None:
    """Refuse a list that names one value twice (its cells would be computed twice)."""
    for i, v in enumerate(values):
        if v in values[:i]:
            shown = f"{v:g}" if isinstance(v, float) else repr(v)
            raise BadInput(f"{flag} lists {shown} twice; give each value once")


def check_lists(task: str, lengths: list, depths: list, subtasks: tuple, ppl_prefix: int) -> None:
    """Lengths (>= 2 tokens; for ppl above the prefix), depths (in [0, 1]), subtasks: some, none twice."""
    _first([(not lengths, "--lengths lists no length; give prompt lengths in tokens, e.g. --lengths 1000,2000")])
    for n in lengths:
        if not _whole(n, 2):
            raise BadInput(f"--lengths {n!r}: a prompt length must be a whole number of tokens >= 2")
        if task == "ppl" and not 1 <= ppl_prefix < n:
            raise BadInput(f"--ppl-prefix {ppl_prefix} with --lengths {n}: the prefix must be at least 1 and below the "
                           f"length, or no token is left to score; give --ppl-prefix below {n} (e.g. --ppl-prefix "
                           f"{n // 2}) or lengths above {ppl_prefix}")
    no_duplicates(lengths, "--lengths")
    _first([(not depths, "--depths lists no depth; give fractions of the context in [0, 1], e.g. --depths 0,0.5,1")])
    for d in depths:
        _first([(isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 <= d <= 1,
                 f"--depths {d!r} is outside [0, 1] (0 = start of the context, 1 = its end)")])
    bad = [s for s in subtasks if s not in RULER_SUBTASKS]
    _first([(bad, f"unknown ruler-lite subtask(s) {', '.join(map(repr, bad))}; subtasks: "
                  f"{', '.join(RULER_SUBTASKS)}"),
            (not subtasks, f"--subtasks lists no subtask; give some of {', '.join(RULER_SUBTASKS)}")])
    no_duplicates(depths, "--depths")
    no_duplicates(list(subtasks), "--subtasks")


@dataclass
class EvalConfig:
    """Everything that defines a grid (what `minikv eval` parsed from its arguments)."""
    task: str
    policies: list[PolicySpec]
    budgets: list[str]
    lengths: list[int] = field(default_factory=lambda: [2000])
    depths: list[float] = field(default_factory=lambda: [0.5])
    samples: int = 1
    seed: int = 0
    question: str = "aware"                  # "aware" | "agnostic"
    chat: bool | None = None                 # None: the task's default
    ppl_prefix: int = 512
    subtasks: tuple = RULER_SUBTASKS
    model_name: str = "model"
    dtype: str = "float32"

    def __post_init__(self):
        _first([
            (self.task not in TASK_NAMES, f"unknown task {self.task!r}; tasks: {', '.join(TASK_NAMES)}"),
            (self.question not in ("aware", "agnostic"),
             f"question mode must be 'aware' or 'agnostic', got {self.question!r}"),
            (not _whole(self.samples, 1), f"--samples {self.samples!r}: give at least 1 prompt per cell (or leave it "
                                          f"out: 1)"),
            (not _whole(self.seed, 0, MAX_SEED), f"--seed {self.seed!r}: give a whole number in [0, {MAX_SEED}]"),
            (not _whole(self.ppl_prefix, 1),
             f"--ppl-prefix {self.ppl_prefix!r}: give the number of prefilled tokens, at least 1")])
        check_lists(self.task, list(self.lengths), list(self.depths), tuple(self.subtasks), self.ppl_prefix)
        _first([(not self.budgets, "--budgets lists no budget; give ratios (0.1,0.2) or counts (128,256)"),
                (self.max_cells() > MAX_CELLS,
                 f"this grid has {self.max_cells()} cells (tasks × lengths × depths × samples × policy budgets), "
                 f"more than {MAX_CELLS}; check --samples {self.samples}, --lengths and --depths")])

    def tasks(self) -> list[str]:
        """The task names of the grid, ruler-lite with each subtask ("ruler-lite/vt")."""
        return [f"ruler-lite/{s}" for s in self.subtasks] if self.task == "ruler-lite" else [self.task]

    def max_cells(self) -> int:
        """The number of cells of the grid."""
        per_prompt = sum(len(self.budgets) if p.takes_budget else 1 for p in self.policies)
        per_task = sum(len(self.depths) if t in DEPTH_TASKS else 1 for t in self.tasks())
        return per_task * len(self.lengths) * self.samples * per_prompt


@dataclass
class Cell:
    """One grid point: a prompt (task, length, depth, sample) under one policy and budget."""
    task: str                   # with the subtask: "ruler-lite/vt"
    policy: PolicySpec
    budget: str | None
    length: int
    depth: float | None
    sample: int
    question: str               # "aware" | "agnostic" | "none" (ppl)
    id: str = ""                # records.cell_id of everything that decides the result


def build_grid(cfg: EvalConfig) -> list[Cell]:
    """Every cell of the run, in a stable order (prompt-major, so policies compare on the same prompt in turn)."""
    cells = []
    for task in cfg.tasks():
        depths, qmode = cfg.depths if task in DEPTH_TASKS else [None], "none" if task == "ppl" else cfg.question
        for length, depth, sample, spec in itertools.product(cfg.lengths, depths, range(cfg.samples), cfg.policies):
            for budget in (cfg.budgets if spec.takes_budget else [None]):
                cells.append(Cell(task, spec, budget, length, depth, sample, qmode, rec.cell_id(
                    {"task": task, "policy": spec.label, "options": dict(spec.options), "budget": budget,
                     "length": length, "depth": depth, "sample": sample, "question": qmode, "seed": cfg.seed,
                     "chat": cfg.chat, "model": cfg.model_name, "dtype": cfg.dtype,
                     **({"ppl_prefix": cfg.ppl_prefix} if task == "ppl" else {})})))
    return cells


# ---- running one cell ------------------------------------------------------------------------------------------------
def example_for(tok, cell: Cell, cfg: EvalConfig, ctx: int | None = None) -> Example:
    """The prompt of a cell (the same for every policy and budget); refused when it does not fit a context `ctx`."""
    ex = make_example(tok, cell.task, cell.length, cell.depth, cell.sample, cfg.seed, cfg.chat, cfg.ppl_prefix)
    if ctx is not None and len(ex.ids) + ex.max_new_tokens > ctx:
        raise BadInput(f"--lengths {cell.length}: {cell.task} prompt of {len(ex.ids)} tokens + {ex.max_new_tokens} "
                       f"answer tokens exceeds the model's context ({ctx} tokens); give lengths up to "
                       f"{ctx - ex.max_new_tokens}")
    return ex


def score_text(ex: Example, text: str) -> float:
    """The example's metric on the generated text, in [0, 1] ("contains" or string_match_all)."""
    if ex.metric == "contains":
        return float(any(a in text for a in ex.answers))
    return string_match_all(text, ex.answers)


def string_match_all(pred: str, refs: list[str]) -> float:
    """RULER string_match_all: fraction of the references found (case-insensitive) in the prediction."""
    if not refs:
        raise BadInput("string_match_all needs at least one reference")
    return sum(r.lower() in pred.lower() for r in refs) / len(refs)


def evicts_while_decoding(policy: Policy) -> bool:
    """True when the policy acts after each decoded token (it overrides after_step)."""
    return type(policy).after_step is not Policy.after_step


def ppl_policy(cell: Cell, ex: Example) -> tuple[Policy, int | None]:
    """The policy for a perplexity cell and the entries its budget resolves to (see the module docstring)."""
    probe = cell.policy.build(cell.budget)
    if cell.budget is None or not cell.policy.takes_budget:
        return probe, None
    b = parse_budget(cell.budget)
    if evicts_while_decoding(probe):
        count = max(1, math.floor(b.value * len(ex.context))) if b.is_ratio else b.value
        return cell.policy.build(count), count
    return probe, int(b.entries(torch.tensor([ex.prefix]))[0])


@torch.no_grad()
def teacher_forced_nll(model, ids: list[int], prefix: int, policy: Policy, chunk: int = 256):
    """Sum of -log p(ids[t] | ids[:t]) for t = prefix .. len-1, the prefix prefilled with the policy and the rest
    fed one token at a time with policy.after_step (or in chunks when the policy never evicts while decoding).
    Returns (nll sum, tokens scored, cache, prefill seconds)."""
    t0 = time.perf_counter()
    logits, cache = prefill(model, [ids[:prefix]], policy)                 # (1, vocab) predicts ids[prefix]
    t_prefill = time.perf_counter() - t0
    target = torch.tensor(ids[prefix:], device=model.device)
    nll = -torch.log_softmax(logits.double(), -1)[0, target[0]]
    rest = torch.tensor(ids[prefix:-1], device=model.device)[None]         # (1, n-1) inputs after the prefix
    if evicts_while_decoding(policy):
        for t in range(rest.shape[1]):
            out = decode_step(model, cache, rest[:, t], policy)[0]          # (vocab,)
            nll = nll - torch.log_softmax(out.double(), -1)[target[t + 1]]
    else:
        for s in range(0, rest.shape[1], chunk):
            out = model(rest[:, s:s + chunk], cache, use_sdpa=model.dtype != torch.float64)[0]   # (T, vocab)
            tgt = target[s + 1: s + 1 + out.shape[0]]
            nll = nll - torch.log_softmax(out.double(), -1).gather(-1, tgt[:, None]).sum()
    return float(nll), len(ids) - prefix, cache, t_prefill


def run_cell(model, tok, cell: Cell, cfg: EvalConfig, example: Example | None = None) -> dict:
    """Run one cell and return its record (not yet written)."""
    ex = example or example_for(tok, cell, cfg)
    dev = model.device
    rec.reset_peak_memory(dev)
    t0 = time.perf_counter()
    if ex.metric == "ppl":
        policy, resolved = ppl_policy(cell, ex)
        nll, n, cache, t_pre = teacher_forced_nll(model, ex.context, ex.prefix, policy)
        out = dict(score=math.exp(nll / n), nll_sum=nll, scored_tokens=n, prefix=ex.prefix,
                   cache_ratio=cache.cache_ratio(), kv_bytes_live=cache.nbytes_live(),
                   kv_bytes_allocated=cache.nbytes_allocated(), prefill_s=t_pre, new_tokens=0,
                   budget_entries=resolved, prediction=None, policy_decodes=evicts_while_decoding(policy))
    else:
        agnostic = cell.question == "agnostic" and ex.question
        prompt = ex.context if agnostic else ex.ids
        res = generate(model, [prompt], cell.policy.build(cell.budget), max_new_tokens=ex.max_new_tokens,
                       stop_ids=chat_stop_ids(tok) if ex.chat else None,
                       question=[ex.question] if agnostic else None, seed=cfg.seed)
        text = tok.decode(res.tokens[0], skip_special_tokens=True)
        out = dict(score=score_text(ex, text), prediction=text, cache_ratio=res.cache_ratio,
                   kv_bytes_live=res.kv_bytes_live, kv_bytes_allocated=res.kv_bytes_allocated,
                   kv_bytes_full=res.kv_bytes_full, prefill_s=res.prefill_seconds, decode_s=res.decode_seconds,
                   new_tokens=len(res.tokens[0]),
                   budget_entries=(None if not cell.policy.takes_budget else
                                   int(parse_budget(cell.budget).entries(torch.tensor([len(prompt)]))[0])))
    wall = time.perf_counter() - t0
    peak, peak_kind = rec.peak_memory(dev)
    return {
        "id": cell.id, "task": cell.task, "policy": cell.policy.label, "policy_name": cell.policy.name,
        "options": dict(cell.policy.options), "budget": cell.budget, "length": cell.length, "depth": cell.depth,
        "sample": cell.sample, "seed": cfg.seed, "question": cell.question, "chat": ex.chat, "metric": ex.metric,
        "answers": ex.answers, "prompt_tokens": len(ex.ids), "context_tokens": len(ex.context),
        "question_tokens": len(ex.question), **out, "wall_s": wall, "peak_memory_bytes": peak,
        "peak_memory_kind": peak_kind, "model": cfg.model_name, "dtype": cfg.dtype, "device": str(dev),
        "minikv_version": rec.minikv_version(), "torch_version": torch.__version__,
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "meta": ex.meta,
    }


# ---- the grid ---------------------------------------------------------------------------------------------------------
def check_fits(tok, cfg: EvalConfig, cells: list[Cell], ctx: int) -> None:
    """Refuse before any cell runs a length past the context, or a shortest/longest prompt that does not fit."""
    for n in cfg.lengths:
        _first([(n > ctx, f"--lengths {n} exceeds the model's context ({ctx} tokens); give lengths up to {ctx} (less "
                          f"the answer's tokens for generated tasks)")])
    for task in dict.fromkeys(c.task for c in cells):
        lo, hi = (f([c for c in cells if c.task == task], key=lambda c: c.length) for f in (min, max))
        for c in [lo] if lo.length == hi.length else [lo, hi]:
            example_for(tok, c, cfg, ctx)


def run_grid(model, tok, cfg: EvalConfig, out_dir, progress: bool = True, cells: list[Cell] | None = None) -> dict:
    """Run every cell not already in out_dir/records.jsonl; return {"cells", "ran", "skipped", "records"} where
    records are this grid's records (old and new), in grid order. Each record is on disk as soon as its cell
    finishes, so an exception or Ctrl-C loses only the cell running then."""
    cells = build_grid(cfg) if cells is None else cells
    ctx = model.cfg.max_position_embeddings
    check_fits(tok, cfg, cells, ctx)
    done = rec.finished_ids(rec.read_records(out_dir, warn=True))
    todo = [c for c in cells if c.id not in done]
    bar = progress_bar(len(cells), len(cells) - len(todo), f"eval {cfg.task}", progress)
    prompt, ex = None, None                           # one prompt at a time: cells are prompt-major
    try:
        for c in todo:
            if bar is not None:
                bar.set_postfix_str(f"{c.policy.label} b={c.budget} n={c.length} d={c.depth} s={c.sample}")
            if prompt != (c.task, c.length, c.depth, c.sample):   # a prompt that cannot be built stops the run
                prompt, ex = (c.task, c.length, c.depth, c.sample), example_for(tok, c, cfg, ctx)
            try:
                record = run_cell(model, tok, c, cfg, ex)
            except ValueError as e:                   # a policy/budget combination that cannot run: record it
                record = {"id": c.id, "task": c.task, "policy": c.policy.label, "budget": c.budget,
                          "length": c.length, "depth": c.depth, "sample": c.sample, "question": c.question,
                          "error": str(e), "score": None, "cache_ratio": None}
                note(bar, f"minikv eval: cell {c.id}: {e}")
            rec.append_record(out_dir, record)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    latest = {r["id"]: r for r in rec.read_records(out_dir)}
    return {"cells": cells, "ran": len(todo), "skipped": len(cells) - len(todo),
            "records": [latest[c.id] for c in cells if c.id in latest]}
