"""Summing replicas: answers add up, estimates weigh by the answers they rest on, and the canary
watch trips on the sum that no single replica's breaker sees."""

from __future__ import annotations

import pytest

from captchaops.canary.watch import summed_trip
from captchaops.evaluation.evidence import weighted_mean
from captchaops.live import monitoring as names
from captchaops.live.reported import LiveState, ReplicaSum, _summed
from captchaops.settings import Settings


def test_replica_runs_add_answers_and_weigh_estimates() -> None:
    runs = [
        {names.LIVE_ANSWERS: 100.0, names.LIVE_ESTIMATE: 0.9},
        {names.LIVE_ANSWERS: 300.0, names.LIVE_ESTIMATE: 0.5},
        {names.LIVE_ANSWERS: 20.0},  # too few answers for an estimate of its own
    ]
    total = _summed(runs)
    assert (total.answers, total.replicas) == (420, 3)
    assert total.estimate == pytest.approx((100 * 0.9 + 300 * 0.5) / 400)
    assert _summed([{names.LIVE_ANSWERS: 5.0}]).estimate is None
    assert weighted_mean([(0.8, 0.0), (0.6, 0.0)]) == pytest.approx(0.7)
    assert weighted_mean([]) is None


def test_a_state_names_the_replicas_it_sums() -> None:
    state = LiveState("production", "m", "3", 0.915, 600, 0.95, None, replicas=3)
    assert (
        state.line() == "live estimate 91.5% over 600 answers from 3 replicas; gate accuracy 95.0%"
    )


def test_the_canary_trips_on_the_replicas_sum_once_it_has_enough_answers() -> None:
    settings = Settings(canary_min_answers=100, canary_drop_points=10.0)
    block = {"gate_accuracy": 0.95}
    # Three replicas with 40 answers each: none judges alone (100 needed), the sum does.
    low = ReplicaSum(answers=120, estimate=0.80, replicas=3)
    why = summed_trip(settings, block, low)
    assert why is not None and "80.0% over 120 answers from 3 replicas" in why
    assert summed_trip(settings, block, ReplicaSum(120, 0.90, 3)) is None  # within 10 points
    assert summed_trip(settings, block, ReplicaSum(90, 0.10, 3)) is None  # too few answers
    assert summed_trip(settings, {}, low) is None  # no gate accuracy to compare with
