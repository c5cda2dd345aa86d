"""The canary breaker's verdicts, the routing share and the latency window (pure logic), and the
production server's canary slot deciding where requests go (its watchers hold versions set by
hand; no thread, server or registry runs)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from captchaops.canary.breaker import Evidence, Latencies, Limits, Share, verdict
from captchaops.canary.slot import Canary, CanaryWatcher, parse_percent
from captchaops.serving.loader import Timeouts, VersionLoader
from captchaops.serving.metrics import ServingMetrics
from captchaops.serving.watcher import AliasWatcher, ServedModel
from captchaops.tracking_rest import TrackingRest

LIMITS = Limits(min_answers=100, drop_points=10.0, p99_ratio=2.0, p99_slack_ms=50.0)


def evidence(**changes: object) -> Evidence:
    """A healthy canary with 200 answers; `changes` make it less so."""
    values: dict[str, object] = {
        "answers": 200,
        "estimate": 0.90,
        "gate_accuracy": 0.92,
        "production_estimate": 0.91,
        "p99_ms": 20.0,
        "production_p99_ms": 18.0,
    }
    return Evidence(**(values | changes))  # type: ignore[arg-type]


def test_a_healthy_canary_goes_on() -> None:
    assert verdict(evidence(), LIMITS) is None


def test_nothing_is_judged_before_the_minimum_answers() -> None:
    assert verdict(evidence(answers=99, estimate=0.0, p99_ms=10_000.0), LIMITS) is None
    assert verdict(evidence(answers=100, estimate=0.0), LIMITS) is not None


def test_an_estimate_below_the_gate_accuracy_trips() -> None:
    reason = verdict(evidence(estimate=0.80, production_estimate=None), LIMITS)
    assert reason == ("live estimate 80.0% is 12.0 points below its gate accuracy 92.0% (limit 10)")
    assert verdict(evidence(estimate=0.83, production_estimate=None), LIMITS) is None


def test_an_estimate_below_production_trips_even_above_its_own_gate() -> None:
    reason = verdict(evidence(estimate=0.70, gate_accuracy=0.72, production_estimate=0.95), LIMITS)
    assert reason is not None and "25.0 points below production's 95.0%" in reason


def test_a_slow_canary_trips_on_p99() -> None:
    reason = verdict(evidence(p99_ms=90.0, production_p99_ms=18.0), LIMITS)
    assert reason == "p99 90.0 ms is over 86.0 ms (production's 18.0 ms x 2 + 50 ms)"
    assert verdict(evidence(p99_ms=85.0, production_p99_ms=18.0), LIMITS) is None


def test_missing_numbers_never_trip() -> None:
    blank = evidence(estimate=None, gate_accuracy=None, production_estimate=None, p99_ms=None)
    assert verdict(blank, LIMITS) is None
    assert verdict(evidence(production_p99_ms=None, p99_ms=1e6), LIMITS) is None


@pytest.mark.parametrize("percent", [1, 5, 10, 25, 33, 50])
def test_the_share_is_exact_over_any_hundred_requests(percent: int) -> None:
    share = Share()
    taken = [share.take(percent) for _ in range(1000)]
    assert sum(taken) == 10 * percent
    for start in range(0, 900, 37):
        assert abs(sum(taken[start : start + 100]) - percent) <= 1


def test_latencies_give_a_p99_in_milliseconds() -> None:
    window = Latencies(size=100)
    assert window.p99_ms() is None
    for i in range(200):
        window.add(0.001 if i % 100 else 1.0)
    p99 = window.p99_ms()
    assert p99 is not None and 1.0 < p99 <= 1000.0
    window.clear()
    assert window.p99_ms() is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [("10", 10), ("1", 1), ("50", 50), ("0", None), ("51", None), ("-5", None), ("x", None)],
)
def test_only_a_share_of_1_to_50_percent_is_routed(text: str, expected: int | None) -> None:
    assert parse_percent(text) == expected
    assert parse_percent(None) is None


class Blank:
    """A stand-in for a loaded version: the routing logic never runs it."""

    meta: dict[str, Any] = {}

    def predict_images(self, images: list[bytes]) -> list[dict[str, Any]]:
        raise AssertionError("routing must not predict")


def served(alias: str, version: str) -> ServedModel:
    return ServedModel("m", alias, version, "run", "now", 0.0, Blank())


@pytest.fixture()
def slot(tmp_path: Path) -> Canary:
    """A canary slot whose watchers hold production v1 and canary v2 at 20% (no threads run)."""
    rest = TrackingRest("http://127.0.0.1:9", timeout=1.0)

    def watcher(kind: type[AliasWatcher], alias: str) -> Any:
        loader = VersionLoader(rest, tmp_path / alias, Timeouts())
        return kind(rest, "m", alias, 1.0, ServingMetrics(), loader)

    production: AliasWatcher = watcher(AliasWatcher, "production")
    canary: CanaryWatcher = watcher(CanaryWatcher, "canary")
    production.current = served("production", "1")
    canary.current, canary.target_version, canary.percent = served("canary", "2"), "2", 20
    limits = Limits(min_answers=5, drop_points=10.0, p99_ratio=2.0, p99_slack_ms=50.0)
    return Canary(canary, production, None, limits, CollectorRegistry())


def test_the_slot_routes_its_share_and_trips_on_p99(slot: Canary) -> None:
    picked = [slot.pick() for _ in range(100)]
    assert sum(p is not None for p in picked) == 20
    assert {p.version for p in picked if p is not None} == {"2"}
    for _ in range(50):
        slot.observe("1", 0.010)
    for _ in range(4):
        slot.observe("2", 0.500)
    assert (slot.health() or {})["state"] == "routing"  # 4 answers: not judged yet
    slot.observe("2", 0.500)
    block = slot.health()
    assert block is not None and block["state"] == "tripped" and block["answers"] == 5
    assert str(block["reason"]).startswith("p99 500.0 ms is over 70.0 ms")
    assert all(slot.pick() is None for _ in range(100))


def test_a_failing_canary_trips_at_once_and_a_new_version_starts_afresh(slot: Canary) -> None:
    slot.failed("2", RuntimeError("boom\nsecond line"))
    block = slot.health()
    assert block is not None and block["state"] == "tripped"
    assert block["reason"] == "prediction failed: RuntimeError: boom second line"
    slot.watcher.current, slot.watcher.target_version = served("canary", "3"), "3"
    block = slot.health()
    assert block is not None and (block["version"], block["state"], block["answers"]) == (
        "3",
        "routing",
        0,
    )
    assert sum(slot.pick() is not None for _ in range(100)) == 20


def test_the_slot_waits_without_a_share_or_when_the_canary_is_production(slot: Canary) -> None:
    slot.watcher.percent = None
    block = slot.health()
    assert block is not None and block["state"] == "waiting"
    assert "carries no canary_percent tag of 1-50" in str(block["reason"])
    assert slot.pick() is None
    slot.watcher.percent = 20
    slot.production.current = served("production", "2")
    block = slot.health()
    assert block is not None and block["reason"] == "version 2 is @production already"
    slot.watcher.current, slot.watcher.target_version = None, None
    assert slot.health() is None and slot.pick() is None


def test_the_slot_imports_first_in_a_fresh_process() -> None:
    """`canary/slot.py` imports serving's modules, and serving's app imports the slot: either may
    be the first import of a process (a test, a tool) without a circular-import error."""
    for module in ("captchaops.canary.slot", "captchaops.serving"):
        done = subprocess.run(
            [
                sys.executable,
                "-c",
                f"import {module}, captchaops.canary.slot as s; print(s.Canary)",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stderr[-2000:]
