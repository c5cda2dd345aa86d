"""The harness tests and benchmarks share: processes, RSS, MLflow state; benchmarks stand alone."""

from __future__ import annotations

import ast
import os
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import psutil
import pytest

import captchaops
from harness.mlflow_state import mlflow_state_restored
from harness.processes import (
    RssSampler,
    free_port,
    http_service,
    process_tree,
    rss_mb,
    start_http_process,
)

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _test_modules_named(path: Path) -> list[str]:
    """Every import of the `tests` package in a file, and every `tests.` module it names in a
    string (as `python -m tests.x` would run one)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names if alias.name.split(".")[0] == "tests"]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] == "tests":
                found.append(node.module)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            found += [word for word in node.value.split() if word.startswith("tests.")]
    return [f"{path.name}: {name}" for name in found]


def test_benchmarks_import_no_test_module() -> None:
    files = sorted(BENCHMARKS.glob("*.py"))
    assert len(files) >= 5
    assert [hit for path in files for hit in _test_modules_named(path)] == []


def test_the_import_scan_sees_test_imports(tmp_path: Path) -> None:
    sample = tmp_path / "bench_sample.py"
    sample.write_text(
        "import tests.fixtures.stack\nfrom tests.e2e import drills\n"
        "def main() -> None:\n    from tests.fixtures.stack import free_port\n"
        "CMD = ['python', '-m', 'tests.e2e.drills']\nimport harness\n"
    )
    assert [hit.split(": ")[1] for hit in _test_modules_named(sample)] == [
        "tests.fixtures.stack",
        "tests.e2e",
        "tests.fixtures.stack",
        "tests.e2e.drills",
    ]


def test_free_port_can_be_listened_on() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
        sock.listen(1)


def test_a_service_is_healthy_inside_the_block_and_gone_with_its_children_after(
    tmp_path: Path,
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # A server that also starts a child, as `mlflow server` starts its workers.
    script = (
        "import http.server, subprocess, sys\n"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
        f"http.server.ThreadingHTTPServer(('127.0.0.1', {port}), "
        "http.server.SimpleHTTPRequestHandler).serve_forever()\n"
    )
    cmd = [sys.executable, "-c", script]
    with http_service(cmd, url + "/", log=tmp_path / "server.log") as proc:
        assert httpx.get(url + "/").status_code == 200
        tree = process_tree(proc.pid)
        assert len(tree) == 2
        assert rss_mb(proc.pid) > rss_mb(proc.pid, children=False) > 1
    assert proc.poll() is not None
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in tree)
    assert rss_mb(proc.pid) == 0.0 and rss_mb(None) == 0.0


def test_a_process_that_dies_before_health_is_an_error() -> None:
    cmd = [sys.executable, "-c", "raise SystemExit(3)"]
    with pytest.raises(RuntimeError, match="exited with 3"):
        start_http_process(cmd, f"http://127.0.0.1:{free_port()}/", timeout=30)


def test_rss_sampler_keeps_the_peak() -> None:
    readings = iter([{"a": 5.0, "b": 1.0}, {"a": 2.0, "b": 7.0}])
    with RssSampler(lambda: next(readings, {"a": 0.0}), every=60) as sampler:
        pass
    assert sampler.peak == {"a": 5.0, "b": 7.0}
    assert sampler.peak_total == 9.0


def test_mlflow_state_comes_back_even_for_variables_that_were_absent(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import mlflow

    for key in [k for k in os.environ if k.startswith("MLFLOW_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "kept")
    before = mlflow.get_tracking_uri()
    with mlflow_state_restored():
        mlflow.set_tracking_uri("http://127.0.0.1:9")
        mlflow.set_registry_uri("http://127.0.0.1:9")
        os.environ["MLFLOW_EXPERIMENT_NAME"] = "leak"
        os.environ["MLFLOW_TRACKING_USERNAME"] = "changed"
        assert os.environ["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:9"
    assert {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_")} == {
        "MLFLOW_TRACKING_USERNAME": "kept"
    }
    assert mlflow.get_tracking_uri() == before
    assert mlflow.get_registry_uri() == before


def test_the_load_generator_runs_as_a_module_from_any_directory(tmp_path: Path) -> None:
    from harness.load import _importable_env

    result = subprocess.run(
        [sys.executable, "-c", "import harness.load as m; print(m.__name__)"],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
        env=_importable_env(),
    )
    assert result.stdout.strip() == "harness.load"


def harness_imports(source: str) -> list[str]:
    """The imports of the test harness in a module (`harness...` or the old `captchaops.harness`)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        names = (
            [alias.name for alias in node.names]
            if isinstance(node, ast.Import)
            else [node.module or ""]
            if isinstance(node, ast.ImportFrom) and not node.level
            else []
        )
        found += [
            n for n in names if n.split(".")[0] == "harness" or n.startswith("captchaops.harness")
        ]
    return found


def test_the_product_imports_no_test_support() -> None:
    src = Path(captchaops.__file__).parent
    files = sorted(src.rglob("*.py"))
    assert len(files) > 50 and not (src / "harness").exists()
    assert {str(p.relative_to(src)): harness_imports(p.read_text()) for p in files} == {
        str(p.relative_to(src)): [] for p in files
    }
    planted = (
        "import os\nfrom harness.processes import free_port\ndef f():\n    import harness.load\n"
    )
    assert harness_imports(planted) == ["harness.processes", "harness.load"]


def test_a_private_stack_signs_in_process_with_the_key_its_servers_trust(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from harness.stack import SIGNING_KEY_ENV, PrivateStack, share_signing_key

    monkeypatch.delenv(SIGNING_KEY_ENV, raising=False)
    own = PrivateStack.create(tmp_path / "own")  # no key named here: the home's
    assert own.env[SIGNING_KEY_ENV] == str(tmp_path / "own" / "promotion-keys")
    assert own.settings().effective_signing_key_dir == tmp_path / "own" / "promotion-keys"

    shared = share_signing_key(tmp_path / "bench")  # a benchmark's: this process and children
    assert os.environ[SIGNING_KEY_ENV] == str(shared) == str(tmp_path / "bench" / "promotion-keys")
    stack = PrivateStack.create(tmp_path / "stack")
    assert stack.env[SIGNING_KEY_ENV] == str(shared)
    assert stack.settings().effective_signing_key_dir == shared
    assert share_signing_key(tmp_path / "later") == shared  # a folder already named is kept
