"""Monitoring runs in a real tracking server, written by real model servers over REST: one run
per (model, alias, version, replica) with the live estimate and, for a server that shadows, how
its shadow compared; the last points at shutdown, and the same run again after a restart of the
same replica (same host and port)."""

from __future__ import annotations

import base64
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from mlflow import MlflowClient
from mlflow.entities import Run

from captchaops.data.synthetic import generate
from captchaops.live import monitoring
from captchaops.live.estimate import Calibration
from harness.processes import start_http_process
from harness.stack import copy_version
from tests.fixtures.models import TrainedModel
from tests.fixtures.serving import ModelServer, start_model_server
from tests.fixtures.signing import signed_alias
from tests.fixtures.stack import VENV_BIN, Tracking, free_port, stop_process

pytestmark = pytest.mark.slow

PRODUCTION, STAGING = "monitor-production", "monitor-staging"
IMAGES = [base64.b64encode(s.image).decode() for s in generate(10, seed=41)]
REQUESTS = 6


@dataclass
class Pair:
    """A production server shadowing to a staging server, both logging monitoring runs."""

    tracking: Tracking
    model: str
    production: ModelServer
    staging: ModelServer
    versions: tuple[str, str]
    home: Path

    def client(self) -> MlflowClient:
        return MlflowClient(self.tracking.uri, registry_uri=self.tracking.uri)

    def runs(self, alias: str, version: str) -> list[Run]:
        client = self.client()
        experiment = client.get_experiment_by_name(monitoring.experiment_name(self.model))
        if experiment is None:
            return []
        return client.search_runs(
            [experiment.experiment_id], monitoring.replicas_filter(self.model, alias, version)
        )

    def wait_run(self, alias: str, version: str, key: str, value: float) -> Run:
        """The run once its latest `key` is `value` (fails after 60 s)."""
        deadline = time.monotonic() + 60
        while True:
            runs = self.runs(alias, version)
            if runs and runs[0].data.metrics.get(key) == value:
                return runs[0]
            assert time.monotonic() < deadline, f"{alias} v{version}: {runs and runs[0].data}"
            time.sleep(0.3)


def serve(tracking: Tracking, alias: str, home: Path, **env: str) -> ModelServer:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CAPTCHAOPS_MONITOR_SECONDS", "1")
        for name, value in env.items():
            patch.setenv(f"CAPTCHAOPS_{name.upper()}", value)
        return start_model_server(tracking.uri, alias, home)


@pytest.fixture(scope="module")
def pair(
    tracking_server: Tracking, tiny_model: TrainedModel, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Pair]:
    name = tiny_model.model_name
    client = MlflowClient(tracking_server.uri, registry_uri=tracking_server.uri)
    versions = []
    for alias in (PRODUCTION, STAGING):
        version = copy_version(tracking_server.uri, name, tiny_model.version)
        for key, tag in Calibration(threshold=1.0, accuracy=0.95, size=2000).tags().items():
            client.set_model_version_tag(name, version, key, tag)
        signed_alias(tracking_server.uri, name, alias, version)
        versions.append(version)
    home = tmp_path_factory.mktemp("monitoring")
    staging = serve(tracking_server, STAGING, home / "staging")
    production = serve(
        tracking_server,
        PRODUCTION,
        home / "production",
        shadow_url=staging.url,
        shadow_per_second="1000",
    )
    try:
        production.wait_version(versions[0])
        staging.wait_version(versions[1])
        yield Pair(tracking_server, name, production, staging, (versions[0], versions[1]), home)
    finally:
        stop_process(production.proc)
        stop_process(staging.proc)


def calibrated(server: ModelServer, version: str) -> None:
    """Wait until the server has read the version's calibration (once it serves it, in a
    thread of its own): from then on every answer counts."""
    deadline = time.monotonic() + 30
    while version not in httpx.get(f"{server.url}/health", timeout=10).json()["live_estimate"]:
        assert time.monotonic() < deadline, f"{server.alias} never read v{version}'s calibration"
        time.sleep(0.2)


