"""The architecture as tests (issue 14): what a reader may rely on when opening `minikv/`.

- `minikv/` (the reference core: `minikv/*.py` and `minikv/policies/*.py`) is what one needs to learn the methods;
  `minikv/io/` reads models and tokenizers; `minikv/tools/` holds the command line, eval, benchmarks, oracle, trace.
- The import graph of the package has no cycle (imports inside functions included: a cycle dodged by a lazy import
  is still a cycle).
- Imports inside a function body are only for optional dependencies (`OPTIONAL`), never to dodge a cycle.
- The core imports nothing from `minikv.io` or `minikv.tools`, except that `minikv/__init__.py` exposes `load`
  (and `minikv/__main__.py`, the `python -m minikv` entry point, starts the command line).
- No function in the core is longer than 40 lines (from `def` to its last line, as `ast` reports them).
- Line budgets: the core at most 2,000 lines, the whole package at most 5,500 (raw lines of `minikv/**/*.py`;
  the package puts one blank line between top-level definitions, as nanoGPT's model.py does).

Everything is read with `ast` (nothing is imported), so the tests are fast and see exactly the files on disk.
"""
from __future__ import annotations

import ast
from functools import lru_cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "minikv"

MAX_FUNCTION_LINES = 40
CORE_LINE_BUDGET = 2_000
PACKAGE_LINE_BUDGET = 5_500

# Optional dependencies: a function may import these lazily, so that minikv works without them.
OPTIONAL = ("matplotlib", "tqdm", "transformers", "gguf", "numpy", "sentencepiece", "accelerate", "tokenizers",
            "importlib.metadata")
# Core modules allowed to import from minikv.io / minikv.tools, and which names: `from minikv import load` and the
# `python -m minikv` entry point.
CORE_EXCEPTIONS = {"minikv/__init__.py": {"load"}, "minikv/__main__.py": None}   # None: any name


# ---- reading the package ---------------------------------------------------------------------------------------
def module_name(rel: str) -> str:
    """`minikv/tools/eval/cli.py` -> `minikv.tools.eval.cli`; `minikv/io/__init__.py` -> `minikv.io`."""
    parts = rel[:-3].split("/")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@lru_cache(maxsize=None)
def package_files() -> tuple[str, ...]:
    """Every `minikv/**/*.py`, as repository-relative paths."""
    return tuple(sorted(p.relative_to(REPO).as_posix() for p in PACKAGE.rglob("*.py")
                        if "__pycache__" not in p.parts))


def is_core(rel: str) -> bool:
    parts = rel.split("/")
    return len(parts) == 2 or (len(parts) == 3 and parts[1] == "policies")


@lru_cache(maxsize=None)
def source(rel: str) -> str:
    return (REPO / rel).read_text(encoding="utf-8")


@lru_cache(maxsize=None)
def tree(rel: str) -> ast.Module:
    return ast.parse(source(rel), filename=rel)


@lru_cache(maxsize=None)
def modules() -> dict[str, str]:
    """module name -> file."""
    return {module_name(rel): rel for rel in package_files()}


