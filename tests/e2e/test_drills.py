"""Fault drills against a whole private stack started by `captchaops up`: the parts that fit CI time.

One stack (tracking server, both model servers, web app under supervisord) runs in a temporary
home, on a small tmpfs when this machine lets us mount one (so the disk can really fill up).
A tiny real model is trained, gated and promoted; then, in order: promote/rollback/promote under
load, kill -9 of the production server and of the tracking server under load, a full disk, a
read-only home, and down/up. The full-size versions (50 req/s for 60 s, every service killed,
memory) are in benchmarks/bench_e2e.py; docs/drills.md has the table.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from captchaops.data.synthetic import generate_one
from captchaops.decisions import gate, promotion
from captchaops.registry.aliases import resolve_alias
from captchaops.registry.names import PRODUCTION
from captchaops.settings import Settings
from harness.load import Load
from harness.mlflow_state import mlflow_state_restored
from harness.stack import (
    PrivateStack,
    copy_version,
    fill,
    integrity,
    mount_tmpfs,
    snapshot,
    unmount,
)
from tests.fixtures.models import train_tiny

pytestmark = pytest.mark.slow
HOME_SIZE = "256m"


@dataclass
class Drill:
    """The stack under test and what it serves."""

    stack: PrivateStack
    settings: Settings
    on_tmpfs: bool


@pytest.fixture(autouse=True)
def _own_mlflow_uris() -> Iterator[None]:
    with mlflow_state_restored():
        yield


@pytest.fixture(scope="module")
def drill(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Drill]:
    """A whole stack with a tiny model promoted to @production by the gate."""
    home = tmp_path_factory.mktemp("drills") / "home"
    home.mkdir()
    on_tmpfs = shutil.which("mount") is not None and mount_tmpfs(home, HOME_SIZE)
    stack = PrivateStack.create(home, CAPTCHAOPS_STAGING_FLOOR="0")
    try:
        with mlflow_state_restored():
            stack.up()
            settings = stack.settings()
            first = train_tiny(settings).version
            decision, _ = gate.auto_promote(settings, actor="drills")
            assert decision.promote, decision.refusals
            stack.wait_version("production", first)
            yield Drill(stack, settings, on_tmpfs)
    finally:
        stack.down()
        if on_tmpfs:
            unmount(home)


def production(settings: Settings) -> str:
    """The version holding @production."""
    version = resolve_alias(settings, PRODUCTION)
    assert version is not None
    return version


def image_json() -> dict[str, str]:
    """The web app's JSON body for one CAPTCHA."""
    return {"image": base64.b64encode(generate_one(5).image).decode()}


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    """The CLI failed the way users should see it: exit 1, one line, no traceback."""
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_promote_rollback_promote_under_load_fails_no_request(drill: Drill, tmp_path: Path) -> None:
    s, stack = drill.settings, drill.stack
    champion = production(s)
    second, third = (
        copy_version(s.effective_tracking_uri, s.model_name, champion) for _ in range(2)
    )
    load = Load.start(stack.url("production"), rate=20, seconds=300, out=tmp_path / "load.json")
    try:
        promotion.promote(s, version=second, reason="drill: promote under load", actor="drills")
        stack.wait_version("production", second)
        promotion.rollback(s, reason="drill: roll back under load", actor="drills")
        stack.wait_version("production", champion)
        promotion.promote(s, version=third, reason="drill: promote again", actor="drills")
        stack.wait_version("production", third)
        time.sleep(1)
        report = load.finish()
    finally:
        load.stop()
    print(report.summary())
    assert report.failures() == [], report.summary()
    assert {champion, second, third} <= set(report.versions), report.summary()


def test_kill_9_production_server_comes_back_with_the_same_version(
    drill: Drill, tmp_path: Path
) -> None:
    stack = drill.stack
    version = production(drill.settings)
    load = Load.start(stack.url("production"), rate=10, seconds=300, out=tmp_path / "load.json")
    try:
        time.sleep(1)
        old = stack.pids()["production"]
        killed = time.time()
        os.kill(old, signal.SIGKILL)
        api_down = page_down = False
        deadline = time.monotonic() + 30
        while not (api_down and page_down) and time.monotonic() < deadline:
            answer = httpx.post(f"{stack.url('app')}/api/predict", json=image_json(), timeout=10)
            assert answer.status_code == 200, answer.text
            envs = answer.json()["environments"]
            assert envs["staging"]["available"], envs
            if not envs["production"]["available"]:
                assert envs["production"]["error"], envs
                api_down = True
            page = httpx.get(stack.url("app"), timeout=10)
            assert page.status_code == 200
            page_down = page_down or 'class="env-status down" data-env="production"' in page.text
        stack.wait_version("production", version)
        back = time.time()
        assert stack.pids()["production"] != old
        time.sleep(2)
        report = load.finish()
    finally:
        load.stop()
    print(f"back after {back - killed:.1f}s; {report.summary()}")
    assert api_down and page_down, "the web app never reported production as unavailable"
    assert report.failures(end=killed - 1) == [], report.summary()
    assert report.failures(start=back) == [], report.summary()
    assert set(report.versions) == {version}


