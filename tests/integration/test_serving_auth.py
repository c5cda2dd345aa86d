"""A model server in team mode: /reload and /metrics need the serving token, a foreign Host is
refused, production's /invocations stays open, and only trusted answers feed the live estimate."""

from __future__ import annotations

import re
from collections.abc import Iterator

import httpx
import pytest

from harness.attacks import b64, captcha, scoring
from tests.fixtures.models import TrainedModel
from tests.fixtures.serving import ModelServer, start_model_server
from tests.fixtures.stack import Tracking, stop_process
from tests.integration.test_gate import copy_version, isolated

pytestmark = pytest.mark.slow
TOKEN = "team-serving-token-for-tests"
BEARER = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def server(
    tracking_server: Tracking, tiny_model: TrainedModel, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ModelServer]:
    home = tmp_path_factory.mktemp("auth")
    settings = isolated(tracking_server, home)
    version = copy_version(settings, tiny_model)
    from captchaops import registry

    registry.client(settings).set_registered_model_alias(settings.model_name, "production", version)
    served = start_model_server(
        tracking_server.uri,
        "production",
        home / "serve",
        model_name=settings.model_name,
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
