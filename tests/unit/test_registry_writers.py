"""`captchaops.registry` is the only writer of registry state: no write anywhere else in src/."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import captchaops

ROOT = Path(captchaops.__file__).parent
REGISTRY = ROOT / "registry"

WRITE_METHODS = frozenset(
    {
        "create_registered_model",
        "update_registered_model",
        "rename_registered_model",
        "delete_registered_model",
        "set_registered_model_tag",
        "delete_registered_model_tag",
        "create_model_version",
        "update_model_version",
        "transition_model_version_stage",
        "delete_model_version",
        "set_model_version_tag",
        "delete_model_version_tag",
        "set_registered_model_alias",
        "delete_registered_model_alias",
        "copy_model_version",
        "register_model",
    }
)
"""MlflowClient's registry writes, and `mlflow.register_model` (matched by attribute name)."""
WRITE_ENDPOINTS = (
    "registered-models/create",
    "registered-models/update",
    "registered-models/rename",
    "registered-models/delete",
    "registered-models/set-tag",
    "registered-models/delete-tag",
    "registered-models/alias",
    "model-versions/create",
    "model-versions/update",
    "model-versions/delete",
    "model-versions/set-tag",
    "model-versions/delete-tag",
    "model-versions/transition-stage",
)
"""The REST paths of the same writes. `registered-models/alias` is also the read of an alias
(GET), so a path passed to a call together with the method "GET" counts as a read."""


def _text(node: ast.expr) -> str | None:
    """The literal text of a string constant or f-string (its constant parts), else None."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(_text(part) or "" for part in node.values)
    return None


def registry_writes(source: str, filename: str = "<source>") -> list[str]:
    """Every registry write in a module: `line: what`, for calls, keywords and REST paths."""
    tree = ast.parse(source, filename=filename)
    reads = {
        id(arg)
        for call in ast.walk(tree)
        if isinstance(call, ast.Call) and any(_text(arg) == "GET" for arg in call.args)
        for arg in call.args
    } | {
        id(part)  # the pieces of an f-string are judged as the whole
        for joined in ast.walk(tree)
        if isinstance(joined, ast.JoinedStr)
        for part in joined.values
    }
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in WRITE_METHODS:
                found.append(f"{node.lineno}: {name}()")
            found.extend(
                f"{node.lineno}: {kw.arg}="
                for kw in node.keywords
                if kw.arg == "registered_model_name"
            )
        elif isinstance(node, ast.JoinedStr | ast.Constant) and id(node) not in reads:
            text = _text(node) or ""
            found.extend(
                f"{node.lineno}: {endpoint!r}" for endpoint in WRITE_ENDPOINTS if endpoint in text
            )
    return found


def writes_outside_registry(root: Path) -> dict[str, list[str]]:
    """{file: its registry writes} for every module under `root` outside `root/registry/`."""
    out: dict[str, list[str]] = {}
    for path in sorted(root.rglob("*.py")):
        if (root / "registry") in path.parents:
            continue
        writes = registry_writes(path.read_text(), str(path))
        if writes:
            out[str(path.relative_to(root))] = writes
    return out


def test_nothing_outside_the_registry_writes_registry_state() -> None:
    assert len(list(ROOT.rglob("*.py"))) > 50
    assert writes_outside_registry(ROOT) == {}


def test_the_registry_itself_is_seen_writing() -> None:
    """The scan finds the writes where they belong, so an empty result above means something."""
    found = {path.name: registry_writes(path.read_text()) for path in sorted(REGISTRY.glob("*.py"))}
    seen = " ".join(w for writes in found.values() for w in writes)
    for method in ("create_model_version", "set_registered_model_alias", "set_model_version_tag"):
        assert f"{method}()" in seen
    assert "registered-models/create" in seen


@pytest.mark.parametrize(
    "planted",
    [
        "client.set_registered_model_alias('m', 'production', '3')",
        "MlflowClient().create_model_version('m', 'runs:/r/model', 'r')",
        "c.delete_model_version_tag('m', '1', 'k')",
        "mlflow.register_model('runs:/r/model', 'm')",
        "mlflow.pyfunc.log_model(name='model', python_model=p, registered_model_name='m')",
        "rest.call('POST', '/api/2.0/mlflow/registered-models/set-tag', json={})",
        "httpx.post(f'{uri}/api/2.0/mlflow/model-versions/create', json=body)",
        "rest.call('POST', f'{API}/registered-models/alias', json=body)",
        "ALIAS_PATH = '/api/2.0/mlflow/registered-models/alias'",
    ],
)
def test_a_planted_write_is_caught(tmp_path: Path, planted: str) -> None:
    package = tmp_path / "pkg"
    (package / "registry").mkdir(parents=True)
    (package / "registry" / "ok.py").write_text(f"def allowed(client, rest):\n    {planted}\n")
    (package / "elsewhere.py").write_text(f"def sneaky(client, rest):\n    {planted}\n")
    assert list(writes_outside_registry(package)) == ["elsewhere.py"]


def test_reads_are_not_writes() -> None:
    source = (
        "client.get_registered_model('m')\n"
        "client.get_model_version_by_alias('m', 'production')\n"
        "rest.call('GET', '/api/2.0/mlflow/registered-models/get', params={})\n"
        "rest.call('GET', '/api/2.0/mlflow/model-versions/get-download-uri', params={})\n"
        "rest.call('GET', f'{API}/registered-models/alias', params={})\n"
    )
    assert registry_writes(source) == []


def test_the_registry_package_is_only_its_modules() -> None:
    """Callers import the module that defines a name (ordinary imports a reader and a type
    checker can follow); the package itself defines nothing and imports nothing, so importing
    one module (a model server's `registry.signing`) loads no MLflow."""
    code = (
        "import sys, captchaops.registry as r; "
        "print(sorted(n for n in vars(r) if not n.startswith('__')), 'mlflow' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["[]", "False"]
