"""DIR/records.jsonl, only ever appended to: one JSON record per grid cell, flushed as each cell finishes, so a re-run
skips the cell ids there; an unusable line (cut off by a kill, edited by hand) is skipped with a warning and its cell
runs again. Also the markdown table of the records, and DIR/eval.lock, which keeps a second run off the folder."""
from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import random
import re
import resource
import socket
import sys
import time
from contextlib import contextmanager
from datetime import datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from minikv.errors import BadInput
from minikv.tools.common import format_rows

RECORDS, LOCK, RESAMPLES = "records.jsonl", "eval.lock", 2000     # RESAMPLES: of a perplexity interval's bootstrap

# ---- ids and provenance -------------------------------------------------------------------------------------------
def cell_id(key: dict) -> str:
    """'passkey|h2o|b0.2|n2000|d0.5|s0|aware|<10 hex>': readable fields, then a hash of everything that decides the
    result (seed, options, model, dtype, task settings), so changing any of those runs the cell again."""
    digest = hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:10]
    depth = "-" if key.get("depth") is None else f"{key['depth']:g}"
    return (f"{key['task']}|{key['policy']}|b{key.get('budget') or '-'}|n{key.get('length')}|d{depth}|"
            f"s{key.get('sample')}|{key.get('question')}|{digest}")

def minikv_version() -> str:
    try:
        return version("minikv")
    except PackageNotFoundError:
        return "unknown"

_rss_peak_was_reset = False                    # set once /proc/self/clear_refs accepted a reset

def reset_peak_memory(device) -> None:
    """Start a new peak-memory window: CUDA's counter, or Linux's peak RSS (VmHWM, reset via clear_refs)."""
    global _rss_peak_was_reset
    if torch.device(device).type == "cuda":
        return torch.cuda.reset_peak_memory_stats(device)
    try:
        Path("/proc/self/clear_refs").write_text("5")
        _rss_peak_was_reset = True
    except OSError:
        _rss_peak_was_reset = False            # not Linux, or not allowed: peak_memory says it is the process peak

def peak_memory(device) -> tuple[int, str]:
    """(bytes, kind) since the last reset_peak_memory: "cuda_max_allocated"; on Linux "rss_peak_since_reset" (the
    whole process, weights included); else "process_peak_rss" (the lifetime peak, the largest cell so far)."""
    if torch.device(device).type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_allocated"
    if _rss_peak_was_reset:                         # Linux: /proc/self/status has the peak RSS in kB
        return int(re.search(r"^VmHWM:\s+(\d+)", Path("/proc/self/status").read_text(), re.M)[1]) * 1024, \
            "rss_peak_since_reset"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024), "process_peak_rss"

# ---- records.jsonl: what the resume logic and the table need of a record (key -> types; results unless it failed) --
RECORD_FIELDS = {"id": (str,), "task": (str,), "policy": (str,), "question": (str,), "budget": (str, type(None))}
RESULT_FIELDS = {"score": (int, float, type(None)), "cache_ratio": (int, float)}

def record_problem(rec) -> str | None:
    """Why a parsed JSON value cannot be used as a record (None when it can)."""
    if not isinstance(rec, dict):
        return f"a JSON {type(rec).__name__}, not an object"
    fields = dict(RECORD_FIELDS, error=(str, type(None)), **({} if rec.get("error") else RESULT_FIELDS))
    missing = [k for k in fields if k not in rec and k != "error"]
    bad = [k for k, types in fields.items() if isinstance(rec.get(k), bool) or not isinstance(rec.get(k), types)
           or (k == "id" and not rec[k])]
    return (f"missing key(s) {', '.join(missing)}" if missing else
            f"{bad[0]} is {json.dumps(rec[bad[0]], default=str)[:40]}, of the wrong type" if bad else None)

def read_records(out_dir: str | Path, warn: bool = False) -> list[dict]:
    """Every usable record in DIR/records.jsonl; with `warn`, a warning naming FILE:LINE for each line skipped."""
    path, out = Path(out_dir) / RECORDS, []
    try:                                              # bytes: a line of binary garbage must not stop the others
        lines = path.read_bytes().split(b"\n") if path.exists() else []
    except OSError as e:
        raise BadInput(f"cannot read {path}: {e.strerror or e}") from None
    for i, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw.decode("utf-8"))
            problem = record_problem(rec)
            problem = problem and f"not a minikv eval record ({problem})"
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            problem = f"not valid JSON, e.g. cut off by an interrupted run ({e})"
        if not problem:
            out.append(rec)
        elif warn:
            print(f"minikv eval: warning: {path}:{i}: {problem}; skipped, its cell runs again", file=sys.stderr)
    return out

