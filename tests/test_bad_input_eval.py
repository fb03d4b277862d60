"""`minikv eval` refuses bad input with one line `minikv: error: ...` (exit status 2) naming the value, before the
model loads where it can; it never loses a finished record: Ctrl-C keeps them and prints the command that resumes,
a second run on the same folder is refused by a lock, a stale lock is taken over, a damaged records.jsonl is read
around. Everything runs on the tiny model folder (a cell takes well under a second)."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from minikv.cli import main
from minikv.eval import records as R

REPO = Path(__file__).resolve().parent.parent
FAST = ["--task", "passkey", "--policies", "full", "--lengths", "300", "--no-progress"]      # 1 cell, < 1 s


def run_eval(argv, model_dir, out, capsys):
    """main(["eval", *argv, --model, --out]) -> (return value, stdout, stderr)."""
    code = main(["eval", *argv, "--model", str(model_dir), "--out", str(out)])
    got = capsys.readouterr()
    return code, got.out, got.err


def assert_refused(code, out, err, value):
    """Exit status 2 and exactly one stderr line `minikv: error: ...` that names the value; no traceback."""
    assert code == 2, (code, err)
    lines = err.strip("\n").splitlines()
    assert len(lines) == 1 and lines[0].startswith("minikv: error:"), err
    assert value in lines[0], (value, lines[0])
    assert "Traceback" not in out + err


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


LONGBENCH_ROW = {"context": "some text " * 20, "input": "what?", "answers": ["text"], "dataset": "hotpotqa"}

# (id, extra arguments (replacing FAST's where they name the same option), a text the error line must contain).
# {tmp} is the test's tmp_path. Each is a distinct bad input; they all fail before any cell runs.
BAD = [
    ("ppl-prefix-default-above-length", ["--task", "ppl", "--lengths", "300"], "--ppl-prefix 512"),
    ("ppl-prefix-equals-length", ["--task", "ppl", "--lengths", "300", "--ppl-prefix", "300"], "300"),
    ("ppl-prefix-zero", ["--task", "ppl", "--lengths", "300", "--ppl-prefix", "0"], "--ppl-prefix 0"),
    ("samples-zero", ["--samples", "0"], "--samples 0"),
    ("samples-negative", ["--samples", "-1"], "--samples -1"),
    ("samples-huge", ["--samples", "1000000000"], "1000000000"),
    ("depth-above-1", ["--depths", "1.5"], "1.5"),
    ("depth-negative", ["--depths", "-0.1"], "-0.1"),
    ("depth-nan", ["--depths", "nan"], "nan"),
    ("depths-empty", ["--depths", ","], "','"),
    ("depths-duplicate", ["--depths", "0.5,0.5"], "0.5"),
    ("length-zero", ["--lengths", "0"], "--lengths 0"),
    ("length-negative", ["--lengths", "-5"], "-5"),
    ("length-not-a-number", ["--lengths", "3e2"], "3e2"),
    ("lengths-empty", ["--lengths", ","], "','"),
    ("lengths-duplicate", ["--lengths", "300,300"], "300"),
    ("length-above-context", ["--lengths", "5000"], "5000"),
    ("length-too-short-for-prompt", ["--lengths", "200"], "200"),
    ("budgets-empty", ["--policies", "full,h2o", "--budgets", ","], "','"),
    ("budgets-duplicate", ["--policies", "full,h2o", "--budgets", "0.2,0.20"], "0.2"),
    ("budget-zero", ["--policies", "h2o", "--budgets", "0"], "'0'"),
    ("policies-empty", ["--policies", ","], "','"),
    ("ruler-subtask-unknown", ["--task", "ruler-lite", "--subtasks", "vt,bogus"], "bogus"),
    ("ruler-subtasks-empty", ["--task", "ruler-lite", "--subtasks", ","], "','"),
    ("ruler-subtask-duplicate", ["--task", "ruler-lite", "--subtasks", "vt,vt"], "'vt'"),
    ("threads-zero", ["--threads", "0"], "--threads 0"),
    ("threads-absurd", ["--threads", "100000"], "100000"),
    ("view-layer-out-of-range", ["--view-layer", "99"], "--view-layer 99"),
    ("view-layer-negative", ["--view-layer", "-1"], "--view-layer -1"),
    ("view-head-out-of-range", ["--view-head", "7"], "--view-head 7"),
    ("seed-negative", ["--seed", "-1"], "--seed -1"),
    ("seed-too-large", ["--seed", str(2**64)], str(2**64)),
    ("data-for-another-task", ["--data", "{tmp}/rows.jsonl"], "rows.jsonl"),
    ("longbench-data-missing", ["--task", "longbench-local", "--data", "{tmp}/missing.jsonl"], "missing.jsonl"),
    ("longbench-data-a-folder", ["--task", "longbench-local", "--data", "{tmp}"], "{tmp}"),
    ("longbench-data-not-jsonl", ["--task", "longbench-local", "--data", "{tmp}/notes.txt"], "notes.txt:1"),
    ("longbench-data-binary", ["--task", "longbench-local", "--data", "{tmp}/binary.jsonl"], "binary.jsonl:1"),
    ("longbench-row-not-object", ["--task", "longbench-local", "--data", "{tmp}/list.jsonl"], "list.jsonl:2"),
    ("longbench-row-wrong-type", ["--task", "longbench-local", "--data", "{tmp}/types.jsonl"], "context is 5"),
    ("longbench-data-empty", ["--task", "longbench-local", "--data", "{tmp}/empty.jsonl"], "empty.jsonl"),
    ("out-is-a-file", ["--out", "{tmp}/notes.txt"], "notes.txt"),
    ("out-under-a-file", ["--out", "{tmp}/notes.txt/run"], "notes.txt/run"),
]


def _with(base: list[str], extra: list[str]) -> list[str]:
    """base with extra's options replacing the same options of base."""
    out, given = list(base), {a for a in extra if a.startswith("--")}
    i = 0
    while i < len(out):
        if out[i] in given:
            del out[i:i + (1 if out[i] == "--no-progress" else 2)]
        else:
            i += 1
    return out + extra


