"""Fuzz the real model server's /invocations and the real web app's /api/predict: never a 5xx.

Hypothesis draws request bodies (arbitrary bytes, arbitrary JSON, every scoring format with
valid, mutated, truncated and oversized images, wrong content types) and sends them over HTTP
to `captchaops serve` and `captchaops app` processes. Every answer must be a 2xx or a 4xx,
and every refusal must be the JSON `{"error": ..., "detail": ...}` of the contract.
"""

from __future__ import annotations

import base64
import io
import json
from collections import Counter
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from tests.integration.test_webapp import WebappStack, app_url, webapp_stack

pytestmark = pytest.mark.slow
__all__ = ["app_url", "webapp_stack"]

INVOCATION_EXAMPLES = 3000
PREDICT_EXAMPLES = 1500
FUZZ = settings(
    max_examples=INVOCATION_EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
CONTENT_TYPES = [
    "application/json",
    "application/json; format=pandas-split",
    "application/json; charset=utf-8",
    "text/csv",
    "text/plain",
    "multipart/form-data; boundary=x",
    "application/octet-stream",
    "",
]


@st.composite
def images(draw: st.DrawFn) -> bytes:
    """An image file of any size, mode and format, possibly truncated or with flipped bytes."""
    width = draw(st.integers(1, 400))
    height = draw(st.integers(1, 200))
    fmt = draw(st.sampled_from(["PNG", "JPEG", "GIF", "BMP"]))
    modes = ["L", "RGB"] if fmt == "JPEG" else ["1", "L", "P", "RGB", "RGBA"]
    if fmt == "BMP":
        modes.remove("RGBA")
    mode = draw(st.sampled_from(modes))
    shade = draw(st.integers(0, 255))
    buffer = io.BytesIO()
    Image.new(mode, (width, height), shade if mode != "RGBA" else (shade, 0, 0, 128)).save(
        buffer, format=fmt
    )
    data = buffer.getvalue()
    damage = draw(st.sampled_from(["none", "none", "truncate", "flip", "prefix"]))
    if damage == "truncate":
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif damage == "flip":
        position = draw(st.integers(0, len(data) - 1))
        data = data[:position] + bytes([data[position] ^ 0xFF]) + data[position + 1 :]
    elif damage == "prefix":
        data = draw(st.binary(max_size=16)) + data
    return data


def b64(data: bytes) -> str:
    """Base64 text of bytes."""
    return base64.b64encode(data).decode()


cells = st.one_of(
    images().map(b64),
    st.binary(max_size=300).map(b64),
    st.text(max_size=60),
    st.integers(),
    st.floats(allow_nan=True),
    st.none(),
    st.booleans(),
    st.lists(st.text(max_size=5), max_size=3),
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=12,
)
columns = st.sampled_from(["image", "images", "", "IMAGE", "text"])


@st.composite
def scoring_payloads(draw: st.DrawFn) -> Any:
    """A body in one of the MLflow scoring formats (or nearly), with fuzzed cells."""
    kind = draw(
        st.sampled_from(["split", "records", "instances", "inputs", "inputs_list", "mixed"])
    )
    rows = draw(st.lists(cells, min_size=0, max_size=4))
    column = draw(columns)
    if kind == "split":
        return {"dataframe_split": {"columns": [column], "data": [[c] for c in rows]}}
    if kind == "records":
        return {"dataframe_records": [{column: c} for c in rows]}
    if kind == "instances":
        return {"instances": draw(st.sampled_from([rows, [{column: c} for c in rows]]))}
    if kind == "inputs":
        return {"inputs": {column: rows}}
    if kind == "inputs_list":
        return {"inputs": rows}
    return {draw(st.sampled_from(["dataframe_split", "instances", "inputs"])): draw(json_values)}


@st.composite
def invocation_requests(draw: st.DrawFn) -> tuple[str, bytes]:
    """A content type and a body for POST /invocations."""
    choice = draw(st.sampled_from(["payload", "payload", "payload", "json", "bytes"]))
    if choice == "bytes":
        body = draw(st.binary(max_size=2000))
    else:
        value = draw(scoring_payloads() if choice == "payload" else json_values)
        body = json.dumps(value, allow_nan=True).encode()
    content_type = draw(
        st.sampled_from(CONTENT_TYPES[:3])
        if choice == "payload"
        else st.sampled_from(CONTENT_TYPES)
    )
    return content_type, body


@st.composite
def predict_requests(draw: st.DrawFn) -> dict[str, Any]:
    """Keyword arguments for httpx: a multipart upload, a JSON body or raw bytes for /api/predict."""
    choice = draw(st.sampled_from(["upload", "upload", "json", "raw"]))
    data = draw(st.one_of(images(), images(), st.binary(max_size=500)))
    if choice == "upload":
        field = draw(st.sampled_from(["image", "image", "file", ""]))
        name = draw(st.sampled_from(["a.png", "b.jpg", "", "../../etc/passwd", "x" * 300]))
        return {"files": {field: (name, data, draw(st.sampled_from(["image/png", "text/plain"])))}}
    if choice == "json":
        value = draw(st.one_of(st.just({"image": b64(data)}), json_values))
        return {
            "content": json.dumps(value, allow_nan=True),
            "headers": {"Content-Type": "application/json"},
        }
    return {
        "content": data,
        "headers": {"Content-Type": draw(st.sampled_from(CONTENT_TYPES))},
    }


def check(answer: httpx.Response, seen: Counter[int]) -> None:
    """No 5xx; every refusal is the JSON error of the contract."""
    seen[answer.status_code] += 1
    assert answer.status_code < 500, answer.text[:500]
    if answer.status_code >= 400:
        body = answer.json()
        assert set(body) >= {"error", "detail"}, body


def test_invocations_never_answer_5xx(webapp_stack: WebappStack) -> None:
    seen: Counter[int] = Counter()
    url = f"{webapp_stack.production.url}/invocations"
    with httpx.Client(timeout=30) as http:

        @FUZZ
        @given(request=invocation_requests())
        def fuzz(request: tuple[str, bytes]) -> None:
            content_type, body = request
            headers = {"Content-Type": content_type} if content_type else {}
            check(http.post(url, content=body, headers=headers), seen)

        fuzz()
    print(f"/invocations: {sum(seen.values())} requests, statuses {dict(sorted(seen.items()))}")
    assert sum(seen.values()) >= INVOCATION_EXAMPLES * 0.9
    assert seen[200] > 0 and seen[400] > 0


def test_api_predict_never_answers_5xx(webapp_stack: WebappStack, app_url: str) -> None:
    seen: Counter[int] = Counter()
    with httpx.Client(timeout=30) as http:

        @settings(FUZZ, max_examples=PREDICT_EXAMPLES)
        @given(request=predict_requests())
        def fuzz(request: dict[str, Any]) -> None:
            check(http.post(f"{app_url}/api/predict", **request), seen)

        fuzz()
    print(f"/api/predict: {sum(seen.values())} requests, statuses {dict(sorted(seen.items()))}")
    assert sum(seen.values()) >= PREDICT_EXAMPLES * 0.9
    assert seen[200] > 0 and seen[415] > 0
