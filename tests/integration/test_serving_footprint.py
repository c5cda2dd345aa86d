"""A model server imports neither MLflow nor pandas (together about 110 MB of its memory)."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest

from tests.fixtures.models import TrainedModel
from tests.fixtures.serving import start_model_server
from tests.fixtures.stack import Tracking, stop_process
from tests.integration.test_serving import IMAGE, set_alias, split_body

pytestmark = pytest.mark.slow

IMPORTED = re.compile(r"^import time:\s+\d+ \|\s+\d+ \|\s*(\S+)\s*$")


def test_a_serving_process_never_imports_mlflow_or_pandas(
    tracking_server: Tracking,
    tiny_model: TrainedModel,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    alias = "footprint"
    set_alias(tracking_server.uri, tiny_model.model_name, alias, tiny_model.version)
    # Python writes one line per module the process imports, whenever and wherever it happens
    # (the watcher's threads included), to stderr, which the fixture keeps in the server's log.
    monkeypatch.setenv("PYTHONPROFILEIMPORTTIME", "1")
    server = start_model_server(tracking_server.uri, alias, tmp_path)
    try:
        server.wait_version(tiny_model.version)
        assert server.invoke(split_body(IMAGE)).status_code == 200
        assert httpx.get(f"{server.url}/health").json()["status"] == "ok"
        assert httpx.get(f"{server.url}/metrics").status_code == 200
        maps = Path(f"/proc/{server.proc.pid}/maps").read_text()
    finally:
        stop_process(server.proc)
    modules = {
        found[1] for line in server.log.read_text().splitlines() if (found := IMPORTED.match(line))
    }
    assert {"captchaops.serving.watcher", "onnxruntime", "httpx"} <= modules
    roots = {module.split(".")[0] for module in modules}
    assert "mlflow" not in roots
    assert "pandas" not in roots
    assert "/pandas/" not in maps