def append_record(out_dir: str | Path, record: dict) -> None:
    """Append one record and force it to disk, so a crash right after loses nothing."""
    with open(Path(out_dir) / RECORDS, "a+b") as f:
        f.seek(0, os.SEEK_END)
        cut = f.tell() > 0 and (f.seek(-1, os.SEEK_END), f.read(1))[1] != b"\n"   # a run died mid-line
        f.write((("\n" if cut else "") + json.dumps(record, default=str) + "\n").encode("utf-8"))
        f.flush()
        os.fsync(f.fileno())

def finished_ids(records: list[dict]) -> set[str]:
    """Ids of cells that completed (records with an error are run again)."""
    return {r["id"] for r in records if not r.get("error")}

# ---- the table -------------------------------------------------------------------------------------------------------
def scored(records: list[dict]) -> list[dict]:
    """The records that finished with a score (not None, not NaN)."""
    return [r for r in records if not r.get("error") and r.get("score") is not None and r["score"] == r["score"]]

def mean(xs) -> float:
    """The mean of the values that are not None or NaN; NaN when there is none."""
    xs = [x for x in xs if x is not None and x == x]
    return sum(xs) / len(xs) if xs else math.nan

def group_by(records: list[dict], *keys) -> dict[tuple, list[dict]]:
    """Records grouped by the values of `keys`, in first-seen order."""
    out: dict[tuple, list[dict]] = {}
    for r in records:
        out.setdefault(tuple(r[k] for k in keys), []).append(r)
    return out

def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of the proportion successes / n (z = 1.96: 95%): the p with (s/n - p)² <= z² p(1-p) / n.
    `successes` may be fractional (a sum of scores in [0, 1]: p(1-p) bounds their variance); NaN, NaN when n = 0."""
    if n < 1:
        return math.nan, math.nan
    p, d = successes / n, 1 + z * z / n
    c, h = (p + z * z / (2 * n)) / d, z / d * math.sqrt(max(0.0, p * (1 - p) / n + z * z / (4 * n * n)))
    return min(p, max(0.0, c - h)), max(p, min(1.0, c + h))     # it holds p exactly (rounding may not, at 0 or n)

def bootstrap_interval(values: list, stat=mean, n_resamples: int = RESAMPLES, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap: `stat` of `n_resamples` resamples of `values` with replacement (random.Random(seed),
    so deterministic), sorted; the (k+1)-th smallest and (k+1)-th largest, k = floor(0.025 · n_resamples)."""
    rng, k = random.Random(seed), int(0.025 * n_resamples)
    stats = sorted(stat(rng.choices(values, k=len(values))) for _ in range(n_resamples))
    return stats[k], stats[-1 - k]

def summary(rs: list[dict]) -> tuple[float, float, float, int]:
    """(mean score, low, high, n) of finished records: the Wilson interval of the score (passkey, needle,
    ruler-lite), for perplexity the bootstrap over the n texts of their mean (NaN for one text)."""
    xs = [r["score"] for r in scored(rs)]
    if rs and rs[0]["task"] == "ppl":
        return mean(xs), *(bootstrap_interval(xs) if len(xs) > 1 else (math.nan, math.nan)), len(xs)
    return mean(xs), *wilson_interval(sum(xs), len(xs)), len(xs)

def paired_sign_test(rs: list[dict], ref_rs: list[dict]) -> float:
    """Two-sided exact sign test of score minus the reference's on the same prompt or text (length, depth, sample,
    seed), ties dropped: P(signs split at least this unevenly | each sign has p = 1/2)."""
    key = lambda r: (r.get("length"), r.get("depth"), r.get("sample"), r.get("seed"))
    ref = {key(r): r["score"] for r in scored(ref_rs)}
    d = [r["score"] - ref[key(r)] for r in scored(rs) if key(r) in ref]
    n, k = sum(x != 0 for x in d), sum(x > 0 for x in d)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(min(k, n - k) + 1)) / 2 ** n)

def _entry(rs: list[dict], ref_rs: list[dict] | None = None) -> str:
    """One table entry: mean score, '*' (its interval and that of the reference's records `ref_rs` are disjoint),
    '†' (paired_sign_test against them: p < 0.05), [interval] n=prompts (mean ratio), '[k err]'/'error' (some/all)."""
    ok, errors = [r for r in rs if not r.get("error")], len([r for r in rs if r.get("error")])
    if not ok:
        return "error" if errors else ""
    (score, lo, hi, n), ratio = summary(ok), mean(r["cache_ratio"] for r in ok)
    ref = summary(ref_rs)[1:3] if ref_rs else (math.nan, math.nan)
    mark, ci = "*" if hi < ref[0] or lo > ref[1] else "", "" if lo != lo else f" [{lo:.2f}, {hi:.2f}]"
    mark += "†" if ref_rs and paired_sign_test(ok, ref_rs) < 0.05 else ""
    return ("-" if score != score else f"{score:.2f}") + mark + ci + f" n={n} ({ratio:.2f})" + \
        (f" [{errors} err]" if errors else "")

