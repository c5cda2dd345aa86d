"""The MLflow scoring protocol for image models: request bodies in, image bytes out, within limits."""

from __future__ import annotations

import binascii
from dataclasses import dataclass
from struct import error as struct_error
from typing import Any

from captchaops import bounded_json
from captchaops.model.decode_worker import refusal_of
from captchaops.model.preprocess import (
    ImageTooLarge,
    InvalidImage,
    TooCostly,
    b64decode_image,
    check_cost,
    check_size,
)

FORMATS = ("dataframe_split", "dataframe_records", "instances", "inputs")
IMAGE_COLUMN = "image"
JSON_TYPE = "application/json"
MAX_JSON_DEPTH = bounded_json.MAX_JSON_DEPTH
PRECHECK_CHARS = 64 * 1024
"""Base64 characters decoded first from a larger image to count its structure (a JPEG's scans):
an image too costly to decode is refused before the rest of it is decoded."""


class ProtocolError(Exception):
    """A request the server refuses: HTTP status, a short error code and a one-sentence detail."""

    def __init__(self, status: int, error: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.error = error
        self.detail = detail


@dataclass(frozen=True)
class Limits:
    """How much one request may carry."""

    max_body_bytes: int
    max_image_bytes: int
    max_images: int


def check_content_type(content_type: str) -> None:
    """Refuse anything but JSON in UTF-8 (415), as `mlflow models serve` does for unknown types."""
    mime, *params = (part.strip() for part in content_type.split(";"))
    if mime.lower() != JSON_TYPE:
        shown = mime or "none"
        raise ProtocolError(
            415,
            "unsupported_media_type",
            f"content type {shown!r} is not supported; send the body as {JSON_TYPE}",
        )
    for param in params:
        key, _, value = param.partition("=")
        if key.strip().lower() == "charset" and value.strip().strip('"').lower() not in (
            "utf-8",
            "utf8",
        ):
            raise ProtocolError(
                415, "unsupported_media_type", "only UTF-8 bodies are supported; send charset=utf-8"
            )


def parse_body(body: bytes, limits: Limits) -> list[bytes]:
    """The images of a scoring request (any of the four MLflow JSON formats), base64-decoded."""
    if len(body) > limits.max_body_bytes:
        raise too_large(limits.max_body_bytes)
    values = image_values(_load_json(body))
    if not values:
        raise ProtocolError(400, "no_images", "the request holds no images; send at least one")
    if len(values) > limits.max_images:
        raise ProtocolError(
            413,
            "too_many_images",
            f"the request holds {len(values)} images, more than {limits.max_images}; split it",
        )
    return [
        decode_image(value, index, limits.max_image_bytes) for index, value in enumerate(values)
    ]


def check_images(images: list[bytes], max_pixels: int) -> list[int]:
    """Each image's pixel count, read from its header; oversized or unreadable ones are refused."""
    pixels = []
    for index, data in enumerate(images):
        try:
            width, height = check_size(data, max_pixels)
        except InvalidImage as exc:  # the statuses and codes the decoding workers answer
            raise ProtocolError(*refusal_of(exc), f"image {index}: {exc}") from exc
        pixels.append(width * height)
    return pixels


def _load_json(body: bytes) -> Any:
    """The decoded body within `bounded_json`'s shape limits, or a 400 saying which one."""
    try:
        return bounded_json.loads(body)
    except bounded_json.JsonShapeError as exc:
        fix = {
            "shape": "send one flat row per image",
            "depth": "send a flat JSON object",
            "syntax": "send a JSON object",
        }[exc.reason]
        raise ProtocolError(400, "bad_json", f"{exc.detail}; {fix}") from exc


def too_large(max_body_bytes: int) -> ProtocolError:
    """The refusal for a body over the size limit."""
    return ProtocolError(
        413,
        "body_too_large",
        f"the body is larger than {max_body_bytes:,} bytes; send fewer or smaller images",
    )


def image_values(payload: Any) -> list[Any]:
    """The `image` column of a decoded JSON payload in one of the MLflow scoring formats."""
    if not isinstance(payload, dict):
        raise _format_error(f"the body is a JSON {type(payload).__name__}")
    keys = [key for key in FORMATS if key in payload]
    if len(keys) != 1:
        raise _format_error(f"the top-level keys are {sorted(payload)}")
    key = keys[0]
    data = payload[key]
    if key == "dataframe_split":
        return _split_column(data)
    if key == "dataframe_records":
        return _records_column(data, key)
    if key == "inputs" and isinstance(data, dict):
        return _columns_column(data, key)
    return _records_column(data, key)


def decode_image(value: Any, index: int, max_image_bytes: int) -> bytes:
    """One base64 cell as bytes, refusing non-text, non-base64, oversized and (judged by their
    first PRECHECK_CHARS) too costly images."""
    if isinstance(value, str) and len(value) > PRECHECK_CHARS:
        _precheck(value, index)
    try:
        return b64decode_image(value, index, max_image_bytes)
    except ImageTooLarge as exc:
        raise ProtocolError(413, "image_too_large", str(exc)) from exc
    except InvalidImage as exc:
        raise ProtocolError(400, "bad_base64", str(exc)) from exc


def _precheck(value: str, index: int) -> None:
    """Refuse a large image whose first bytes already hold too many scans, chunks or frames (a
    prefix holds no more of them than the whole); anything else is judged after the decode."""
    text = "".join(value[:PRECHECK_CHARS].split())
    try:
        check_cost(binascii.a2b_base64(text[: len(text) // 4 * 4]))
    except TooCostly as exc:
        raise ProtocolError(400, "too_costly", f"image {index}: {exc}") from exc
    except (InvalidImage, binascii.Error, ValueError, IndexError, struct_error):
        return


def _format_error(found: str) -> ProtocolError:
    return ProtocolError(
        400,
        "bad_format",
        f"{found}; send a JSON object with exactly one of {', '.join(FORMATS)}",
    )


def _missing_column(where: str) -> ProtocolError:
    return ProtocolError(
        400,
        "missing_column",
        f"{where} has no {IMAGE_COLUMN!r} column; put base64 images in a column named {IMAGE_COLUMN!r}",
    )


def _split_column(data: Any) -> list[Any]:
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise ProtocolError(
            400,
            "bad_format",
            'dataframe_split must be an object with "columns" and "data" lists; '
            'send {"columns": ["image"], "data": [[...]]}',
        )
    columns = data.get("columns")
    if not isinstance(columns, list) or IMAGE_COLUMN not in columns:
        raise _missing_column("dataframe_split")
    position = columns.index(IMAGE_COLUMN)
    values = []
    for row_number, row in enumerate(data["data"]):
        if len(columns) == 1 and not isinstance(row, list):
            values.append(row)
        elif isinstance(row, list) and len(row) == len(columns):
            values.append(row[position])
        else:
            raise ProtocolError(
                400,
                "bad_format",
                f"dataframe_split row {row_number} does not have {len(columns)} values; "
                "send one value per column",
            )
    return values


def _records_column(data: Any, key: str) -> list[Any]:
    if not isinstance(data, list):
        raise ProtocolError(
            400, "bad_format", f"{key} must be a list of rows; send [{{{IMAGE_COLUMN!r}: ...}}]"
        )
    values = []
    for row in data:
        if isinstance(row, dict):
            if IMAGE_COLUMN not in row:
                raise _missing_column(key)
            values.append(row[IMAGE_COLUMN])
        elif key == "dataframe_records":
            raise ProtocolError(
                400, "bad_format", "dataframe_records rows must be objects; send [{'image': ...}]"
            )
        else:
            values.append(row)
    return values


def _columns_column(data: dict[str, Any], key: str) -> list[Any]:
    if IMAGE_COLUMN not in data:
        raise _missing_column(key)
    column = data[IMAGE_COLUMN]
    return column if isinstance(column, list) else [column]
