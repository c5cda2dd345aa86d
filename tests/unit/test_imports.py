"""No import cycle inside the captchaops package and no import pointing up a layer between its
packages (docs/layout.md), counting imports inside functions too."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
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


def _from_module(node: ast.ImportFrom, package: str) -> str:
    """The absolute module a `from ... import` reads from, relative levels resolved against
    `package` (the importing module's package)."""
    base = node.module or ""
    if not node.level:
        return base
    parts = package.split(".")
    anchor = ".".join(parts[: len(parts) - node.level + 1])
    return f"{anchor}.{base}" if base else anchor


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
            base = _from_module(node, package)
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


LAYERS: tuple[tuple[str, ...], ...] = (
    ("settings", "scheme_names", "bounded_json"),
    ("tracking_rest", "mlflow_scope", "service_auth", "access"),
    ("model",),
    ("data", "live"),
    ("registry",),
    ("evaluation",),
    ("decisions",),
    ("training", "team_accounts", "stack", "serving", "webapp"),
    ("scaleout",),
    ("console", "demo"),
    ("cli",),
)
"""The packages (and top-level modules) of captchaops, bottom layer first. A package imports only
its own layer and those below it, and no loop runs between packages; docs/layout.md draws it."""


FEATURES: dict[str, dict[str, str]] = {
    "canary": {"moves": "decisions", "watch": "decisions", "slot": "serving", "breaker": "serving"},
}
"""Feature folders: one feature's modules side by side, each module in the layer of the package
it works with (the canary's registry side with `decisions`, its server side with `serving`), so
the folder adds no layer and no loop; the folder's own `__init__` imports nothing."""


def package_of(module: str) -> str:
    """The package (or top-level module) a module of captchaops belongs to: `registry` for
    `captchaops.registry.aliases`; `captchaops` itself for the package's `__init__` and for a
    feature folder's; for a feature's module, the package it sits beside (`FEATURES`)."""
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in FEATURES:
        sides = FEATURES[parts[1]]
        return sides.get(parts[2], ".".join(parts[1:3])) if len(parts) > 2 else parts[0]
    return parts[1] if len(parts) > 1 else parts[0]


def package_imports(root: Path) -> list[tuple[str, str, str]]:
    """Every import of one package of captchaops by another, as (importer, imported, file:line):
    at module level, inside functions and under `if TYPE_CHECKING:` alike (a type is a
    dependency too); `from captchaops import x` imports `x` where `x` is a module, else the
    package's own `__init__` (`__version__`), which belongs to no layer."""
    top = root.name
    found: list[tuple[str, str, str]] = []
    for path in sorted(root.rglob("*.py")):
        name = ".".join(path.relative_to(root.parent).with_suffix("").parts)
        name = name.removesuffix(".__init__")
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _from_module(node, package)
                folder = root.parent.joinpath(*base.split("."))
                # `from pkg import module` imports that module (a feature folder's side)
                targets = [
                    f"{base}.{a.name}" if (folder / f"{a.name}.py").is_file() else base
                    for a in node.names
                ]
                targets = [f"{top}.{a.name}" for a in node.names] if base == top else targets
            for target in targets:
                first = target.split(".")[1] if target.startswith(f"{top}.") else ""
                if not first or not ((root / first).is_dir() or (root / f"{first}.py").is_file()):
                    continue  # outside the package, or a name of its __init__
                source, imported = package_of(name), package_of(target)
                if source != imported:
                    where = f"{path.relative_to(root.parent)}:{node.lineno}"
                    found.append((source, imported, where))
    return found


def layer_violations(
    edges: list[tuple[str, str, str]], layers: tuple[tuple[str, ...], ...]
) -> list[str]:
    """One line per import that points up a layer, or comes from or goes to an undeclared package."""
    level = {package: i for i, layer in enumerate(layers) for package in layer}
    bad = []
    for source, imported, where in edges:
        if source == PACKAGE:
            continue  # the package's own __init__ imports nothing of its own
        if source not in level or imported not in level:
            missing = source if source not in level else imported
            bad.append(f"{where}: package {missing!r} has no layer in LAYERS; add it")
        elif level[imported] > level[source]:
            bad.append(
                f"{where}: {source} (layer {level[source]}) imports {imported} "
                f"(layer {level[imported]}), which sits above it"
            )
    return bad


def package_loops(edges: list[tuple[str, str, str]]) -> list[list[str]]:
    """The loops between packages (strongly connected components of the package graph)."""
    graph: dict[str, set[str]] = {}
    for source, imported, _ in edges:
        graph.setdefault(source, set()).add(imported)
    return cycles(graph)


def test_the_layer_check_sees_an_import_pointing_up(tmp_path: Path) -> None:
    root = tmp_path / PACKAGE
    (root / "registry").mkdir(parents=True)
    (root / "evaluation").mkdir()
    (root / "registry" / "__init__.py").write_text("")
    (root / "__init__.py").write_text("__version__ = '1'\n")
    (root / "evaluation" / "__init__.py").write_text(
        "from captchaops import __version__, registry\nimport numpy\n"
    )
    (root / "registry" / "scores.py").write_text("def f():\n    from ..evaluation import evalset\n")
    edges = package_imports(root)
    assert sorted(edges) == [
        ("evaluation", "registry", "captchaops/evaluation/__init__.py:1"),
        ("registry", "evaluation", "captchaops/registry/scores.py:2"),
    ]
    assert layer_violations(edges, (("registry",), ("evaluation",))) == [
        "captchaops/registry/scores.py:2: registry (layer 0) imports evaluation (layer 1), "
        "which sits above it"
    ]
    assert package_loops(edges) == [["evaluation", "registry"]]
    assert "has no layer" in layer_violations(edges, (("registry",),))[0]


def test_packages_import_only_their_layer_and_below() -> None:
    edges = package_imports(ROOT)
    assert len(edges) > 100
    declared = {package for layer in LAYERS for package in layer}
    present = {package_of(module_name(p)) for p in ROOT.rglob("*.py")} - {PACKAGE}
    assert present <= declared, f"declare a layer for {sorted(present - declared)}"
    assert declared <= present, f"LAYERS names packages that are gone: {sorted(declared - present)}"
    bad = layer_violations(edges, LAYERS)
    assert not bad, "imports pointing up a layer:\n" + "\n".join(bad)


def test_no_loop_between_packages() -> None:
    edges = package_imports(ROOT)
    loops = package_loops(edges)
    inside = [f"{w}: {s} -> {i}" for s, i, w in edges if any({s, i} <= set(c) for c in loops)]
    assert not loops, f"loops between packages {loops}:\n" + "\n".join(inside)


REASON = "here, not at the top:"
"""What the comment over a function-level import in captchaops says, followed by why: a process
that must not load the module (model servers and the web app stay free of MLflow and
TensorFlow, `train` of Ray), an optional dependency, a cost a command's start would pay for
nothing, or a function Ray ships by value to workers of another image."""


def function_level_imports(source: str) -> list[tuple[int, bool]]:
    """(line, explained) for each import inside a function: explained when the import's line or
    the comment and import lines right above it say `REASON`."""
    lines = source.splitlines()
    found = []
    for function in ast.walk(ast.parse(source)):
        if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        for node in ast.walk(function):
            if not isinstance(node, ast.Import | ast.ImportFrom):
                continue
            row = node.lineno - 1
            explained = REASON in lines[row]
            while (
                not explained
                and row > 0
                and lines[row - 1].lstrip().startswith(("#", "from ", "import "))
            ):
                row -= 1
                explained = REASON in lines[row]
            found.append((node.lineno, explained))
    return sorted(set(found))


def test_the_scan_sees_explained_and_unexplained_function_level_imports() -> None:
    source = (
        "import os\n"
        "def f():\n"
        f"    # {REASON} slow\n"
        "    import json\n"
        "    from a import b\n"
        "\n"
        "    import re\n"
        "    def g():\n"
        f"        import csv  # {REASON} rare\n"
    )
    assert function_level_imports(source) == [(4, True), (5, True), (7, False), (9, True)]


def test_the_package_imports_at_the_top_unless_it_says_why() -> None:
    """A module imports what it uses at the top; the CLI's laziness is its command table
    (`cli.base.COMMANDS`), which loads a command's module only when that command runs; the
    scale-out drivers load Ray in the command's function, after the cluster's check."""
    unexplained = {}
    for path in sorted(ROOT.rglob("*.py")):
        name = str(path.relative_to(ROOT))
        lines = [line for line, why in function_level_imports(path.read_text()) if not why]
        if lines:
            unexplained[name] = lines
    scanned = {str(p.relative_to(ROOT)) for p in ROOT.rglob("*.py")}
    assert {"cli/base.py", "cli/scaleout.py", "scaleout/engine.py"} <= scanned
    assert not unexplained, (
        f"function-level imports with no `# {REASON} <why>` comment above them "
        f"(import at the top instead): {unexplained}"
    )


LEAN_PROCESSES = {
    "captchaops.serving.app": "a model server",
    "captchaops.cli.serve": "a model server replica (`captchaops serve`)",
    "captchaops.webapp.app": "the web app",
    "captchaops.cli.web": "the web app (`captchaops app`)",
}
HEAVY = ("tensorflow", "keras", "mlflow", "ray", "optuna", "matplotlib", "onnx", "tf2onnx")
"""What model servers and the web app never load at start (docs/layout.md): TensorFlow and Keras
are the train extra's, MLflow is reached over REST, onnx (the graph policy) runs in the model
server's trial child."""


def heavy_loaded(module: str) -> str:
    """The heavy packages (`HEAVY`) in sys.modules once `module` is imported in a fresh
    interpreter, as a process starts it, printed as a list."""
    code = (
        f"import sys, {module}\n"
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    return out.stdout.strip()


@pytest.mark.parametrize("module", sorted(LEAN_PROCESSES))
def test_model_servers_and_the_web_app_load_no_heavy_package(module: str) -> None:
    """Imported in a fresh interpreter, as the process starts it: no heavy package in sys.modules."""
    loaded = heavy_loaded(module)
    assert loaded == "[]", f"{LEAN_PROCESSES[module]} loads {loaded}"


LEAN_COMMANDS = {
    "captchaops.cli": "the root command (`captchaops --help`)",
    "captchaops.cli.training": "`train`, which imports cli.scaleout for --members and --submit",
    "captchaops.cli.scaleout": "`cv --help`, `tune --help` and a refused cv or tune",
}
"""Command modules that load nothing of `HEAVY` at import: Ray (and Ray Tune, Optuna) load in
a scale-out command's function once it runs on Ray, TensorFlow once its output goes to the log,
MLflow once the command talks to the tracking server."""


@pytest.mark.parametrize("module", sorted(LEAN_COMMANDS))
def test_the_cli_loads_ray_only_in_a_command_that_runs_on_it(module: str) -> None:
    loaded = heavy_loaded(module)
    assert loaded == "[]", f"{LEAN_COMMANDS[module]} loads {loaded}"


def test_a_feature_folder_s_modules_sit_in_their_sides_layers(tmp_path: Path) -> None:
    root = tmp_path / PACKAGE
    for folder in ("canary", "decisions", "serving"):
        (root / folder).mkdir(parents=True)
        (root / folder / "__init__.py").write_text("")
    (root / "decisions" / "approval.py").write_text("from captchaops.canary import moves\n")
    (root / "serving" / "app.py").write_text("from captchaops.canary.slot import Canary\n")
    (root / "canary" / "moves.py").write_text("from captchaops.decisions import scores\n")
    (root / "canary" / "slot.py").write_text("from captchaops.canary import moves\n")
    edges = package_imports(root)
    assert edges == [("serving", "decisions", "captchaops/canary/slot.py:1")]
    assert package_loops(edges) == []
    (root / "canary" / "watch.py").write_text("from captchaops.canary.slot import Canary\n")
    edges = package_imports(root)
    assert layer_violations(edges, (("decisions",), ("serving",))) == [
        "captchaops/canary/watch.py:1: decisions (layer 0) imports serving (layer 1), "
        "which sits above it"
    ]
    assert package_loops(edges) == [["decisions", "serving"]]


def test_the_canary_s_server_side_imports_nothing_of_its_registry_side() -> None:
    """A model server runs `canary.slot` and `canary.breaker`: what they import stays within the
    serving side and below `registry` (MLflow-free), never the canary's moves or watch."""
    server_side = ("captchaops/canary/slot.py", "captchaops/canary/breaker.py")
    reached = [
        f"{where}: {imported}"
        for source, imported, where in package_imports(ROOT)
        if where.startswith(server_side) and imported in ("decisions", "evaluation", "registry")
    ]
    assert reached == []
