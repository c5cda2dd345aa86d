"""Hostile traffic against a real model server: bombs, hostile JSON, a full queue, fairness, leavers.

Timings live in benchmarks/bench_attack.py; these tests check outcomes and ordering only.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
from PIL import Image

from captchaops.data.synthetic import generate
from tests.fixtures.models import TrainedModel
from tests.fixtures.serving import ModelServer, serving
from tests.fixtures.stack import Tracking

pytestmark = pytest.mark.slow


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


def test_a_batch_of_png_bombs_is_refused_from_the_headers_without_decoding(
    tiny_server: ModelServer,
) -> None:
    body = json.dumps(split_body(*[BOMB] * 64)).encode()
    assert len(BOMB) < 100_000 and len(body) < 8 * 1024 * 1024
    before = samples(tiny_server.url)
    post(tiny_server.url, body)  # first one warms up whatever the parse path allocates
    rss_before = psutil.Process(tiny_server.proc.pid).memory_info().rss
    for _ in range(5):
        resp = post(tiny_server.url, body)
        assert resp.status_code == 400, resp.text
        assert resp.json()["error"] == "too_many_pixels"
        assert resp.json()["detail"].startswith("image 0: the image is 4000x4000 pixels")
    grown_mb = (psutil.Process(tiny_server.proc.pid).memory_info().rss - rss_before) / 2**20
    assert grown_mb < 32, f"decoding one bomb costs 64 MB; RSS grew {grown_mb:.0f} MB"
    after = samples(tiny_server.url)
    assert after["captchaops_batch_size_count"] == before["captchaops_batch_size_count"], (
        "no model call ran"
    )
    assert after['captchaops_errors_total{error="too_many_pixels"}'] >= 6
    assert post(tiny_server.url, json.dumps(split_body(CAPTCHA)).encode()).status_code == 200


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
def test_hostile_json_is_refused_with_400_and_a_reason(
    tiny_server: ModelServer, raw: bytes
) -> None:
    resp = post(tiny_server.url, raw)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"] == "bad_json"
    assert "Traceback" not in resp.text
    assert httpx.get(f"{tiny_server.url}/ping", timeout=10).status_code == 200


def decoding_cpu_s(server: ModelServer) -> float:
    """CPU seconds the server's decoding workers (and their forkserver) have used."""
    children = psutil.Process(server.proc.pid).children(recursive=True)
    return sum(child.cpu_times().user + child.cpu_times().system for child in children)


def test_a_small_request_is_answered_while_a_big_batch_is_still_decoding(
    tiny_server: ModelServer,
) -> None:
    heavy = json.dumps(split_body(*[HEAVY] * 64)).encode()
    small = json.dumps(split_body(CAPTCHA)).encode()
    finished: list[str] = []
    statuses: dict[str, int] = {}

    def send(name: str, body: bytes) -> None:
        statuses[name] = post(tiny_server.url, body).status_code
        finished.append(name)

    idle = decoding_cpu_s(tiny_server)
    big = threading.Thread(target=send, args=("big", heavy))
    big.start()
    while decoding_cpu_s(tiny_server) < idle + 0.1:  # its 64 images take a second or more
        assert big.is_alive(), statuses
        time.sleep(0.01)
    send("small", small)
    big.join()
    assert statuses == {"big": 200, "small": 200}
    assert finished == ["small", "big"]


def test_a_client_that_leaves_has_its_remaining_images_dropped(tiny_server: ModelServer) -> None:
    heavy = json.dumps(split_body(*[HEAVY] * 64)).encode()
    before = samples(tiny_server.url)
    with pytest.raises(httpx.TimeoutException):
        post(tiny_server.url, heavy, timeout=0.5)
    give_up = time.monotonic() + 60
    while samples(tiny_server.url)["captchaops_abandoned_requests_total"] == before.get(
        "captchaops_abandoned_requests_total", 0
    ):
        assert time.monotonic() < give_up, "the server never noticed the client had left"
        time.sleep(0.05)
    assert post(tiny_server.url, json.dumps(split_body(CAPTCHA)).encode()).status_code == 200
    after = samples(tiny_server.url)
    predicted = after["captchaops_batch_size_sum"] - before["captchaops_batch_size_sum"]
    assert predicted < 64, f"{predicted:.0f} images were run for a client that had left"


@pytest.fixture
def small_queue(
    tracking_server: Tracking, tiny_model: TrainedModel, tmp_path: Path
) -> Iterator[str]:
    """A model server allowed 4 images per request, so 4 x 16 images may wait."""
    with serving(
        tracking_server, "small-queue", tmp_path, tiny_model.version, max_batch_images="4"
    ) as running:
        yield running.url


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


def costly_jpeg() -> bytes:
    """A 1000x1000 progressive JPEG of random pixels: under 1 MiB, about 30 ms of CPU to read."""
    noise = np.random.default_rng(1).integers(0, 256, (1000, 1000, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise, "RGB").save(buffer, format="JPEG", quality=90, progressive=True)
    return buffer.getvalue()


def test_a_decoding_worker_stopped_by_the_kernel_is_replaced_and_the_next_request_answered(
    tracking_server: Tracking, tiny_model: TrainedModel, tmp_path: Path
) -> None:
    with serving(
        tracking_server,
        "decode-cpu",
        tmp_path,
        tiny_model.version,
        decode_cpu_seconds="0.01",
        decode_workers="1",
    ) as server:
        workers = {p.pid for p in psutil.Process(server.proc.pid).children(recursive=True)}
        resp = post(server.url, json.dumps(split_body(CAPTCHA, costly_jpeg())).encode())
        assert resp.status_code == 422, resp.text
        assert resp.json()["error"] == "too_costly"
        assert "0.01 s of CPU" in resp.json()["detail"]
        resp = post(server.url, json.dumps(split_body(CAPTCHA)).encode())
        assert resp.status_code == 200, resp.text
        now = {p.pid for p in psutil.Process(server.proc.pid).children(recursive=True)}
        assert workers - now and now - workers, "the stopped worker has a successor"
