"""Prometheus metrics of one model server, kept in a registry of its own.

Besides the serving figures the registry holds the process's own (`process_resident_memory_bytes`,
`process_cpu_seconds_total`, open files, start time) and `captchaops_server_info`, always 1,
whose labels name the server: model, alias, replica and the version it serves. Queries join it
to label any series by them (`* on(instance) group_left(model, alias, replica, version)`), as
Prometheus' info metrics do, so every series keeps the labels it always had.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)

if TYPE_CHECKING:
    from captchaops.serving.live_estimate import LiveQuality

__all__ = ["CONTENT_TYPE", "SWAP_CAUSES", "ServingMetrics"]

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
CONFIDENCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.999, 1.0)
LENGTH_BUCKETS = (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 16, 24, 32)
DIFFERENCE_BUCKETS = (-0.5, -0.2, -0.1, -0.05, -0.02, -0.005, 0.005, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
SWAP_CAUSES = ("startup", "poll", "webhook", "last_known_good", "deleted_alias")
"""Why a server changed the model it serves; each starts at 0 so dashboards see every cause."""


class ServingMetrics:
    """Counters, histograms and gauges a model server exposes on `/metrics`."""

    def __init__(self, *, model: str = "", alias: str = "", replica: str | None = None) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        self.server_info = Gauge(
            "captchaops_server_info",
            "Always 1: the server's model, alias, replica id and the version it serves now.",
            ["model", "alias", "replica", "version"],
            registry=self.registry,
        )
        self._identity = (model, alias, replica or "")
        self._served = "none"
        self._info_lock = threading.Lock()
        self.shadow_difference_sums: dict[tuple[str, str], float] = {}
        """(this version, shadow version) -> sum of shadow-minus-own confidences so far."""
        self._sums_lock = threading.Lock()
        self.requests = Counter(
            "captchaops_requests",
            "Answered /invocations requests, by HTTP status.",
            ["status"],
            registry=self.registry,
        )
        self.errors = Counter(
            "captchaops_errors",
            "Refused or failed /invocations requests, by error code.",
            ["error"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "captchaops_request_latency_seconds",
            "Time to answer /invocations, from first byte read to response built.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "captchaops_batch_size",
            "Images per model call after micro-batching.",
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.images = Counter("captchaops_images", "Images predicted.", registry=self.registry)
        self.pending_images = Gauge(
            "captchaops_pending_images",
            "Images waiting for a model call, as of the last answered request.",
            registry=self.registry,
        )
        self.held_bytes = Gauge(
            "captchaops_held_body_bytes",
            "Large request-body bytes held (read, parsed or waiting), as of the last answer.",
            registry=self.registry,
        )
        self.abandoned = Counter(
            "captchaops_abandoned_requests",
            "Requests whose client left before the answer; their remaining images were dropped.",
            registry=self.registry,
        )
        self.model_version = Gauge(
            "captchaops_model_version",
            "Registered model version being served (0 while none is loaded).",
            registry=self.registry,
        )
        self.reloads = Counter(
            "captchaops_reloads",
            "Attempts to load a version the alias points to, by result.",
            ["result"],
            registry=self.registry,
        )
        self.reload_failing = Gauge(
            "captchaops_reload_failing",
            "1 while the alias points to a version that failed to load or warm up.",
            registry=self.registry,
        )
        self.unaudited = Gauge(
            "captchaops_unaudited_alias",
            "1 while the alias holds a version no audited move put there (moved around the CLI).",
            registry=self.registry,
        )
        self.poll_errors = Counter(
            "captchaops_poll_errors",
            "Failed checks of the alias against the tracking server.",
            registry=self.registry,
        )
        self.queue_time = Histogram(
            "captchaops_queue_seconds",
            "Time a request's images waited in the batch queue before their first model call.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.compute_time = Histogram(
            "captchaops_compute_seconds",
            "Time one model call took (preprocessing, the network and decoding of a batch).",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "captchaops_in_flight_requests",
            "/invocations requests being served now (reading, parsing, queued or predicting).",
            registry=self.registry,
        )
        self.confidence = Histogram(
            "captchaops_prediction_confidence",
            "Confidence of each answered image, by the version that predicted it.",
            ["version"],
            buckets=CONFIDENCE_BUCKETS,
            registry=self.registry,
        )
        self.text_length = Histogram(
            "captchaops_prediction_length_characters",
            "Characters in each answered image's text, by the version that predicted it.",
            ["version"],
            buckets=LENGTH_BUCKETS,
            registry=self.registry,
        )
        self.swaps = Counter(
            "captchaops_swaps",
            "Changes of the served model (a first load counts), by cause.",
            ["cause"],
            registry=self.registry,
        )
        pair = ["production_version", "staging_version"]
        self.shadow_requests = Counter(
            "captchaops_shadow_requests",
            "Answered requests offered to the shadow server, by outcome: agree or disagree (every "
            "image's text the same, or not), refused (it answered 503), error, dropped (queue "
            "full), skipped (over the copies-per-second budget).",
            [*pair, "result"],
            registry=self.registry,
        )
        self.shadow_confidence_diff = Histogram(
            "captchaops_shadow_confidence_difference",
            "Shadow confidence minus this server's confidence, per image of an answered copy.",
            pair,
            buckets=DIFFERENCE_BUCKETS,
            registry=self.registry,
        )
        self.shadow_latency = Histogram(
            "captchaops_shadow_latency_seconds",
            "Time the shadow server took to answer a copy (sending to answer read).",
            pair,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.shadow_queued = Gauge(
            "captchaops_shadow_queued_requests",
            "Copies waiting to be sent to the shadow server.",
            registry=self.registry,
        )
        self.review_offers = Counter(
            "captchaops_review_offers",
            "Low-confidence answers offered to the web app's review queue, by outcome: queued, "
            "rate_limited, dropped (queue full), accepted, declined (the app's caps or a "
            "duplicate), error.",
            ["result"],
            registry=self.registry,
        )
        for result in ("success", "failure"):
            self.reloads.labels(result)
        for cause in SWAP_CAUSES:
            self.swaps.labels(cause)

        self._show_info()

    quality: LiveQuality | None = None  # the live accuracy estimate, when the server has one

    @property
    def replica(self) -> str | None:
        """The replica id this server reports under; None until it is named."""
        return self._identity[2] or None

    def identify(self, model: str, alias: str, replica: str | None) -> None:
        """Name the server in `captchaops_server_info` (and the replica its monitor reports)."""
        self._identity = (model, alias, replica or "")
        self._show_info()

    def _show_info(self) -> None:
        with self._info_lock:
            self.server_info.clear()
            self.server_info.labels(*self._identity, self._served).set(1)

    def record_shadow_differences(self, version: str, other: str, differences: list[float]) -> None:
        """Observe shadow-minus-own confidences of one compared copy, and keep their sum (the
        histogram has negative buckets, so Prometheus exports no `_sum` for it)."""
        histogram = self.shadow_confidence_diff.labels(version, other)
        for difference in differences:
            histogram.observe(difference)
        with self._sums_lock:
            key = (version, other)
            self.shadow_difference_sums[key] = self.shadow_difference_sums.get(key, 0.0) + sum(
                differences
            )

    def shadow_sums(self) -> dict[tuple[str, str], float]:
        """A copy of `shadow_difference_sums`, taken under its lock."""
        with self._sums_lock:
            return dict(self.shadow_difference_sums)

    def record_swap(self, cause: str, version: str | None = None) -> None:
        """Count one change of the served model; `cause` is one of SWAP_CAUSES. With the new
        `version`, its live estimate reads the calibration now, so `/health` shows the gate
        accuracy from the start and the first answers count."""
        self.swaps.labels(cause).inc()
        if version is not None:
            self._served = version
            self._show_info()
        if version is not None and self.quality is not None:
            self.quality.observe(version, ())

    def record_predictions(self, version: str, predictions: list[dict[str, Any]]) -> None:
        """Observe the confidence and text length of each answered image of `version`."""
        confidence = self.confidence.labels(version)
        length = self.text_length.labels(version)
        for prediction in predictions:
            confidence.observe(float(prediction["confidence"]))
            length.observe(len(prediction["text"]))
        if self.quality is not None:
            self.quality.observe(version, (float(p["confidence"]) for p in predictions))

    def render(self) -> bytes:
        """The metrics in the Prometheus text format."""
        return generate_latest(self.registry)
