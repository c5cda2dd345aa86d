"""Hostile-input limits without a server: header-only pixel refusal, JSON shape, fair batching."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import threading
from typing import Any

import httpx
import pytest
from PIL import Image

from captchaops.model.preprocess import (
    MAX_PIXELS,
    BadBase64,
    ImageTooLarge,
    InvalidImage,
    TooManyPixels,
    b64decode_image,
    check_size,
    decode,
)
from captchaops.serving.batching import MicroBatcher, Overloaded
from captchaops.serving.protocol import (
    MAX_JSON_DEPTH,
    Limits,
    ProtocolError,
    check_images,
    parse_body,
)
from captchaops.serving.trial import NonFiniteOutput
from captchaops.serving.watcher import ServedModel
from tests.unit.test_preprocess import png_header_only

LIMITS = Limits(max_body_bytes=8 * 1024 * 1024, max_image_bytes=1024 * 1024, max_images=64)


def png(width: int, height: int, mode: str = "L") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (width, height), 255).save(buffer, format="PNG")
    return buffer.getvalue()


def refusal(raw: bytes) -> tuple[int, str]:
    with pytest.raises(ProtocolError) as caught:
        parse_body(raw, LIMITS)
    assert ";" in caught.value.detail, "the detail names the fix"
    return caught.value.status, caught.value.error


# --- images: refused from the header, before any pixel is decoded ---------------------------


def test_a_4000x4000_header_is_refused_without_touching_the_pixel_data() -> None:
    bomb = png_header_only(4000, 4000)  # declares 16 M pixels, carries one byte of them
    with pytest.raises(InvalidImage, match="cannot be decoded"):
        decode(bomb, max_pixels=20_000_000)  # decoding would fail: the data is not there
    with pytest.raises(TooManyPixels, match="4000x4000"):
        check_size(bomb)
    with pytest.raises(TooManyPixels, match="4000x4000"):
        decode(bomb)


def test_a_real_png_bomb_is_refused_by_header() -> None:
    bomb = png(4000, 4000, "RGBA")
    assert len(bomb) < 100_000
    with pytest.raises(TooManyPixels, match="more than 1,000,000"):
        decode(bomb)


def test_the_pixel_cap_is_a_parameter_with_a_one_megapixel_default() -> None:
    image = png(1000, 1000)
    assert MAX_PIXELS == 1_000_000
    assert check_size(image) == (1000, 1000)
    assert decode(image).size == (1000, 1000)
    with pytest.raises(TooManyPixels):
        check_size(image, max_pixels=999_999)


def test_check_images_names_the_oversized_image_and_returns_pixel_counts() -> None:
    small = png(200, 50)
    assert check_images([small, small], 1_000_000) == [10_000, 10_000]
    with pytest.raises(ProtocolError) as caught:
        check_images([small, png_header_only(4000, 4000)], 1_000_000)
    assert (caught.value.status, caught.value.error) == (400, "too_many_pixels")
    assert caught.value.detail.startswith("image 1:")
    with pytest.raises(ProtocolError) as caught:
        check_images([b"not an image"], 1_000_000)
    assert caught.value.error == "invalid_image"


# --- one base64 decoder for the server and the shipped pyfunc -------------------------------


def test_b64decode_image_accepts_text_bytes_and_line_breaks() -> None:
    data = png(20, 10)
    text = base64.b64encode(data).decode()
    assert b64decode_image(text, 0) == data
    assert b64decode_image(text.encode(), 0) == data
    assert b64decode_image(text[:10] + "\n" + text[10:], 0) == data


@pytest.mark.parametrize(
    ("value", "kind", "words"),
    [
        (42, BadBase64, "image 3 is a int"),
        ("@@ nope @@", BadBase64, "image 3 is not valid base64"),
        (base64.b64encode(b"x" * 101).decode(), ImageTooLarge, "larger than 100 bytes"),
    ],
)
def test_b64decode_image_refuses_with_the_index(value: object, kind: type, words: str) -> None:
    with pytest.raises(kind, match=words):
        b64decode_image(value, 3, max_bytes=100)


# --- JSON: size, shape and depth refused with 400 before objects are built -------------------


def test_deeply_nested_json_is_refused_with_400() -> None:
    assert refusal(b"[" * 200_000) == (400, "bad_json")


def test_json_nested_past_the_depth_limit_is_refused_even_when_small() -> None:
    payload: Any = ["x"]
    for _ in range(MAX_JSON_DEPTH):
        payload = {"inputs": payload}
    assert refusal(json.dumps(payload).encode()) == (400, "bad_json")


@pytest.mark.parametrize(
    "raw",
    [b"[" + b"[]," * 100_000 + b"[]]", b"[" + b"0," * 100_000 + b"0]"],
    ids=["a hundred thousand arrays", "a hundred thousand numbers"],
)
def test_json_with_too_many_values_is_refused_before_parsing(raw: bytes) -> None:
    assert refusal(raw) == (400, "bad_json")


def test_a_full_64_image_request_is_within_every_json_limit() -> None:
    image = base64.b64encode(png(200, 50)).decode()
    for payload in (
        {
            "dataframe_split": {
                "index": list(range(64)),
                "columns": ["image"],
                "data": [[image]] * 64,
            }
        },
        {"dataframe_records": [{"image": image}] * 64},
        {"inputs": {"image": [image] * 64}, "params": {"a": {"b": [1]}}},
    ):
        assert len(parse_body(json.dumps(payload).encode(), LIMITS)) == 64


# --- batching: turns, a bounded queue, dropped work ------------------------------------------


class GatedModel:
    """Reads each image as its own bytes; every call waits for the test to open the gate."""

    meta: dict[str, Any] = {"alphabet": "0123456789", "height": 32, "width": 96}

    def __init__(self) -> None:
        self.calls: list[list[bytes]] = []
        self.entered = threading.Semaphore(0)
        self.gate = threading.Semaphore(0)
        self.opened = False

    def open(self) -> None:
        """Let every call through from now on."""
        self.opened = True
        self.gate.release()

    def predict_images(self, images: list[bytes]) -> list[dict[str, Any]]:
        self.calls.append(list(images))
        self.entered.release()
        if not self.opened:
            self.gate.acquire()
        for index, image in enumerate(images):
            if image == b"bad":
                raise InvalidImage(f"image {index}: not an image; send one")
        return [{"text": image.decode("latin-1"), "confidence": 1.0} for image in images]


def served(model: GatedModel) -> ServedModel:
    return ServedModel("m", "a", "1", "run", "now", 0.0, model)


async def entered(model: GatedModel) -> None:
    await asyncio.get_running_loop().run_in_executor(None, model.entered.acquire)


def batcher(model: GatedModel, max_pending: int = 1024) -> MicroBatcher:
    version = served(model)
    return MicroBatcher(
        current=lambda: version,
        max_images=16,
        max_wait_s=0.0,
        max_pending_images=max_pending,
        observe_batch=lambda size: None,
        quantum=4,
    )


def images(prefix: str, count: int) -> list[bytes]:
    return [f"{prefix}{i}".encode() for i in range(count)]


def test_a_small_request_is_answered_before_a_big_batch_queued_ahead_of_it() -> None:
    async def scenario() -> tuple[list[str], list[list[bytes]]]:
        model = GatedModel()
        queue = batcher(model)
        await queue.start()
        finished: list[str] = []

        async def request(name: str, count: int) -> None:
            _, predictions = await queue.predict(images(name, count))
            assert [p["text"] for p in predictions] == [i.decode() for i in images(name, count)]
            finished.append(name)

        big = [asyncio.create_task(request(f"big{n}-", 64)) for n in range(4)]
        await entered(model)  # the first model call is running
        small = asyncio.create_task(request("small-", 1))
        await asyncio.sleep(0)
        while not small.done():
            model.gate.release()
            await entered(model)
        model.open()
        await asyncio.gather(*big)
        await queue.stop()
        return finished, model.calls

    finished, calls = asyncio.run(scenario())
    assert finished[0] == "small-", finished
    assert sorted(finished[1:]) == [f"big{n}-" for n in range(4)]
    second = calls[1]
    assert b"small-0" in second, "the small request runs in the very next model call"
    assert all(
        sum(i.startswith(f"big{n}".encode()) for i in call) <= 4 for call in calls for n in range(4)
    )


def test_a_full_queue_refuses_more_images_and_frees_room_as_it_drains() -> None:
    async def scenario() -> None:
        model = GatedModel()
        queue = batcher(model, max_pending=24)
        await queue.start()
        first = asyncio.create_task(queue.predict(images("a", 24)))
        await entered(model)  # 16 images are in the running call, 8 wait
        assert queue.pending_images == 8
        with pytest.raises(Overloaded):
            await queue.predict(images("b", 17))
        second = asyncio.create_task(queue.predict(images("c", 16)))
        model.open()
        assert len((await first)[1]) == 24
        assert len((await second)[1]) == 16
        assert queue.pending_images == 0
        await queue.stop()

    asyncio.run(scenario())


def test_a_cancelled_request_has_its_remaining_images_dropped() -> None:
    async def scenario() -> tuple[int, int]:
        model = GatedModel()
        queue = batcher(model)
        await queue.start()
        gone = asyncio.create_task(queue.predict(images("gone", 64)))
        await entered(model)
        assert queue.pending_images == 64 - 16
        gone.cancel()
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert queue.pending_images == 0, "its waiting images stop counting at once"
        model.gate.release()
        kept = asyncio.create_task(queue.predict(images("kept", 1)))
        await entered(model)
        model.gate.release()
        await kept
        await queue.stop()
        return sum(len(call) for call in model.calls), queue.pending_images

    run_images, pending = asyncio.run(scenario())
    assert run_images == 16 + 1, "only the call already running used the cancelled images"
    assert pending == 0


def test_a_bad_image_fails_its_own_request_with_its_index_and_spares_the_others() -> None:
    async def scenario() -> tuple[BaseException | None, list[str]]:
        model = GatedModel()
        queue = batcher(model)
        await queue.start()
        bad = images("x", 8)
        bad[6] = b"bad"
        outcomes = asyncio.gather(
            queue.predict(bad), queue.predict(images("ok", 3)), return_exceptions=True
        )
        model.open()
        failed, (_, fine) = await outcomes
        await queue.stop()
        return failed if isinstance(failed, BaseException) else None, [p["text"] for p in fine]

    failed, fine = asyncio.run(scenario())
    assert isinstance(failed, InvalidImage) and str(failed).startswith("image 6:")
    assert fine == ["ok0", "ok1", "ok2"]


# --- the endpoint: a deadline and admission, in a tiny app ----------------------------------


class Watching:
    """Stands in for the alias watcher: always serves `current`."""

    def __init__(self, model: GatedModel) -> None:
        self.current = served(model)


def scoring_app(model: GatedModel, deadline_s: float) -> tuple[Any, Any]:
    from starlette.applications import Starlette
    from starlette.routing import Route

    from captchaops.serving.invocations import Invocations
    from captchaops.serving.metrics import ServingMetrics
    from captchaops.settings import Settings

    endpoint = Invocations(
        Settings(),
        "a",
        Watching(model),  # type: ignore[arg-type]
        ServingMetrics(),
        max_body_bytes=1024 * 1024,
        max_wait_s=0.0,
        deadline_s=deadline_s,
    )
    return Starlette(routes=[Route("/invocations", endpoint.handle, methods=["POST"])]), endpoint


def test_a_request_past_its_deadline_is_answered_503_and_its_images_dropped() -> None:
    model = GatedModel()
    app, endpoint = scoring_app(model, deadline_s=0.5)
    image = base64.b64encode(png(20, 10)).decode()

    async def scenario() -> None:
        await endpoint.start()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://server") as client:
            resp = await client.post("/invocations", json={"inputs": [image] * 40})
            assert resp.status_code == 503
            assert resp.json()["error"] == "deadline_exceeded"
            assert resp.headers["Retry-After"] == "1"
            model.open()
            resp = await client.post("/invocations", json={"inputs": [image]})
            assert resp.status_code == 200, resp.text
        assert endpoint.batcher.pending_images == 0
        await endpoint.stop()

    asyncio.run(scenario())
    assert sum(len(call) for call in model.calls) == 16 + 1, "only the running call used them"


def test_admission_refuses_past_its_request_and_byte_bounds_and_frees_on_exit() -> None:
    from captchaops.serving.admission import SMALL_BODY_BYTES, Admission, Busy

    gate = Admission(max_requests=2, max_bytes=3 * SMALL_BODY_BYTES)
    with gate.request() as first:
        first.charge(SMALL_BODY_BYTES)  # small: free
        assert gate.held_bytes == 0
        first.charge(2 * SMALL_BODY_BYTES)
        with gate.request() as second:
            with pytest.raises(Busy):
                second.charge(2 * SMALL_BODY_BYTES)
            with pytest.raises(Busy), gate.request():
                pass
        assert gate.requests == 1
    assert (gate.requests, gate.held_bytes) == (0, 0)


class FailingModel(GatedModel):
    """Fails every call with the exception it is given."""

    def __init__(self, error: Exception) -> None:
        super().__init__()
        self.error = error
        self.opened = True

    def predict_images(self, images: list[bytes]) -> list[dict[str, Any]]:
        raise self.error


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (NonFiniteOutput("confidence nan"), 503, "version_unusable"),
        (RuntimeError("/srv/secret/path token=abc123"), 500, "prediction_failed"),
    ],
)
def test_a_failing_version_is_answered_in_json_without_its_exception_text(
    error: Exception, status: int, code: str
) -> None:
    app, endpoint = scoring_app(FailingModel(error), deadline_s=5.0)
    image = base64.b64encode(png(20, 10)).decode()

    async def scenario() -> httpx.Response:
        await endpoint.start()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://server") as client:
            resp = await client.post("/invocations", json={"inputs": [image]})
        await endpoint.stop()
        return resp

    resp = asyncio.run(scenario())
    assert resp.status_code == status
    body = resp.json()
    assert body["error"] == code
    assert str(error) not in resp.text and type(error).__name__ not in resp.text
