"""A model server's live accuracy estimate: calibration read from the version's tags, the
estimate and its alert in /health and /metrics after real answers."""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator

import httpx
import pytest
from mlflow import MlflowClient

from captchaops.data.synthetic import generate
from captchaops.live.estimate import Calibration
from harness.stack import copy_version
from tests.fixtures.models import TrainedModel
from tests.fixtures.serving import ModelServer, serving
from tests.fixtures.stack import Tracking

pytestmark = pytest.mark.slow

ALIAS = "live-estimate"


@pytest.fixture(scope="module")
def server(
    tracking_server: Tracking, tiny_model: TrainedModel, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ModelServer, str]]:
    client = MlflowClient(tracking_server.uri, registry_uri=tracking_server.uri)
    version = copy_version(tracking_server.uri, tiny_model.model_name, tiny_model.version)
    # A calibration no answer can pass: the estimate must read 0 and the alert must fire.
    for key, tag in Calibration(threshold=1.0, accuracy=0.95, size=2000).tags().items():
        client.set_model_version_tag(tiny_model.model_name, version, key, tag)
    with serving(tracking_server, ALIAS, tmp_path_factory.mktemp("live"), version) as running:
        yield running, version


def live(server: ModelServer) -> dict[str, dict[str, object]]:
    return httpx.get(f"{server.url}/health", timeout=10).json()["live_estimate"]


def test_the_estimate_and_its_alert_follow_the_answers(server: tuple[ModelServer, str]) -> None:
    running, version = server
    images = [base64.b64encode(s.image).decode() for s in generate(10, seed=31)]
    assert running.invoke({"inputs": images[:1]}).status_code == 200
    deadline = time.monotonic() + 30
    while version not in live(running) and time.monotonic() < deadline:
        time.sleep(0.2)  # the calibration is read off the request path, once per version served
    state = live(running)[version]
    assert state["gate_accuracy"] == pytest.approx(0.95) and state["estimate"] is None
    for _ in range(6):
        assert running.invoke({"inputs": images}).status_code == 200
    state = live(running)[version]
    assert state["estimate"] == 0.0 and int(state["answers_seen"]) >= 60
    assert "95.0 points below the 95.0% measured at promotion" in str(state["alert"])
    text = httpx.get(f"{running.url}/metrics", timeout=10).text
    assert f'captchaops_live_accuracy_alert{{version="{version}"}} 1.0' in text
    assert f'captchaops_live_accuracy_estimate_ratio{{version="{version}"}} 0.0' in text