def test_kill_9_tracking_server_keeps_models_serving(drill: Drill, tmp_path: Path) -> None:
    stack = drill.stack
    version = production(drill.settings)
    load = Load.start(stack.url("production"), rate=10, seconds=300, out=tmp_path / "load.json")
    try:
        old = stack.pids()["tracking"]
        os.kill(old, signal.SIGKILL)
        answer = httpx.post(f"{stack.url('app')}/api/predict", json=image_json(), timeout=10)
        assert answer.status_code == 200, answer.text
        assert answer.json()["environments"]["production"]["available"]
        deadline = time.monotonic() + 60
        while not stack.healthy("tracking"):
            assert time.monotonic() < deadline, "tracking server did not come back"
            time.sleep(0.2)
        assert stack.pids()["tracking"] != old
        assert production(drill.settings) == version
        report = load.finish()
    finally:
        load.stop()
    print(report.summary())
    assert report.failures() == [], report.summary()
    assert set(report.versions) == {version}


def test_full_disk_gives_clear_errors_and_keeps_the_database(drill: Drill, tmp_path: Path) -> None:
    if not drill.on_tmpfs:
        pytest.skip("cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN) to fill a disk")
    s, stack = drill.settings, drill.stack
    champion = production(s)
    candidate = copy_version(s.effective_tracking_uri, s.model_name, champion)
    db = stack.home / "mlflow.db"
    load = Load.start(stack.url("production"), rate=10, seconds=300, out=tmp_path / "load.json")
    filler = fill(stack.home)
    try:
        # How long the refusal takes (the CLI caps MLflow's client retries) is measured by
        # benchmarks/bench_e2e.py.
        refused = stack.cli("promote", "--version", candidate, "--reason", "drill: disk full")
        message = one_line_error(refused)
        assert "tracking server" in message and "disk may be full" in message, message
        feedback = httpx.post(
            f"{stack.url('app')}/api/feedback", json={**image_json(), "label": "AB12"}, timeout=60
        )
        assert feedback.status_code == 503, feedback.text
        assert feedback.json()["error"] == "feedback_unavailable"
        predicted = httpx.post(f"{stack.url('app')}/api/predict", json=image_json(), timeout=10)
        assert predicted.status_code == 200, predicted.text
        assert production(s) == champion
        report = load.finish()
    finally:
        load.stop()
        filler.unlink()
    print(f"full disk: promote said {message!r}; {report.summary()}")
    assert report.failures() == [], report.summary()
    assert integrity(db) == "ok"
    accepted = stack.cli("promote", "--version", candidate, "--reason", "drill: space is back")
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr
    stack.wait_version("production", candidate)


def test_read_only_home_is_one_clear_error(drill: Drill, tmp_path: Path) -> None:
    home = tmp_path / "read-only-home"
    home.mkdir()
    if not mount_tmpfs(home, "64m"):
        pytest.skip("cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN) to make it read-only")
    try:
        with (
            closing(sqlite3.connect(drill.stack.home / "mlflow.db")) as source,
            closing(sqlite3.connect(home / "mlflow.db")) as copy,
        ):
            source.backup(copy)
        digest = hashlib.sha256((home / "mlflow.db").read_bytes()).hexdigest()
        remount = subprocess.run(["mount", "-o", "remount,ro", str(home)], capture_output=True)
        assert remount.returncode == 0, remount.stderr
        stack = PrivateStack.create(home)
        message = one_line_error(stack.cli("up", "--core"))
        assert str(home) in message, message
        assert stack.leftovers() == []
        assert integrity(home / "mlflow.db") == "ok"
        assert hashlib.sha256((home / "mlflow.db").read_bytes()).hexdigest() == digest
    finally:
        unmount(home)


def test_down_then_up_keeps_runs_versions_and_aliases(drill: Drill) -> None:
    s, stack = drill.settings, drill.stack
    before = snapshot(s)
    assert len(before["runs"]) >= 5 and len(before["audit"]) >= 4
    stack.down()
    assert stack.leftovers() == []
    stack.up()
    assert snapshot(s) == before
    stack.wait_version("production", before["aliases"]["production"])
    assert integrity(stack.home / "mlflow.db") == "ok"
