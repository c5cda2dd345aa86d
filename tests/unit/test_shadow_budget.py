"""The shadow's copy budget and queue bounds, without a network: what is skipped, dropped, queued."""

from __future__ import annotations

import asyncio

from prometheus_client.parser import text_string_to_metric_families

from captchaops.serving.metrics import ServingMetrics
from captchaops.serving.shadow import Copy, Shadow


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def outcomes(metrics: ServingMetrics) -> dict[str, float]:
    return {
        sample.labels["result"]: sample.value
        for family in text_string_to_metric_families(metrics.render().decode())
        for sample in family.samples
        if sample.name == "captchaops_shadow_requests_total"
    }


def offer(shadow: Shadow, count: int, size: int = 10) -> None:
    async def run() -> None:
        for _ in range(count):
            await shadow.offer(Copy(b"x" * size, "application/json", "3", []))

    asyncio.run(run())


def test_copies_past_the_budget_are_skipped_and_the_budget_refills_with_time() -> None:
    clock = Clock()
    metrics = ServingMetrics()
    shadow = Shadow(
        "http://unused", metrics, queue_size=100, timeout_s=1, per_second=2, clock=clock
    )
    offer(shadow, 5)
    assert outcomes(metrics) == {"skipped": 3}
    clock.now += 1.0
    offer(shadow, 5)
    assert outcomes(metrics) == {"skipped": 6}
    assert shadow.held_bytes == 4 * 10


def test_copies_past_the_queue_or_its_bytes_are_dropped() -> None:
    metrics = ServingMetrics()
    shadow = Shadow("http://unused", metrics, queue_size=3, timeout_s=1, per_second=100)
    offer(shadow, 5)
    assert outcomes(metrics) == {"dropped": 2}
    roomy = Shadow(
        "http://unused", ServingMetrics(), queue_size=100, timeout_s=1, per_second=100, max_bytes=25
    )
    offer(roomy, 3)
    assert outcomes(roomy.metrics) == {"dropped": 1}
    assert roomy.held_bytes == 20


def test_the_request_path_admits_within_the_budget_and_queues_only_what_it_admitted() -> None:
    clock = Clock()
    metrics = ServingMetrics()
    shadow = Shadow(
        "http://unused", metrics, queue_size=100, timeout_s=1, per_second=2, clock=clock
    )
    admitted = [shadow.admit("3") for _ in range(5)]
    assert admitted == [True, True, False, False, False]
    assert outcomes(metrics) == {"skipped": 3}
    assert shadow.held_bytes == 0  # admitting spends budget, nothing is queued yet

    async def enqueue() -> None:
        await shadow.enqueue(Copy(b"x" * 10, "application/json", "3", []))

    asyncio.run(enqueue())
    assert shadow.held_bytes == 10 and outcomes(metrics) == {"skipped": 3}
