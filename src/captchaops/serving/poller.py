"""Asking the registry where an alias points, on a timer, and remembering when it last answered."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime

from captchaops.serving.audit_gate import RECHECK_S, AuditGate
from captchaops.tracking_rest import TrackingRest, VersionRef

log = logging.getLogger(__name__)

STALE_POLLS = 5
"""Polls in a row without an answer after which `/health` calls the alias stale."""

TIMER = "poll"
"""The cause of a check that the timer started (others: "webhook", "reload")."""


class AliasPoller:
    """Asks the registry where `name@alias` points, every `poll_seconds`, in a thread of its own;
    with a `gate`, answers are judged against the alias's audit record first."""

    def __init__(
        self,
        rest: TrackingRest,
        name: str,
        alias: str,
        poll_seconds: float,
        on_answer: Callable[[VersionRef | None, str], None],
        on_failure: Callable[[str], None],
        gate: AuditGate | None = None,
    ) -> None:
        self.rest = rest
        self.gate = gate
        self.name = name
        self.alias = alias
        self.on_answer = on_answer
        self.on_failure = on_failure
        self.poll_seconds = poll_seconds
        self.stale_after = 0.0
        self.set_interval(poll_seconds)
        self.last_poll_at: str | None = None
        self.last_error: str | None = None
        self._last_success = time.monotonic()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._cause = TIMER
        self._asked = 0.0
        self.asked_at = 0.0
        """When the check being answered was asked for (monotonic: a delivery's `poll_soon`,
        else the poll's start)."""
        self.read_seconds = 0.0
        """How long its registry read took."""
        self._thread: threading.Thread | None = None

    def set_interval(self, poll_seconds: float) -> None:
        """Check every `poll_seconds` from the next tick on (and call the alias stale later)."""
        self.poll_seconds = poll_seconds
        self.stale_after = max(STALE_POLLS * poll_seconds, self.rest.timeout + poll_seconds)

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

    def poll_soon(self, cause: str = "reload") -> None:
        """Poll now instead of at the next tick; `cause` is passed on with the answer."""
        self._cause = cause
        self._asked = time.monotonic()
        self._wake.set()

    def poll_once(self, cause: str = TIMER, asked_at: float | None = None) -> None:
        """Ask the registry once and report the answer (None: no such alias) with `cause`, or
        the failure; `asked_at` (monotonic) is when the check was asked for."""
        started = time.monotonic()
        try:
            if self.gate is not None:  # one read: the aliases and the moves signed for them
                ref = self.gate.judge()
            else:
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
        self.asked_at = started if asked_at is None else asked_at
        self.read_seconds = self._last_success - started
        self.on_answer(ref, cause)

    def silent_seconds(self) -> float:
        """Seconds since the registry last answered (since start, before its first answer)."""
        return time.monotonic() - self._last_success

    def stale(self) -> bool:
        """True after STALE_POLLS intervals (at least one request timeout) without an answer."""
        return self.silent_seconds() > self.stale_after

    def _loop(self) -> None:
        cause, asked = TIMER, None
        while not self._stop.is_set():
            try:
                self.poll_once(cause, asked)
            except Exception:  # a bug in a callback must not end polling for good
                log.exception("checking alias %s failed", self.alias)
            soon = self.gate is not None and self.gate.pending()
            woken = self._wake.wait(RECHECK_S if soon else self.poll_seconds)
            self._wake.clear()
            cause, self._cause = (self._cause if woken else TIMER), TIMER
            asked = self._asked if woken else None


class SwapMode:
    """Whether webhooks or the timer drive swaps, and the poller's interval to match."""

    def __init__(
        self, poller: AliasPoller, poll_seconds: float, webhook_poll_seconds: float | None
    ) -> None:
        self.poller = poller
        self.poll_seconds = poll_seconds
        self.webhook_poll_seconds = max(poll_seconds, webhook_poll_seconds or poll_seconds)
        self.last_webhook_at: str | None = None
        self._seen = 0.0

    @property
    def mode(self) -> str:
        """ "webhooks" once a verified delivery arrived (until `fall_back`), else "polling"."""
        return "webhooks" if self._seen else "polling"

    def delivered(self) -> None:
        """A verified webhook arrived (for any model: it proves the tracking server reaches this
        server with the right secret); the timer relaxes to the safety-net interval."""
        first = not self._seen
        self._seen = time.monotonic()
        self.last_webhook_at = _now()
        if first:
            self.poller.set_interval(self.webhook_poll_seconds)
            log.info(
                "webhooks reach this server: swapping on delivery, checking the alias every "
                "%g s as a safety net",
                self.webhook_poll_seconds,
            )

    def fall_back(self, why: str) -> None:
        """Webhooks stopped arriving: poll every `poll_seconds` again until the next delivery."""
        if self._seen:
            self._seen = 0.0
            self.poller.set_interval(self.poll_seconds)
            log.warning(
                "%s; checking it every %g s until a webhook arrives", why, self.poll_seconds
            )

    def describe(self) -> dict[str, object]:
        """The `/health` fields: swap_mode, poll_seconds, last_webhook_at, last_webhook_age_s."""
        return {
            "swap_mode": self.mode,
            "poll_seconds": self.poller.poll_seconds,
            "last_webhook_at": self.last_webhook_at,
            "last_webhook_age_s": round(time.monotonic() - self._seen, 1) if self._seen else None,
        }


def one_line(exc: BaseException, limit: int = 500) -> str:
    """An exception's text on one line, cut to `limit` characters."""
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
