"""Reading the live estimates out of a model server's `/health` body."""

from __future__ import annotations

from typing import Any

from captchaops.console import live_lines
from captchaops.live.reported import from_health

HEALTH: dict[str, Any] = {
    "name": "text-captcha",
    "version": "7",
    "live_estimate": {
        "7": {"estimate": 0.61, "answers_seen": 200, "gate_accuracy": 0.951, "alert": "x"},
        "6": {"estimate": 0.9, "answers_seen": 10, "gate_accuracy": 0.9, "alert": None},
    },
    "canary": None,
}


def test_the_served_version_only_with_its_alert() -> None:
    (state,) = from_health("production", HEALTH)
    assert (state.alias, state.version, state.answers, state.alert) == ("production", "7", 200, "x")
    assert state.short() == "61.0%"
    lines = live_lines([state])
    assert [line.plain for line in lines] == [
        "live production v7: live estimate 61.0% over 200 answers; gate accuracy 95.1%",
        "ALERT production v7: x",
    ]
    assert lines[1].spans[0].style == "red" and lines[1].spans[0].end == len("ALERT")


def test_a_tripped_canary_is_listed_with_its_reason_as_the_alert() -> None:
    canary = {
        "version": "8",
        "percent": 10,
        "answers": 120,
        "estimate": 0.2,
        "gate_accuracy": 0.95,
        "state": "tripped",
        "reason": "live estimate 20.0% is 75.0 points below its gate accuracy",
    }
    production, state = from_health("production", HEALTH | {"canary": canary})
    assert production.version == "7"
    assert (state.alias, state.version, state.estimate, state.answers) == ("canary", "8", 0.2, 120)
    assert state.alert == f"canary tripped: {canary['reason']}"


def test_a_routing_canary_has_no_alert_and_one_still_loading_is_left_out() -> None:
    routing = {"version": "8", "answers": 3, "estimate": None, "gate_accuracy": 0.95}
    (_, state) = from_health("production", HEALTH | {"canary": routing | {"state": "routing"}})
    assert state.alert is None and state.short() == "..."
    loading = {"version": "8", "state": "waiting", "gate_accuracy": None}
    assert [s.alias for s in from_health("production", HEALTH | {"canary": loading})] == [
        "production"
    ]


def test_bodies_without_a_served_version_or_with_odd_values_give_nothing() -> None:
    assert from_health("staging", {"version": None}) == []
    assert from_health("staging", HEALTH | {"live_estimate": {"7": {"estimate": "high"}}}) == []
    no_version = from_health("production", HEALTH | {"canary": {"gate_accuracy": 0.9}})
    assert [s.alias for s in no_version] == ["production"]


def test_a_version_the_gate_never_scored_says_so_on_both_sides() -> None:
    import time

    from prometheus_client import CollectorRegistry

    from captchaops.live.reported import NO_CALIBRATION
    from captchaops.serving.live_estimate import LiveQuality

    quality = LiveQuality(lambda version: {}, CollectorRegistry())  # no calibration tags
    quality.observe("7", [0.9])
    deadline = time.monotonic() + 10
    while not quality.snapshot() and time.monotonic() < deadline:
        time.sleep(0.01)  # the tags are read in a thread of their own
    assert quality.snapshot() == {"7": {"calibrated": False}}
    (state,) = from_health("production", HEALTH | {"live_estimate": quality.snapshot()})
    assert not state.calibrated and state.short() == "none"
    assert [line.plain for line in live_lines([state])] == [f"live production v7: {NO_CALIBRATION}"]
