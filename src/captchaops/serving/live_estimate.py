"""The live accuracy estimate of each version a model server answers with (issue 16).

A version's calibration (its confidence threshold, fitted on the frozen set when the gate
scored it) is read from its registry tags once, in a thread of its own, the first time the
version answers; from then on every answered confidence feeds a sliding window. The estimate
and its alert are Prometheus gauges, in `/health`, and one log line when the alert starts.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Gauge

from captchaops.live.estimate import Calibration, LiveEstimate

log = logging.getLogger("captchaops.serving.live_estimate")

Tags = Callable[[str], dict[str, str]]
"""A version number -> its registry tags."""


class LiveQuality:
    """Per served version: the estimate over the last `window` answers, and its alert."""

    def __init__(
        self,
        tags: Tags,
        registry: CollectorRegistry,
        *,
        window: int = 200,
        min_count: int = 50,
        alert_points: float = 10.0,
    ) -> None:
        self._tags, self._lock = tags, threading.Lock()
        self.window, self.min_count, self.alert_points = window, min_count, alert_points
        self._live: dict[str, LiveEstimate | None] = {}  # None: fetching, or uncalibrated
        self._alerting: set[str] = set()
        self._uncalibrated: set[str] = set()  # versions the gate never scored
        self.estimate = Gauge(
            "captchaops_live_accuracy_estimate_ratio",
            "Estimated sequence accuracy over the last answers (ATC on confidences), by version.",
            ["version"],
            registry=registry,
        )
        self.gate_accuracy = Gauge(
            "captchaops_gate_accuracy_ratio",
            "Sequence accuracy on the frozen set when the version was scored, by version.",
            ["version"],
            registry=registry,
        )
        self.alert = Gauge(
            "captchaops_live_accuracy_alert",
            "1 while the estimate is more than the alert margin below the gate accuracy.",
            ["version"],
            registry=registry,
        )

    def observe(self, version: str, confidences: Iterable[float]) -> None:
        """Feed the answered confidences of `version` (cheap: no I/O on this path)."""
        with self._lock:
            known = version in self._live
            live = self._live.get(version)
            if not known:
                self._live[version] = None
        if not known:
            threading.Thread(target=self._calibrate, args=(version,), daemon=True).start()
        if live is None:
            return
        for confidence in confidences:
            live.add(float(confidence))
        value = live.estimate()
        if value is None:
            return
        self.estimate.labels(version).set(value)
        line = live.alert()
        self.alert.labels(version).set(1 if line else 0)
        with self._lock:
            started = line is not None and version not in self._alerting
            if line is None:
                self._alerting.discard(version)
            elif started:
                self._alerting.add(version)
        if started:
            log.warning("version %s: %s", version, line)

    def _calibrate(self, version: str) -> None:
        try:
            calibration = Calibration.from_tags(self._tags(version))
        except Exception as exc:  # the registry may be down; answers go on without an estimate
            log.warning("version %s: no live estimate (%s)", version, exc)
            with self._lock:
                self._live.pop(version, None)  # try again on a later answer
            return
        if calibration is None:
            log.info("version %s carries no calibration; no live estimate", version)
            with self._lock:
                self._uncalibrated.add(version)
            return
        live = LiveEstimate(
            calibration,
            window=self.window,
            min_count=self.min_count,
            alert_points=self.alert_points,
        )
        self.gate_accuracy.labels(version).set(calibration.accuracy)
        with self._lock:
            self._live[version] = live

    def snapshot(self) -> dict[str, Any]:
        """For `/health`: each calibrated version's estimate, gate accuracy and alert line, and
        `{"calibrated": false}` for a version that carries no calibration (never gate-scored)."""
        with self._lock:
            items = [(v, live) for v, live in self._live.items() if live is not None]
            bare = sorted(self._uncalibrated)
        found: dict[str, Any] = {version: {"calibrated": False} for version in bare}
        for version, live in items:
            found[version] = {
                "calibrated": True,
                "estimate": live.estimate(),
                "gate_accuracy": live.calibration.accuracy,
                "answers_seen": live.seen,
                "alert": live.alert(),
            }
        return found