def resolve(name: str, known) -> str | None:
    """The longest prefix of the dotted `name` that is a known module (None when it is not ours)."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in known:
            return ".".join(parts[:i])
    return None


def imported_names(node: ast.AST, this: str, is_package: bool) -> list[tuple[str, str]]:
    """(dotted module name, the name bound) for each thing an import statement imports, relative imports resolved.

    `from minikv.x import y` gives `minikv.x.y` (whether y is a submodule or a name in minikv.x: `resolve` decides).
    `__import__("m")` and `importlib.import_module("m")` with a constant string count as imports of "m"; with any
    other argument they give "<dynamic>".
    """
    if isinstance(node, ast.Import):
        return [(a.name, a.asname or a.name.split(".")[0]) for a in node.names]
    if isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            pkg = this.split(".") if is_package else this.split(".")[:-1]
            pkg = pkg[:len(pkg) - (node.level - 1)]
            base = ".".join(pkg + ([node.module] if node.module else []))
        return [(f"{base}.{a.name}" if a.name != "*" else base, a.asname or a.name) for a in node.names]
    if isinstance(node, ast.Call):
        f = node.func
        dynamic = (isinstance(f, ast.Name) and f.id == "__import__") or \
                  (isinstance(f, ast.Attribute) and f.attr == "import_module")
        if dynamic:
            arg = node.args[0] if node.args else None
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                return [(arg.value, arg.value)]
            return [("<dynamic>", "<dynamic>")]
    return []


@lru_cache(maxsize=None)
def import_sites(rel: str) -> tuple[tuple[int, str, str, bool], ...]:
    """Every import in a file: (line, imported dotted name, bound name, inside a function body)."""
    this = module_name(rel)
    is_package = rel.endswith("__init__.py")
    out = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for name, bound in imported_names(node, this, is_package):
            out.append((node.lineno, name, bound, in_function))
        inner = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            visit(child, inner)

    visit(tree(rel), False)
    return tuple(out)


@lru_cache(maxsize=None)
def import_graph() -> dict[str, dict[str, int]]:
    """module -> {imported minikv module: first line importing it}. Only explicit imports (a parent package's
    `__init__` that Python runs first is not an edge: it is not a dependency the importing module chose)."""
    known = modules()
    graph: dict[str, dict[str, int]] = {m: {} for m in known}
    for mod, rel in known.items():
        for line, name, _, _ in import_sites(rel):
            target = resolve(name, known)
            if target is not None and target != mod:
                graph[mod].setdefault(target, line)
    return graph


def find_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle (as a closed path [a, b, ..., a]) per strongly connected component with more than one module,
    found with Tarjan's algorithm, then a shortest cycle through the component's smallest module (BFS)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def strongconnect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, {})):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)

    cycles = []
    for comp in sorted(components):
        members, start = set(comp), comp[0]
        parent: dict[str, str | None] = {start: None}
        frontier, closing = [start], None
        while frontier and closing is None:
            nxt = []
            for v in frontier:
                for w in sorted(graph[v]):
                    if w == start:
                        closing = v
                        break
                    if w in members and w not in parent:
                        parent[w] = v
                        nxt.append(w)
                if closing is not None:
                    break
            frontier = nxt
        path, v = [start], closing                    # walk back from the module that closes the cycle
        while v is not None:
            path.append(v)
            v = parent[v]
        cycles.append(path[::-1])                     # [start, ..., closing, start]
    return cycles


def describe_cycle(cycle: list[str], graph: dict[str, dict[str, int]]) -> str:
    known = modules()
    steps = [f"{known[a]}:{graph[a][b]} imports {b}" for a, b in zip(cycle, cycle[1:])]
    return " -> ".join(cycle) + "  (" + "; ".join(steps) + ")"


def is_optional(name: str) -> bool:
    return any(name == o or name.startswith(o + ".") for o in OPTIONAL)


def functions(node: ast.AST, prefix: str = ""):
    """(qualified name, def line, last line) of every function and method, nested ones included."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
            name = prefix + child.name
            yield name, child.lineno, child.end_lineno
            yield from functions(child, name + ".")
        elif isinstance(child, ast.ClassDef):
            yield from functions(child, prefix + child.name + ".")
        else:
            yield from functions(child, prefix)


def line_count(rel: str) -> int:
    return len(source(rel).splitlines())


# ---- the rules -------------------------------------------------------------------------------------------------
def test_package_is_laid_out_as_core_io_tools():
    files = set(package_files())
    for rel in ("minikv/__init__.py", "minikv/config.py", "minikv/model.py", "minikv/attention.py", "minikv/store.py",
                "minikv/ops.py", "minikv/generate.py", "minikv/policies/__init__.py", "minikv/io/__init__.py",
                "minikv/io/checkpoint.py", "minikv/io/tokenizer.py", "minikv/tools/__init__.py",
                "minikv/tools/cli.py"):
        assert rel in files, f"{rel} is missing"
    stray = sorted(f for f in files if not (is_core(f) or f.startswith(("minikv/io/", "minikv/tools/"))))
    assert not stray, f"files outside the core, minikv/io/ and minikv/tools/: {stray}"


def test_no_import_cycle():
    graph = import_graph()
    cycles = find_cycles(graph)
    assert not cycles, "import cycles in minikv/:\n" + "\n".join(describe_cycle(c, graph) for c in cycles)


def test_function_level_imports_are_optional_dependencies_only():
    bad = []
    for rel in package_files():
        for line, name, _, in_function in import_sites(rel):
            if in_function and not is_optional(name):
                bad.append(f"{rel}:{line} imports {name} inside a function")
    assert not bad, (f"{len(bad)} function-level imports of something other than an optional dependency "
                     f"({', '.join(OPTIONAL)}); move them to the top of the module:\n" + "\n".join(bad))


