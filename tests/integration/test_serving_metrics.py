"""What a real model server's /metrics says about latency and quality after known traffic."""

from __future__ import annotations

import base64
import json
import socket
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from captchaops.data.synthetic import generate
from captchaops.serving.metrics import SWAP_CAUSES, ServingMetrics
from tests.fixtures.models import TrainedModel
from tests.fixtures.serving import ModelServer

pytestmark = pytest.mark.slow

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(text: str) -> Samples:
    """Every sample of a Prometheus text page, by name and labels."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def body(*images: bytes) -> dict[str, object]:
    return {"inputs": [base64.b64encode(image).decode() for image in images]}


def test_histograms_count_requests_model_calls_and_each_answered_image(
    tiny_server: ModelServer, tiny_model: TrainedModel
) -> None:
    captchas = [sample.image for sample in generate(7, seed=21)]
    before = scrape(httpx.get(f"{tiny_server.url}/metrics", timeout=10).text)
    answers = []
    for request in ([captchas[0]], [captchas[1]], captchas[2:7]):
        resp = tiny_server.invoke(body(*request))
        assert resp.status_code == 200, resp.text
        answers += resp.json()["predictions"]
    assert tiny_server.invoke({"inputs": ["not base64!"]}).status_code == 400
    after = scrape(httpx.get(f"{tiny_server.url}/metrics", timeout=10).text)

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    version = tiny_model.version
    assert grew("captchaops_queue_seconds_count") == 3, "once per answered request"
    calls = grew("captchaops_batch_size_count")
    assert calls >= 3 and grew("captchaops_compute_seconds_count") == calls
    assert grew("captchaops_compute_seconds_sum") > 0
    assert grew("captchaops_prediction_confidence_count", version=version) == 7
    confidence = grew("captchaops_prediction_confidence_sum", version=version)
    assert confidence == pytest.approx(sum(a["confidence"] for a in answers))
    assert grew("captchaops_prediction_length_characters_count", version=version) == 7
    length = grew("captchaops_prediction_length_characters_sum", version=version)
    assert length == sum(len(a["text"]) for a in answers)
    assert value(after, "captchaops_in_flight_requests") == 0
    for cause in SWAP_CAUSES:
        assert ("captchaops_swaps_total", frozenset({("cause", cause)})) in after


def test_in_flight_counts_a_request_whose_body_is_still_arriving(tiny_server: ModelServer) -> None:
    def in_flight() -> float:
        return value(
            scrape(httpx.get(f"{tiny_server.url}/metrics").text), "captchaops_in_flight_requests"
        )

    payload = json.dumps(body(generate(1, seed=3)[0].image)).encode()
    with socket.create_connection(("127.0.0.1", tiny_server.port)) as slow:
        slow.sendall(
            b"POST /invocations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(payload)}\r\n\r\n".encode()
            + payload[:10]
        )
        deadline = time.monotonic() + 30
        while in_flight() != 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert in_flight() == 1
        slow.sendall(payload[10:])
        assert slow.recv(65536).startswith(b"HTTP/1.1 200")
    assert in_flight() == 0


def test_swaps_are_counted_by_cause() -> None:
    metrics = ServingMetrics()
    metrics.record_swap("startup")
    metrics.record_swap("poll")
    metrics.record_swap("poll")
    samples = scrape(metrics.render().decode())
    assert value(samples, "captchaops_swaps_total", cause="startup") == 1
    assert value(samples, "captchaops_swaps_total", cause="poll") == 2
    assert value(samples, "captchaops_swaps_total", cause="deleted_alias") == 0
