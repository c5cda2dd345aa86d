"""No import cycle inside the captchaops package, counting imports inside functions too."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import captchaops

PACKAGE = "captchaops"
ROOT = Path(captchaops.__file__).parent


def module_name(path: Path) -> str:
    """The dotted name of a source file under the package root."""
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imported_modules(tree: ast.Module, name: str, is_package: bool, modules: set[str]) -> set[str]:
    """The package's modules a module imports at run time, at module level or in a function.

    `from a.b import c` counts as importing the module `a.b.c` when there is one, else `a.b`
    (whose names it reads). The parent packages Python initialises on the way are left out,
    as are `if TYPE_CHECKING:` blocks, which never run."""
    skipped = {
        id(node)
        for branch in ast.walk(tree)
        if isinstance(branch, ast.If) and _is_type_checking(branch.test)
        for stmt in branch.body
        for node in ast.walk(stmt)
    }
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                anchor = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return (found & modules) - {name}


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports."""
    files = {module_name(p): p for p in ROOT.rglob("*.py")}
    return {
        name: imported_modules(
            ast.parse(path.read_text(), filename=str(path)),
            name,
            path.name == "__init__.py",
            set(files),
        )
        for name, path in files.items()
    }


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component: list[str] = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_graph_sees_function_level_and_relative_imports() -> None:
    tree = ast.parse(
        "from . import sibling\n"
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from captchaops.hidden import X\n"
        "def f():\n"
        "    from captchaops.webapp.app import create_app\n"
        "    import captchaops.training.run\n"
    )
    modules = {
        "captchaops.webapp",
        "captchaops.webapp.sibling",
        "captchaops.webapp.app",
        "captchaops.webapp.api",
        "captchaops.training.run",
        "captchaops.hidden",
    }
    assert imported_modules(tree, "captchaops.webapp.api", False, modules) == {
        "captchaops.webapp.sibling",
        "captchaops.webapp.app",
        "captchaops.training.run",
    }
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_in_the_package() -> None:
    graph = import_graph()
    assert "captchaops.webapp.api" in graph and len(graph) > 20
    assert cycles(graph) == []


BENCHMARKS = sorted(path.stem for path in (ROOT.parents[1] / "benchmarks").glob("bench_*.py"))


@pytest.mark.parametrize("name", BENCHMARKS)
def test_every_benchmark_module_imports(name: str) -> None:
    """`make bench` imports each module only when it runs it; a broken import (a helper moved
    to the harness) would otherwise surface only in a benchmark run."""
    module = importlib.import_module(f"benchmarks.{name}")
    assert callable(module.main)
