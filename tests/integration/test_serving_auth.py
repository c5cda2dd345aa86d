"""A model server in team mode: /reload and /metrics need the serving token, a foreign Host is
refused, production's /invocations stays open, only trusted answers feed the live estimate, and
an alias move with no audit record is not followed until it is audited."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from captchaops import mlflow_scope
from captchaops.registry.aliases import assign_alias
from captchaops.settings import Settings
from harness.attacks import b64, captcha, scoring
from tests.fixtures.models import TrainedModel
from tests.fixtures.serving import ModelServer, start_model_server
from tests.fixtures.stack import Tracking, stop_process
from tests.integration.test_gate import copy_version, isolated

pytestmark = pytest.mark.slow
TOKEN = "team-serving-token-for-tests"
BEARER = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def team(tracking_server: Tracking, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """Settings for a model of this module's own."""
    return isolated(tracking_server, tmp_path_factory.mktemp("auth"))


@pytest.fixture(scope="module")
def server(
    tracking_server: Tracking, tiny_model: TrainedModel, team: Settings
) -> Iterator[ModelServer]:
    version = copy_version(team, tiny_model)
    client = mlflow_scope.client(team)
    assign_alias(client, team.model_name, "production", version, reason="set-up", actor="tests")
    served = start_model_server(
        tracking_server.uri,
        "production",
        team.home_dir / "serve",
        model_name=team.model_name,
        settings={"auth": "true", "serving_token": TOKEN},
    )
    try:
        served.wait_version(version)
        yield served
    finally:
        stop_process(served.proc)


def answered_images(server: ModelServer) -> float:
    """How many answers the live estimate has seen (the confidence histogram's count)."""
    text = httpx.get(f"{server.url}/metrics", headers=BEARER, timeout=10).text
    counts = re.findall(r"^captchaops_prediction_confidence_count\{[^}]*\} (\S+)$", text, re.M)
    return sum(float(c) for c in counts)


def test_reload_and_metrics_need_the_token(server: ModelServer) -> None:
    for method, path in (("POST", "/reload"), ("GET", "/metrics")):
        anonymous = httpx.request(method, f"{server.url}{path}", timeout=10)
        assert anonymous.status_code == 401, path
        assert anonymous.json()["error"] == "unauthorized"
        wrong = httpx.request(
            method, f"{server.url}{path}", headers={"Authorization": "Bearer no"}, timeout=10
        )
        assert wrong.status_code == 401, path
        assert httpx.request(method, f"{server.url}{path}", headers=BEARER, timeout=10).is_success


def test_a_foreign_host_is_refused_even_with_the_token(server: ModelServer) -> None:
    answer = httpx.post(
        f"{server.url}/reload", headers={**BEARER, "Host": "rebound.example"}, timeout=10
    )
    assert answer.status_code == 400 and answer.json()["error"] == "bad_host"


def test_anonymous_answers_do_not_feed_the_live_estimate(server: ModelServer) -> None:
    body = scoring(b64(captcha()))
    before = answered_images(server)
    for _ in range(5):
        assert httpx.post(f"{server.url}/invocations", json=body, timeout=30).status_code == 200
    assert answered_images(server) == before
    for _ in range(3):
        answer = httpx.post(f"{server.url}/invocations", json=body, headers=BEARER, timeout=30)
        assert answer.status_code == 200
    assert answered_images(server) == before + 3


def health_when(server: ModelServer, done: Any, timeout: float = 30.0) -> dict[str, Any]:
    """/health's body once `done(body)` holds (AssertionError after `timeout` s)."""
    deadline = time.monotonic() + timeout
    while True:
        body: dict[str, Any] = httpx.get(f"{server.url}/health", timeout=10).json()
        if done(body) or time.monotonic() > deadline:
            assert done(body), body
            return body
        time.sleep(0.3)


def unaudited_gauge(server: ModelServer) -> str:
    text = httpx.get(f"{server.url}/metrics", headers=BEARER, timeout=10).text
    found = re.search(r"^captchaops_unaudited_alias (\S+)$", text, re.M)
    assert found, text[-2000:]
    return found.group(1)


def test_an_unaudited_move_is_not_followed_until_it_is_audited(
    server: ModelServer, team: Settings, tiny_model: TrainedModel
) -> None:
    audited = httpx.get(f"{server.url}/version", timeout=10).json()["version"]
    other = copy_version(team, tiny_model)
    client = mlflow_scope.client(team)
    # Around the CLI on purpose: the one kind of alias move this test is about.
    client.set_registered_model_alias(team.model_name, "production", other)
    held = health_when(server, lambda body: body["unaudited_version"] == other)
    assert held["version"] == audited and held["alias_version"] == audited
    assert held["status"] == "degraded" and held["follows_unaudited"] is False
    assert f"moved to v{other} with no audit record" in held["reason"]
    assert f"keeping v{audited}" in held["reason"]
    assert unaudited_gauge(server) == "1.0"
    time.sleep(2.5)  # several polls later it still serves the audited version
    assert httpx.get(f"{server.url}/version", timeout=10).json()["version"] == audited
    assert "no audit record" in server.log.read_text()

    assign_alias(client, team.model_name, "production", other, reason="ok", actor="t")
    server.wait_version(other)
    followed = health_when(server, lambda body: body["unaudited_version"] is None)
    assert followed["status"] == "ok" and unaudited_gauge(server) == "0.0"