def markdown_table(records: list[dict], budgets: list[str] | None = None, policies: list[str] | None = None) -> str:
    """Policy rows × budget columns: mean score [95% interval] n=prompts (mean measured cache ratio); '*' and '†' (see
    _entry) compare with the first row (full, when listed first) in that column. Budget-free policies (full,
    corm, ...) ran once per cell and are repeated in every column. One table per (task, question mode), and one of
    all the subtasks of a task together ("ruler-lite (all)")."""
    if not records:
        return "(no records)"
    groups, parts = group_by(records, "task", "question"), []
    for base, qmode in dict.fromkeys((t.split("/")[0], q) for t, q in groups if "/" in t):
        tasks = [t for t, q in groups if q == qmode and t.split("/")[0] == base]
        if len(tasks) > 1:
            groups[(f"{base} (all)", qmode)] = [r for t in tasks for r in groups[(t, qmode)]]
    for (task, qmode), recs in groups.items():
        budgets_here = budgets or list(dict.fromkeys(r["budget"] for r in recs if r["budget"] is not None)) or ["-"]
        pols = [p for p in (policies or []) if any(r["policy"] == p for r in recs)]
        pols += [p for p in dict.fromkeys(r["policy"] for r in recs) if p not in pols]
        cells = group_by(recs, "policy", "budget")
        entry = {(p, b): cells.get((p, b)) or cells.get((p, None)) or [] for p in pols for b in budgets_here}
        metrics = "/".join(dict.fromkeys(str(r.get("metric")) for r in recs if r.get("metric")))
        what, n, interval = ("perplexity, lower is better", "texts", f"percentile bootstrap over the texts "
                             f"({RESAMPLES} resamples, seed 0; none for one text)") if task == "ppl" else \
            (f"mean score ({metrics})", "prompts", "Wilson score interval")
        mode = "" if qmode == "none" else f"question-{qmode}; "          # ppl has no question
        rows = [{"policy": p, **{f"budget {b}": _entry(entry[(p, b)], entry[(pols[0], b)] if i else None)
                                 for b in budgets_here}} for i, p in enumerate(pols)]
        parts += [f"**{task}** ({mode}{what} [95% interval] n={n} (mean measured cache ratio))\n", format_rows(rows),
                  f"\nn = lengths × depths × samples; interval: {interval}; *: the interval does not overlap "
                  f"{pols[0]}'s in the same column (conservative); †: a two-sided sign test against {pols[0]}'s "
                  f"{n} in the same column, paired one to one (ties dropped), gives p < 0.05.\n"]
    return "\n".join(parts).rstrip() + "\n"

# ---- one run per output folder ---------------------------------------------------------------------------------------
@contextmanager
def output_lock(folder: str | Path, command: str):
    """Hold an exclusive flock on folder/eval.lock (naming pid, host, start, command): a second run on the folder is
    refused. The kernel drops a dead process's flock: its lock file is taken over, unless it names another host."""
    path = Path(folder) / LOCK
    while True:
        try:
            f = open(path, "a+", encoding="utf-8")         # created when missing, never truncated here
        except OSError as e:
            raise BadInput(f"cannot create {path}: {e.strerror or e}") from None
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            time.sleep(0.2)                                 # a run that has just taken it writes its name
            with f:                                         # held: _refuse raises
                _refuse(path, (f.seek(0), f.read())[1], held=True)
        if os.fstat(f.fileno()).st_nlink:                   # not removed by the run that held it before us
            break
        f.close()
    with f:
        text = (f.seek(0), f.read())[1]
        if text:
            _refuse(path, text, held=False)
        f.truncate(0)
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": command,
                            "started": datetime.now().astimezone().isoformat(timespec="seconds")}) + "\n")
        f.flush()
        try:
            yield
        finally:
            path.unlink(missing_ok=True)

def _refuse(path: Path, text: str, held: bool) -> None:
    """Refuse a lock naming no holder, or one held or of another host; else note that we take it over."""
    try:
        holder = json.loads(text)
    except json.JSONDecodeError:
        holder = None
    if not (isinstance(holder, dict) and isinstance(holder.get("pid"), int) and isinstance(holder.get("host"), str)):
        raise BadInput(f"{path} exists but does not name its holder (content {text[:60]!r}); if no other "
                       f"`minikv eval` writes to {path.parent}, delete it and run again")
    if held or holder["host"] != socket.gethostname():
        where = "" if holder["host"] == socket.gethostname() else f" on host {holder['host']}"
        raise BadInput(f"{path.parent} is in use by another minikv eval: pid {holder['pid']}{where}, running since "
                       f"{holder.get('started', '?')} ({holder.get('command', '?')}); wait for it (a re-run skips the "
                       f"cells it finished), use another --out, or, if that process is gone, delete {path}")
    print(f"minikv eval: note: taking over the stale lock {path} of pid {holder['pid']} "
          f"(since {holder.get('started', '?')}), which no longer holds it", file=sys.stderr)
