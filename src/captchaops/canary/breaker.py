"""The canary's breaker: when a canary must stop getting traffic, from its live accuracy estimate
and latency against its gate accuracy and production's. Pure logic, so unit tests judge it alone.

Also the two small pieces routing needs: which requests go to the canary (exactly `percent` of
any 100 consecutive ones, by a counter, so shares are reproducible) and a window of recent
request latencies per version for p99.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass

import numpy as np

LATENCY_WINDOW = 500
"""Request latencies kept per version for its p99."""


@dataclass(frozen=True)
class Limits:
    """When the breaker trips; each is a `CAPTCHAOPS_CANARY_*` setting."""

    min_answers: int = 100
    """Canary answers before anything is judged (an estimate over fewer is noise)."""
    drop_points: float = 10.0
    """Trip when the canary's estimate is this many points below its gate accuracy, or below
    production's estimate."""
    p99_ratio: float = 2.0
    """Trip when the canary's p99 exceeds production's times this..."""
    p99_slack_ms: float = 50.0
    """...plus this many milliseconds."""


@dataclass(frozen=True)
class Evidence:
    """What the production server knows about its canary and itself at one moment."""

    answers: int
    estimate: float | None
    gate_accuracy: float | None
    production_estimate: float | None
    p99_ms: float | None
    production_p99_ms: float | None


def verdict(evidence: Evidence, limits: Limits) -> str | None:
    """Why the canary must stop getting traffic (one line), or None while it may go on."""
    if evidence.answers < limits.min_answers:
        return None
    drop = limits.drop_points / 100
    estimate, gate = evidence.estimate, evidence.gate_accuracy
    if estimate is not None and gate is not None and estimate < gate - drop:
        return (
            f"live estimate {estimate:.1%} is {(gate - estimate) * 100:.1f} points below its gate "
            f"accuracy {gate:.1%} (limit {limits.drop_points:g})"
        )
    production = evidence.production_estimate
    if estimate is not None and production is not None and estimate < production - drop:
        return (
            f"live estimate {estimate:.1%} is {(production - estimate) * 100:.1f} points below "
            f"production's {production:.1%} (limit {limits.drop_points:g})"
        )
    p99, base = evidence.p99_ms, evidence.production_p99_ms
    if p99 is not None and base is not None:
        budget = base * limits.p99_ratio + limits.p99_slack_ms
        if p99 > budget:
            return (
                f"p99 {p99:.1f} ms is over {budget:.1f} ms (production's {base:.1f} ms "
                f"x {limits.p99_ratio:g} + {limits.p99_slack_ms:g} ms)"
            )
    return None


class Share:
    """Picks the requests that go to the canary: exactly `percent` of any 100 in a row."""

    def __init__(self) -> None:
        self._count = 0

    def take(self, percent: int) -> bool:
        """Whether this request goes to the canary (called once per request)."""
        n = self._count
        self._count += 1
        return (n + 1) * percent // 100 > n * percent // 100


class Latencies:
    """The last `size` request latencies of one version, and their 99th percentile."""

    def __init__(self, size: int = LATENCY_WINDOW) -> None:
        self._seconds: deque[float] = deque(maxlen=size)
        self._lock = threading.Lock()

    def add(self, seconds: float) -> None:
        """Remember one answered request's latency."""
        with self._lock:
            self._seconds.append(seconds)

    def clear(self) -> None:
        """Forget every latency (the version changed)."""
        with self._lock:
            self._seconds.clear()

    def p99_ms(self) -> float | None:
        """The 99th percentile in milliseconds; None before any answer."""
        with self._lock:
            values = list(self._seconds)
        return float(np.percentile(values, 99) * 1000) if values else None