@pytest.mark.parametrize("extra,value", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_is_one_named_error(tiny_model_dir, tmp_path, capsys, extra, value):
    write(tmp_path / "notes.txt", "these are notes, not JSON\n")
    write(tmp_path / "rows.jsonl", json.dumps(LONGBENCH_ROW) + "\n")
    (tmp_path / "binary.jsonl").write_bytes(b"\xff\xfe\x00garbage\n")
    write(tmp_path / "list.jsonl", json.dumps(LONGBENCH_ROW) + "\n[1, 2]\n")
    write(tmp_path / "types.jsonl", json.dumps(dict(LONGBENCH_ROW, context=5)) + "\n")
    write(tmp_path / "empty.jsonl", "\n")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in extra]
    out_dir = tmp_path / "out"
    if "--out" in argv:
        out_dir = Path(argv[argv.index("--out") + 1])
        argv = argv[:argv.index("--out")] + argv[argv.index("--out") + 2:]
    code, out, err = run_eval(_with(FAST, argv), tiny_model_dir, out_dir, capsys)
    assert_refused(code, out, err, value.replace("{tmp}", str(tmp_path)))
    assert not (out_dir / R.LOCK).exists()                            # released on the error path too
    assert not (out_dir / R.RECORDS).exists()                         # refused before any cell ran


def test_ppl_prefix_refused_before_the_model_loads(tmp_path, capsys):
    """The prefix check needs no model: a model folder that does not exist is never reached."""
    code, out, err = run_eval(["--task", "ppl", "--lengths", "400", "--ppl-prefix", "512"], tmp_path / "no-model",
                              tmp_path / "out", capsys)
    assert_refused(code, out, err, "--ppl-prefix 512")
    assert "400" in err and "below 400" in err


# ---- the lock ------------------------------------------------------------------------------------------------------
def test_stale_lock_is_taken_over(tiny_model_dir, tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()                                                       # a pid that no longer exists
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    write(out_dir / R.LOCK, json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": "earlier",
                                        "command": "minikv eval ..."}))
    code, out, err = run_eval(FAST, tiny_model_dir, out_dir, capsys)
    assert code == 0, err
    assert f"taking over the stale lock {out_dir / R.LOCK} of pid {dead.pid}" in err
    assert len(R.read_records(out_dir)) == 1 and not (out_dir / R.LOCK).exists()


@pytest.mark.parametrize("holder,value", [
    ({"pid": 1, "host": "elsewhere", "started": "2024-01-01T00:00:00"}, "pid 1 on host elsewhere"),
    (None, "does not name its holder"),
], ids=["other-host", "garbage"])
def test_lock_we_cannot_judge_is_refused(tiny_model_dir, tmp_path, capsys, holder, value):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    write(out_dir / R.LOCK, "not json" if holder is None else json.dumps(holder))
    code, out, err = run_eval(FAST, tiny_model_dir, out_dir, capsys)
    assert_refused(code, out, err, value)
    assert str(out_dir / R.LOCK) in err and (out_dir / R.LOCK).exists()        # not ours: left alone