def test_each_server_logs_its_version_and_production_its_shadow(pair: Pair) -> None:
    prod, stag = pair.versions
    calibrated(pair.production, prod)
    calibrated(pair.staging, stag)
    for _ in range(REQUESTS):
        assert pair.production.invoke({"inputs": IMAGES}).status_code == 200
    answers = float(REQUESTS * len(IMAGES))
    run = pair.wait_run(PRODUCTION, prod, monitoring.SHADOW_COMPARISONS, REQUESTS)
    run = pair.wait_run(PRODUCTION, prod, monitoring.LIVE_ANSWERS, answers)
    metrics, tags = run.data.metrics, run.data.tags
    replica = f"{os.uname().nodename}-{pair.production.port}"
    assert run.info.run_name == f"monitor-{pair.model}-{PRODUCTION}-v{prod}-{replica}"
    assert tags[monitoring.REPLICA_TAG] == replica
    assert tags["version"] == prod and tags[monitoring.SHADOW_TAG] == stag
    assert metrics[monitoring.LIVE_ESTIMATE] == 0.0  # the calibration no answer passes
    assert metrics[monitoring.LIVE_ALERT] == 1.0
    assert metrics[monitoring.GATE_ACCURACY] == pytest.approx(0.95)
    assert metrics[monitoring.SHADOW_AGREEMENT] == 1.0  # the same network on both sides
    assert abs(metrics[monitoring.SHADOW_CONFIDENCE_DIFF]) < 1e-3
    assert 0 < metrics[monitoring.SHADOW_P50] <= metrics[monitoring.SHADOW_P99]
    assert metrics[monitoring.SHADOW_DROPPED] == 0
    shadowed = pair.wait_run(STAGING, stag, monitoring.LIVE_ANSWERS, answers)
    assert monitoring.SHADOW_COMPARISONS not in shadowed.data.metrics
    assert shadowed.data.tags["alias"] == STAGING


def test_shutdown_logs_the_last_answers_and_a_restart_reuses_the_run(pair: Pair) -> None:
    """A replica restarted on its host and port reopens its run; the running server's run (a
    replica of the same alias) is another one, untouched."""
    prod = pair.versions[0]
    port = free_port()
    replica = f"{os.uname().nodename}-{port}"

    def serve_once() -> Run:
        server = start_replica(pair, port)
        try:
            server.wait_version(prod)
            calibrated(server, prod)
            assert server.invoke({"inputs": IMAGES}).status_code == 200
        finally:
            stop_process(server.proc)
        (run,) = [r for r in pair.runs(PRODUCTION, prod) if r.data.tags["replica"] == replica]
        return run

    before = serve_once()
    after = serve_once()
    assert after.info.run_id == before.info.run_id
    assert after.info.status == "FINISHED"
    # Each process logged once, at shutdown, its own count.
    assert after.data.metrics[monitoring.LIVE_ANSWERS] == len(IMAGES)
    history = pair.client().get_metric_history(after.info.run_id, monitoring.LIVE_ANSWERS)
    assert [m.value for m in sorted(history, key=lambda m: m.timestamp)] == [len(IMAGES)] * 2
    assert len(pair.runs(PRODUCTION, prod)) == 2  # the pair's production server's run, and this


def start_replica(pair: Pair, port: int) -> ModelServer:
    """Another production server, on `port`, logging only at shutdown."""
    home = pair.home / f"again-{port}"
    home.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "CAPTCHAOPS_HOME": str(home),
        "CAPTCHAOPS_TRACKING_URI": pair.tracking.uri,
        "CAPTCHAOPS_POLL_SECONDS": "0.5",
        "CAPTCHAOPS_MONITOR_SECONDS": "3600",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("CAPTCHAOPS_REPLICA_ID", None)
    url = f"http://127.0.0.1:{port}"
    cmd = [str(VENV_BIN / "captchaops"), "serve", "--alias", PRODUCTION, "--port", str(port)]
    proc = start_http_process(cmd, f"{url}/ping", env=env, log=home / "serve.log")
    return ModelServer(PRODUCTION, url, port, proc, home / "serve.log")


def test_models_shows_the_live_estimate_of_each_served_version(pair: Pair) -> None:
    """`captchaops models` reads the servers' /health: the one that answers shows its served
    version's estimate, answers and gate accuracy with the alert; the one that is down, nothing."""
    prod = pair.versions[0]
    calibrated(pair.production, prod)
    for _ in range(REQUESTS):
        assert pair.production.invoke({"inputs": IMAGES}).status_code == 200
    env = {
        **os.environ,
        "CAPTCHAOPS_HOME": str(pair.home),
        "CAPTCHAOPS_TRACKING_URI": pair.tracking.uri,
        "CAPTCHAOPS_PRODUCTION_PORT": str(pair.production.port),
        "CAPTCHAOPS_STAGING_PORT": str(free_port()),
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    done = subprocess.run(
        [str(VENV_BIN / "captchaops"), "models", "--limit", "50"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    lines = [" ".join(line.split()) for line in done.stdout.splitlines()]
    answers = int(
        httpx.get(f"{pair.production.url}/health").json()["live_estimate"][prod]["answers_seen"]
    )
    assert (
        f"live production v{prod}: live estimate 0.0% over {answers} answers; "
        "gate accuracy 95.0%" in lines
    ), done.stdout
    alert = next(line for line in lines if line.startswith(f"ALERT production v{prod}: "))
    assert "95.0 points below the 95.0% measured at promotion" in alert
    assert not any(line.startswith(("live staging", "ALERT staging")) for line in lines)
    row = next(line for line in lines if line.startswith(f"{prod} @"))
    assert " 0.0% " in row, row  # the live column; the answers are in the line below the table
