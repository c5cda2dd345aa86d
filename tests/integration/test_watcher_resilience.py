"""A model server when the registry misbehaves: down at start, an alias deleted, a download that
hangs. Real tracking servers, real model servers, a real HTTP proxy that stalls downloads."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from mlflow import MlflowClient

from captchaops.serving.loader import Timeouts, VersionLoader, cache_dir_for
from captchaops.serving.metrics import ServingMetrics
from captchaops.serving.watcher import AliasWatcher
from captchaops.settings import load_settings
from captchaops.tracking_rest import TrackingRest, VersionRef
from tests.fixtures.models import TrainedModel
from tests.fixtures.serving import ModelServer, model_server
from tests.fixtures.stack import Tracking, start_tracking_server, stop_process
from tests.integration.test_serving import (
    IMAGE,
    captcha_png,
    copy_version,
    register_folder,
    set_alias,
    split_body,
)

pytestmark = pytest.mark.slow

ARTIFACT_FILES = "/api/2.0/mlflow-artifacts/artifacts/"


def wait_health(server: ModelServer, done: Any, timeout: float = 60.0) -> dict[str, Any]:
    """/health once `done(body)` holds; fails with the server's log after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body: dict[str, Any] = httpx.get(f"{server.url}/health", timeout=5).json()
        if done(body):
            return body
        time.sleep(0.2)
    raise TimeoutError(server.log.read_text()[-3000:])


def test_registry_down_at_start_serves_the_last_known_good_copy(
    tracking_server: Tracking, tiny_model: TrainedModel, tmp_path: Path
) -> None:
    rest = TrackingRest(tracking_server.uri)
    folder = rest.download_artifacts(
        rest.download_uri(tiny_model.model_name, tiny_model.version), tmp_path / "model"
    )
    (tmp_path / "registry").mkdir()
    own = start_tracking_server(tmp_path / "registry")
    home = tmp_path / "home"
    try:
        version = register_folder(own.uri, tiny_model.model_name, folder)
        set_alias(own.uri, tiny_model.model_name, "production", version)
        with model_server(own.uri, "production", home) as first:
            first.wait_version(version)
        stop_process(own.proc)
        with model_server(own.uri, "production", home) as restarted:
            restarted.wait_version(version)
            resp = restarted.invoke(split_body(IMAGE))
            health = httpx.get(f"{restarted.url}/health").json()
            log = restarted.log.read_text()
    finally:
        stop_process(own.proc)
    assert resp.status_code == 200
    assert resp.headers["X-Model-Version"] == version
    assert len(resp.json()["predictions"]) == 1
    assert health["model_loaded"] is True
    assert health["served_from"] == "last_known_good"
    assert health["status"] == "degraded"
    assert health["reason"] and health["last_poll_error"]
    assert f"serving the last-known-good copy of {tiny_model.model_name} version {version}" in log


def test_a_deleted_alias_stops_being_served_with_one_log_line(
    tracking_server: Tracking, tiny_model: TrainedModel, tmp_path: Path
) -> None:
    name, alias = tiny_model.model_name, "resilience-deleted"
    set_alias(tracking_server.uri, name, alias, tiny_model.version)
    cache = cache_dir_for(tmp_path, name, alias)
    with model_server(tracking_server.uri, alias, tmp_path) as server:
        server.wait_version(tiny_model.version)
        assert (cache / "good.json").is_file()
        MlflowClient(
            tracking_server.uri, registry_uri=tracking_server.uri
        ).delete_registered_model_alias(name, alias)
        health = wait_health(server, lambda body: body["status"] == "no_model")
        resp = server.invoke(split_body(IMAGE))
        first_polls = health["last_poll_at"]
        wait_health(server, lambda body: body["last_poll_at"] != first_polls)
        log = server.log.read_text()
    assert resp.status_code == 503 and resp.json()["error"] == "no_model"
    assert resp.headers["X-Model-Version"] == "none"
    assert health["model_loaded"] is False
    assert "deleted" in health["reason"] and tiny_model.version in health["reason"]
    assert len([line for line in log.splitlines() if "no longer exists" in line]) == 1
    assert f"stopped serving version {tiny_model.version}" in log
    assert not (cache / "good.json").exists(), "a restart must not serve a deleted alias"


class Stall:
    """Which requests a stalling proxy holds: those whose path starts with `prefix` (None: none)."""

    prefix: str | None = None


