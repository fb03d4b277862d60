"""The evaluation grid: policy × budget × length × depth × sample, one record per cell, resumable. Budget-free
policies (full; corm, sized by its own w / r) run once per cell. Question-aware: the question is inside the
compressed prompt; question-agnostic: the context is compressed, then the question appended.

Perplexity (task ppl) is teacher-forced: the prefix is prefilled with the policy, then each further token is fed
through `decode_step` (decode-time eviction acts) and scored; policies that never evict while decoding compress the
prefix only, and the rest is fed in chunks. A ratio budget is that ratio of the whole text for the former, of the
prefix for the latter."""
from __future__ import annotations

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
from minikv.policies.base import Policy, policy_options
from minikv.tools.common import note, parse_options, progress_bar, spec_words
from minikv.tools.eval import records as rec
from minikv.tools.eval.tasks import DEPTH_TASKS, RULER_SUBTASKS, Example, make_example

MAX_CELLS = 1_000_000                             # far beyond any useful grid; more is a typo (e.g. --samples 1e9)
MAX_SEED = 2**64 - 1                              # the largest seed torch.Generator.manual_seed takes

# ---- what to run -----------------------------------------------------------------------------------------------------
def refuse(bad, message: str) -> None:
    """Raise BadInput(message) when `bad`."""
    if bad:
        raise BadInput(message)

def split_list(text: str, flag: str, example: str, cast=str) -> list:
    """A comma-separated list, refused (naming the flag) when it is empty or an item does not convert with `cast`."""
    try:
        values = [cast(x.strip()) for x in str(text).split(",") if x.strip()]
    except ValueError:
        values = []
    refuse(not values, f"{flag} {text!r}: give {example}")
    return values

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

def parse_policies(text: str, common: dict | None = None, probe_budget: str | None = "0.5") -> list[PolicySpec]:
    """'full,h2o,snapkv:window=16:kernel=5' -> specs, each built once (at `probe_budget`) to check its options.
    Options after ':' apply to that policy only; `common` (--option) to every listed policy that takes that key."""
    known, common, specs = ", ".join(sorted(REGISTRY)), common or {}, []
    for label in split_list(text, "--policies", f"some of: {known}"):
        name, *pairs = spec_words(label)
        refuse(name not in REGISTRY, f"unknown policy {name!r}; known policies: {known}")
        refuse(any("=" not in p for p in pairs), f"the policy options in {label!r} must be KEY=VALUE")
        opts = {k: v for k, v in common.items() if k in policy_options(REGISTRY[name])} | parse_options(pairs)
        specs.append(PolicySpec(label, name, tuple(sorted(opts.items())), REGISTRY[name].takes_budget))
        specs[-1].build(probe_budget)                           # a bad option is refused now, not in every cell
    for key in common:
        refuse(not any(key in policy_options(REGISTRY[s.name]) for s in specs),
               f"--option {key}: none of the policies {text} takes that option")
    refuse(len({s.label for s in specs}) != len(specs), f"--policies lists a policy twice: {text}")
    return specs

def parse_budgets(text: str) -> list[str]:
    """'0.1,0.2' or '128,256' -> the budget strings, each checked by parse_budget (which raises on a bad one)."""
    return [b for b in split_list(text, "--budgets", "ratios (0.1,0.2) or counts (128,256)") if parse_budget(b)]

@dataclass
class EvalConfig:
    """Everything that defines a grid (what `minikv eval` parsed from its arguments), checked on creation."""
    task: str
    policies: list[PolicySpec]
    budgets: list[str]
    lengths: list[int] = field(default_factory=lambda: [2000])
    depths: list[float] = field(default_factory=lambda: [0.5])
    samples: int = 1
    seed: int = 0
    question: str = "aware"                  # "aware" | "agnostic"
    chat: bool | None = None                 # None or False: plain prompts
    ppl_prefix: int = 512
    subtasks: tuple = RULER_SUBTASKS
    model_name: str = "model"
    dtype: str = "float32"

    def __post_init__(self):
        refuse(self.samples < 1, f"--samples {self.samples}: give at least 1 prompt per cell (or leave it out: 1)")
        refuse(not 0 <= self.seed <= MAX_SEED, f"--seed {self.seed}: give a whole number in [0, {MAX_SEED}]")
        for n in self.lengths:
            refuse(n < 2, f"--lengths {n}: a prompt length must be a whole number of tokens >= 2")
            refuse(self.task == "ppl" and not 1 <= self.ppl_prefix < n,
                   f"--ppl-prefix {self.ppl_prefix} with --lengths {n}: the prefix must be at least 1 and below the "
                   f"length (the rest is scored); give --ppl-prefix below {n} or lengths above {self.ppl_prefix}")
        for d in self.depths:
            refuse(not 0 <= d <= 1, f"--depths {d!r} is outside [0, 1] (0 = start of the context, 1 = its end)")
        unknown = [s for s in self.subtasks if s not in RULER_SUBTASKS]
        refuse(unknown, f"unknown ruler-lite subtask(s) {unknown}; subtasks: {', '.join(RULER_SUBTASKS)}")
        for flag, values in (("--lengths", self.lengths), ("--depths", self.depths), ("--subtasks", self.subtasks),
                             ("--budgets", [str(parse_budget(b)) for b in self.budgets])):   # '0.2' = '0.20'
            twice = [v for i, v in enumerate(values) if v in values[:i]] + [None]
            refuse(len(twice) > 1, f"{flag} lists {twice[0]!r} twice; give each value once")
        refuse(self.max_cells() > MAX_CELLS,
               f"this grid has {self.max_cells()} cells, more than {MAX_CELLS}; check --samples {self.samples}")

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

