"""HTTP client for the model servers: ask every environment, in parallel, within a timeout."""

from __future__ import annotations

import base64
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx

ENVIRONMENTS = ("production", "staging")


@dataclass(frozen=True)
class Answer:
    """One environment's answer to one image, or why it could not answer."""

    alias: str
    url: str
    text: str | None = None
    confidence: float | None = None
    latency_ms: float | None = None
    name: str | None = None
    version: str | None = None
    error: str | None = None
    refused_input: int | None = None
    """The 4xx status when the server refused the image itself (the image is bad, not the
    server)."""

    @property
    def available(self) -> bool:
        """Whether this environment produced a prediction."""
        return self.error is None


@dataclass(frozen=True)
class Served:
    """What a model server says it is serving (its `GET /version`), or why it did not say."""

    alias: str
    url: str
    name: str | None = None
    version: str | None = None
    loaded_at: str | None = None
    alphabet: str | None = None
    error: str | None = None


IMAGE_REFUSALS = frozenset({400, 413, 415, 422})
"""A model server's statuses for an image it will not read (broken, too large, too costly)."""


def predict(http: httpx.Client, alias: str, url: str, image: bytes, timeout: float) -> Answer:
    """Send one image to one model server's `/invocations` and time the round trip."""
    body = {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(image).decode()]]}}
    start = time.perf_counter()
    try:
        resp = http.post(f"{url}/invocations", json=body, timeout=timeout)
    except httpx.TimeoutException:
        return Answer(alias, url, error=f"no answer within {timeout:g} s")
    except httpx.HTTPError:
        return Answer(alias, url, error="server not reachable")
    latency_ms = (time.perf_counter() - start) * 1000
    if resp.status_code != 200:
        refused = resp.status_code if resp.status_code in IMAGE_REFUSALS else None
        return Answer(alias, url, error=_error_text(resp), refused_input=refused)
    try:
        first = resp.json()["predictions"][0]
        text, confidence = str(first["text"]), float(first["confidence"])
    except (ValueError, KeyError, IndexError, TypeError):
        return Answer(alias, url, error="answered in an unexpected format")
    return Answer(
        alias,
        url,
        text=text,
        confidence=confidence,
        latency_ms=latency_ms,
        name=resp.headers.get("X-Model-Name"),
        version=resp.headers.get("X-Model-Version"),
    )


def describe(http: httpx.Client, alias: str, url: str, timeout: float) -> Served:
    """Ask one model server which model version it serves."""
    try:
        resp = http.get(f"{url}/version", timeout=timeout)
    except httpx.TimeoutException:
        return Served(alias, url, error=f"no answer within {timeout:g} s")
    except httpx.HTTPError:
        return Served(alias, url, error="server not reachable")
    if resp.status_code != 200:
        return Served(alias, url, error=_error_text(resp))
    try:
        info = resp.json()
        return Served(
            alias,
            url,
            name=_opt(info.get("name")),
            version=_opt(info.get("version")),
            loaded_at=_opt(info.get("loaded_at")),
            alphabet=_opt(info.get("alphabet")),
            error=None if info.get("version") is not None else "no model loaded yet",
        )
    except (ValueError, AttributeError):
        return Served(alias, url, error="answered in an unexpected format")


def predict_all(
    http: httpx.Client, urls: dict[str, str], image: bytes, timeout: float
) -> list[Answer]:
    """Ask every environment at once; a slow one costs at most `timeout`."""
    with ThreadPoolExecutor(max_workers=len(urls) or 1) as pool:
        futures = [
            pool.submit(predict, http, alias, url, image, timeout) for alias, url in urls.items()
        ]
        return [f.result() for f in futures]


def describe_all(http: httpx.Client, urls: dict[str, str], timeout: float) -> list[Served]:
    """Ask every environment which version it serves, at once."""
    with ThreadPoolExecutor(max_workers=len(urls) or 1) as pool:
        futures = [pool.submit(describe, http, alias, url, timeout) for alias, url in urls.items()]
        return [f.result() for f in futures]


def _error_text(resp: httpx.Response) -> str:
    try:
        body = resp.json()
        if body.get("error") == "no_model":
            return "no model version has this alias yet"
        detail = body.get("detail") or body.get("error")
    except (ValueError, AttributeError):
        detail = None
    return f"HTTP {resp.status_code}" + (f": {detail}" if detail else "")


def _opt(value: object) -> str | None:
    return None if value is None else str(value)
