"""One JSON record per grid cell in DIR/records.jsonl (appended and flushed as each cell finishes, so an interrupted
run resumes by skipping the cell ids already there), the markdown table rendered from them, and DIR/eval.lock, which
keeps a second run off a folder that one is writing.

records.jsonl is only ever appended to: a line that is not a usable record (cut off by a kill, edited by hand) is
skipped with a warning naming the file and line, its cell runs again, and the line itself stays as it was.

A cell id is readable (task|policy|budget|length|depth|sample|question mode) plus a short hash of everything else
that decides the result (seed, options, model, dtype, task settings), so changing any of those runs the cell again.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import resource
import socket
import sys
import time
from collections import defaultdict
from datetime import datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from minikv.errors import BadInput
from minikv.tools.common import format_rows

RECORDS, LOCK = "records.jsonl", "eval.lock"


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
        return version("minikv")
    except PackageNotFoundError:
        pass
    try:
        for line in (Path(__file__).resolve().parents[3] / "pyproject.toml").read_text().splitlines():
            if line.strip().startswith("version"):
                return line.split("=", 1)[1].strip().strip('"') + "+src"
    except OSError:
        pass
    return "unknown"


_rss_peak_was_reset = False                    # set once /proc/self/clear_refs accepted a reset


def reset_peak_memory(device) -> None:
    """Start a new peak-memory window: CUDA's counter, or Linux's peak RSS (VmHWM, reset via clear_refs)."""
    global _rss_peak_was_reset
    if torch.device(device).type == "cuda":
        return torch.cuda.reset_peak_memory_stats(device)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _rss_peak_was_reset = True
    except OSError:
        _rss_peak_was_reset = False            # not Linux, or not allowed: peak_memory says it is the process peak


def peak_memory(device) -> tuple[int, str]:
    """(bytes, kind) since the last reset_peak_memory: torch.cuda.max_memory_allocated on GPU ("cuda_max_allocated");
    on Linux the process's peak RSS (VmHWM: whole process, weights and Python included, "rss_peak_since_reset"); else
    the process's lifetime peak RSS (resource.getrusage, "process_peak_rss": the largest of all cells so far)."""
    if torch.device(device).type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_allocated"
    try:
        if _rss_peak_was_reset:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024, "rss_peak_since_reset"
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024), "process_peak_rss"


# ---- records.jsonl ---------------------------------------------------------------------------------------------------
# What a record must hold for the resume logic and the table to use it: key -> accepted types. A record that is JSON
# but breaks this (hand-edited, or written by something else) is skipped with a warning and its cell runs again.
RECORD_FIELDS = {"id": (str,), "task": (str,), "policy": (str,), "question": (str,), "budget": (str, type(None))}
RESULT_FIELDS = {"score": (int, float, type(None)), "cache_ratio": (int, float)}        # records without an error


def record_problem(rec) -> str | None:
    """Why a parsed JSON value cannot be used as a record (None when it can)."""
    if not isinstance(rec, dict):
        return f"a JSON {type(rec).__name__}, not an object"
    fields = dict(RECORD_FIELDS, **({} if rec.get("error") else RESULT_FIELDS))
    missing = [k for k in fields if k not in rec]
    if missing:
        return f"missing key(s) {', '.join(missing)}"
    for key, types in dict(fields, error=(str, type(None))).items():
        value = rec.get(key)
        if isinstance(value, bool) or not isinstance(value, types) or (key == "id" and not value):
            want = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            return f"{key} is {json.dumps(value, default=str)[:40]}, expected {want}"
    return None


def scan_records(out_dir: str | Path) -> tuple[list[dict], list[str]]:
    """(usable records, a 'FILE:LINE: why skipped' note per unusable line) of DIR/records.jsonl (only read)."""
    path = Path(out_dir) / RECORDS
    if not path.exists():
        return [], []
    try:
        with open(path, "rb") as f:                   # bytes: a line of binary garbage must not stop the others
            lines = f.read().split(b"\n")
    except OSError as e:
        raise BadInput(f"cannot read {path}: {e.strerror or e}") from None
    out, notes = [], []
    for i, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            notes.append(f"{path}:{i}: not valid JSON, e.g. cut off by an interrupted run ({e}); skipped, its cell "
                         f"runs again")
            continue
        problem = record_problem(rec)
        if problem:
            notes.append(f"{path}:{i}: not a minikv eval record ({problem}); skipped, its cell runs again")
        else:
            out.append(rec)
    return out, notes


def read_records(out_dir: str | Path, warn: bool = False) -> list[dict]:
    """Every usable record in DIR/records.jsonl (warning on stderr about each skipped line when `warn`)."""
    records, notes = scan_records(out_dir)
    for note in notes if warn else ():
        print(f"minikv eval: warning: {note}", file=sys.stderr)
    return records


def append_record(out_dir: str | Path, record: dict) -> None:
    """Append one record and force it to disk, so a crash right after loses nothing."""
    path = Path(out_dir) / RECORDS
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        f.seek(0, os.SEEK_END)
        cut = f.tell() > 0 and (f.seek(-1, os.SEEK_END), f.read(1))[1] != b"\n"   # a run died mid-line
        f.write((("\n" if cut else "") + json.dumps(record, default=str) + "\n").encode("utf-8"))
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


