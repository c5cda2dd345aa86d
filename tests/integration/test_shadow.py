"""Shadow traffic between real model servers: production's answers never depend on the shadow.

Production (a real `captchaops serve`) copies each answered request to its shadow: a real model
server of the same version, a server speaking the protocol for another model, one that never
answers, one that refuses, or nothing at all. Outcomes only; timings live in bench_shadow.py.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from captchaops.data.synthetic import generate
from tests.fixtures.models import TrainedModel
from tests.fixtures.serving import ModelServer, serving
from tests.fixtures.stack import Tracking, free_port
from tests.integration.test_serving_metrics import Samples, scrape, value

pytestmark = pytest.mark.slow

PRODUCTION = "shadow-production"
STAGING = "shadow-staging"
Answer = list[dict[str, Any]]
IMAGES = [sample.image for sample in generate(8, seed=5)]


def body(image: bytes) -> dict[str, object]:
    return {"inputs": [base64.b64encode(image).decode()]}


def metrics(server: ModelServer) -> Samples:
    return scrape(httpx.get(f"{server.url}/metrics", timeout=10).text)


def shadowed(server: ModelServer, result: str, production: str, staging: str) -> float:
    return value(
        metrics(server),
        "captchaops_shadow_requests_total",
        production_version=production,
        staging_version=staging,
        result=result,
    )


def wait_shadowed(server: ModelServer, count: int) -> Samples:
    """The production server's metrics once `count` copies have an outcome (or after 60 s)."""
    deadline = time.monotonic() + 60
    while True:
        samples = metrics(server)
        if copies_made(samples) >= count or time.monotonic() > deadline:
            return samples
        time.sleep(0.1)


