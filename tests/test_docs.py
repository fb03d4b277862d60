"""The docs cite real code: every `minikv/...py::name` and `tests/...py::test_name` in train_free.md exists.

Parsed with `ast` (nothing is imported), so the check is fast and cannot be fooled by names created at import time.
Also checks README.md's `<!-- test-command -->` block, which CI and new contributors copy.
"""
from __future__ import annotations

import ast
import re
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