@torch.no_grad()
def teacher_forced_nll(model, ids: list[int], prefix: int, policy: Policy, chunk: int = 256):
    """(sum of -log p(ids[t] | ids[:t]) for t >= prefix, tokens scored, cache, prefill seconds): see the module
    docstring."""
    t0 = time.perf_counter()
    logits, cache = prefill(model, [ids[:prefix]], policy)                 # (1, vocab) predicts ids[prefix]
    t_prefill, target = time.perf_counter() - t0, torch.tensor(ids[prefix:], device=model.device)
    nll = -torch.log_softmax(logits.double(), -1)[0, target[0]]
    rest = torch.tensor(ids[prefix:-1], device=model.device)[None]         # (1, n-1) inputs after the prefix
    if policy.decode_evicts:
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
    ex, dev = example or example_for(tok, cell, cfg), model.device
    rec.reset_peak_memory(dev)
    t0 = time.perf_counter()
    if ex.metric == "ppl":                # a ratio budget: of the whole text if the policy evicts while decoding
        policy, b, resolved = cell.policy.build(cell.budget), parse_budget(cell.budget), None
        if b is not None and policy.decode_evicts:
            resolved = max(1, math.floor(b.value * len(ex.context))) if b.is_ratio else b.value
            policy = cell.policy.build(resolved)
        elif b is not None:
            resolved = int(b.entries(torch.tensor([ex.prefix]))[0])
        nll, n, cache, t_pre = teacher_forced_nll(model, ex.context, ex.prefix, policy)
        out = dict(score=math.exp(nll / n), nll_sum=nll, scored_tokens=n, prefix=ex.prefix,
                   cache_ratio=cache.cache_ratio(), kv_bytes_live=cache.nbytes_live(),
                   kv_bytes_allocated=cache.nbytes_allocated(), prefill_s=t_pre, new_tokens=0,
                   budget_entries=resolved, prediction=None, policy_decodes=policy.decode_evicts)
    else:
        agnostic = cell.question == "agnostic" and ex.question
        prompt = ex.context if agnostic else ex.ids
        res = generate(model, [prompt], cell.policy.build(cell.budget), max_new_tokens=ex.max_new_tokens,
                       stop_ids=chat_stop_ids(tok) if ex.chat else None,
                       question=[ex.question] if agnostic else None, seed=cfg.seed)
        text = tok.decode(res.tokens[0], skip_special_tokens=True)
        out = dict(score=ex.score(text), prediction=text, cache_ratio=res.cache_ratio,
                   kv_bytes_live=res.kv_bytes_live, kv_bytes_allocated=res.kv_bytes_allocated,
                   kv_bytes_full=res.kv_bytes_full, prefill_s=res.prefill_seconds, decode_s=res.decode_seconds,
                   new_tokens=len(res.tokens[0]), budget_entries=(None if not cell.policy.takes_budget else
                                   int(parse_budget(cell.budget).entries(torch.tensor([len(prompt)]))[0])))
    wall, (peak, peak_kind) = time.perf_counter() - t0, rec.peak_memory(dev)
    return {**vars(cell), "policy": cell.policy.label, "policy_name": cell.policy.name,    # id, task, budget, ...
            "options": dict(cell.policy.options), "seed": cfg.seed, "chat": ex.chat, "metric": ex.metric,
            "answers": ex.answers, "prompt_tokens": len(ex.ids), "context_tokens": len(ex.context),
            "question_tokens": len(ex.question), **out, "wall_s": wall, "peak_memory_bytes": peak,
            "peak_memory_kind": peak_kind, "model": cfg.model_name, "dtype": cfg.dtype, "device": str(dev),
            "minikv_version": rec.minikv_version(), "torch_version": torch.__version__,
            "time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "meta": ex.meta}

# ---- the grid -------------------------------------------------------------------------------------------------------
def run_grid(model, tok, cfg: EvalConfig, out_dir, progress: bool = True) -> dict:
    """Run every cell not already in out_dir/records.jsonl; return {"cells", "ran", "skipped", "records"} where
    records are this grid's records (old and new), in grid order. Each record is on disk as soon as its cell
    finishes, so an exception or Ctrl-C loses only the cell running then."""
    cells, ctx = build_grid(cfg), model.cfg.max_position_embeddings
    for task in dict.fromkeys(c.task for c in cells):       # before any cell: the shortest and longest prompts fit
        by_length = sorted((c for c in cells if c.task == task), key=lambda c: c.length)
        for c in {c.length: c for c in (by_length[0], by_length[-1])}.values():
            example_for(tok, c, cfg, ctx)
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
                record = {**vars(c), "policy": c.policy.label, "error": str(e), "score": None, "cache_ratio": None}
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
