"""A live accuracy estimate without labels: Average Thresholded Confidence (ATC).

At promotion, a version's confidences on the frozen evaluation set give a threshold `t` such
that the share of confidences above `t` equals the version's accuracy there. On live traffic
the share of recent confidences above `t` then estimates the accuracy (Garg et al., "Leveraging
Unlabeled Data to Predict Out-of-Distribution Performance", ICLR 2022). Unlike averaging
calibrated probabilities, it stays close when the inputs shift, because it only needs the
ranking of confidences to hold, not their values.

Pure Python and NumPy, so the model servers can keep one per served version.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

THRESHOLD_TAG = "live_threshold"
ACCURACY_TAG = "calibrated_accuracy"
SIZE_TAG = "calibration_images"


class EstimateError(ValueError):
    """Calibration data that cannot give a threshold (the message says why)."""


@dataclass(frozen=True)
class Calibration:
    """The confidence threshold of one version, fitted on its frozen evaluation set."""

    threshold: float
    accuracy: float
    size: int

    @classmethod
    def fit(cls, confidences: Iterable[float], correct: Iterable[bool]) -> Calibration:
        """The threshold above which the share of confidences equals the accuracy."""
        conf = np.asarray(list(confidences), dtype=np.float64)
        right = np.asarray(list(correct), dtype=bool)
        if conf.size == 0 or conf.size != right.size:
            raise EstimateError(
                f"need one correctness flag per confidence, got {conf.size} and {right.size}"
            )
        if not np.all((conf >= 0) & (conf <= 1)):
            raise EstimateError("confidences must lie in [0, 1]")
        accuracy = float(right.mean())
        if accuracy >= 1.0:
            threshold = float(np.nextafter(conf.min(), -np.inf))  # everything counts
        elif accuracy <= 0.0:
            threshold = 1.0  # nothing counts
        else:
            ranked = np.sort(conf)
            cut = round((1.0 - accuracy) * conf.size)  # this many fall at or below t
            threshold = float(ranked[max(cut - 1, 0)])
        return cls(threshold=threshold, accuracy=accuracy, size=int(conf.size))

    def estimate(self, confidences: Iterable[float]) -> float:
        """Estimated sequence accuracy of a batch of predictions."""
        conf = np.asarray(list(confidences), dtype=np.float64)
        return float((conf > self.threshold).mean()) if conf.size else float("nan")

    def tags(self) -> dict[str, str]:
        """As registered-model version tags."""
        return {
            THRESHOLD_TAG: repr(self.threshold),
            ACCURACY_TAG: f"{self.accuracy:.6f}",
            SIZE_TAG: str(self.size),
        }

    @classmethod
    def from_tags(cls, tags: Mapping[str, str]) -> Calibration | None:
        """The calibration stored on a version, or None if it has none (or it is malformed)."""
        try:
            threshold = float(tags[THRESHOLD_TAG])
            accuracy = float(tags[ACCURACY_TAG])
            size = int(tags.get(SIZE_TAG, "0"))
        except (KeyError, ValueError):
            return None
        if not (0.0 <= accuracy <= 1.0 and -1.0 <= threshold <= 1.0):
            return None
        return cls(threshold=threshold, accuracy=accuracy, size=size)


class LiveEstimate:
    """The estimate over the last `window` predictions of one version, and its alert.

    Thread-safe; `add` is O(1), so it can sit on a server's response path.
    """

    def __init__(
        self,
        calibration: Calibration,
        *,
        window: int = 200,
        min_count: int = 50,
        alert_points: float = 10.0,
    ):
        if not 1 <= min_count <= window:
            raise EstimateError(f"need 1 <= min_count <= window, got {min_count} and {window}")
        self.calibration = calibration
        self.min_count, self.alert_points = min_count, alert_points
        self._above: deque[bool] = deque(maxlen=window)
        self._count_above = 0
        self._lock = threading.Lock()
        self.seen = 0

    def add(self, confidence: float) -> None:
        above = confidence > self.calibration.threshold
        with self._lock:
            if len(self._above) == self._above.maxlen:
                self._count_above -= self._above[0]
            self._above.append(above)
            self._count_above += above
            self.seen += 1

    def estimate(self) -> float | None:
        """Estimated accuracy over the window; None until `min_count` predictions were seen."""
        with self._lock:
            n = len(self._above)
            return self._count_above / n if n >= self.min_count else None

    def alert(self) -> str | None:
        """One line when the estimate is more than `alert_points` below the gate's accuracy."""
        value = self.estimate()
        gate = self.calibration.accuracy
        if value is None or value >= gate - self.alert_points / 100:
            return None
        return (
            f"estimated accuracy {value:.1%} over the last {len(self._above)} predictions is "
            f"{(gate - value) * 100:.1f} points below the {gate:.1%} measured at promotion"
        )
