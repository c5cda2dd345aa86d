"""Which predictions go to the review queue, stored off the request path.

A request only compares the confidence, hashes the image and puts it on a bounded in-memory queue
(dropped when full); one background thread (started on demand, gone after a quiet minute) checks
the hourly and pending caps and the tracking server for the same image, then stores it. Counts
live in the app's memory: a restart resets them."""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable

from captchaops.settings import Settings
from captchaops.webapp.review import ReviewStore, Sample
from captchaops.webapp.tracking_client import TrackingError

HOUR = 3600.0
REMEMBERED = 4096
"""How many recently offered image digests the app remembers, to drop repeats without a call."""
PENDING_TTL = 60.0
"""How long the thread trusts its own count of pending items before counting again."""
IDLE_SECONDS = 60.0
DROPS = ("duplicate", "rate_limited", "queue_full", "pending_full", "failed")

log = logging.getLogger(__name__)


class ReviewSampler:
    """Offers low-confidence inputs to the review queue within the caps of `settings`."""

    def __init__(
        self, store: ReviewStore, settings: Settings, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.store = store
        self.below = settings.review_below_confidence
        self.per_hour = settings.review_per_hour
        self.max_pending = settings.review_max_pending
        self._clock = clock
        self._queue: queue.Queue[Sample] = queue.Queue(maxsize=settings.review_queue_size)
        self._lock = threading.Lock()
        self._busy = 0  # samples queued or being stored
        self._thread: threading.Thread | None = None
        self._counts: Counter[str] = Counter()
        self._digests: OrderedDict[str, None] = OrderedDict()
        self._stored_at: deque[float] = deque()
        self._pending: tuple[float, int] | None = None

    def wants(self, confidence: float | None) -> bool:
        """Whether a prediction this confident is one to review."""
        return self.per_hour > 0 and confidence is not None and confidence < self.below

    def offer(
        self,
        image: bytes,
        fmt: str,
        text: str,
        confidence: float,
        model: str | None,
        source: str,
    ) -> str | None:
        """Queue a checked image for storing; None when queued, else why it was dropped (counted)."""
        if self.per_hour <= 0:
            return "disabled"
        if not self.wants(confidence):
            return "confident"
        digest = hashlib.sha256(image).hexdigest()
        sample = Sample(image, fmt, digest, text, confidence, model, source)
        with self._lock:
            self._counts["offered"] += 1
            if digest in self._digests:
                self._digests.move_to_end(digest)
                return self._drop("duplicate")
            if self._hour_is_full():
                return self._drop("rate_limited")
            try:
                self._queue.put_nowait(sample)
            except queue.Full:
                return self._drop("queue_full")
            self._digests[digest] = None
            while len(self._digests) > REMEMBERED:
                self._digests.popitem(last=False)
            self._counts["queued"] += 1
            self._busy += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="review", daemon=True)
                self._thread.start()
        return None

    def stats(self) -> dict[str, object]:
        """What the sampler did since the app started."""
        with self._lock:
            counts = dict(self._counts)
            waiting = self._busy
        return {
            "below_confidence": self.below,
            "offered": counts.get("offered", 0),
            "stored": counts.get("stored", 0),
            "in_memory": waiting,
            "dropped": {reason: counts.get(reason, 0) for reason in DROPS},
        }

    def changed(self) -> None:
        """Items were labelled or discarded: count the pending ones again before the next store."""
        with self._lock:
            self._pending = None

    def _drop(self, reason: str) -> str:
        self._counts[reason] += 1
        return reason

    def _hour_is_full(self) -> bool:
        now = self._clock()
        while self._stored_at and self._stored_at[0] <= now - HOUR:
            self._stored_at.popleft()
        return len(self._stored_at) >= self.per_hour

    def _work(self) -> None:
        while True:
            try:
                sample = self._queue.get(timeout=IDLE_SECONDS)
            except queue.Empty:
                with self._lock:
                    if self._queue.empty():
                        self._thread = None
                        return
                continue
            reason = self._store(sample)
            with self._lock:
                if reason is None:
                    self._counts["stored"] += 1
                else:
                    self._drop(reason)
                    if reason != "duplicate":  # not stored: may be offered again later
                        self._digests.pop(sample.digest, None)
                self._busy -= 1

    def _store(self, sample: Sample) -> str | None:
        """Store one sample unless a cap or an earlier copy says no; the reason when not."""
        with self._lock:
            if self._hour_is_full():
                return "rate_limited"
            cached = self._pending
        try:
            if cached is None or self._clock() - cached[0] > PENDING_TTL:
                cached = (self._clock(), self.store.count_pending(self.max_pending))
            if cached[1] >= self.max_pending:
                with self._lock:
                    self._pending = cached
                return "pending_full"
            if self.store.seen(sample.digest):
                return "duplicate"
            self.store.store(sample)
        except TrackingError:
            return "failed"
        except Exception:  # the thread must outlive any one sample; the app log gets the cause
            log.exception("could not store a review item")
            return "failed"
        with self._lock:
            self._stored_at.append(self._clock())
            self._pending = (cached[0], cached[1] + 1)
        return None
