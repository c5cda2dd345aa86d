"""Continuous delivery without restarts: hot swap under load, a broken version, the registry down."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.fixtures.models import TrainedModel
from tests.fixtures.serving import ModelServer, model_server
from tests.fixtures.stack import Tracking, start_tracking_server, stop_process
from tests.integration.test_serving import (
    IMAGE,
    copy_version,
    download_model,
    register_folder,
    set_alias,
    split_body,
)

pytestmark = pytest.mark.slow


class Hammer:
    """A client thread that sends requests back to back and records every outcome."""

    def __init__(self, server: ModelServer) -> None:
        self.server = server
        self.answers: list[tuple[float, int, str]] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Hammer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        with httpx.Client(timeout=30) as client:
            while not self._stop.is_set():
                try:
                    resp = client.post(f"{self.server.url}/invocations", json=split_body(IMAGE))
                    self.answers.append(
                        (time.monotonic(), resp.status_code, resp.headers["X-Model-Version"])
                    )
                except httpx.HTTPError as exc:
                    self.errors.append(repr(exc))

    def failed(self) -> list[tuple[float, int, str]]:
        """Answers that were not 200."""
        return [answer for answer in self.answers if answer[1] != 200]

    def first_from(self, version: str, after: float) -> float | None:
        """When the first answer from `version` arrived after `after`."""
        times = [
            t for t, status, v in self.answers if v == version and t >= after and status == 200
        ]
        return min(times) if times else None


def test_alias_move_under_load_switches_with_zero_failures(
    tracking_server: Tracking, tiny_model: TrainedModel, tmp_path: Path
) -> None:
    name, alias = tiny_model.model_name, "serve-swap"
    version_a = tiny_model.version
    version_b = copy_version(tracking_server.uri, name, version_a)
    set_alias(tracking_server.uri, name, alias, version_a)
    with model_server(tracking_server.uri, alias, tmp_path) as server:
        server.wait_version(version_a)
        with Hammer(server) as hammer:
            time.sleep(1.0)
            moved = time.monotonic()
            set_alias(tracking_server.uri, name, alias, version_b)
            # How soon the switch comes is measured by benchmarks/bench_serving.py (hot swap).
            deadline = moved + 60
            while hammer.first_from(version_b, moved) is None and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(1.0)
        switched = hammer.first_from(version_b, moved)
        assert hammer.errors == []
        assert hammer.failed() == []
        assert len(hammer.answers) > 20
        assert switched is not None, "the server never answered from the new version"
        after = [v for t, _, v in hammer.answers if t > switched]
        assert set(after) == {version_b}, "no answer from the old version after the swap"
        assert httpx.get(f"{server.url}/version").json()["version"] == version_b


def test_a_broken_version_keeps_the_old_one_serving_and_health_says_why(
    tracking_server: Tracking, tiny_model: TrainedModel, tmp_path: Path
) -> None:
    name, alias = tiny_model.model_name, "serve-broken"
    folder = download_model(tracking_server.uri, name, tiny_model.version, tmp_path / "model")
    onnx_files = list(folder.rglob("*.onnx"))
    assert onnx_files, "the tiny model has an ONNX file"
    for onnx_file in onnx_files:
        onnx_file.write_bytes(onnx_file.read_bytes()[:200])
    broken = register_folder(tracking_server.uri, name, folder)
    set_alias(tracking_server.uri, name, alias, tiny_model.version)
    with model_server(tracking_server.uri, alias, tmp_path / "home") as server:
        server.wait_version(tiny_model.version)
        with Hammer(server) as hammer:
            set_alias(tracking_server.uri, name, alias, broken)
            deadline = time.monotonic() + 30
            health = httpx.get(f"{server.url}/health").json()
            while health["last_reload_error"] is None and time.monotonic() < deadline:
                time.sleep(0.2)
                health = httpx.get(f"{server.url}/health").json()
            time.sleep(1.0)
        assert hammer.errors == [] and hammer.failed() == []
        assert {v for _, _, v in hammer.answers} == {tiny_model.version}
        assert health["status"] == "degraded"
        assert health["version"] == tiny_model.version
        assert health["failed_version"] == broken
        assert f"version {broken}" in health["last_reload_error"]
        metrics = httpx.get(f"{server.url}/metrics").text
        assert "captchaops_reload_failing 1.0" in metrics
        assert 'captchaops_reloads_total{result="failure"} 1.0' in metrics
        resp = server.invoke(split_body(IMAGE))
        assert resp.status_code == 200
        assert resp.headers["X-Model-Version"] == tiny_model.version

        set_alias(tracking_server.uri, name, alias, tiny_model.version)
        deadline = time.monotonic() + 10
        while httpx.get(f"{server.url}/health").json()["status"] != "ok":
            assert time.monotonic() < deadline, "health recovers once the alias moves back"
            time.sleep(0.2)


def test_predictions_continue_while_the_tracking_server_is_down(
    tracking_server: Tracking, tiny_model: TrainedModel, tmp_path: Path
) -> None:
    folder = download_model(
        tracking_server.uri, tiny_model.model_name, tiny_model.version, tmp_path / "model"
    )
    (tmp_path / "registry").mkdir()
    own = start_tracking_server(tmp_path / "registry")
    try:
        version = register_folder(own.uri, tiny_model.model_name, folder)
        set_alias(own.uri, tiny_model.model_name, "production", version)
        with model_server(own.uri, "production", tmp_path / "home") as server:
            server.wait_version(version)
            stop_process(own.proc)
            with Hammer(server) as hammer:
                deadline = time.monotonic() + 30
                health = httpx.get(f"{server.url}/health").json()
                while health["last_poll_error"] is None and time.monotonic() < deadline:
                    time.sleep(0.2)
                    health = httpx.get(f"{server.url}/health").json()
                time.sleep(2.0)
            assert hammer.errors == [] and hammer.failed() == []
            assert len(hammer.answers) > 20
            assert {v for _, _, v in hammer.answers} == {version}
            assert health["last_poll_error"]
            assert health["status"] == "degraded"
            assert health["model_loaded"] is True
    finally:
        stop_process(own.proc)
