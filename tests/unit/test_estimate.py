"""The live accuracy estimate: ATC threshold, sliding window and alert."""

from __future__ import annotations

import numpy as np
import pytest

from captchaops.live.estimate import Calibration, EstimateError, LiveEstimate


def _stream(rng: np.random.Generator, n: int, accuracy: float) -> tuple[np.ndarray, np.ndarray]:
    """Confidences that separate right from wrong answers, as a CTC reader's mostly do."""
    correct = rng.random(n) < accuracy
    conf = np.where(correct, rng.beta(20, 1, n), rng.beta(1, 5, n))
    return conf, correct


def test_the_threshold_reproduces_the_calibration_accuracy() -> None:
    conf, correct = _stream(np.random.default_rng(0), 2000, 0.93)
    calibration = Calibration.fit(conf, correct)
    assert calibration.estimate(conf) == pytest.approx(correct.mean(), abs=1e-3)
    assert calibration.size == 2000


def test_the_estimate_follows_the_true_accuracy_on_fresh_streams() -> None:
    rng = np.random.default_rng(1)
    calibration = Calibration.fit(*_stream(rng, 2000, 0.95))
    for accuracy in (0.95, 0.8, 0.5):
        conf, correct = _stream(rng, 4000, accuracy)
        assert calibration.estimate(conf) == pytest.approx(correct.mean(), abs=0.03)


def test_tags_round_trip_and_malformed_tags_give_none() -> None:
    calibration = Calibration.fit([0.2, 0.6, 0.9, 0.95], [False, True, True, True])
    assert Calibration.from_tags(calibration.tags()) == calibration
    assert Calibration.from_tags({}) is None
    assert Calibration.from_tags({"live_threshold": "x", "calibrated_accuracy": "0.9"}) is None
    assert Calibration.from_tags({"live_threshold": "0.5", "calibrated_accuracy": "7"}) is None


def test_perfect_and_hopeless_calibration_sets() -> None:
    assert Calibration.fit([0.3, 0.9], [True, True]).estimate([0.3, 0.9]) == 1.0
    assert Calibration.fit([0.3, 0.9], [False, False]).estimate([0.3, 0.99]) == 0.0
    with pytest.raises(EstimateError):
        Calibration.fit([0.3], [True, False])
    with pytest.raises(EstimateError):
        Calibration.fit([1.5], [True])


def test_the_window_forgets_and_the_alert_fires_when_the_estimate_falls() -> None:
    calibration = Calibration(threshold=0.5, accuracy=0.95, size=1000)
    live = LiveEstimate(calibration, window=100, min_count=20, alert_points=10)
    for _ in range(19):
        live.add(0.9)
    assert live.estimate() is None and live.alert() is None  # too few to say
    live.add(0.9)
    assert live.estimate() == 1.0 and live.alert() is None
    for _ in range(100):
        live.add(0.1)  # another style: nothing confident
    assert live.estimate() == 0.0
    alert = live.alert()
    assert alert is not None and "95.0 points below the 95.0%" in alert
    assert live.seen == 120