def test_core_does_not_import_io_or_tools():
    known = modules()
    bad = []
    for rel in package_files():
        if not is_core(rel):
            continue
        allowed = CORE_EXCEPTIONS.get(rel, set())
        for line, name, bound, _ in import_sites(rel):
            target = resolve(name, known) or ""
            if target.startswith(("minikv.io", "minikv.tools")) and allowed is not None and bound not in allowed:
                bad.append(f"{rel}:{line} imports {name}")
    assert not bad, "the core (minikv/*.py, minikv/policies/) imports from minikv.io / minikv.tools:\n" + "\n".join(bad)


def test_core_functions_are_at_most_40_lines():
    long = []
    for rel in package_files():
        if is_core(rel):
            for name, first, last in functions(tree(rel)):
                n = last - first + 1
                if n > MAX_FUNCTION_LINES:
                    long.append((n, f"{rel}:{first} {name}() is {n} lines"))
    assert not long, (f"{len(long)} core functions are longer than {MAX_FUNCTION_LINES} lines:\n"
                      + "\n".join(msg for _, msg in sorted(long, reverse=True)))


def budget_message(files: list[str], total: int, budget: int, what: str) -> str:
    biggest = sorted(files, key=line_count, reverse=True)[:10]
    return (f"{what} is {total} lines, over its budget of {budget} by {total - budget}; largest files: "
            + ", ".join(f"{f} ({line_count(f)})" for f in biggest))


def test_core_line_budget():
    files = [f for f in package_files() if is_core(f)]
    total = sum(map(line_count, files))
    assert total <= CORE_LINE_BUDGET, budget_message(files, total, CORE_LINE_BUDGET, "the core (minikv/*.py, "
                                                                                        "minikv/policies/*.py)")


def test_package_line_budget():
    files = list(package_files())
    total = sum(map(line_count, files))
    assert total <= PACKAGE_LINE_BUDGET, budget_message(files, total, PACKAGE_LINE_BUDGET, "minikv/**/*.py")


# ---- negative controls: the analysers really see what the rules are about -------------------------------------
def test_cycle_finder_names_the_cycle():
    graph = {"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3, "d": 4}, "d": {}, "e": {"e2": 5}, "e2": {"e": 6}}
    assert find_cycles(graph) == [["a", "b", "c", "a"], ["e", "e2", "e"]]
    assert find_cycles({"a": {"b": 1}, "b": {"c": 2}, "c": {}}) == []


def test_import_resolution():
    known = {"minikv", "minikv.generate", "minikv.policies", "minikv.policies.corm", "minikv.tools.eval"}
    src = ("from minikv.policies import corm, get_policy\nfrom .base import Policy\nfrom .. import generate\n"
           "import minikv.tools.eval.plots as p\n"
           "def f():\n    import matplotlib.pyplot\n    __import__('minikv.generate')\n    __import__(name)\n")
    found = []
    for node in ast.walk(ast.parse(src)):
        for name, bound in imported_names(node, "minikv.policies.d2o", False):
            found.append((resolve(name, known) or name, bound))
    assert sorted(found) == sorted([
        ("minikv.policies.corm", "corm"), ("minikv.policies", "get_policy"), ("minikv.policies", "Policy"),
        ("minikv.generate", "generate"), ("minikv.tools.eval", "p"), ("matplotlib.pyplot", "matplotlib"),
        ("minikv.generate", "minikv.generate"), ("<dynamic>", "<dynamic>")])
    assert is_optional("matplotlib.pyplot") and is_optional("importlib.metadata")
    assert not is_optional("importlib") and not is_optional("minikv.generate") and not is_optional("<dynamic>")


def test_function_lengths_and_core_membership():
    src = "class A:\n    def m(self):\n        def inner():\n            pass\n        return 1\n\n\ndef g():\n    pass\n"
    assert list(functions(ast.parse(src))) == [("A.m", 2, 5), ("A.m.inner", 3, 4), ("g", 8, 9)]
    assert is_core("minikv/generate.py") and is_core("minikv/policies/d2o.py")
    assert not is_core("minikv/io/checkpoint.py") and not is_core("minikv/tools/eval/cli.py")
