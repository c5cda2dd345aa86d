"""The monitor's arithmetic on exact numbers, and a tracking server that refuses its writes
(a real HTTP server answering as MLflow's basic-auth does for a READ-only account)."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from captchaops.serving.metrics import ServingMetrics
from captchaops.serving.monitoring_runs import Monitor, quantile, shadow_outcomes
from captchaops.tracking_rest import TrackingRest


def test_quantiles_interpolate_within_a_bucket_like_prometheus() -> None:
    buckets = {0.01: 0.0, 0.05: 50.0, 0.1: 90.0, 0.5: 100.0, float("inf"): 100.0}
    assert quantile(buckets, 0.5) == pytest.approx(0.05)
    assert quantile(buckets, 0.25) == pytest.approx(0.03)
    assert quantile(buckets, 0.99) == pytest.approx(0.46)
    assert quantile({0.1: 0.0, float("inf"): 4.0}, 0.5) == 0.1  # past the last finite bound
    assert quantile({0.1: 0.0, float("inf"): 0.0}, 0.5) is None


def test_shadow_outcomes_are_grouped_by_version_and_pair() -> None:
    metrics = ServingMetrics()
    for result, times in (("agree", 3), ("disagree", 1)):
        for _ in range(times):
            metrics.shadow_requests.labels("3", "4", result).inc()
    metrics.shadow_requests.labels("3", "unknown", "dropped").inc(2)
    metrics.record_shadow_differences("3", "4", [0.1, -0.3])
    metrics.shadow_latency.labels("3", "4").observe(0.02)
    (version,) = shadow_outcomes(metrics).items()
    assert version[0] == "3"
    pair = version[1].pairs["4"]
    assert (pair.agree, pair.disagree, version[1].dropped) == (3, 1, 2)
    assert pair.diff_sum / pair.diff_count == pytest.approx(-0.1)
    assert quantile(pair.latency, 0.5) == pytest.approx(0.0175)


@pytest.fixture()
def read_only() -> Iterator[tuple[str, list[str]]]:
    """A tracking server that refuses every call with 403 PERMISSION_DENIED."""
    calls: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def answer(self) -> None:
            calls.append(self.path)
            data = json.dumps(
                {"error_code": "PERMISSION_DENIED", "message": "Permission denied"}
            ).encode()
            self.send_response(403)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = answer

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", calls
    finally:
        server.shutdown()
        server.server_close()


def test_without_write_rights_one_line_and_no_more_tries(
    read_only: tuple[str, list[str]], caplog: pytest.LogCaptureFixture
) -> None:
    url, calls = read_only
    metrics = ServingMetrics()
    metrics.shadow_requests.labels("3", "4", "agree").inc()
    monitor = Monitor(TrackingRest(url, timeout=2.0), "text-captcha", "production", metrics, 30)
    with caplog.at_level(logging.INFO, logger="captchaops.serving.monitoring_runs"):
        monitor.flush()
        metrics.shadow_requests.labels("3", "4", "agree").inc()
        monitor.flush()
        monitor.stop()
    assert not monitor.enabled and len(calls) == 1
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith("monitoring runs are off: this server's account may not write")
    assert "PERMISSION_DENIED" in line and "text-captcha-monitoring" in line
