"""`up --replicas N`: each served alias as N supervised model servers behind HAProxy on the
alias's own port; a replica killed under load costs the clients nothing and comes back into rotation;
slow connections to the balancer hold no replica.

One stack per module: @production of a copy of the tiny model as two replicas (the other
services are not needed here), the session's tracking server.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from mlflow import MlflowClient

from harness import hosts, slow
from harness.load import captcha_body
from harness.processes import VENV_BIN
from harness.replicas import (
    Balanced,
    balanced_production,
    kill_drill,
    load_result,
    stack_settings,
    start_load,
)
from tests.fixtures.models import TrainedModel, copies
from tests.fixtures.signing import signed_alias
from tests.fixtures.stack import Tracking

pytestmark = pytest.mark.slow

REPLICAS = 2
CLI = str(VENV_BIN / "captchaops")


@pytest.fixture(scope="module")
def body(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("replicas-body") / "body.json"
    path.write_text(json.dumps(captcha_body()))
    return path


@pytest.fixture(scope="module")
def stack_env(
    tracking_server: Tracking, tiny_model: TrainedModel, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, str]:
    if shutil.which("haproxy") is None:  # CI installs it (.ci/run) and must not skip
        assert not hosts.required(), "no haproxy on PATH: apt-get install haproxy"
        pytest.skip("no haproxy on PATH (apt-get install haproxy)")
    client = MlflowClient(tracking_server.uri, registry_uri=tracking_server.uri)
    model = f"up-replicas-{uuid.uuid4().hex[:8]}"
    (version,) = copies(client, tiny_model, model, 1)
    signed_alias(tracking_server.uri, model, "production", version)
    home = tmp_path_factory.mktemp("up-replicas")
    return {**stack_settings(home, tracking_server.uri, model, REPLICAS), "version": version}


@pytest.fixture(scope="module")
def balanced(stack_env: dict[str, str]) -> Iterator[Balanced]:
    env = {k: v for k, v in stack_env.items() if k.startswith("CAPTCHAOPS_")}
    with balanced_production(env, REPLICAS) as served:
        for index in range(1, REPLICAS + 1):
            served.wait_serving(index, stack_env["version"])
        yield served


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("CAPTCHAOPS_", "MLFLOW_"))}
    return subprocess.run(
        [CLI, *args], env={**clean, **env}, capture_output=True, text=True, timeout=120
    )


def test_every_replica_answers_through_the_balancer_and_status_shows_them(
    balanced: Balanced, stack_env: dict[str, str], body: Path
) -> None:
    with httpx.Client(timeout=30) as http:
        ping = http.get(f"{balanced.url}/ping")
        answers = [
            http.post(f"{balanced.url}/invocations", content=body.read_bytes(), headers=JSON)
            for _ in range(30)
        ]
        missing = http.post(f"{balanced.url}/nowhere", json={})
    assert ping.status_code == 200 and ping.text.strip() == "pong"  # the balancer's own
    assert {a.status_code for a in answers} == {200}
    assert {a.headers["X-Model-Version"] for a in answers} == {stack_env["version"]}
    assert all(balanced.answered(k) > 0 for k in range(1, REPLICAS + 1))  # both in rotation
    assert missing.status_code == 404 and missing.json()["error"] == "not_found"  # a replica's
    for k in range(1, REPLICAS + 1):
        assert balanced.replica_url(k).startswith("http://127.0.0.1:")

    env = {k: v for k, v in stack_env.items() if k.startswith("CAPTCHAOPS_")}
    shown = cli(env, "status")
    assert shown.returncode == 0, shown.stdout + shown.stderr
    text = " ".join(shown.stdout.split())
    assert (
        f"balancer: production (haproxy) over {REPLICAS} replicas, {REPLICAS} in rotation" in text
    )
    assert "production-1" in text and "production-2" in text
    again = cli(env, "up", "--replicas", "3")
    assert again.returncode != 0
    assert f"runs with {REPLICAS} replica(s) per alias, not 3" in again.stdout + again.stderr


def test_up_replicas_without_haproxy_is_one_line_with_the_fix(tmp_path: Path) -> None:
    env = {"CAPTCHAOPS_HOME": str(tmp_path / "home"), "PATH": str(VENV_BIN)}
    result = cli(env, "up", "--replicas", "2")
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1, lines
    assert "apt-get install haproxy" in lines[0] and "Traceback" not in lines[0]


def test_a_replica_killed_under_load_costs_no_client_request(
    balanced: Balanced, body: Path
) -> None:
    before = balanced.pid(1)
    result, back_s = kill_drill(balanced, body, clients=8, seconds=15, kill_at=5, index=1)
    assert result.failed == 0, result.statuses
    assert result.ok > 50, result
    assert balanced.pid(1) not in (0, before)
    assert back_s < 90  # restarted by supervisord and answering through the balancer again


def test_500_slow_connections_to_the_balancer_hold_no_replica(
    balanced: Balanced, body: Path
) -> None:
    url = balanced.url
    slow_head = b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Le"
    slow_body = slow.head(url, "/invocations", 10_000) + b'{"inputs": ['
    with (
        slow.holding(url, 250, slow_head, source="127.0.0.2") as heads,
        slow.holding(url, 250, slow_body, source="127.0.0.2") as bodies,
    ):
        assert len(heads.sockets) + len(bodies.sockets) == 500, (heads.refused, bodies.refused)
        result = load_result(start_load(url, 4, 6, body))
    assert result.failed == 0 and result.ok > 20, result


JSON = {"Content-Type": "application/json"}
