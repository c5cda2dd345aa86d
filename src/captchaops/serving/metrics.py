"""Prometheus metrics of one model server, kept in a registry of its own."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["CONTENT_TYPE", "ServingMetrics"]

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServingMetrics:
    """Counters, histograms and gauges a model server exposes on `/metrics`."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
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
        self.poll_errors = Counter(
            "captchaops_poll_errors",
            "Failed checks of the alias against the tracking server.",
            registry=self.registry,
        )
        for result in ("success", "failure"):
            self.reloads.labels(result)

    def render(self) -> bytes:
        """The metrics in the Prometheus text format."""
        return generate_latest(self.registry)
