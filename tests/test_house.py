"""The house rules of the repository, checked on its files.

* The project stands on its own: no file that ships (package, README, docs, examples, tests,
  benchmarks) points to notes that live outside the repository.
* The package's import graph has no cycle. Counted are the imports a module runs: module-level
  imports and imports inside functions (a function-level import that exists only to break a
  cycle is still a cycle). Not counted: imports under ``if TYPE_CHECKING:`` (they never run) and
  the implicit import of a module's parent packages.
  Cycles listed in ``KNOWN_CYCLES`` are tolerated while the modules involved are reworked; each
  entry says why, and the test fails once the cycle is gone so that the entry is removed.
* No module is over ``MAX_LINES`` lines unless it is in ``LONG_MODULES`` with its reason (the
  architecture page of the documentation lists the same modules and reasons).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "curvlens"

# Assembled from pieces so that this file does not match its own patterns.
_OUTSIDE_NOTES = [
    re.compile(re.escape("shared" + "/")),
    re.compile("seed" + r"s?\s+0\d\d", re.IGNORECASE),
    re.compile("SP" + "EC"),
    re.compile(re.escape("STY" + "LE.md")),
]
_SHIPPED = ["curvlens", "README.md", "CHANGELOG.md", "docs", "examples", "tests", "benchmarks",
            "setup.cfg", "Makefile"]
_TEXT_SUFFIXES = {".py", ".md", ".rst", ".txt", ".cfg", ".toml", ".log", ".json", ".csv", ".svg",
                  ".html", ""}
_SKIP_DIRS = {"_build", "__pycache__", ".pytest_cache"}

#: Import cycles tolerated for now, as the set of modules in the cycle, with the reason.
KNOWN_CYCLES: dict[frozenset[str], str] = {}

MAX_LINES = 420
#: Modules allowed over MAX_LINES, with the reason (mirrored in docs/architecture.rst).
LONG_MODULES: dict[str, str] = {
}


def _shipped_files() -> list[Path]:
    files = []
    for entry in _SHIPPED:
        path = ROOT / entry
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            files.extend(p for p in sorted(path.rglob("*"))
                         if p.is_file() and p.suffix in _TEXT_SUFFIXES
                         and not _SKIP_DIRS.intersection(p.relative_to(ROOT).parts))
    return files


def test_no_reference_to_files_outside_the_repository():
    hits = []
    for path in _shipped_files():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for lineno, line in enumerate(text.splitlines(), 1):
            if any(p.search(line) for p in _OUTSIDE_NOTES):
                hits.append(f"{path.relative_to(ROOT)}:{lineno}: {line.strip()[:90]}")
    assert not hits, ("define the quantity in the project's own words or cite the paper by "
                      "title, authors and arXiv id:\n" + "\n".join(hits))


def _module_names() -> dict[str, Path]:
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _runtime_imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph() -> dict[str, set[str]]:
    """``{module: modules of the package it imports when it runs}``."""
    modules = _module_names()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in _runtime_imports(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                # ``from pkg import submodule`` imports the submodule, ``from pkg import name``
                # the package itself.
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                           for a in node.names]
            edges.update(t for t in targets if t in modules and t != name)
        graph[name] = edges
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def strongconnect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return cycles


def test_cycle_finder_finds_a_cycle_and_accepts_a_chain():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_import_graph_sees_function_level_imports_but_not_type_checking_ones():
    tree = ast.parse("import os\nif TYPE_CHECKING:\n    import sys\n"
                     "def f():\n    from json import loads\n")
    assert [type(n).__name__ for n in _runtime_imports(tree)] == ["Import", "ImportFrom"]
    graph = import_graph()
    assert "curvlens.linalg.lanczos" in graph["curvlens"]  # module-level edge is seen


def test_no_import_cycles_in_the_package():
    cycles = [c for c in find_cycles(import_graph()) if frozenset(c) not in KNOWN_CYCLES]
    assert not cycles, f"import cycles (move code along responsibilities): {cycles}"


@pytest.mark.parametrize("cycle", sorted(KNOWN_CYCLES, key=sorted),
                         ids=lambda c: "+".join(sorted(c)))
def test_known_cycles_are_current(cycle):
    assert sorted(cycle) in find_cycles(import_graph()), (
        f"the cycle {sorted(cycle)} is gone: remove it from KNOWN_CYCLES")


def test_modules_stay_small():
    too_long = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        n = len(path.read_text(encoding="utf-8").splitlines())
        if n > MAX_LINES and rel not in LONG_MODULES:
            too_long[rel] = n
    assert not too_long, f"split these modules by responsibility (max {MAX_LINES}): {too_long}"


@pytest.mark.parametrize("rel", sorted(LONG_MODULES))
def test_long_module_allowlist_is_current(rel):
    path = ROOT / rel
    assert path.is_file(), f"{rel} no longer exists: remove it from LONG_MODULES"
    n = len(path.read_text(encoding="utf-8").splitlines())
    assert n > MAX_LINES, f"{rel} has {n} lines now: remove it from LONG_MODULES"


def test_architecture_page_lists_the_same_long_modules():
    page = (ROOT / "docs" / "architecture.rst").read_text(encoding="utf-8")
    section = page.split("Modules over the size limit", 1)[1]
    listed = set(re.findall(r"``(curvlens/[\w/]+\.py)``", section))
    assert listed == set(LONG_MODULES), "keep docs/architecture.rst and LONG_MODULES in sync"
