"""The production server's canary (issue 16): a second slot that follows `@canary`, gets the
share of requests its version's `canary_percent` tag asks for, and stops getting any the moment
its breaker (`captchaops.canary.breaker`) trips.

The slot is an `AliasWatcher` of its own (polling, webhooks, every load check), with metrics of
its own so production's swap and version gauges stay production's. Routing needs a percent read
from the registry: a last-known-good copy loaded while the registry is unreachable is not routed
to. A trip lasts until `@canary` moves or is removed; only `registry/` removes the alias
(`captchaops promote --canary` does when it sees the trip, or `captchaops rollback --canary`).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from captchaops.canary.breaker import Evidence, Latencies, Limits, Share, verdict
from captchaops.scheme_names import CANARY, CANARY_MAX_PERCENT, CANARY_PERCENT_TAG
from captchaops.serving.live_estimate import LiveQuality
from captchaops.serving.metrics import LATENCY_BUCKETS, ServingMetrics
from captchaops.serving.poller import TIMER, one_line
from captchaops.serving.watcher import AliasWatcher, ServedModel
from captchaops.settings import Settings
from captchaops.tracking_rest import VersionRef

log = logging.getLogger(__name__)

ROUTING, TRIPPED, WAITING = "routing", "tripped", "waiting"


def parse_percent(text: str | None) -> int | None:
    """The share a `canary_percent` tag asks for, if it is a whole number in 1..50."""
    if text is None or not text.strip().isdigit():
        return None
    value = int(text)
    return value if 1 <= value <= CANARY_MAX_PERCENT else None


class CanaryWatcher(AliasWatcher):
    """Follows `@canary`, and on every answer of the registry reads the version's percent."""

    percent: int | None = None

    def _on_answer(self, ref: VersionRef | None, cause: str = TIMER) -> None:
        self.percent = None if ref is None else self._percent_of(ref.version)
        super()._on_answer(ref, cause)

    def _percent_of(self, version: str) -> int | None:
        try:
            tags = self.poller.rest.version_tags(self.name, version)
        except Exception as exc:  # keep the share already known for this version, if any
            log.warning("cannot read the canary share of version %s: %s", version, one_line(exc))
            return self.percent if version == self.target_version else None
        return parse_percent(tags.get(CANARY_PERCENT_TAG))


