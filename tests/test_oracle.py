"""Golden vectors: round trip, perturbation detection, determinism; and the trace account."""
from __future__ import annotations

import io
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import tiny_model
from minikv.tools.oracle import check, export
from minikv.policies import get_policy
from minikv.tools.trace import Recorder, head_changes


@pytest.mark.parametrize("policy", ["h2o", "snapkv", "streaming"])
def test_export_then_check_passes_and_perturbation_fails(tmp_path, policy):
    gold = tmp_path / "gold"
    export(policy, gold, seed=0, n_cases=1, real_model=False)
    buf = io.StringIO()
    assert check(gold, gold, out=buf), buf.getvalue()
    assert "ALL PASS" in buf.getvalue()

    cand = tmp_path / "cand"
    shutil.copytree(gold, cand)
    f = cand / "small_seed0.safetensors"
    tensors = load_file(f)
    victim = "prefill/L1/probe/after"
    tensors[victim] = tensors[victim] + 1e-6
    save_file(tensors, f)
    buf = io.StringIO()
    assert not check(gold, cand, out=buf)
    failed = [line for line in buf.getvalue().splitlines() if line.endswith("FAIL |")]
    assert failed and all(victim in line for line in failed), buf.getvalue()


def test_wrong_kept_positions_are_caught(tmp_path):
    gold = tmp_path / "gold"
    export("h2o", gold, seed=3, n_cases=1, real_model=False)
    cand = tmp_path / "cand"
    shutil.copytree(gold, cand)
    f = cand / "small_seed3.safetensors"
    tensors = load_file(f)
    tensors["prefill/L0/out/pos"][0, 0, 0] += 1
    save_file(tensors, f)
    buf = io.StringIO()
    assert not check(gold, cand, out=buf)
    assert "prefill/L0/out/pos" in buf.getvalue()


def test_export_is_byte_identical_twice(tmp_path):
    for name in ("a", "b"):
        export("h2o", tmp_path / name, seed=5, n_cases=1, real_model=False)
    assert (tmp_path / "a" / "small_seed5.safetensors").read_bytes() == \
        (tmp_path / "b" / "small_seed5.safetensors").read_bytes()
    assert (tmp_path / "a" / "manifest.json").read_text() == (tmp_path / "b" / "manifest.json").read_text()


def test_missing_candidate_tensor_fails(tmp_path):
    gold = tmp_path / "gold"
    export("streaming", gold, seed=0, n_cases=1, real_model=False)
    (tmp_path / "cand").mkdir()
    buf = io.StringIO()
    assert not check(gold, tmp_path / "cand", out=buf)
    rows = [line for line in buf.getvalue().splitlines() if line.startswith("| ") and "FAIL" in line]
    assert len(rows) == 1 and "file missing" in rows[0], buf.getvalue()     # one row per missing file, not per tensor
    # --allow-missing compares only what the candidate wrote; having written nothing is not a pass.
    buf = io.StringIO()
    assert not check(gold, tmp_path / "cand", allow_missing=True, out=buf)
    assert "0 tensors compared" in buf.getvalue() and "ALL PASS" not in buf.getvalue()


def test_allow_missing_passes_on_what_the_candidate_wrote(tmp_path):
    gold = tmp_path / "gold"
    export("h2o", gold, seed=0, n_cases=1, real_model=False)
    (tmp_path / "cand").mkdir()
    tensors = load_file(gold / "small_seed0.safetensors")
    save_file({k: v for k, v in tensors.items() if "/probe/" in k}, tmp_path / "cand" / "small_seed0.safetensors")
    buf = io.StringIO()
    assert check(gold, tmp_path / "cand", allow_missing=True, out=buf), buf.getvalue()
    n_probe = sum("/probe/" in k for k in tensors)
    assert f"{n_probe} tensors compared: {n_probe} PASS, 0 FAIL" in buf.getvalue()
    assert buf.getvalue().rstrip().endswith("ALL PASS")


def test_recorder_sees_evictions_and_changes_nothing():
    from minikv.generate import generate
    model = tiny_model(torch.float64)
    prompt = list(range(1, 41))
    plain = generate(model, [prompt], get_policy("h2o", 12), max_new_tokens=4, stop_ids=[], use_sdpa=False)
    rec = Recorder(get_policy("h2o", 12), model.cfg.num_attention_heads)
    recorded = generate(model, [prompt], rec, max_new_tokens=4, stop_ids=[], use_sdpa=False)
    assert plain.tokens == recorded.tokens
    prefill0 = [e for e in rec.events if e.phase == "prefill" and e.layer == 0][0]
    changes = head_changes(prefill0)
    assert all(len(c["kept"]) == 12 and len(c["evicted"]) == 28 for c in changes)
    steps = [e for e in rec.events if e.phase == "step1"]
    assert len(steps) == 3 and all(len(c["evicted"]) == 1 for e in steps for c in head_changes(e))


def test_recorder_records_only_the_chosen_layers():
    from minikv.generate import prefill
    model = tiny_model(torch.float64, num_hidden_layers=5)
    rec = Recorder(get_policy("h2o", 12), model.cfg.num_attention_heads, layers={0, 2, 3})
    _, cache = prefill(model, [list(range(1, 41))], rec)
    events = {e.layer: e for e in rec.events}
    assert sorted(events) == [0, 2, 3] and len(rec.events) == 3
    for layer, e in events.items():
        assert torch.equal(e.after["length"], cache.layers[layer].length)
        assert int(e.after["length"].max()) == 12 < int(e.before["length"].max())