@contextmanager
def stalling_proxy(upstream: str) -> Iterator[tuple[str, Stall]]:
    """A real HTTP proxy to `upstream` that never answers the requests `Stall.prefix` names."""
    stall = Stall()
    release = threading.Event()

    class Handle(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if stall.prefix is not None and self.path.startswith(stall.prefix):
                release.wait(120)
                return
            resp = httpx.get(upstream + self.path, headers={"Accept": "*/*"}, timeout=30)
            self.send_response(resp.status_code)
            self.send_header("Content-Type", resp.headers.get("content-type", "text/plain"))
            self.send_header("Content-Length", str(len(resp.content)))
            self.end_headers()
            self.wfile.write(resp.content)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handle)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", stall
    finally:
        release.set()
        server.shutdown()
        server.server_close()


def test_a_hung_download_times_out_and_the_old_version_keeps_serving(
    tracking_server: Tracking, tiny_model: TrainedModel, tmp_path: Path
) -> None:
    name, alias = tiny_model.model_name, "resilience-hung"
    version_a = tiny_model.version
    version_b = copy_version(tracking_server.uri, name, version_a)
    set_alias(tracking_server.uri, name, alias, version_a)
    with stalling_proxy(tracking_server.uri) as (url, stall):
        settings = load_settings(home=tmp_path, tracking_uri=url, poll_seconds=0.5)
        watcher = AliasWatcher.for_settings(
            settings, alias, ServingMetrics(), Timeouts(download=30.0, load=60.0, warm_up=60.0)
        )
        watcher.start()
        try:
            deadline = time.monotonic() + 60
            while watcher.current is None and time.monotonic() < deadline:
                time.sleep(0.2)
            assert watcher.current is not None and watcher.current.version == version_a
            stall.prefix = ARTIFACT_FILES
            set_alias(tracking_server.uri, name, alias, version_b)
            deadline = time.monotonic() + 120
            while watcher.failed_version != version_b and time.monotonic() < deadline:
                time.sleep(0.2)
            polled = watcher.last_poll_at
            while watcher.last_poll_at == polled and time.monotonic() < deadline:
                time.sleep(0.2)
            health = watcher.health()
            served = watcher.current
            answer = served.model.predict_images([captcha_png()]) if served else []
        finally:
            watcher.stop()
    assert served is not None and served.version == version_a
    assert len(answer) == 1 and isinstance(answer[0]["text"], str)
    assert health["failed_version"] == version_b
    assert health["alias_version"] == version_b
    assert "took longer than 30 s" in health["last_reload_error"]
    assert health["status"] == "degraded" and health["reason"].startswith(
        f"keeping version {version_a}"
    )
    assert health["last_poll_error"] is None and health["poll_stale"] is False


def test_a_registry_that_stops_answering_makes_health_stale_and_the_model_keeps_serving(
    tracking_server: Tracking, tiny_model: TrainedModel, tmp_path: Path
) -> None:
    name, alias = tiny_model.model_name, "resilience-stale"
    set_alias(tracking_server.uri, name, alias, tiny_model.version)
    with stalling_proxy(tracking_server.uri) as (url, stall):
        rest = TrackingRest(url, timeout=2.0)
        loader = VersionLoader(rest, cache_dir_for(tmp_path, name, alias), Timeouts())
        watcher = AliasWatcher(rest, name, alias, 0.2, ServingMetrics(), loader)
        watcher.start()
        try:
            deadline = time.monotonic() + 60
            while watcher.health()["status"] != "ok" and time.monotonic() < deadline:
                time.sleep(0.2)
            fresh = watcher.health()
            stall.prefix = "/api/2.0/mlflow/registered-models/alias"
            while not watcher.health()["poll_stale"] and time.monotonic() < deadline:
                time.sleep(0.2)
            stale = watcher.health()
            served = watcher.current
        finally:
            watcher.stop()
    assert fresh["status"] == "ok" and fresh["poll_stale"] is False and fresh["reason"] is None
    assert served is not None and served.version == tiny_model.version
    assert stale["poll_stale"] is True
    assert stale["status"] == "degraded" and stale["model_loaded"] is True
    assert stale["reason"].startswith("no answer from the registry for")


def test_a_home_that_cannot_be_written_still_loads_without_a_copy(
    tracking_server: Tracking, tiny_model: TrainedModel, tmp_path: Path
) -> None:
    blocked = tmp_path / "a-file"
    blocked.write_text("the cache cannot be a folder under a file")
    loader = VersionLoader(TrackingRest(tracking_server.uri), blocked / "cache", Timeouts())
    loaded = loader.load(VersionRef(tiny_model.model_name, tiny_model.version, tiny_model.run_id))
    assert loaded.model.predict_images([captcha_png()])[0]["text"] is not None
    assert loader.load_last_good() is None
