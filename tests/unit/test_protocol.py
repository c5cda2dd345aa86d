"""The MLflow scoring formats and request limits, without a server."""

from __future__ import annotations

import base64
import json

import pytest

from captchaops.serving.protocol import (
    PRECHECK_CHARS,
    Limits,
    ProtocolError,
    check_content_type,
    image_values,
    parse_body,
)
from harness.images import jpeg_bomb

LIMITS = Limits(max_body_bytes=10_000, max_image_bytes=100, max_images=3)
A, B = b"\x89PNG first", b"\x89PNG second"
A64, B64 = base64.b64encode(A).decode(), base64.b64encode(B).decode()


def body(payload: object) -> bytes:
    return json.dumps(payload).encode()


@pytest.mark.parametrize(
    "payload",
    [
        {"dataframe_split": {"columns": ["image"], "data": [[A64], [B64]]}},
        {"dataframe_split": {"columns": ["id", "image"], "data": [[1, A64], [2, B64]]}},
        {"dataframe_split": {"index": [0, 1], "columns": ["image"], "data": [[A64], [B64]]}},
        {"dataframe_records": [{"image": A64}, {"image": B64}]},
        {"instances": [{"image": A64}, {"image": B64}]},
        {"instances": [A64, B64]},
        {"inputs": {"image": [A64, B64]}},
        {"inputs": [{"image": A64}, {"image": B64}]},
        {"inputs": [A64, B64]},
        {"inputs": {"image": [A64, B64]}, "params": {"ignored": True}},
    ],
    ids=lambda p: next(iter(p)) + "-" + json.dumps(p)[20:50],
)
def test_every_format_yields_the_images_in_order(payload: object) -> None:
    assert parse_body(body(payload), LIMITS) == [A, B]


def test_base64_wrapped_over_lines_is_accepted() -> None:
    wrapped = A64[:8] + "\n" + A64[8:]
    assert parse_body(body({"inputs": {"image": [wrapped]}}), LIMITS) == [A]


@pytest.mark.parametrize(
    ("raw", "status", "error"),
    [
        (b"{not json", 400, "bad_json"),
        (b"\xff\xfe\x00", 400, "bad_json"),
        (body([A64]), 400, "bad_format"),
        (body({"data": [[A64]]}), 400, "bad_format"),
        (body({"inputs": [A64], "instances": [A64]}), 400, "bad_format"),
        (body({"dataframe_split": {"columns": ["img"], "data": [[A64]]}}), 400, "missing_column"),
        (body({"dataframe_split": [[A64]]}), 400, "bad_format"),
        (
            body({"dataframe_split": {"columns": ["a", "image"], "data": [[A64]]}}),
            400,
            "bad_format",
        ),
        (body({"dataframe_records": [{"img": A64}]}), 400, "missing_column"),
        (body({"dataframe_records": [A64]}), 400, "bad_format"),
        (body({"inputs": {"img": [A64]}}), 400, "missing_column"),
        (body({"instances": "not a list"}), 400, "bad_format"),
        (body({"inputs": {"image": []}}), 400, "no_images"),
        (body({"inputs": {"image": ["not base64!!"]}}), 400, "bad_base64"),
        (body({"inputs": {"image": [42]}}), 400, "bad_base64"),
        (body({"inputs": {"image": [A64] * 4}}), 413, "too_many_images"),
        (
            body({"inputs": {"image": [base64.b64encode(b"x" * 101).decode()]}}),
            413,
            "image_too_large",
        ),
        (body({"inputs": {"image": ["A" * 20_000]}}), 413, "body_too_large"),
        (b"[" * 5_000, 400, "bad_json"),  # deep enough for RecursionError, under the size cap
    ],
)
def test_bad_bodies_are_refused_with_a_status_and_code(raw: bytes, status: int, error: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        parse_body(raw, LIMITS)
    assert (caught.value.status, caught.value.error) == (status, error)
    assert ";" in caught.value.detail, "detail names the fix after a semicolon"


def test_the_image_column_is_found_among_others() -> None:
    assert image_values({"dataframe_records": [{"id": 1, "image": "x"}]}) == ["x"]


@pytest.mark.parametrize("content_type", ["application/json", "application/json; charset=utf-8"])
def test_json_content_types_are_accepted(content_type: str) -> None:
    check_content_type(content_type)


@pytest.mark.parametrize(
    "content_type", ["", "text/plain", "text/csv", "image/png", "application/json; charset=latin-1"]
)
def test_other_content_types_are_refused_with_415(content_type: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        check_content_type(content_type)
    assert caught.value.status == 415


def test_a_jpeg_bomb_is_refused_on_its_first_bytes_before_the_rest_is_decoded() -> None:
    bomb = jpeg_bomb()
    assert len(bomb) > 4 * PRECHECK_CHARS
    # Past the prefix the base64 is broken: a refusal that decoded the whole would say bad_base64.
    text = base64.b64encode(bomb).decode()[: 2 * PRECHECK_CHARS] + "!" * 64
    big = Limits(max_body_bytes=4 << 20, max_image_bytes=2 << 20, max_images=1)
    with pytest.raises(ProtocolError) as refused:
        parse_body(body({"inputs": [text]}), big)
    assert (refused.value.status, refused.value.error) == (400, "too_costly")
    assert refused.value.detail.startswith("image 0: the JPEG holds more than 32 scans")
    ordinary = base64.b64encode(b"\xff\xd8\xff" + bytes(PRECHECK_CHARS)).decode() + "!"
    with pytest.raises(ProtocolError) as judged_whole:
        parse_body(body({"inputs": [ordinary]}), big)
    assert judged_whole.value.error == "bad_base64"