class StandIn:
    """A shadow target over real HTTP: answers as another model would, hangs, or refuses."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.received = 0
        self.release = threading.Event()
        self.marked: list[str | None] = []
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                size = int(self.headers["Content-Length"])
                images = json.loads(self.rfile.read(size))["inputs"]
                stand_in.received += 1
                stand_in.marked.append(self.headers.get("X-Captchaops-Shadow"))
                if stand_in.mode == "hang":
                    stand_in.release.wait()
                status, answer = (
                    200,
                    {"predictions": [{"text": "zz", "confidence": 0.25}] * len(images)},
                )
                if stand_in.mode != "answer":
                    status, answer = 503, {"error": "overloaded", "detail": "retry shortly"}
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("X-Model-Version", "99")
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def staging(
    tracking_server: Tracking, tiny_model: TrainedModel, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ModelServer]:
    """A real staging server of the tiny model with a shadow of its own (nothing listens there),
    so a copy it copied again would show in its metrics."""
    home = tmp_path_factory.mktemp("staging")
    port = free_port()
    with serving(
        tracking_server, STAGING, home, tiny_model.version, shadow_url=f"http://127.0.0.1:{port}"
    ) as server:
        yield server


@pytest.fixture(scope="module")
def reference(staging: ModelServer) -> list[Answer]:
    """What the tiny model answers for each image, asked directly."""
    return [staging.invoke(body(image)).json()["predictions"] for image in IMAGES]


def copies_made(samples: Samples) -> float:
    return sum(v for (name, _), v in samples.items() if name == "captchaops_shadow_requests_total")


def production_answers(server: ModelServer) -> list[Answer]:
    answers = []
    for image in IMAGES:
        resp = server.invoke(body(image))
        assert resp.status_code == 200, resp.text
        answers.append(resp.json()["predictions"])
    return answers


def test_the_same_version_agrees_and_copies_are_not_copied_again(
    tracking_server: Tracking,
    tiny_model: TrainedModel,
    staging: ModelServer,
    reference: list[Answer],
    tmp_path: Path,
) -> None:
    v = tiny_model.version
    before = wait_shadowed(staging, len(IMAGES))  # its copies of the direct requests failed
    with serving(tracking_server, PRODUCTION, tmp_path, v, shadow_url=staging.url) as production:
        assert production_answers(production) == reference
        wait_shadowed(production, len(IMAGES))
        time.sleep(6)  # past staging's 5 s keep-alive: the senders' connections are closed
        assert production_answers(production) == reference
        samples = wait_shadowed(production, 2 * len(IMAGES))
    pair = {"production_version": v, "staging_version": v}
    agree = value(samples, "captchaops_shadow_requests_total", **pair, result="agree")
    assert agree == 2 * len(IMAGES), samples
    assert value(samples, "captchaops_shadow_requests_total", **pair, result="disagree") == 0
    assert value(samples, "captchaops_shadow_latency_seconds_count", **pair) == 2 * len(IMAGES)
    near_zero = value(
        samples, "captchaops_shadow_confidence_difference_bucket", **pair, le="0.005"
    ) - value(samples, "captchaops_shadow_confidence_difference_bucket", **pair, le="-0.005")
    assert near_zero == 2 * len(IMAGES)
    after = metrics(staging)
    got = value(after, "captchaops_requests_total", status="200") - value(
        before, "captchaops_requests_total", status="200"
    )
    assert got == 2 * len(IMAGES), "staging answered each copy once"
    assert copies_made(after) == copies_made(before) > 0, "staging copied direct requests only"


def test_a_different_model_disagrees(
    tracking_server: Tracking, tiny_model: TrainedModel, reference: list[Answer], tmp_path: Path
) -> None:
    other = StandIn("answer")
    try:
        with serving(
            tracking_server, PRODUCTION, tmp_path, tiny_model.version, shadow_url=other.url
        ) as production:
            assert production_answers(production) == reference
            samples = wait_shadowed(production, len(IMAGES))
    finally:
        other.close()
    pair = {"production_version": tiny_model.version, "staging_version": "99"}
    disagree = value(samples, "captchaops_shadow_requests_total", **pair, result="disagree")
    assert disagree == len(IMAGES) - sum(answer[0]["text"] == "zz" for answer in reference)
    assert value(samples, "captchaops_shadow_confidence_difference_count", **pair) == len(IMAGES)
    assert other.marked == ["1"] * len(IMAGES), "every copy says it is one"


@pytest.mark.parametrize("mode", ["down", "refuse"])
def test_production_answers_alike_when_the_shadow_is_down_or_refuses(
    mode: str,
    tracking_server: Tracking,
    tiny_model: TrainedModel,
    reference: list[Answer],
    tmp_path: Path,
) -> None:
    target = StandIn("refuse") if mode == "refuse" else None
    url = target.url if target else f"http://127.0.0.1:{free_port()}"
    try:
        with serving(
            tracking_server, PRODUCTION, tmp_path, tiny_model.version, shadow_url=url
        ) as production:
            assert production_answers(production) == reference
            samples = wait_shadowed(production, len(IMAGES))
    finally:
        if target:
            target.close()
    result, staging = ("refused", "99") if target else ("error", "unknown")
    counted = value(
        samples,
        "captchaops_shadow_requests_total",
        production_version=tiny_model.version,
        staging_version=staging,
        result=result,
    )
    assert counted == len(IMAGES)
    assert value(samples, "captchaops_requests_total", status="200") == len(IMAGES)


def test_a_hanging_shadow_fills_the_queue_and_further_copies_are_dropped(
    tracking_server: Tracking, tiny_model: TrainedModel, reference: list[Answer], tmp_path: Path
) -> None:
    hang = StandIn("hang")
    try:
        with serving(
            tracking_server,
            PRODUCTION,
            tmp_path,
            tiny_model.version,
            shadow_url=hang.url,
            shadow_queue="2",
            shadow_per_second="1000",
            shadow_timeout_seconds="300",
        ) as production:
            assert production_answers(production) == reference
            assert production_answers(production) == reference
            dropped = shadowed(production, "dropped", tiny_model.version, "unknown")
            queued = value(metrics(production), "captchaops_shadow_queued_requests")
    finally:
        hang.close()
    senders = 4
    assert dropped >= 2 * len(IMAGES) - senders - 2, "at most 4 in flight and 2 queued"
    assert queued == 2
