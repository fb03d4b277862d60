"""One JSON record per grid cell in DIR/records.jsonl (appended and flushed as each cell finishes, so an interrupted
run resumes by skipping the cell ids already there), and the markdown table rendered from them.

A cell id is readable (task|policy|budget|length|depth|sample|question mode) plus a short hash of everything else
that decides the result (seed, options, model, dtype, task settings), so changing any of those runs the cell again.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import resource
import sys
from collections import defaultdict
from pathlib import Path

import torch

RECORDS = "records.jsonl"


# ---- ids and provenance -------------------------------------------------------------------------------------------
def cell_id(key: dict) -> str:
    """'passkey|h2o|b0.2|n2000|d0.5|s0|aware|<10 hex>': readable fields, then a hash of the whole key."""
    digest = hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:10]
    depth = "-" if key.get("depth") is None else f"{key['depth']:g}"
    return (f"{key['task']}|{key['policy']}|b{key.get('budget') or '-'}|n{key.get('length')}|d{depth}|"
            f"s{key.get('sample')}|{key.get('question')}|{digest}")


def minikv_version() -> str:
    """The installed package version, else the version in the source tree's pyproject.toml."""
    try:
        from importlib.metadata import PackageNotFoundError, version
        return version("minikv")
    except PackageNotFoundError:
        pass
    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    try:
        for line in pyproject.read_text().splitlines():
            if line.strip().startswith("version"):
                return line.split("=", 1)[1].strip().strip('"') + "+src"
    except OSError:
        pass
    return "unknown"


_rss_peak_was_reset = False                    # set once /proc/self/clear_refs accepted a reset


def reset_peak_memory(device) -> None:
    """Start a new peak-memory window: CUDA's peak counter, or on Linux the process's peak RSS (VmHWM), which
    writing "5" to /proc/self/clear_refs resets; elsewhere the process RSS peak cannot be reset."""
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    global _rss_peak_was_reset
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _rss_peak_was_reset = True
    except OSError:
        _rss_peak_was_reset = False            # not Linux, or not allowed: peak_memory says it is the process peak


def _linux_rss_peak_since_reset() -> int | None:
    """VmHWM of /proc/self/status in bytes, or None when unavailable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_memory(device) -> tuple[int, str]:
    """(bytes, kind) since the last reset_peak_memory: torch.cuda.max_memory_allocated on GPU ("cuda_max_allocated");
    on Linux the process's peak RSS (whole process: weights and Python included, "rss_peak_since_reset"); else the
    process's lifetime peak RSS (resource.getrusage, "process_peak_rss": the largest of all cells so far)."""
    if torch.device(device).type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_allocated"
    hwm = _linux_rss_peak_since_reset() if _rss_peak_was_reset else None
    if hwm is not None:
        return hwm, "rss_peak_since_reset"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024), "process_peak_rss"


# ---- records.jsonl ---------------------------------------------------------------------------------------------------
def read_records(out_dir: str | Path) -> list[dict]:
    """Every complete record in DIR/records.jsonl (a line cut short by an interruption is ignored)."""
    path = Path(out_dir) / RECORDS
    if not path.exists():
        return []
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and "id" in rec:
                out.append(rec)
    return out


def append_record(out_dir: str | Path, record: dict) -> None:
    """Append one record and force it to disk, so a crash right after loses nothing."""
    path = Path(out_dir) / RECORDS
    path.parent.mkdir(parents=True, exist_ok=True)
    needs_newline = path.exists() and path.stat().st_size > 0 and not path.read_bytes().endswith(b"\n")
    with open(path, "a", encoding="utf-8") as f:
        if needs_newline:                     # a previous run died mid-line: start a fresh line
            f.write("\n")
        f.write(json.dumps(record, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


def finished_ids(records: list[dict]) -> set[str]:
    """Ids of cells that completed (records with an error are run again)."""
    return {r["id"] for r in records if not r.get("error")}


# ---- the table -------------------------------------------------------------------------------------------------------
def _mean(xs):
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return sum(xs) / len(xs) if xs else None


def table_groups(records: list[dict]) -> dict[tuple, list[dict]]:
    """Records grouped by (task, question mode), in first-seen order; tasks with subtasks ("ruler-lite/vt", ...)
    also get a group of all their subtasks together ("ruler-lite (all)")."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["task"], r["question"]), []).append(r)
    families = defaultdict(set)
    for task, qmode in groups:
        if "/" in task:
            families[(task.split("/")[0], qmode)].add(task)
    for (base, qmode), tasks in families.items():
        if len(tasks) > 1:
            groups[(f"{base} (all)", qmode)] = [r for t in tasks for r in groups[(t, qmode)]]
    return groups


def markdown_table(records: list[dict], budgets: list[str] | None = None, policies: list[str] | None = None) -> str:
    """Policy rows × budget columns: mean score (mean measured cache ratio, cells). Budget-free policies (full,
    corm, ...) ran once per cell and are repeated in every column. One table per (task, question mode)."""
    if not records:
        return "(no records)"
    parts = []
    for (task, qmode), recs in table_groups(records).items():
        budgets_here = budgets or list(dict.fromkeys(r["budget"] for r in recs if r["budget"] is not None)) or ["-"]
        pols = [p for p in (policies or []) if any(r["policy"] == p for r in recs)]
        pols += [p for p in dict.fromkeys(r["policy"] for r in recs) if p not in pols]
        cells = defaultdict(list)
        for r in recs:
            cells[(r["policy"], r["budget"])].append(r)
        ppl = task == "ppl"
        metrics = "/".join(dict.fromkeys(str(r.get("metric")) for r in recs if r.get("metric")))
        what = "perplexity, lower is better" if ppl else f"mean score ({metrics})"
        mode = "" if qmode == "none" else f"question-{qmode}; "          # ppl has no question
        parts.append(f"**{task}** ({mode}{what}; in parentheses: mean measured cache ratio)\n")
        parts.append("| policy | " + " | ".join(f"budget {b}" for b in budgets_here) + " |")
        parts.append("|---|" + "---|" * len(budgets_here))
        for p in pols:
            row = []
            for b in budgets_here:
                rs = cells.get((p, b)) or cells.get((p, None)) or []
                rs = [r for r in rs if not r.get("error")]
                errors = [r for r in cells.get((p, b)) or cells.get((p, None)) or [] if r.get("error")]
                if not rs:
                    row.append("error" if errors else "")
                    continue
                score, ratio = _mean(r["score"] for r in rs), _mean(r["cache_ratio"] for r in rs)
                s = "-" if score is None else f"{score:.2f}"
                row.append(f"{s} ({ratio:.2f})" + (f" [{len(errors)} err]" if errors else ""))
            parts.append(f"| {p} | " + " | ".join(row) + " |")
        n = defaultdict(int)
        for r in recs:
            n[(r["policy"], r["budget"])] += 1
        parts.append(f"\n{max(n.values())} cell(s) per entry (lengths × depths × samples).\n")
    return "\n".join(parts).rstrip() + "\n"
