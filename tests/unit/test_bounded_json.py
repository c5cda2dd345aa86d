"""Bounded JSON: shapes no request needs are refused from the bytes, before any object is built,
in the model servers' protocol and the web app's API alike."""

from __future__ import annotations

import json
import socket
import tracemalloc
from pathlib import Path

import pytest

from captchaops import bounded_json
from captchaops.bounded_json import JsonShapeError
from captchaops.settings import load_settings
from captchaops.webapp.app import create_app

WIDE = b"[" + b"{}," * (2 * 1024 * 1024 // 3) + b"{}]"  # 2 MiB of [{},{},...]
DEEP = b"[" * 200_000


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (WIDE, "shape"),
        (b"[" + b"1," * 20_000 + b"1]", "shape"),
        (DEEP, "shape"),
        (b"[" * 20 + b"]" * 20, "depth"),
        (b'{"image": ', "syntax"),
    ],
    ids=["wide objects", "many values", "deep", "nine levels", "truncated"],
)
def test_shapes_no_request_needs_are_refused(body: bytes, reason: str) -> None:
    with pytest.raises(JsonShapeError) as refused:
        bounded_json.loads(body)
    assert refused.value.reason == reason


def test_a_wide_body_is_refused_without_building_its_objects() -> None:
    tracemalloc.start()
    try:
        with pytest.raises(JsonShapeError):
            bounded_json.loads(WIDE)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1024 * 1024, f"{peak:,} bytes allocated refusing the body"


def test_a_request_shaped_body_is_parsed() -> None:
    body = {"dataframe_split": {"columns": ["image"], "data": [["aGk="]] * 64}}
    assert bounded_json.loads(json.dumps(body).encode()) == body


@pytest.fixture()
def client(tmp_path: Path) -> object:
    settings = load_settings(
        home=tmp_path,
        tracking_uri=f"http://127.0.0.1:{free_port()}",
        production_port=free_port(),
        staging_port=free_port(),
    )
    return create_app(settings).test_client()


@pytest.mark.parametrize("path", ["/api/predict", "/api/feedback", "/api/review"])
def test_the_web_app_refuses_wide_json_with_a_400_and_little_memory(
    client: object, path: str
) -> None:
    tracemalloc.start()
    try:
        response = client.post(path, data=WIDE, content_type="application/json")  # type: ignore[attr-defined]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert response.status_code == 400, response.text
    assert response.json["error"] == "bad_json"
    assert "too many arrays, objects or values" in response.json["detail"]
    assert peak < 50 * 1024 * 1024, f"{peak:,} bytes allocated refusing the body"


def test_the_web_app_still_says_when_json_nests_too_deeply(client: object) -> None:
    response = client.post(
        "/api/predict",
        data=b'{"image": ' + b"[" * 20 + b"]" * 20 + b"}",
        content_type="application/json",
    )  # type: ignore[attr-defined]
    assert response.status_code == 400
    assert "nested too deeply" in response.json["detail"]
