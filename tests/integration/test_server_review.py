"""A model server offers its low-confidence answers to a real web app's review queue (`captchaops
app` over HTTP, the review items stored in the real tracking server); copies from a shadowing
server and confident answers are not offered."""

from __future__ import annotations

import base64
import os
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from captchaops.data.synthetic import generate
from tests.fixtures.models import TrainedModel
from tests.fixtures.serving import ModelServer, start_model_server
from tests.fixtures.signing import signed_alias
from tests.fixtures.stack import VENV_BIN, Tracking, free_port, start_http_process, stop_process
from tests.integration.test_serving_metrics import scrape, value

pytestmark = pytest.mark.slow

MODEL_NAME = "server-review"


@pytest.fixture(scope="module")
def app_and_server(
    tracking_server: Tracking, tiny_model: TrainedModel, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, ModelServer]]:
    from mlflow import MlflowClient

    home: Path = tmp_path_factory.mktemp("server-review")
    client = MlflowClient(tracking_server.uri, registry_uri=tracking_server.uri)
    if not client.search_registered_models(f"name = '{MODEL_NAME}'"):
        client.create_registered_model(MODEL_NAME)
    source = f"models:/{tiny_model.model_name}/{tiny_model.version}"
    version = str(client.create_model_version(MODEL_NAME, source).version)
    signed_alias(tracking_server.uri, MODEL_NAME, "production", version)
    port = free_port()
    env = {
        **os.environ,
        "CAPTCHAOPS_HOME": str(home),
        "CAPTCHAOPS_TRACKING_URI": tracking_server.uri,
        "CAPTCHAOPS_MODEL_NAME": MODEL_NAME,
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    app_url = f"http://127.0.0.1:{port}"
    app = start_http_process(
        [str(VENV_BIN / "captchaops"), "app", "--port", str(port)],
        f"{app_url}/healthz",
        env=env,
        log=home / "app.log",
        timeout=60,
    )
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("CAPTCHAOPS_REVIEW_URL", app_url)
            patch.setenv("CAPTCHAOPS_REVIEW_BELOW_CONFIDENCE", "1.0")  # every answer qualifies
            patch.setenv("CAPTCHAOPS_MONITOR_SECONDS", "0")
            server = start_model_server(
                tracking_server.uri, "production", home / "serve", model_name=MODEL_NAME
            )
        try:
            server.wait_version(version)
            yield app_url, server
        finally:
            stop_process(server.proc)
    finally:
        stop_process(app)


def test_low_confidence_answers_reach_the_review_queue_once(
    app_and_server: tuple[str, ModelServer],
) -> None:
    app_url, server = app_and_server
    images = [base64.b64encode(s.image).decode() for s in generate(3, seed=77)]
    assert server.invoke({"inputs": images}).status_code == 200
    assert server.invoke({"inputs": images[:1]}).status_code == 200  # the same image again
    copy = httpx.post(
        f"{server.url}/invocations",
        json={"inputs": [base64.b64encode(generate(1, seed=78)[0].image).decode()]},
        headers={"X-Captchaops-Shadow": "1"},
        timeout=30,
    )
    assert copy.status_code == 200
    deadline = time.monotonic() + 60
    while True:
        counts = httpx.get(f"{app_url}/api/review", timeout=10).json()
        if counts["stored"] + sum(counts["dropped"].values()) >= 4 or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert counts["stored"] == 3, counts  # (pending counts other modules' items too)
    assert counts["dropped"]["duplicate"] == 1, counts
    samples = scrape(httpx.get(f"{server.url}/metrics", timeout=10).text)
    offered = {
        result: value(samples, "captchaops_review_offers_total", result=result)
        for result in ("queued", "accepted", "declined")
    }
    assert offered == {"queued": 4, "accepted": 3, "declined": 1}, "the copy was not offered"
