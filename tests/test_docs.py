"""The docs cite real code and real files.

- Every `minikv/...py::name` and `tests/...py::test_name` in train_free.md exists (parsed with `ast`, nothing is
  imported, so the check is fast and cannot be fooled by names created at import time).
- No tracked .md file, and no docstring or comment in minikv/, refers to a file that is not in the repository:
  `../shared/...`, `specs/...`, a bare `name.md` that no tracked file is called, a `minikv/...` or `tests/...` path
  that does not exist.
- README.md's `<!-- test-command -->` block runs pytest (CI and new contributors copy it), and its Python example
  (the block after `<!-- example -->`) runs.
"""
from __future__ import annotations

import ast
import io
import re
import subprocess
import tokenize
from functools import lru_cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "train_free.md"
README = REPO / "README.md"

# `minikv/policies/h2o.py::heavy_recent_keep`, `minikv/store.py::LayerStore.keep`, `tests/test_bounds.py::test_x`
REF = re.compile(r"\b((?:minikv|tests)/[\w/]+\.py)::([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)?)")


def doc_refs() -> list[tuple[str, str]]:
    return sorted(set(REF.findall(DOC.read_text(encoding="utf-8"))))


@lru_cache(maxsize=None)
def definitions(path: str) -> frozenset[str]:
    """Names a module defines: top-level functions, classes, assignments, and `Class.method` / `Class.attr`."""
    tree = ast.parse((REPO / path).read_text(encoding="utf-8"), filename=path)
    names: set[str] = set()

    def targets(node) -> list[str]:
        if isinstance(node, ast.Assign):
            return [t.id for t in node.targets if isinstance(t, ast.Name)]
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            return [node.target.id]
        return []

    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        names.update(targets(node))
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    names.add(f"{node.name}.{item.name}")
                for t in targets(item):
                    names.add(f"{node.name}.{t}")
    return frozenset(names)


def test_doc_exists_and_cites_code():
    assert DOC.is_file(), f"{DOC} is missing"
    refs = doc_refs()
    cited_files = {path for path, _ in refs}
    # Every method's module is cited at least once (a doc that lost a section would pass the other checks).
    for module in ("minikv/ops.py", "minikv/attention.py", "minikv/store.py", "minikv/budgets.py", "minikv/bounds.py",
                   "minikv/tools/oracle.py", "minikv/policies/streaming.py", "minikv/policies/h2o.py",
                   "minikv/policies/snapkv.py", "minikv/policies/d2o.py", "minikv/policies/corm.py",
                   "minikv/policies/adakv.py", "tests/test_bounds.py"):
        assert module in cited_files, f"train_free.md cites nothing in {module}"


@pytest.mark.parametrize("path,name", doc_refs(), ids=lambda x: str(x))
def test_cited_name_is_defined(path, name):
    assert (REPO / path).is_file(), f"train_free.md cites {path}::{name}, but {path} does not exist"
    assert name in definitions(path), f"train_free.md cites {path}::{name}, but {path} defines no {name!r}"


def test_every_bound_test_is_listed():
    # The Ada-KV section promises the full list of what tests/test_bounds.py checks.
    listed = {name for path, name in doc_refs() if path == "tests/test_bounds.py"}
    defined = {n for n in definitions("tests/test_bounds.py") if n.startswith("test_") and "." not in n}
    assert defined <= listed, f"train_free.md does not list {sorted(defined - listed)} from tests/test_bounds.py"


def test_reference_pattern_catches_bad_names():
    # Negative control: the checker really rejects a name that is not there (and parses Class.method).
    assert "LayerStore.keep" in definitions("minikv/store.py")
    assert "LayerStore.no_such_method" not in definitions("minikv/store.py")
    assert REF.findall("see `minikv/store.py::LayerStore.keep`.") == [("minikv/store.py", "LayerStore.keep")]


def test_readme_test_command_block_runs_pytest():
    text = README.read_text(encoding="utf-8")
    m = re.search(r"<!--\s*test-command\s*-->\s*\n```[^\n]*\n(.*?)\n```", text, flags=re.S)
    assert m, "README.md has no fenced code block right after <!-- test-command -->"
    assert "pytest" in m.group(1), f"README.md's test-command block does not run pytest: {m.group(1)!r}"


# ---- references to files -----------------------------------------------------------------------------------------
# Anything under ../shared/ or specs/ (neither is in the repository), a bare or relative `*.md` name, and a path
# under minikv/ or tests/ (a file `.py`/`.md`, or a folder written with its trailing slash).
FILE_REF = re.compile(r"(?<![\w./$-])("
                      r"(?:\.\./)+shared/[\w./*-]*"                        # ../shared/...
                      r"|specs/[\w./*-]*"                                    # specs/...
                      r"|(?:minikv|tests)/(?:[\w*]+/)*(?:[\w*]+\.(?:py|md)\b)?"  # minikv/x.py, tests/x.py, minikv/io/
                      r"|(?:[\w-]+/)*[\w*-]+\.md\b"                          # d2o.md, weights/README.md
                      r")")


# Files minikv writes (into an output folder), named in prose: not files of the repository.
OUTPUT_FILES = {"table.md"}


