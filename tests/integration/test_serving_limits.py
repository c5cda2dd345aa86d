"""Hostile traffic against a real model server: bombs, hostile JSON, a full queue, fairness, leavers.

Timings live in benchmarks/bench_attack.py; these tests check outcomes and ordering only.
"""

from __future__ import annotations

import base64
import io
import json
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest
from mlflow import MlflowClient
from PIL import Image

from captchaops.data.synthetic import generate
from tests.fixtures.models import TrainedModel
from tests.fixtures.serving import ModelServer, start_model_server
from tests.fixtures.stack import VENV_BIN, Tracking, free_port, start_http_process, stop_process

pytestmark = pytest.mark.slow

ALIAS = "serve-limits"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def png(width: int, height: int, mode: str = "RGBA") -> bytes:
    """A blank image: tiny as a file, `width * height * 4` bytes once decoded."""
    buffer = io.BytesIO()
    Image.new(mode, (width, height), (255, 255, 255, 255)).save(buffer, format="PNG")
    return buffer.getvalue()


def split_body(*images: bytes) -> dict[str, object]:
    return {"dataframe_split": {"columns": ["image"], "data": [[b64(i)] for i in images]}}


def post(url: str, content: bytes, timeout: float = 120.0) -> httpx.Response:
    return httpx.post(
        f"{url}/invocations",
        content=content,
        headers={"Content-Type": "application/json"},
        timeout=timeout,
    )