def start_eval(tiny_model_dir, out_dir: Path, samples: int) -> subprocess.Popen:
    """A real `python3 -m minikv eval` of `samples` one-cell prompts, Ctrl-C-able (SIGINT at its default even
    when this test runs in the background, where SIGINT is ignored and children inherit that)."""
    return subprocess.Popen(
        [sys.executable, "-m", "minikv", "eval", *_with(FAST, ["--samples", str(samples)]),
         "--model", str(tiny_model_dir), "--out", str(out_dir)], cwd=REPO, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def wait_for(condition, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"eval exited early ({proc.returncode}): {proc.communicate()[1][-2000:]}")
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def has_records(out_dir: Path) -> bool:
    path = out_dir / R.RECORDS
    return path.exists() and path.stat().st_size > 0


def test_second_run_on_one_folder_is_refused(tiny_model_dir, tmp_path, capsys):
    out_dir = tmp_path / "out"
    first = start_eval(tiny_model_dir, out_dir, samples=40)
    try:
        wait_for(lambda: (out_dir / R.LOCK).exists() and (out_dir / R.LOCK).stat().st_size > 0, first)
        holder = json.loads((out_dir / R.LOCK).read_text())
        assert holder["pid"] == first.pid and holder["host"] == socket.gethostname() and "--samples 40" in \
            holder["command"]
        code, out, err = run_eval(_with(FAST, ["--samples", "40"]), tiny_model_dir, out_dir, capsys)
        assert_refused(code, out, err, f"pid {first.pid}")
        assert holder["started"] in err and f"delete {out_dir / R.LOCK}" in err
    finally:
        first.send_signal(signal.SIGINT)
        first.communicate(timeout=60)
    assert first.returncode == 130 and not (out_dir / R.LOCK).exists()           # released on Ctrl-C


# ---- nothing lost --------------------------------------------------------------------------------------------------
def test_ctrl_c_keeps_records_prints_resume_and_rerun_skips(tiny_model_dir, tmp_path, capsys):
    out_dir = tmp_path / "out"
    proc = start_eval(tiny_model_dir, out_dir, samples=20)
    wait_for(lambda: has_records(out_dir), proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "interrupted" in line]
    assert len(lines) == 1, err
    m = re.fullmatch(r"minikv eval: interrupted; (\d+) of 20 cells finished, kept in (.+); resume with: (.+)",
                     lines[0])
    assert m and m[2] == str(out_dir / R.RECORDS), lines[0]
    assert m[3].startswith("python3 -m minikv eval --task passkey") and f"--out {out_dir}" in m[3]
    assert "--samples 20" in m[3] and f"--model {tiny_model_dir}" in m[3]
    kept = R.read_records(out_dir)
    assert len(kept) == int(m[1]) >= 1 and not (out_dir / R.LOCK).exists()
    before = (out_dir / R.RECORDS).read_bytes()
    # The re-run (here only the first prompts, to stay quick) skips what the interrupted run finished.
    n = min(2, len(kept))
    code, _, err = run_eval(_with(FAST, ["--samples", str(n)]), tiny_model_dir, out_dir, capsys)
    assert code == 0 and f"{n} cells: ran 0, skipped {n}" in err
    assert (out_dir / R.RECORDS).read_bytes() == before                          # not rewritten


def test_damaged_records_are_skipped_with_a_warning_and_nothing_is_lost(tiny_model_dir, tmp_path, capsys):
    out_dir = tmp_path / "out"
    argv = _with(FAST, ["--samples", "2"])
    code, _, err = run_eval(argv, tiny_model_dir, out_dir, capsys)
    assert code == 0, err
    path = out_dir / R.RECORDS
    good = path.read_bytes()
    first, second = [json.loads(line) for line in good.splitlines()]
    damage = [json.dumps([1, 2]),                                     # line 3: not an object
              json.dumps({"id": "x", "note": "hand-written"}),        # line 4: lacks keys
              json.dumps(dict(first, id="y", score="high")),          # line 5: wrong type
              "\x00\x01 not json",                                    # line 6: garbage
              json.dumps(dict(second, id=["a list"]))]                # line 7: an id that is not a string
    with open(path, "ab") as f:
        f.write(("\n".join(damage) + "\n").encode() + b'{"id": "cut off mid-wri')      # line 8: cut off
    code, out, err = run_eval(argv, tiny_model_dir, out_dir, capsys)
    assert code == 0 and "Traceback" not in out + err
    assert "2 cells: ran 0, skipped 2" in err                          # both finished records still count
    warned = [line for line in err.splitlines() if line.startswith("minikv eval: warning:")]
    assert [int(re.match(rf"minikv eval: warning: {re.escape(str(path))}:(\d+):", w)[1]) for w in warned] == \
        [3, 4, 5, 6, 7, 8]
    assert "missing key(s)" in warned[1] and "score is" in warned[2] and "cut off" in warned[5]
    assert path.read_bytes().startswith(good)                          # finished records never rewritten

    # A finished record damaged by hand: its cell runs again; the other is kept; nothing is removed from the file.
    lines = good.decode().splitlines()
    write(path, lines[0][:40] + "\n" + lines[1] + "\n")
    code, _, err = run_eval(argv, tiny_model_dir, out_dir, capsys)
    assert code == 0 and "2 cells: ran 1, skipped 1" in err and f"{path}:1:" in err
    after = path.read_text().splitlines()
    assert after[:2] == [lines[0][:40], lines[1]] and len(after) == 3
    assert {r["id"] for r in R.read_records(out_dir)} == {first["id"], second["id"]}


# ---- progress ------------------------------------------------------------------------------------------------------
def test_progress_without_tqdm(tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)                    # `from tqdm import tqdm` -> ImportError
    argv = [a for a in _with(FAST, ["--samples", "2"]) if a != "--no-progress"]
    code, _, err = run_eval(argv, tiny_model_dir, tmp_path / "out", capsys)
    assert code == 0, err
    counts = re.findall(r"^eval passkey: (\d)/2 \[\d+s", err, re.M)
    assert counts == ["0", "1", "2"], err
    assert "left]" in err                                              # an estimate once a cell finished
