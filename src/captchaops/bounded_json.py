"""JSON parsed within shape limits counted in the bytes before parsing: one rule for the model
servers' scoring bodies and the web app's API bodies.

`json.loads` of 2 MiB of `[{},{},...]` builds half a million objects (the web app went from 75
to 397 MB); counting brackets, braces and commas in the bytes first costs a few milliseconds and
builds nothing. Nesting is checked after parsing (a `RecursionError` is refused the same way).
"""

from __future__ import annotations

import json
from typing import Any

MAX_JSON_DEPTH = 8
"""Nesting a scoring request needs: 4 (`{"dataframe_split": {"data": [[...]]}}`), with room."""
MAX_JSON_CONTAINERS = 1_000
MAX_JSON_VALUES = 10_000
"""Arrays/objects and commas a body may hold, counted in its bytes before parsing: a 8 MiB body
of `[[],[],...]` would otherwise build millions of Python objects (hundreds of MB)."""
_NOT_MARKS = bytes(b for b in range(256) if b not in b"[{,")
"""Every byte but the three counted, deleted before counting."""
_CHUNK = 64 * 1024


class JsonShapeError(ValueError):
    """A body that is not JSON or breaks a shape limit; `reason` is 'shape', 'depth' or 'syntax'."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def loads(body: bytes) -> Any:
    """The decoded body, refusing shapes no request needs before building any object."""
    containers, commas = _marks(body)
    if containers > MAX_JSON_CONTAINERS or commas > MAX_JSON_VALUES:
        raise JsonShapeError(
            "shape",
            f"the body holds more than {MAX_JSON_CONTAINERS:,} arrays and objects or "
            f"{MAX_JSON_VALUES:,} values",
        )
    try:
        payload = json.loads(body)
    except RecursionError as exc:
        raise _too_deep() from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise JsonShapeError("syntax", f"the body is not valid JSON ({exc})") from exc
    if depth(payload) > MAX_JSON_DEPTH:
        raise _too_deep()
    return payload


def _marks(body: bytes) -> tuple[int, int]:
    """Brackets plus braces, and commas: one pass of `translate` per 64 KiB (three `count`s over
    the whole body took four times longer; the chunks keep what it builds small)."""
    containers = commas = 0
    for start in range(0, len(body), _CHUNK):
        marks = body[start : start + _CHUNK].translate(None, _NOT_MARKS)
        containers += marks.count(b"[") + marks.count(b"{")
        commas += marks.count(b",")
    return containers, commas


def depth(payload: Any) -> int:
    """How deeply arrays and objects nest in a decoded JSON value (a scalar is 0)."""
    deepest = 0
    level: list[Any] = [payload]
    while level:
        children: list[Any] = []
        for item in level:
            if isinstance(item, dict):
                children.extend(item.values())
            elif isinstance(item, list):
                children.extend(item)
        if not any(isinstance(item, dict | list) for item in level):
            break
        deepest += 1
        level = children
    return deepest


def _too_deep() -> JsonShapeError:
    return JsonShapeError("depth", f"the body's JSON nests deeper than {MAX_JSON_DEPTH} levels")
