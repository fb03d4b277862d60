"""`minikv oracle` on bad input: each refusal is one named line (exit 2), and nothing unchecked passes (exit 1).

Everything runs through the command line in-process (`minikv.cli.main`). One small golden set (one seeded case, no
real model) is exported per module and copied by the tests that damage it.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from minikv.cli import main
from minikv.oracle import compare

CASE = "small_seed0.safetensors"
SMALL = ["--cases", "1", "--no-real-model"]


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `minikv ARGV`, argparse's exits included."""
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def assert_refused(result, *names) -> str:
    """Exit 2 with one `minikv: error:` line naming every one of `names`, and no traceback."""
    rc, out, err = result
    assert rc == 2, (rc, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("minikv: error:"), err
    for name in names:
        assert str(name) in lines[0], (name, lines[0])
    assert "Traceback" not in out + err
    return lines[0]


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    """A one-case h2o golden set; do not modify it (copy it with `damaged`)."""
    out = tmp_path_factory.mktemp("oracle") / "gold"
    assert main(["oracle", "export", "--policy", "h2o", *SMALL, "--out", str(out)]) == 0
    return out


@pytest.fixture
def copy(golden, tmp_path):
    """A private copy of the golden set, free to damage."""
    return shutil.copytree(golden, tmp_path / "copy")


def edit_manifest(folder, change) -> None:
    """Rewrite folder/manifest.json as change(manifest) returns it."""
    path = folder / "manifest.json"
    path.write_text(json.dumps(change(json.loads(path.read_text()))))


def edit_case(folder, change) -> None:
    """Rewrite the case file's tensors in place through change(dict of tensors)."""
    tensors = load_file(folder / CASE)
    change(tensors)
    save_file(tensors, folder / CASE)


# ---- check: the golden set ---------------------------------------------------------------------------------------
def test_golden_folder_missing(tmp_path, capsys):
    assert_refused(run(["oracle", "check", tmp_path / "nope", tmp_path], capsys), tmp_path / "nope", "not found")


def test_golden_is_a_file(tmp_path, capsys):
    f = tmp_path / "gold.txt"
    f.write_text("x")
    assert_refused(run(["oracle", "check", f, tmp_path], capsys), f, "not a folder")


def test_golden_folder_without_manifest(copy, capsys):
    (copy / "manifest.json").unlink()
    assert_refused(run(["oracle", "check", copy, copy], capsys), copy, "manifest.json")


@pytest.mark.parametrize("text,expect", [("{not json", "not valid JSON"), ("[1, 2]", "got list"),
                                         ("\xff\xfe", "not valid JSON"), ("", "not valid JSON")])
def test_manifest_not_a_json_object(copy, capsys, text, expect):
    (copy / "manifest.json").write_bytes(text.encode("latin-1"))
    assert_refused(run(["oracle", "check", copy, copy], capsys), copy / "manifest.json", expect)


@pytest.mark.parametrize("key", ["format_version", "tolerances", "cases"])
def test_manifest_missing_key(copy, capsys, key):
    edit_manifest(copy, lambda m: {k: v for k, v in m.items() if k != key})
    assert_refused(run(["oracle", "check", copy, copy], capsys), copy / "manifest.json", key)


@pytest.mark.parametrize("change,expect", [
    (lambda m: {**m, "cases": []}, "non-empty"),                              # an empty golden set checks nothing
    (lambda m: {**m, "format_version": 99}, "format_version 99"),
    (lambda m: {**m, "cases": [{**m["cases"][0], "file": "../elsewhere.safetensors"}]}, "../elsewhere.safetensors"),
    (lambda m: {**m, "cases": [{k: v for k, v in m["cases"][0].items() if k != "tensors"}]}, "tensors"),
    (lambda m: {**m, "cases": [{**m["cases"][0], "dtype": "float16"}]}, "float16"),
    (lambda m: {**m, "cases": ["small_seed0.safetensors"]}, "cases[0]"),
    (lambda m: {**m, "cases": [{**m["cases"][0], "tensors": {k: {**t, "role": "in"} for k, t in
                                                            m["cases"][0]["tensors"].items()}}]}, "no out/"),
], ids=["no-cases", "version", "path-outside", "no-tensors", "no-tolerance", "case-not-object", "nothing-checked"])
def test_manifest_with_bad_contents(copy, capsys, change, expect):
    edit_manifest(copy, change)
    assert_refused(run(["oracle", "check", copy, copy], capsys), copy / "manifest.json", expect)


def test_manifest_names_a_missing_file(copy, capsys):
    (copy / CASE).unlink()
    assert_refused(run(["oracle", "check", copy, copy], capsys), copy / CASE, "not found")


@pytest.mark.parametrize("cut", ["empty", "header", "data"])
def test_golden_safetensors_corrupt_or_truncated(copy, tmp_path, capsys, cut):
    data = (copy / CASE).read_bytes()
    (copy / CASE).write_bytes({"empty": b"", "header": data[:100], "data": data[:len(data) // 2]}[cut])
    cand = shutil.copytree(copy, tmp_path / "cand")
    assert_refused(run(["oracle", "check", copy, cand], capsys), copy / CASE, "golden", "safetensors")


def test_golden_file_lacks_a_listed_tensor(copy, capsys):
    edit_case(copy, lambda t: t.pop("prefill/L0/out/pos"))
    assert_refused(run(["oracle", "check", copy, copy], capsys), copy / CASE, "prefill/L0/out/pos")


# ---- check: the candidate ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("allow", [[], ["--allow-missing"]])
def test_candidate_folder_missing_is_one_error(golden, tmp_path, capsys, allow):
    rc, out, err = run(["oracle", "check", golden, tmp_path / "nope", *allow], capsys)
    assert_refused((rc, out, err), tmp_path / "nope", "not found")
    assert "FAIL" not in out                                    # one error, not a row per tensor


def test_candidate_is_a_file(golden, tmp_path, capsys):
    f = tmp_path / "cand.safetensors"
    f.write_bytes(b"x")
    assert_refused(run(["oracle", "check", golden, f], capsys), f, "is a file")


def test_candidate_safetensors_truncated(golden, tmp_path, capsys):
    cand = tmp_path / "cand"
    cand.mkdir()
    data = (golden / CASE).read_bytes()
    (cand / CASE).write_bytes(data[:len(data) - 1000])
    rc, out, err = run(["oracle", "check", golden, cand], capsys)
    assert_refused((rc, out, err), cand / CASE, "candidate")
    assert out == ""                                            # no half-printed table before the error


# ---- export ------------------------------------------------------------------------------------------------------
def test_export_out_is_a_file(tmp_path, capsys):
    f = tmp_path / "golden.txt"
    f.write_text("keep me")
    assert_refused(run(["oracle", "export", "--policy", "h2o", *SMALL, "--out", f], capsys), f, "is a file")
    assert f.read_text() == "keep me"


def test_export_out_under_a_file(tmp_path, capsys):
    f = tmp_path / "golden.txt"
    f.write_text("keep me")
    assert_refused(run(["oracle", "export", "--policy", "h2o", *SMALL, "--out", f / "sub"], capsys), f / "sub")


def test_export_refuses_a_folder_with_golden_vectors_unless_overwrite(copy, capsys):
    before = (copy / "manifest.json").read_text()
    argv = ["oracle", "export", "--policy", "streaming", "--seed", "7", *SMALL, "--out", copy]
    assert_refused(run(argv, capsys), copy, "--overwrite")
    assert (copy / "manifest.json").read_text() == before                      # untouched
    rc, out, _ = run(argv + ["--overwrite"], capsys)
    assert rc == 0, out
    assert json.loads((copy / "manifest.json").read_text())["policy"] == "streaming"
    assert sorted(p.name for p in copy.iterdir()) == ["manifest.json", "small_seed7.safetensors"]  # no stale case


@pytest.mark.parametrize("args,names", [
    (["--cases", "-1"], ["--cases", "-1"]),
    (["--cases", "0", "--no-real-model"], ["--cases 0"]),
    (["--seed", "-1", *SMALL], ["--seed", "-1"]),
    (["--seed", str(2 ** 63), *SMALL], ["--seed", str(2 ** 63)]),
    (["--seed", "abc", *SMALL], ["--seed", "abc"]),
    (["--cases", "two", "--no-real-model"], ["--cases", "two"]),
    (["--budget", "-5", *SMALL], ["-5"]),
    (["--option", "window", *SMALL], ["window"]),
    (["--option", "bogus=1", *SMALL], ["bogus"]),
    (["--option", "window=-3", *SMALL], ["window", "-3"]),
], ids=["cases-negative", "cases-zero", "seed-negative", "seed-huge", "seed-text", "cases-text", "budget",
        "option-not-kv", "option-unknown", "option-value"])
def test_export_bad_arguments(tmp_path, capsys, args, names):
    out = tmp_path / "gold"
    policy = "snapkv" if "window" in " ".join(args) else "h2o"
    assert_refused(run(["oracle", "export", "--policy", policy, *args, "--out", out], capsys), *names)
    assert not out.exists()                                     # refused before anything was written


def test_export_unknown_policy(tmp_path, capsys):
    out = tmp_path / "gold"
    assert_refused(run(["oracle", "export", "--policy", "h3o", *SMALL, "--out", out], capsys), "h3o", "h2o")
    assert not out.exists()


# ---- nothing unchecked passes (exit 1) ---------------------------------------------------------------------------
def test_identical_candidate_passes_and_says_how_many(golden, capsys):
    rc, out, _ = run(["oracle", "check", golden, golden], capsys)
    n = sum(t["role"] in ("out", "probe") for t in json.loads((golden / "manifest.json").read_text())
            ["cases"][0]["tensors"].values())
    assert rc == 0 and f"{n} tensors compared: {n} PASS, 0 FAIL" in out and out.rstrip().endswith("ALL PASS")


def test_allow_missing_with_nothing_compared_fails(golden, tmp_path, capsys):
    (tmp_path / "cand").mkdir()
    rc, out, err = run(["oracle", "check", golden, tmp_path / "cand", "--allow-missing"], capsys)
    assert rc == 1 and "0 tensors compared" in out and "ALL PASS" not in out, out
    assert "Traceback" not in out + err


def test_allow_missing_with_only_misnamed_tensors_fails(golden, tmp_path, capsys):
    (tmp_path / "cand").mkdir()
    save_file({"prefill/L0/out/kk": torch.zeros(2)}, tmp_path / "cand" / CASE)
    rc, out, _ = run(["oracle", "check", golden, tmp_path / "cand", "--allow-missing"], capsys)
    assert rc == 1 and "0 tensors compared" in out and "1 candidate tensors not in the golden set" in out, out


def test_missing_candidate_file_is_one_fail_row(golden, tmp_path, capsys):
    (tmp_path / "cand").mkdir()
    rc, out, _ = run(["oracle", "check", golden, tmp_path / "cand"], capsys)
    rows = [line for line in out.splitlines() if line.startswith("| ") and "FAIL" in line]
    assert rc == 1 and len(rows) == 1 and "file missing" in rows[0], out


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_or_inf_in_candidate_fails(golden, copy, capsys, value):
    victim = "step1/L1/probe/after"
    edit_case(copy, lambda t: t[victim].view(-1).__setitem__(0, value))
    rc, out, _ = run(["oracle", "check", golden, copy], capsys)
    failed = [line for line in out.splitlines() if "FAIL" in line and line.startswith("| ")]
    assert rc == 1 and len(failed) == 1 and victim in failed[0] and "ALL PASS" not in out, out


@pytest.mark.parametrize("change,expect", [
    (lambda t: t.update({"prefill/L0/probe/after": t["prefill/L0/probe/after"][..., :3].contiguous()}),
     "shape [1, 4, 1, 3] != golden [1, 4, 1, 8]"),
    (lambda t: t.update({"prefill/L0/out/pos": t["prefill/L0/out/pos"].int()}), "dtype int32 != golden int64"),
    (lambda t: t.update({"prefill/L0/out/k": t["prefill/L0/out/k"].float()}), "dtype float32 != golden float64"),
], ids=["shape", "int-dtype", "float-dtype"])
def test_wrong_shape_or_dtype_is_a_named_fail(golden, copy, capsys, change, expect):
    edit_case(copy, change)
    rc, out, err = run(["oracle", "check", golden, copy], capsys)
    failed = [line for line in out.splitlines() if "FAIL" in line and line.startswith("| ")]
    assert rc == 1 and len(failed) == 1 and expect in failed[0], out
    assert "Traceback" not in out + err


def test_compare_never_lets_nonfinite_values_pass():
    tol = {"atol": 1e-10, "rtol": 1e-8}
    g = torch.tensor([1.0, float("inf"), float("nan")], dtype=torch.float64)
    assert compare(g, g.clone(), tol)[2]                         # the same values, NaN where golden is NaN: pass
    for i, bad in [(0, float("nan")), (0, float("inf")), (1, 5.0), (1, float("-inf")), (2, 1.0)]:
        c = g.clone()
        c[i] = bad
        assert not compare(g, c, tol)[2], (i, bad)