@lru_cache(maxsize=None)
def tracked_files() -> tuple[str, ...]:
    """The repository's files: `git ls-files` (plus untracked, not ignored), or a walk when git is missing."""
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                             capture_output=True, text=True, check=True).stdout
        return tuple(sorted(set(out.split())))
    except (OSError, subprocess.CalledProcessError):
        return tuple(sorted(p.relative_to(REPO).as_posix() for p in REPO.rglob("*")
                            if p.is_file() and ".git" not in p.parts))


def missing_reference(ref: str, where: Path) -> bool:
    """True when `ref` (as FILE_REF found it in a file in folder `where`) names nothing in the repository."""
    if ref.startswith(("../", "specs/")):
        return True
    if "*" in ref:                                             # a pattern: it must match something
        pattern = re.compile(re.escape(ref).replace(r"\*", r"[^/]*"))
        return not any(pattern.fullmatch(f) or pattern.fullmatch(f + "/") for f in tracked_files())
    if "/" not in ref:                                         # a bare name.md: some tracked file has that name
        return ref not in OUTPUT_FILES and not any(f == ref or f.endswith("/" + ref) for f in tracked_files())
    return not ((REPO / ref).exists() or (where / ref).exists())


def markdown_files() -> list[str]:
    return [f for f in tracked_files() if f.endswith(".md") and (REPO / f).is_file()]


def code_texts(rel: str) -> list[tuple[int, str]]:
    """(line, text) of every comment and docstring of a Python file."""
    text = (REPO / rel).read_text(encoding="utf-8")
    out = [(tok.start[0], tok.string) for tok in tokenize.generate_tokens(io.StringIO(text).readline)
           if tok.type == tokenize.COMMENT]
    for node in ast.walk(ast.parse(text, filename=rel)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                    and isinstance(first.value.value, str):
                for i, line in enumerate(first.value.value.splitlines()):
                    out.append((first.lineno + i, line))
    return out


def bad_references(texts, rel: str) -> list[str]:
    where = (REPO / rel).parent
    return [f"{rel}:{line}: {ref}" for line, text in texts for ref in FILE_REF.findall(text)
            if missing_reference(ref.rstrip("."), where)]


def test_markdown_refers_only_to_files_in_the_repository():
    bad = []
    for rel in markdown_files():
        lines = (REPO / rel).read_text(encoding="utf-8").splitlines()
        bad += bad_references(enumerate(lines, 1), rel)
    assert not bad, "references to files that are not in the repository:\n" + "\n".join(bad)


def test_code_comments_refer_only_to_files_in_the_repository():
    bad = []
    for rel in (f for f in tracked_files() if f.startswith("minikv/") and f.endswith(".py")):
        if (REPO / rel).is_file():
            bad += bad_references(code_texts(rel), rel)
    assert not bad, "docstrings and comments citing files that are not in the repository:\n" + "\n".join(bad)


def test_reference_check_catches_missing_files():
    # Negative control: each kind of stale reference is caught, real files are not.
    text = ("see specs/d2o.md and ../shared/specs/model.md; as model.md says, design.md (perf.md, eval.md, "
            "baselines.md, corm.md, adakv.md, style.md); minikv/no_such.py, tests/test_nothing.py, minikv/gone/. "
            "Real: README.md, weights/README.md, minikv/store.py, minikv/io/, tests/test_docs.py, minikv/policies/*.py")
    found = bad_references([(1, text)], "README.md")
    refs = [f.split(": ", 1)[1] for f in found]
    assert refs == ["specs/d2o.md", "../shared/specs/model.md", "model.md", "design.md", "perf.md", "eval.md",
                    "baselines.md", "corm.md", "adakv.md", "style.md", "minikv/no_such.py", "tests/test_nothing.py",
                    "minikv/gone/"], refs
    assert code_texts("tests/test_docs.py"), "comments and docstrings are read"


# ---- README's Python example ---------------------------------------------------------------------------------------
def readme_example() -> str:
    text = README.read_text(encoding="utf-8")
    m = re.search(r"<!--\s*example\s*-->\s*\n```python\n(.*?)\n```", text, flags=re.S)
    assert m, "README.md has no ```python block right after <!-- example -->"
    return m.group(1)


def test_readme_example_is_short_and_imports_what_exists():
    import importlib
    code = readme_example()
    assert len(code.splitlines()) <= 15, f"README.md's example is {len(code.splitlines())} lines; keep it ~10"
    for node in ast.walk(ast.parse(code, filename="README.md example")):
        if isinstance(node, ast.ImportFrom):
            module = importlib.import_module(node.module)
            missing = [a.name for a in node.names if not hasattr(module, a.name)]
            assert not missing, f"README.md's example imports {missing} from {node.module}, which has no such name"


@pytest.mark.slow
def test_readme_example_runs(default_model_dir, capsys):
    code = compile(readme_example(), "README.md <!-- example -->", "exec")
    exec(code, {"__name__": "readme_example"})
    out = capsys.readouterr().out
    assert re.search(r"measured cache ratio 0\.\d{3}", out), f"README.md's example printed {out!r}"