class Canary:
    """Routes a share of production's requests to `@canary` and trips when it misbehaves."""

    def __init__(
        self,
        watcher: CanaryWatcher,
        production: AliasWatcher,
        quality: LiveQuality | None,
        limits: Limits,
        registry: CollectorRegistry,
    ) -> None:
        self.watcher = watcher
        self.production = production
        self.quality = quality
        self.limits = limits
        self.share = Share()
        self.canary_latency = Latencies()
        self.production_latency = Latencies()
        self.version: str | None = None
        self.answers = 0
        self.tripped: str | None = None
        self._lock = threading.Lock()
        self.percent_gauge = Gauge(
            "captchaops_canary_percent",
            "Share of /invocations requests routed to @canary now (0: none, or tripped).",
            registry=registry,
        )
        self.trips = Counter(
            "captchaops_canary_trips",
            "Times the canary breaker stopped routing to a canary, by canary version.",
            ["version"],
            registry=registry,
        )
        self.version_latency = Histogram(
            "captchaops_version_request_latency_seconds",
            "Time to answer /invocations, by the version that answered (production or canary).",
            ["version"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )

    @classmethod
    def for_settings(
        cls, settings: Settings, production: AliasWatcher, metrics: ServingMetrics
    ) -> Canary:
        """A canary slot for the production server, with the settings' breaker limits."""
        watcher = CanaryWatcher.for_settings(settings, CANARY, ServingMetrics())
        limits = Limits(
            min_answers=settings.canary_min_answers,
            drop_points=settings.canary_drop_points,
            p99_ratio=settings.canary_p99_ratio,
            p99_slack_ms=settings.canary_p99_slack_ms,
        )
        return cls(watcher, production, metrics.quality, limits, metrics.registry)

    def start(self) -> None:
        """Start following `@canary`."""
        self.watcher.start()

    def stop(self) -> None:
        """Stop following it."""
        self.watcher.stop()

    def pick(self) -> ServedModel | None:
        """The canary for this request, or None when production answers it."""
        served, percent, why = self._routable()
        if served is None or percent is None or why is not None:
            return None
        return served if self.share.take(percent) else None

    def observe(self, version: str | None, seconds: float) -> None:
        """One answered request: its latency by version, and the breaker after a canary answer."""
        if version is None:
            return
        self.version_latency.labels(version).observe(seconds)
        production = self.production.current
        if production is not None and version == production.version:
            self.production_latency.add(seconds)
            return
        with self._lock:
            if version != self.version or self.tripped:
                return
            self.answers += 1
        self.canary_latency.add(seconds)
        reason = verdict(self.evidence(), self.limits)
        if reason is not None:
            self._trip(version, reason)

    def failed(self, version: str, exc: Exception) -> None:
        """The canary's model raised on a request: trip at once, whatever the answers so far."""
        self._follow(self.watcher.target_version)
        self._trip(version, f"prediction failed: {type(exc).__name__}: {one_line(exc, 200)}")

    def evidence(self) -> Evidence:
        """The numbers the breaker judges now."""
        live = self.quality.snapshot() if self.quality is not None else {}
        production = self.production.current
        mine = live.get(self.version or "", {})
        theirs = live.get(production.version, {}) if production is not None else {}
        return Evidence(
            answers=self.answers,
            estimate=mine.get("estimate"),
            gate_accuracy=mine.get("gate_accuracy"),
            production_estimate=theirs.get("estimate"),
            p99_ms=self.canary_latency.p99_ms(),
            production_p99_ms=self.production_latency.p99_ms(),
        )

    def health(self) -> dict[str, Any] | None:
        """The `/health` block: None when no version has `@canary`."""
        _, percent, why = self._routable()
        if self.watcher.target_version is None:
            return None
        state = TRIPPED if self.tripped else WAITING if why else ROUTING
        evidence = self.evidence()
        return {
            "version": self.watcher.target_version,
            "percent": percent,
            "answers": evidence.answers,
            "min_answers": self.limits.min_answers,
            "estimate": evidence.estimate,
            "gate_accuracy": evidence.gate_accuracy,
            "production_estimate": evidence.production_estimate,
            "p99_ms": _rounded(evidence.p99_ms),
            "production_p99_ms": _rounded(evidence.production_p99_ms),
            "state": state,
            "reason": self.tripped or why,
        }

    def _routable(self) -> tuple[ServedModel | None, int | None, str | None]:
        """The loaded canary, its percent, and why it gets no traffic now (None: it does)."""
        watcher = self.watcher
        served, percent, target = watcher.current, watcher.percent, watcher.target_version
        self._follow(target)
        production = self.production.current
        why = None
        if served is None or served.version != target:
            why = f"loading version {target}" if target else "no version has @canary"
            if watcher.last_reload_error:
                why = f"cannot load it: {watcher.last_reload_error}"
        elif percent is None:
            why = f"version {target} carries no {CANARY_PERCENT_TAG} tag of 1-{CANARY_MAX_PERCENT}"
        elif production is None:
            why = "production serves no version yet"
        elif production.version == target:
            why = f"version {target} is @production already"
        elif self.tripped:
            why = self.tripped
        self.percent_gauge.set(0 if why else percent or 0)
        return served, percent, why

    def _follow(self, target: str | None) -> None:
        """Start afresh (answers, latencies, breaker) when `@canary` names another version."""
        with self._lock:
            if target == self.version:
                return
            self.version, self.answers, self.tripped = target, 0, None
        self.canary_latency.clear()

    def _trip(self, version: str, reason: str) -> None:
        with self._lock:
            if self.tripped or version != self.version:
                return
            self.tripped = reason
        self.trips.labels(version).inc()
        self.percent_gauge.set(0)
        log.warning("canary version %s tripped, no more traffic: %s", version, reason)


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 2)