def _entry(rs: list[dict]) -> str:
    """One table entry: mean score (mean measured ratio), '[k err]' when some cells failed, 'error' when all did."""
    ok, errors = [r for r in rs if not r.get("error")], len([r for r in rs if r.get("error")])
    if not ok:
        return "error" if errors else ""
    score, ratio = _mean(r["score"] for r in ok), _mean(r["cache_ratio"] for r in ok)
    return ("-" if score is None else f"{score:.2f}") + f" ({ratio:.2f})" + (f" [{errors} err]" if errors else "")


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
        metrics = "/".join(dict.fromkeys(str(r.get("metric")) for r in recs if r.get("metric")))
        what = "perplexity, lower is better" if task == "ppl" else f"mean score ({metrics})"
        mode = "" if qmode == "none" else f"question-{qmode}; "          # ppl has no question
        rows = [{"policy": p, **{f"budget {b}": _entry(cells.get((p, b)) or cells.get((p, None)) or [])
                                 for b in budgets_here}} for p in pols]
        parts += [f"**{task}** ({mode}{what}; in parentheses: mean measured cache ratio)\n", format_rows(rows),
                  f"\n{max(map(len, cells.values()))} cell(s) per entry (lengths × depths × samples).\n"]
    return "\n".join(parts).rstrip() + "\n"


# ---- one run per output folder ---------------------------------------------------------------------------------------
def _read_lock(path: Path) -> tuple[str | None, dict | None]:
    """(raw text, holder or None when it names none) of a lock file; (None, None) when it has vanished."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
        if not text:                                    # just created by a run that has not written it yet
            time.sleep(0.2)
            text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return None, None
    try:
        holder = json.loads(text)
    except json.JSONDecodeError:
        return text, None
    ok = isinstance(holder, dict) and isinstance(holder.get("pid"), int) and isinstance(holder.get("host"), str)
    return text, holder if ok else None


def _is_stale(holder: dict) -> bool:
    """A lock taken on this host by a process that no longer exists (killed, machine crash before a release)."""
    if holder["host"] != socket.gethostname():
        return False
    try:
        os.kill(holder["pid"], 0)
    except PermissionError:                             # exists, but not ours to signal
        return False
    except (ProcessLookupError, OverflowError, ValueError):
        return True
    return False


def _take_over(path: Path, stale_text: str) -> None:
    """Remove the stale lock whose content is `stale_text`. It is renamed aside first, so that of two runs taking
    over at once, the second cannot remove the lock the first has just made (that one is put back)."""
    aside = path.with_name(f"{path.name}.stale-{os.getpid()}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return                                          # another run took it over first
    try:
        if aside.read_text(encoding="utf-8", errors="replace") != stale_text:
            try:
                os.link(aside, path)                    # a live lock taken meanwhile: restore it
            except FileExistsError:
                pass
    finally:
        aside.unlink(missing_ok=True)


class OutputLock:
    """`with OutputLock(folder, command):` holds folder/eval.lock (created with O_CREAT | O_EXCL, holding pid, host,
    start time and command) so that a second run on the same folder is refused instead of computing every cell
    twice. A lock left by a process that no longer exists on this host is taken over with a one-line note."""

    def __init__(self, folder: str | Path, command: str):
        self.path, self.command, self.mine = Path(folder) / LOCK, command, None

    def __enter__(self) -> "OutputLock":
        me = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                         "started": datetime.now().astimezone().isoformat(timespec="seconds"),
                         "command": self.command}) + "\n"
        for _ in range(3):                              # a takeover can race with another run: try again
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                fd = None
            except OSError as e:
                raise BadInput(f"cannot create {self.path}: {e.strerror or e} (--out must be a folder you can "
                               f"write to)") from None
            if fd is None:
                self._refuse_or_take_over()
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(me)
            self.mine = me
            return self
        raise BadInput(f"could not take {self.path}: other runs keep taking it; check that no other `minikv eval` "
                       f"writes to {self.path.parent}")

    def _refuse_or_take_over(self) -> None:
        """Raise BadInput naming the run that holds the lock, or take over a stale one."""
        text, holder = _read_lock(self.path)
        if text is None:
            return                                      # released between our open and our read
        if holder is None:
            raise BadInput(f"{self.path} exists but does not name its holder (content {text[:60]!r}); if no other "
                           f"`minikv eval` writes to {self.path.parent}, delete it and run again")
        if not _is_stale(holder):
            where = "" if holder["host"] == socket.gethostname() else f" on host {holder['host']}"
            raise BadInput(f"{self.path.parent} is in use by another minikv eval: pid {holder['pid']}{where}, running "
                           f"since {holder.get('started', '?')} ({holder.get('command', '?')}); wait for it to finish "
                           f"(a re-run then skips the cells it finished), use another --out, or, if that process is "
                           f"gone, delete {self.path}")
        print(f"minikv eval: note: taking over the stale lock {self.path} of pid {holder['pid']} "
              f"(since {holder.get('started', '?')}), which no longer runs", file=sys.stderr)
        _take_over(self.path, text)

    def __exit__(self, *exc) -> None:
        """Remove the lock if it is still ours (never another run's)."""
        try:
            if self.mine is not None and self.path.read_text(encoding="utf-8") == self.mine:
                self.path.unlink()
        except OSError:
            pass
        self.mine = None
