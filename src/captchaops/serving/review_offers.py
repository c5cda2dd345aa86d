"""Low-confidence answers of a model server, offered to the web app's review queue.

An answered image read with less than `review_below_confidence` is put on a bounded queue
(dropped when full, at most `review_per_hour` an hour) without waiting; one sender thread posts
each to the web app's `POST /api/review` (the review token as a bearer token when one is set),
where the app's own caps and de-duplication decide whether it is stored. Nothing here delays or
fails an answer: outcomes only move `captchaops_review_offers_total{result}`.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

from captchaops.serving.metrics import ServingMetrics

log = logging.getLogger(__name__)

HOUR = 3600.0


@dataclass(frozen=True)
class Offer:
    """One image to offer, with what this server read in it."""

    image: bytes
    text: str
    confidence: float
    model: str


class ReviewOffers:
    """Offers low-confidence answers to the review queue at `url` (the web app)."""

    def __init__(
        self,
        url: str,
        model: str,
        metrics: ServingMetrics,
        *,
        token: str | None,
        below: float,
        per_hour: int,
        queue_size: int,
        timeout_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = f"{url.rstrip('/')}/api/review"
        self.model, self.metrics, self.below, self.per_hour = model, metrics, below, per_hour
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._timeout, self._clock = timeout_s, clock
        self._queue: queue.Queue[Offer | None] = queue.Queue(queue_size)
        self._offered: deque[float] = deque()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the sender thread."""
        self._thread = threading.Thread(target=self._send_loop, name="review-offers", daemon=True)
        self._thread.start()
        log.info("offering answers below confidence %.2f to %s", self.below, self.url)

    def stop(self) -> None:
        """Stop sending; offers still queued are dropped."""
        with contextlib.suppress(queue.Full):  # else the daemon thread ends with the process
            self._queue.put_nowait(None)

    def offer(self, images: list[bytes], predictions: list[dict[str, Any]], version: str) -> None:
        """Queue the images read with low confidence (cheap: no I/O, no copy of the bytes)."""
        if self.per_hour <= 0:
            return
        for image, prediction in zip(images, predictions, strict=True):
            confidence = float(prediction["confidence"])
            if confidence >= self.below:
                continue
            with self._lock:
                now = self._clock()
                while self._offered and self._offered[0] <= now - HOUR:
                    self._offered.popleft()
                if len(self._offered) >= self.per_hour:
                    self._count("rate_limited")
                    continue
                offer = Offer(image, str(prediction["text"]), confidence, f"{self.model}/{version}")
                try:
                    self._queue.put_nowait(offer)
                except queue.Full:
                    self._count("dropped")
                    continue
                self._offered.append(now)
            self._count("queued")

    def _send_loop(self) -> None:
        with httpx.Client(timeout=self._timeout, headers=self._headers) as client:
            while (offer := self._queue.get()) is not None:
                body = {
                    "image": base64.b64encode(offer.image).decode(),
                    "text": offer.text,
                    "confidence": offer.confidence,
                    "model": offer.model,
                }
                try:
                    resp = client.post(self.url, json=body)
                except httpx.HTTPError as exc:
                    log.debug("review offer failed: %s", exc)
                    self._count("error")
                    continue
                if resp.status_code == 202:
                    self._count("accepted")
                elif resp.status_code == 200:
                    self._count("declined")  # the app's caps or an earlier copy
                else:
                    log.warning("the review queue answered HTTP %d", resp.status_code)
                    self._count("error")

    def _count(self, result: str) -> None:
        self.metrics.review_offers.labels(result).inc()
