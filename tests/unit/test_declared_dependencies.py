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


def _lock() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"requirements.lock: {line!r} is not name==version"
            pins[_normalise(name)] = version
    return pins


def test_the_lock_pins_every_declared_requirement_inside_its_range() -> None:
    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project.get("optional-dependencies", {}).values()
    pins = _lock()
    wrong = []
    for text in [*project["dependencies"], *(r for extra in extras for r in extra)]:
        requirement = Requirement(text)
        name = _normalise(requirement.name)
        if name == "captchaops":  # the project's own extras
            continue
        if name not in pins or pins[name] not in requirement.specifier:
            wrong.append(f"{text} (locked: {pins.get(name, 'absent')})")
    assert not wrong, f"requirements.lock is stale, run `make lock`: {wrong}"


def test_every_install_of_the_project_uses_the_lock() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert "$(STAMP): pyproject.toml $(LOCK)" in makefile
    assert 'pip install --quiet -c $(LOCK) -e ".[dev]"' in makefile
    installs = [
        line
        for path in [
            *(ROOT / "deploy").glob("Dockerfile*"),
            ROOT / ".github" / "workflows" / "continuous-deployment.yml",
        ]
        for line in path.read_text().splitlines()
        if re.search(r"pip (install|wheel)\b", line) and "--no-index" not in line
    ]
    assert len(installs) >= 3, installs
    assert all("-c requirements.lock" in line for line in installs), installs
