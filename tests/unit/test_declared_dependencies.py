"""Every package `src/` imports is declared in pyproject.toml, not merely installed alongside one."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Not distributions: the copy of captchaops.model a logged model carries (model/pyfunc.py).
LOCAL = {"captchaops", "captcha_runtime"}


def _imported_top_levels() -> set[str]:
    names: set[str] = set()
    for path in (ROOT / "src").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - LOCAL


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project.get("optional-dependencies", {}).values()
    requirements = [*project["dependencies"], *(r for extra in extras for r in extra)]
    return {_normalise(re.split(r"[\[<>=!~ ;]", r, maxsplit=1)[0]) for r in requirements}


def test_every_imported_package_is_declared() -> None:
    declared = _declared()
    owners = packages_distributions()
    missing = {
        name: sorted(owners.get(name, ["not installed"]))
        for name in sorted(_imported_top_levels())
        if not {_normalise(d) for d in owners.get(name, [])} & declared
    }
    assert not missing, f"imported by src/ but not declared in pyproject.toml: {missing}"
