"""Shadow traffic: a copy of each answered request goes to another model server, to compare.

At most `per_second` copies a second are made (the rest are skipped: the shadow's predictions
take CPU that a shared machine would otherwise give production). Copies wait in a bounded queue
(by requests and by bytes) and are sent by a few sender threads with plain keep-alive
connections (an async client on the event loop cost about 2 ms of production's CPU per copy)
after the client has its answer; when the queue is full the copy is dropped. Both are counted.
Nothing here can delay or fail a request of this server: the shadow server's answers, refusals,
errors and silences only move the `captchaops_shadow_*` metrics.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from captchaops.serving.metrics import ServingMetrics

log = logging.getLogger(__name__)

HEADER = "X-Captchaops-Shadow"
"""Marks a copy, so the server receiving it never copies it again."""
SENDERS = 4
"""Copies in flight to the shadow server at once (one thread and connection each)."""
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
        headers: dict[str, str] | None = None,
    ) -> None:
        parts = urlsplit(url.rstrip("/"))
        self._headers = dict(headers or {})
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"shadow URL {url!r} is not http(s)://host[:port]; fix shadow_url")
        self.url = f"{url.rstrip('/')}/invocations"
        self._target = parts
        self.metrics = metrics
        self.timeout_s = timeout_s
        self.senders = senders
        self.max_bytes = max_bytes
        self.held_bytes = 0
        self.per_second = per_second
        self._burst = max(1.0, per_second)
        self._tokens = self._burst
        self._clock = clock
        self._refilled = clock()
        self._queue: queue.Queue[Copy | None] = queue.Queue(queue_size)
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def accepts(self, size: int) -> bool:
        """Whether a body of `size` bytes could ever be queued (so is worth keeping)."""
        return size <= self.max_bytes

    async def start(self) -> None:
        """Start the sender threads."""
        self._threads = [
            threading.Thread(target=self._send_loop, name=f"shadow-{i}", daemon=True)
            for i in range(self.senders)
        ]
        for thread in self._threads:
            thread.start()
        log.info("copying answered requests to %s", self.url)

    async def stop(self) -> None:
        """Stop sending; queued copies are dropped uncounted, copies in flight end on their own."""
        with contextlib.suppress(queue.Empty):
            while True:
                self._queue.get_nowait()
        for _ in self._threads:
            with contextlib.suppress(queue.Full):
                self._queue.put_nowait(None)
        self._threads = []

    def admit(self, version: str) -> bool:
        """Spend one copy of the budget; past it, count a skip and say no. Called on the
        request path (cheap, no I/O), so the requests not copied carry no background task."""
        if self._take_token():
            return True
        self._count(version, UNKNOWN, "skipped")
        return False

    async def offer(self, copy: Copy) -> None:
        """Queue a copy without waiting: skipped past the copy budget, dropped when full."""
        if self.admit(copy.version):
            await self.enqueue(copy)

    async def enqueue(self, copy: Copy) -> None:
        """Queue an admitted copy without waiting; dropped when the queue is full."""
        size = len(copy.body)
        with self._lock:
            if self.held_bytes + size > self.max_bytes:
                room = False
            else:
                try:
                    self._queue.put_nowait(copy)
                    self.held_bytes += size
                    room = True
                except queue.Full:
                    room = False
        if not room:
            self._count(copy.version, UNKNOWN, "dropped")
            return
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

    def _send_loop(self) -> None:
        connection: http.client.HTTPConnection | None = None
        while True:
            copy = self._queue.get()
            if copy is None:
                break
            with self._lock:
                self.held_bytes -= len(copy.body)
            self.metrics.shadow_queued.set(self._queue.qsize())
            try:
                connection = self._deliver(connection, copy)
            except (OSError, http.client.HTTPException) as exc:
                log.debug("shadow request failed: %s", exc)
                self._count(copy.version, UNKNOWN, "error")
                if connection is not None:
                    connection.close()
                connection = None
            except Exception:
                log.exception("comparing a shadow answer failed")
                self._count(copy.version, UNKNOWN, "error")
        if connection is not None:
            connection.close()

    def _deliver(
        self, connection: http.client.HTTPConnection | None, copy: Copy
    ) -> http.client.HTTPConnection:
        """Send on the kept-alive connection, or on a new one if the server had closed it."""
        if connection is not None:
            try:
                self._send(connection, copy)
                return connection
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                connection.close()
        connection = self._connect()
        try:
            self._send(connection, copy)
        except BaseException:
            connection.close()
            raise
        return connection

    def _connect(self) -> http.client.HTTPConnection:
        kind = (
            http.client.HTTPSConnection
            if self._target.scheme == "https"
            else http.client.HTTPConnection
        )
        return kind(self._target.hostname or "", self._target.port, timeout=self.timeout_s)

    def _send(self, connection: http.client.HTTPConnection, copy: Copy) -> None:
        started = time.perf_counter()
        connection.request(
            "POST",
            f"{self._target.path}/invocations",
            body=copy.body,
            headers={**self._headers, "Content-Type": copy.content_type, HEADER: "1"},
        )
        resp = connection.getresponse()
        data = resp.read()
        elapsed = time.perf_counter() - started
        other = (resp.getheader("X-Model-Version") or UNKNOWN)[:MAX_LABEL_CHARS]
        if resp.status == 503:
            self._count(copy.version, other, "refused")
            return
        theirs = _predictions(data) if resp.status == 200 else None
        if theirs is None or len(theirs) != len(copy.predictions):
            self._count(copy.version, other, "error")
            return
        self.metrics.shadow_latency.labels(copy.version, other).observe(elapsed)
        pairs = list(zip(copy.predictions, theirs, strict=True))
        self.metrics.record_shadow_differences(
            copy.version,
            other,
            [float(shadow["confidence"]) - float(ours["confidence"]) for ours, shadow in pairs],
        )
        agree = all(shadow["text"] == ours["text"] for ours, shadow in pairs)
        self._count(copy.version, other, "agree" if agree else "disagree")

    def _count(self, version: str, other: str, result: str) -> None:
        self.metrics.shadow_requests.labels(version, other, result).inc()


def _predictions(data: bytes) -> list[dict[str, Any]] | None:
    """The answer's predictions if each has a text and a numeric confidence, else None."""
    with contextlib.suppress(ValueError):
        body = json.loads(data)
        predictions = body.get("predictions") if isinstance(body, dict) else None
        if isinstance(predictions, list) and all(
            isinstance(p, dict)
            and isinstance(p.get("text"), str)
            and isinstance(p.get("confidence"), int | float)
            for p in predictions
        ):
            return predictions
    return None
