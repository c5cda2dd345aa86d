"""Asking the registry where an alias points, on a timer, and remembering when it last answered."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime

from captchaops.tracking_rest import TrackingRest, VersionRef

log = logging.getLogger(__name__)

STALE_POLLS = 5
"""Polls in a row without an answer after which `/health` calls the alias stale."""


class AliasPoller:
    """Asks the registry where `name@alias` points, every `poll_seconds`, in a thread of its own."""

    def __init__(
        self,
        rest: TrackingRest,
        name: str,
        alias: str,
        poll_seconds: float,
        on_answer: Callable[[VersionRef | None], None],
        on_failure: Callable[[str], None],
    ) -> None:
        self.rest = rest
        self.name = name
        self.alias = alias
        self.poll_seconds = poll_seconds
        self.on_answer = on_answer
        self.on_failure = on_failure
        self.stale_after = max(STALE_POLLS * poll_seconds, rest.timeout + poll_seconds)
        self.last_poll_at: str | None = None
        self.last_error: str | None = None
        self._last_success = time.monotonic()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Poll in a daemon thread; the first poll happens at once."""
        # httpx logs every request at INFO: one line per poll would bury the server's own log.
        logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger("httpx").level))
        self._thread = threading.Thread(target=self._loop, name=f"poll-{self.alias}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float) -> None:
        """Stop polling."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def poll_soon(self) -> None:
        """Poll now instead of at the next tick."""
        self._wake.set()

    def poll_once(self) -> None:
        """Ask the registry once and report the answer (None: no such alias) or the failure."""
        try:
            ref = self.rest.alias_version(self.name, self.alias)
        except Exception as exc:
            self.last_poll_at = _now()
            self.last_error = f"{type(exc).__name__}: {one_line(exc)}"
            self.on_failure(self.last_error)
            return
        if self.last_error is not None:
            log.info("tracking server reachable again")
        self.last_poll_at = _now()
        self.last_error = None
        self._last_success = time.monotonic()
        self.on_answer(ref)

    def silent_seconds(self) -> float:
        """Seconds since the registry last answered (since start, before its first answer)."""
        return time.monotonic() - self._last_success

    def stale(self) -> bool:
        """True after STALE_POLLS intervals (at least one request timeout) without an answer."""
        return self.silent_seconds() > self.stale_after

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll_once()
            except Exception:  # a bug in a callback must not end polling for good
                log.exception("checking alias %s failed", self.alias)
            self._wake.wait(self.poll_seconds)
            self._wake.clear()


def one_line(exc: BaseException, limit: int = 500) -> str:
    """An exception's text on one line, cut to `limit` characters."""
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
