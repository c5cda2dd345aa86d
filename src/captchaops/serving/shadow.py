"""Shadow traffic: a copy of each answered request goes to another model server, to compare.

At most `per_second` copies a second are made (the rest are skipped: the shadow's predictions
take CPU that a shared machine would otherwise give production). Copies wait in a bounded queue
(by requests and by bytes) and are sent by a few background tasks after the client has its
answer; when the queue is full the copy is dropped. Both are counted.
Nothing here can delay or fail a request of this server: the shadow server's answers, refusals,
errors and silences only move the `captchaops_shadow_*` metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

from captchaops.serving.metrics import ServingMetrics

log = logging.getLogger(__name__)

HEADER = "X-Captchaops-Shadow"
"""Marks a copy, so the server receiving it never copies it again."""
SENDERS = 4
"""Copies in flight to the shadow server at once."""
MAX_QUEUED_BYTES = 16 * 1024 * 1024
"""Request bodies the queue may hold, whatever their number."""
UNKNOWN = "unknown"
MAX_LABEL_CHARS = 32


@dataclass(frozen=True)
class Copy:
    """One answered request: what the client sent, and what this server answered."""

    body: bytes
    content_type: str
    version: str
    predictions: list[dict[str, Any]]


class Shadow:
    """Sends copies of answered requests to `url` and records how its answers compare."""

    def __init__(
        self,
        url: str,
        metrics: ServingMetrics,
        *,
        queue_size: int,
        timeout_s: float,
        per_second: float,
        senders: int = SENDERS,
        max_bytes: int = MAX_QUEUED_BYTES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url.rstrip("/") + "/invocations"
        self.metrics = metrics
        self.queue_size = queue_size
        self.timeout_s = timeout_s
        self.senders = senders
        self.max_bytes = max_bytes
        self.held_bytes = 0
        self.per_second = per_second
        self._burst = max(1.0, per_second)
        self._tokens = self._burst
        self._clock = clock
        self._refilled = clock()
        self._queue: asyncio.Queue[Copy] = asyncio.Queue(queue_size)
        self._client: httpx.AsyncClient | None = None
        self._tasks: list[asyncio.Task[None]] = []

    def accepts(self, size: int) -> bool:
        """Whether a body of `size` bytes could ever be queued (so is worth keeping)."""
        return size <= self.max_bytes

    async def start(self) -> None:
        """Open the connection pool and start the senders on the running loop."""
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(self.timeout_s),
            limits=httpx.Limits(max_connections=self.senders),
            trust_env=False,
        )
        self._tasks = [asyncio.create_task(self._send_loop()) for _ in range(self.senders)]
        log.info("copying answered requests to %s", self.url)

    async def stop(self) -> None:
        """Stop sending; queued copies are dropped without being counted."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._client is not None:
            await self._client.aclose()

    async def offer(self, copy: Copy) -> None:
        """Queue a copy without waiting: skipped past the copy budget, dropped when full."""
        if not self._take_token():
            self._count(copy.version, UNKNOWN, "skipped")
            return
        size = len(copy.body)
        if self._queue.full() or self.held_bytes + size > self.max_bytes:
            self._count(copy.version, UNKNOWN, "dropped")
            return
        self._queue.put_nowait(copy)
        self.held_bytes += size
        self.metrics.shadow_queued.set(self._queue.qsize())

    def _take_token(self) -> bool:
        """Spend one of `per_second` copies a second (bursts of one second's worth)."""
        now = self._clock()
        self._tokens = min(self._burst, self._tokens + (now - self._refilled) * self.per_second)
        self._refilled = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True

    async def _send_loop(self) -> None:
        while True:
            copy = await self._queue.get()
            self.held_bytes -= len(copy.body)
            self.metrics.shadow_queued.set(self._queue.qsize())
            try:
                await self._send(copy)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("comparing a shadow answer failed")
                self._count(copy.version, UNKNOWN, "error")

    async def _send(self, copy: Copy) -> None:
        assert self._client is not None
        started = time.perf_counter()
        try:
            resp = await self._client.post(
                self.url,
                content=copy.body,
                headers={"Content-Type": copy.content_type, HEADER: "1"},
            )
        except httpx.HTTPError as exc:
            log.debug("shadow request failed: %s", exc)
            self._count(copy.version, UNKNOWN, "error")
            return
        elapsed = time.perf_counter() - started
        other = resp.headers.get("X-Model-Version", UNKNOWN)[:MAX_LABEL_CHARS] or UNKNOWN
        if resp.status_code == 503:
            self._count(copy.version, other, "refused")
            return
        theirs = _predictions(resp) if resp.status_code == 200 else None
        if theirs is None or len(theirs) != len(copy.predictions):
            self._count(copy.version, other, "error")
            return
        self.metrics.shadow_latency.labels(copy.version, other).observe(elapsed)
        difference = self.metrics.shadow_confidence_diff.labels(copy.version, other)
        agree = True
        for ours, shadow in zip(copy.predictions, theirs, strict=True):
            difference.observe(float(shadow["confidence"]) - float(ours["confidence"]))
            agree = agree and shadow["text"] == ours["text"]
        self._count(copy.version, other, "agree" if agree else "disagree")

    def _count(self, version: str, other: str, result: str) -> None:
        self.metrics.shadow_requests.labels(version, other, result).inc()


def _predictions(resp: httpx.Response) -> list[dict[str, Any]] | None:
    """The answer's predictions if each has a text and a numeric confidence, else None."""
    with contextlib.suppress(ValueError):
        body = resp.json()
        predictions = body.get("predictions") if isinstance(body, dict) else None
        if isinstance(predictions, list) and all(
            isinstance(p, dict)
            and isinstance(p.get("text"), str)
            and isinstance(p.get("confidence"), int | float)
            for p in predictions
        ):
            return predictions
    return None