def samples(url: str) -> dict[str, float]:
    """The server's Prometheus samples by name and labels."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }


CAPTCHA = generate(1, seed=11)[0].image
BOMB = png(4000, 4000)
HEAVY = png(1000, 1000)  # just under the pixel cap: accepted, ~4 MB and tens of ms to decode


@pytest.fixture(scope="module")
def server(
    tracking_server: Tracking, tiny_model: TrainedModel, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ModelServer]:
    """A model server with default limits for an alias of its own pointing at the tiny model."""
    MlflowClient(tracking_server.uri, registry_uri=tracking_server.uri).set_registered_model_alias(
        tiny_model.model_name, ALIAS, tiny_model.version
    )
    running = start_model_server(tracking_server.uri, ALIAS, tmp_path_factory.mktemp("limits"))
    try:
        running.wait_version(tiny_model.version)
        yield running
    finally:
        stop_process(running.proc)


def test_a_batch_of_png_bombs_is_refused_from_the_headers_without_decoding(
    server: ModelServer,
) -> None:
    body = json.dumps(split_body(*[BOMB] * 64)).encode()
    assert len(BOMB) < 100_000 and len(body) < 8 * 1024 * 1024
    before = samples(server.url)
    post(server.url, body)  # first one warms up whatever the parse path allocates
    rss_before = psutil.Process(server.proc.pid).memory_info().rss
    for _ in range(5):
        resp = post(server.url, body)
        assert resp.status_code == 400, resp.text
        assert resp.json()["error"] == "too_many_pixels"
        assert resp.json()["detail"].startswith("image 0: the image is 4000x4000 pixels")
    grown_mb = (psutil.Process(server.proc.pid).memory_info().rss - rss_before) / 2**20
    assert grown_mb < 32, f"decoding one bomb costs 64 MB; RSS grew {grown_mb:.0f} MB"
    after = samples(server.url)
    assert after["captchaops_batch_size_count"] == before["captchaops_batch_size_count"], (
        "no model call ran"
    )
    assert after['captchaops_errors_total{error="too_many_pixels"}'] >= 6
    assert post(server.url, json.dumps(split_body(CAPTCHA)).encode()).status_code == 200


@pytest.mark.parametrize(
    "raw",
    [
        b"[" * 200_000,
        b'{"inputs": ' + b"[" * 50 + b'"x"' + b"]" * 50 + b"}",
        b'{"inputs": [' + b"[]," * 500_000 + b"[]]}",
        b'{"inputs": [' + b"0," * 1_000_000 + b"0]}",
    ],
    ids=["200k deep", "50 deep", "500k arrays", "1M numbers"],
)
def test_hostile_json_is_refused_with_400_and_a_reason(server: ModelServer, raw: bytes) -> None:
    resp = post(server.url, raw)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"] == "bad_json"
    assert "Traceback" not in resp.text
    assert httpx.get(f"{server.url}/ping", timeout=10).status_code == 200


def test_a_small_request_is_answered_while_a_big_batch_is_still_running(
    server: ModelServer,
) -> None:
    heavy = json.dumps(split_body(*[HEAVY] * 64)).encode()
    small = json.dumps(split_body(CAPTCHA)).encode()
    finished: list[str] = []
    statuses: dict[str, int] = {}

    def send(name: str, body: bytes) -> None:
        statuses[name] = post(server.url, body).status_code
        finished.append(name)

    calls = samples(server.url)["captchaops_batch_size_count"]
    big = threading.Thread(target=send, args=("big", heavy))
    big.start()
    while samples(server.url)["captchaops_batch_size_count"] == calls:  # its first call ran
        assert big.is_alive(), statuses
        time.sleep(0.01)
    send("small", small)
    big.join()
    assert statuses == {"big": 200, "small": 200}
    assert finished == ["small", "big"]


def test_a_client_that_leaves_has_its_remaining_images_dropped(server: ModelServer) -> None:
    heavy = json.dumps(split_body(*[HEAVY] * 64)).encode()
    before = samples(server.url)
    with pytest.raises(httpx.TimeoutException):
        post(server.url, heavy, timeout=0.5)
    give_up = time.monotonic() + 60
    while samples(server.url)["captchaops_abandoned_requests_total"] == before.get(
        "captchaops_abandoned_requests_total", 0
    ):
        assert time.monotonic() < give_up, "the server never noticed the client had left"
        time.sleep(0.05)
    assert post(server.url, json.dumps(split_body(CAPTCHA)).encode()).status_code == 200
    after = samples(server.url)
    predicted = after["captchaops_batch_size_sum"] - before["captchaops_batch_size_sum"]
    assert predicted < 64, f"{predicted:.0f} images were run for a client that had left"


@pytest.fixture
def small_queue(
    tracking_server: Tracking, tiny_model: TrainedModel, tmp_path: Path
) -> Iterator[str]:
    """A model server allowed 4 images per request, so 4 x 16 images may wait."""
    MlflowClient(tracking_server.uri, registry_uri=tracking_server.uri).set_registered_model_alias(
        tiny_model.model_name, ALIAS, tiny_model.version
    )
    port = free_port()
    env = {
        **os.environ,
        "CAPTCHAOPS_HOME": str(tmp_path),
        "CAPTCHAOPS_TRACKING_URI": tracking_server.uri,
        "CAPTCHAOPS_MAX_BATCH_IMAGES": "4",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    url = f"http://127.0.0.1:{port}"
    cmd = [str(VENV_BIN / "captchaops"), "serve", "--alias", ALIAS, "--port", str(port)]
    proc = start_http_process(cmd, f"{url}/ping", env=env, log=tmp_path / "serve.log")
    try:
        running = ModelServer(ALIAS, url, port, proc, tmp_path / "serve.log")
        running.wait_version(tiny_model.version)
        yield url
    finally:
        stop_process(proc)


def test_a_full_queue_answers_503_with_retry_after_and_serves_the_rest(small_queue: str) -> None:
    body = json.dumps(split_body(*[HEAVY] * 4)).encode()
    with ThreadPoolExecutor(48) as pool:
        answers = list(pool.map(lambda _: post(small_queue, body), range(48)))
    codes = sorted({resp.status_code for resp in answers})
    assert codes == [200, 503], codes
    for resp in answers:
        if resp.status_code == 503:
            assert resp.json()["error"] == "overloaded"
            assert int(resp.headers["Retry-After"]) >= 1
    assert post(small_queue, json.dumps(split_body(CAPTCHA)).encode()).status_code == 200
