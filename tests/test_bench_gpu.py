"""`minikv bench gpu` and `minikv bench report` on the CPU (no GPU here; the real run is a single, costly device call,
so its machinery is checked first): rows of the tiny shape through the real generate(), the env plan, the max-batch
search and its back-off (fake runs with a memory model), profiler summaries, the sync check's error path, and the
report's merge and targets (each one's pass, miss and "not measured")."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from torch.autograd import DeviceType

from minikv.config import LlamaConfig
from minikv.model import Llama
from minikv.tools import bench
from minikv.tools.cli import main

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, rope_theta=10000.0, max_position_embeddings=2048, tie_word_embeddings=False)
P = 192           # prompt tokens: snapkv's observation window (32) fits in its 0.2 budget
GiB = 2**30


@pytest.fixture(autouse=True)
def tiny_shape(monkeypatch):
    monkeypatch.setitem(bench.SHAPES, "tiny", TINY)


@pytest.fixture(scope="module")
def tiny():
    return bench.random_model(lambda: Llama(LlamaConfig(**TINY)), torch.float32, "cpu")


def run_cli(argv, capsys):
    code = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


# ---- rows through the real generate() ------------------------------------------------------------------------
def test_minikv_rows_on_cpu(tiny):
    full = bench.run_minikv(tiny, "full", 0.2, 2, P, 5)
    h2o = bench.run_minikv(tiny, "h2o", 0.2, 3, P, 5)
    for r, batch in ((full, 2), (h2o, 3)):
        assert r["batch"] == batch and r["capture_s"] == 0.0 and r["decode_s"] > 0 and r["prefill_s"] > 0
        assert 0 < r["decode_ms_per_step"] < 1000 * r["decode_s"]                      # one steady step of 4
        assert r["decode_tok_per_s"] == pytest.approx(batch * 1000 / r["decode_ms_per_step"])
        assert r["peak_gib"] == 0.0                                                     # no CUDA here
        assert r["kv_alloc_gib"] >= r["kv_live_gib"] > 0
    assert full["cache_ratio"] == 1.0 and full["kv_live_gib"] == pytest.approx(full["kv_full_gib"])
    assert 0.1 < h2o["cache_ratio"] < 0.3 and h2o["kv_live_gib"] < 0.3 * h2o["kv_full_gib"]


def test_step_time_is_the_median_steady_gap(tiny, monkeypatch):
    """9 tokens read at these times: the gaps from the third token on, less the last (which queued no step), are
    1.0, 0.5, 1.5, 0.5, 0.6 s (median 0.6); the slow first ones (fit, capture, first use of each kernel) are left out.
    With them the median would be 1.0, with the last one 0.55, with both 0.8."""
    times = iter([0.0, 50.0, 60.0, 61.0, 61.5, 63.0, 63.5, 64.1, 64.2])
    monkeypatch.setattr(bench, "_clock", lambda: next(times))
    r = bench.run_minikv(tiny, "full", 0.2, 2, P, 9, mode="eager")
    assert r["decode_ms_per_step"] == pytest.approx(600.0) and r["decode_tok_per_s"] == pytest.approx(2 / 0.6)


def test_a_run_too_short_for_a_steady_step_gives_its_mean_step(tiny):
    """3 tokens (the context may cut a run short): no gap from the third token on, so the decode time over 3."""
    r = bench.run_minikv(tiny, "full", 0.2, 2, P, 3)
    assert r["decode_ms_per_step"] == pytest.approx(1000 * r["decode_s"] / 3)


def test_probe_and_checks_run_on_cpu(tiny):
    assert bench.probe_minikv(tiny, "snapkv", 0.2, 2, P, 8) == {"peak_gib": 0.0}
    for name in ("full", "h2o", "d2o", "corm"):
        assert bench.profile_decode(tiny, name, 0.2, 2, P, "sync") == {"ok": True, "checked": False}
    prof = bench.profile_decode(tiny, "streaming", 0.2, 2, P, "eager", steps=2)
    assert prof["wall_ms_per_step"] > 0 and prof["kernels_per_step"] == 0 and prof["top_kernels"] == []


def test_prefill_profile_times_the_second_of_three_prefills(tiny, monkeypatch):
    """Mode "prefill" profiles a prefill (for target (e)): an untimed one, a timed one, then one under the profiler."""
    calls, real = [], bench.prefill
    monkeypatch.setattr(bench, "prefill", lambda *a, **kw: (calls.append(len(a[1])), real(*a, **kw))[1])
    times = iter([10.0, 10.25])                     # the clock around the timed (second) prefill
    monkeypatch.setattr(bench, "_clock", lambda: next(times))
    prof = bench.profile_decode(tiny, "h2o", 0.2, 2, P, "prefill")
    assert calls == [2, 2, 2] and prof["wall_ms_per_step"] == pytest.approx(250.0) and prof["kernels_per_step"] == 0
    assert bench.bench_plan({"MINIKV_BENCH_PROFILE": "h2o:16:prefill"})["profile"] == [("h2o", 16, "prefill")]


def test_sync_check_records_the_first_error(tiny, monkeypatch):
    calls, real = [], bench.decode_step

    def step(*a, **kw):
        calls.append(kw.get("validate"))
        if len(calls) == 3:                    # the second step under the check (the first is _fitted's)
            raise RuntimeError("called a synchronizing CUDA operation\nmore")
        return real(*a, **kw)
    monkeypatch.setattr(bench, "decode_step", step)
    r = bench.profile_decode(tiny, "h2o", 0.2, 2, P, "sync")
    assert r == {"ok": False, "checked": False, "error": "called a synchronizing CUDA operation"}
    assert calls == [False, False, False]


def test_run_plan_on_cpu_saves_every_item(tiny, tmp_path, capsys):
    env = {"MINIKV_BENCH_SHAPES": "tiny", "MINIKV_BENCH_POLICIES": "full,snapkv", "MINIKV_BENCH_BATCHES": "1,2",
           "MINIKV_BENCH_MODES": "eager", "MINIKV_BENCH_HF": "0", "MINIKV_BENCH_PROMPT": str(P),
           "MINIKV_BENCH_NEW_TOKENS": "5", "MINIKV_BENCH_PROFILE": "full:1:eager"}
    plan = bench.bench_plan(env)
    assert plan["sync"] and plan["profile"] == [("full", 1, "eager")]       # the sync check is on when profiling
    out = tmp_path / "g.json"
    res = bench.run_plan(plan, out, {"gpu": "cpu"}, "cpu", torch.float32)
    assert json.loads(out.read_text()) == json.loads(json.dumps(res))
    got = [(r["policy"], r["batch"], r["mode"], r["max_batch"]) for r in res["rows"]]
    assert got == [("full", 1, "eager", False), ("full", 2, "eager", False), ("snapkv", 1, "eager", False),
                   ("snapkv", 2, "eager", False)]
    assert all("error" not in r and r["shape"] == "tiny" and r["engine"] == "minikv" for r in res["rows"])
    assert [(s["policy"], s["ok"]) for s in res["sync"]] == [(p, True) for p in bench.POLICIES]    # all of them
    assert res["profile"][0]["wall_ms_per_step"] > 0 and "error" not in res["profile"][0]
    printed = capsys.readouterr().out
    assert printed.count("| tiny | minikv |") == 4 and printed.count("sync: ") == len(bench.POLICIES)

    spent = bench.run_plan(dict(plan, seconds=0.0), tmp_path / "h.json", {}, "cpu", torch.float32)
    assert spent["rows"] == spent["sync"] == spent["profile"] == []
    assert "time budget spent: skipping minikv full batch 1 eager" in capsys.readouterr().err


# ---- the plan from the environment ---------------------------------------------------------------------------
def test_plan_defaults_and_refusals():
    plan = bench.bench_plan({})
    assert (plan["shapes"], plan["batches"], plan["modes"], plan["hf"]) == (["llama2-7b"], [1, 16, "max"],
                                                                            ["graph", "eager"], "1")
    assert (plan["prompt_len"], plan["new_tokens"], plan["ratio"], plan["sync"], plan["profile"]) == \
        (4096, 64, 0.2, False, [])
    assert plan["policies"] == bench.POLICIES and "adakv-h2o" in plan["policies"]
    prof = bench.bench_plan({"MINIKV_BENCH_SYNC": "0"}, profile_flag=True)
    assert prof["profile"][0] == ("full", 1, "eager") and ("h2o", 16, "graph") in prof["profile"] and not prof["sync"]
    assert bench.bench_plan({"MINIKV_BENCH_BATCHES": "max", "MINIKV_BENCH_HF": "only"})["batches"] == ["max"]
    for name, value in (("MINIKV_BENCH_BATCHES", "1,huge"), ("MINIKV_BENCH_MODES", "fast"), ("MINIKV_BENCH_HF", "2"),
                        ("MINIKV_BENCH_PROFILE", "h2o:16"), ("MINIKV_BENCH_PROFILE", "nope:1:eager"),
                        ("MINIKV_BENCH_POLICIES", "h2o,nope"), ("MINIKV_BENCH_NEW_TOKENS", "4"),
                        ("MINIKV_BENCH_SECONDS", "soon"), ("MINIKV_BENCH_SHAPES", ""),
                        ("MINIKV_BENCH_SHAPES", "llama2-7b:x")):
        with pytest.raises(bench.BadInput, match=name):
            bench.bench_plan({name: value})


def test_cli_refuses_without_cuda_or_with_a_bad_plan(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, _, err = run_cli(["bench", "gpu", "--profile", "--out", tmp_path / "g.json"], capsys)
    assert code == 2 and "needs a CUDA GPU" in err and "minikv bench cpu" in err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)          # refused before any CUDA call
    monkeypatch.setenv("MINIKV_BENCH_HF", "0")
    monkeypatch.setenv("MINIKV_BENCH_MODES", "graph,turbo")
    code, _, err = run_cli(["bench", "gpu", "--out", tmp_path / "g.json"], capsys)
    assert code == 2 and "MINIKV_BENCH_MODES" in err and "Traceback" not in err
    assert not (tmp_path / "g.json").exists()


# ---- the max-batch search ------------------------------------------------------------------------------------
def fake_run(calls, per_row, limit=80.0, base=10.0):
    """A run whose peak memory is base + per_row * batch GiB, out of memory past `limit` GiB."""
    def fn(batch, mode="eager"):
        calls.append((batch, mode))
        peak = base + per_row * batch
        if peak > limit:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {peak} GiB")
        return {"batch": batch, "peak_gib": peak}
    return fn


def test_predict_batch_fits_a_line_through_two_probes():
    calls = []
    assert bench.predict_batch(fake_run(calls, 0.5), 80 * GiB) == 124          # (0.9 * 80 - 10) / 0.5
    assert calls == [(8, "eager"), (24, "eager")]
    assert bench.predict_batch(fake_run([], 0.5, limit=20.0), 80 * GiB) == 8    # 24 rows do not fit
    assert bench.predict_batch(fake_run([], 0.5, limit=12.0), 80 * GiB) == 0    # not even 8
    with pytest.raises(ValueError):                                             # only out-of-memory is caught
        bench.fits(lambda b: (_ for _ in ()).throw(ValueError("bug")), 8)
    with pytest.raises(RuntimeError, match="device-side assert"):
        bench.fits(lambda b: (_ for _ in ()).throw(RuntimeError("device-side assert")), 8)


def test_out_of_memory_inside_another_error_counts():
    def broken_capture(batch):
        try:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        except RuntimeError:
            raise RuntimeError("operation failed due to a previous error during capture")
    assert bench.fits(broken_capture, 4) is None


def test_max_batch_is_shared_by_the_modes_and_backs_off():
    calls, rows = [], []
    graph = fake_run(calls, 0.6)                              # the graph run needs more than the probes said
    eager = fake_run(calls, 0.5)
    run = lambda b, mode: (graph if mode == "graph" else eager)(b, mode)
    bench.bench_rows({"engine": "minikv", "policy": "h2o"}, run, fake_run(calls, 0.5), ["max"], ["graph", "eager"],
                     lambda: 80 * GiB, lambda kind, r: rows.append(r), lambda what: True)
    # probes at 8 and 24 predict 124; graph runs out of memory there (84.4 GiB) and backs off by 8% to 114 (78.4 GiB);
    # eager starts from 114, not from 124
    assert calls == [(8, "eager"), (24, "eager"), (124, "graph"), (114, "graph"), (114, "eager")]
    assert [(r["mode"], r["batch"], r["max_batch"]) for r in rows] == [("graph", 114, True), ("eager", 114, True)]
    assert all(r["max_batch_search_s"] >= 0 and r["policy"] == "h2o" for r in rows)


def test_failures_become_rows_and_the_run_goes_on():
    rows = []

    def run(b, mode):
        if mode == "graph":
            raise ValueError("capture failed\nsecond line")
        if b == 64:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return {"batch": b, "decode_ms_per_step": 1.0}
    bench.bench_rows({"engine": "minikv", "policy": "d2o"}, run, None, [1, 64], ["graph", "eager"], None,
                     lambda kind, r: rows.append(r), lambda what: True)
    assert [(r["batch"], r["mode"], r.get("error")) for r in rows] == [
        (1, "graph", "ValueError: capture failed"), (1, "eager", None), (64, "graph", "ValueError: capture failed"),
        (64, "eager", "out of memory")]
    skipped = []
    bench.bench_rows({"engine": "minikv", "policy": "d2o"}, run, None, [1], ["eager"], None,
                     lambda kind, r: skipped.append(r), lambda what: False)
    assert skipped == []


# ---- profiler summaries --------------------------------------------------------------------------------------
@pytest.mark.parametrize("field", ["device_time_total", "cuda_time_total"])
def test_summarize_reads_either_name_of_the_device_time(field):
    ev = lambda key, count, us, dev=DeviceType.CUDA: SimpleNamespace(key=key, count=count, device_type=dev,
                                                                     **{field: us})
    events = [ev("cudaLaunchKernel", 40, 0, DeviceType.CPU), ev("cudaGraphLaunch", 10, 0, DeviceType.CPU),
              ev("aten::mm", 20, 0, DeviceType.CPU)] + [ev(f"kernel_{i}", 10, 1000 * (i + 1)) for i in range(10)]
    s = bench.summarize(events, steps=10)
    assert s["launches_per_step"] == 5 and s["kernels_per_step"] == 10
    assert s["gpu_busy_ms_per_step"] == pytest.approx(sum(range(1, 11)) / 10)
    assert [k[2] for k in s["top_kernels"]] == [f"kernel_{i}" for i in range(9, 1, -1)]
    assert s["top_kernels"][0] == [1.0, 1.0, "kernel_9"]                            # ms/step, calls/step, name


# ---- the report: merge and targets ---------------------------------------------------------------------------
def row(engine, policy, mode, batch, ms=50.0, tok=100.0, prefill=2.0, peak=40.0, max_batch=False, **kw):
    return {"shape": "llama2-7b", "engine": engine, "policy": policy, "mode": mode, "batch": batch,
            "decode_ms_per_step": ms, "decode_tok_per_s": tok, "prefill_s": prefill, "peak_gib": peak,
            "max_batch": max_batch, **kw}


def passing() -> dict:
    hf, mk = "transformers", "minikv"
    rows = [row(hf, "full", "static", 1, ms=20), row(hf, "full", "static", 16, ms=25), row(hf, "full", "eager", 1, ms=60),
            row(hf, "full", "eager", 16, ms=70), row(hf, "full", "static", 40, tok=500, max_batch=True),
            row(hf, "full", "eager", 40, tok=450, max_batch=True),
            row(mk, "full", "graph", 1, ms=15), row(mk, "full", "graph", 16, ms=20, peak=50),
            row(mk, "full", "eager", 1, ms=50), row(mk, "full", "eager", 16, ms=60, peak=50)]
    rows += [row(mk, p, "graph", 16, ms=10, prefill=2.5, peak=24) for p in
             ("streaming", "h2o", "d2o", "corm", "adakv-h2o", "snapkv", "adakv-snapkv")]
    rows += [row(mk, p, "graph", 120, tok=1600, max_batch=True) for p in
             ("h2o", "d2o", "snapkv", "adakv-snapkv", "streaming")]
    sync = [{"shape": "llama2-7b", "policy": p, "ok": True, "checked": True} for p in bench.POLICIES]
    return {"info": {"gpu": "NVIDIA H200"}, "rows": rows, "profile": [], "sync": sync}


def verdicts(res: dict) -> dict:
    return {t["target"][:3]: t["verdict"] for t in bench.targets(res)}


def edit(res: dict, change, engine="minikv", policy="full", mode="graph", batch=16) -> dict:
    for r in res["rows"]:
        if (r["engine"], r["policy"], r["mode"], r["batch"]) == (engine, policy, mode, batch):
            r.update(change)
    return res


def test_targets_pass_and_each_one_misses():
    assert verdicts(passing()) == {k: "pass" for k in ("(a)", "(b)", "(c)", "(d)", "(e)", "(f)", "(g)")}
    res = edit(passing(), {"decode_ms_per_step": 30.0})                           # 30 > 25 ms of transformers
    assert verdicts(res)["(a)"] == "miss" and verdicts(res)["(c)"] == "pass"
    assert verdicts(edit(passing(), {"decode_ms_per_step": 61.0}, mode="eager", batch=1))["(b)"] == "miss"
    assert verdicts(edit(passing(), {"decode_ms_per_step": 15.0}, policy="corm"))["(c)"] == "miss"   # > 0.7 x 20
    assert verdicts(edit(passing(), {"decode_tok_per_s": 1400.0}, policy="d2o", batch=120))["(d)"] == "miss"
    assert verdicts(edit(passing(), {"prefill_s": 3.5}, policy="h2o"))["(e)"] == "miss"               # > 1.5 x 2
    assert verdicts(edit(passing(), {"peak_gib": 26.0}, policy="d2o"))["(f)"] == "miss"               # > 0.5 x 50
    res = passing()
    res["sync"][2] = dict(res["sync"][2], ok=False, error="called a synchronizing CUDA operation")
    assert verdicts(res)["(g)"] == "miss"
    assert "h2o called a synchronizing" in bench.targets(res)[-1]["measured"]


def test_targets_take_the_best_captured_mode():
    # corm's graph row misses (c) (15 > 0.7 x 20 ms); a faster compiled row of it passes, a slower one does not count
    res = edit(passing(), {"decode_ms_per_step": 15.0}, policy="corm")
    res["rows"].append(row("minikv", "corm", "compiled", 16, ms=12.0))
    assert verdicts(res)["(c)"] == "pass" and "corm 0.6x" in bench.targets(res)[2]["measured"]
    res = edit(passing(), {"decode_ms_per_step": 30.0})                           # full graph misses (a) at batch 16
    res["rows"].append(row("minikv", "full", "compiled", 16, ms=40.0))
    assert verdicts(res)["(a)"] == "miss"
    res["rows"].append(row("minikv", "full", "compiled", 16, ms=24.0))            # 24 <= 25 ms of transformers
    assert verdicts(res)["(a)"] == "pass"


def test_targets_take_a_policy_with_options_as_the_policy():
    """A row of "d2o when=prefill" or "d2o:when=prefill" (the spec's option that compresses at prefill) counts as d2o:
    (f) takes the lower peak of the two; the plan accepts such a name and refuses a bad option before anything runs."""
    res = edit(passing(), {"peak_gib": 40.0}, policy="d2o")                      # > 0.5 x 50: misses alone
    assert verdicts(res)["(f)"] == "miss"
    res["rows"].append(row("minikv", "d2o when=prefill", "graph", 16, peak=20.0))
    assert verdicts(res)["(f)"] == "pass" and "d2o 0.4x" in bench.targets(res)[5]["measured"]
    assert bench.bench_plan({"MINIKV_BENCH_POLICIES": "full,d2o when=prefill"})["policies"][1] == "d2o when=prefill"
    assert bench.policy_for("d2o when=prefill", 0.3).when == "prefill"
    colon = bench.bench_plan({"MINIKV_BENCH_POLICIES": "d2o:when=prefill",
                              "MINIKV_BENCH_PROFILE": "d2o:when=prefill:16:graph"})
    assert colon["policies"] == ["d2o:when=prefill"] and colon["profile"] == [("d2o:when=prefill", 16, "graph")]
    res["rows"][-1]["policy"] = "d2o:when=prefill"                                  # eval's spelling: the same policy
    assert verdicts(res)["(f)"] == "pass" and bench.policy_for("d2o:when=prefill", 0.3).when == "prefill"
    with pytest.raises(bench.BadInput, match="when .* got 'later'"):
        bench.bench_plan({"MINIKV_BENCH_POLICIES": "d2o when=later"})


def test_targets_use_only_rows_that_ran_at_the_right_batch():
    res = passing()
    res["rows"] = [r for r in res["rows"] if not (r["policy"] == "d2o" and r["max_batch"])]
    res["rows"].append(row("minikv", "d2o", "graph", 120, tok=9999, max_batch=True, error="out of memory"))
    res["rows"].append(row("minikv", "d2o", "eager", 16, tok=9999))              # not a max-batch row
    t = {x["target"][:3]: x for x in bench.targets(res)}
    assert t["(d)"]["verdict"] == "not measured" and "d2o not measured" in t["(d)"]["measured"]
    assert "h2o 3.2x" in t["(d)"]["measured"]                                     # 1600 / 500
    empty = {"info": {}, "rows": [], "profile": [], "sync": []}
    assert set(verdicts(empty).values()) == {"not measured"}
    unchecked = dict(passing(), sync=[dict(s, checked=False) for s in passing()["sync"]])    # a CPU run
    assert verdicts(unchecked)["(g)"] == "not measured"


def test_report_merges_calls(tmp_path, capsys):
    res = passing()
    a = dict(res, rows=res["rows"][:10], sync=[], info=dict(res["info"], torch="2.11", transformers="5.17",
                                                             date="2026-01-01 00:00 UTC"))
    b = dict(res, rows=res["rows"][10:], info={"gpu": "other"},
             profile=[{"shape": "llama2-7b", "policy": "full", "batch": 1, "mode": "graph", "launches_per_step": 1.0,
                       "kernels_per_step": 900.0, "gpu_busy_ms_per_step": 14.0, "wall_ms_per_step": 15.0}])
    fa, fb = tmp_path / "a.json", tmp_path / "b.json"
    fa.write_text(json.dumps(a))
    fb.write_text(json.dumps(b))
    code, out, _ = run_cli(["bench", "report", fa, fb, "--out", tmp_path / "md" / "t.md"], capsys)
    assert code == 0
    text = (tmp_path / "md" / "t.md").read_text()
    assert out == text + "\n"
    assert text.startswith("# minikv bench gpu: NVIDIA H200, torch 2.11, transformers 5.17, 2026-01-01 00:00 UTC")
    assert "| (g) no host sync in decode_step after cache.fit |" in text and "| miss |" not in text
    assert text.count("| pass |") == 7 and "| llama2-7b | full | 1 | graph | 1 | 900 | 14 | 15 |" in text
    assert "ms/step = (decode_s - capture_s) / steps" in text                 # a file written before bench.STEADY
    fa.write_text(json.dumps(dict(a, info=dict(a["info"], step_rule=bench.STEADY))))
    assert f"ms/step = {bench.STEADY}" in run_cli(["bench", "report", fa, fb], capsys)[1]
    code, _, err = run_cli(["bench", "report", tmp_path / "nope.json"], capsys)
    assert code == 2 and "nope.json" in err
