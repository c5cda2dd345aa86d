"""The tiny training config: seconds of training on a few hundred images.

For tests and benchmark smoke runs, which check plumbing and contracts, not accuracy; it is no
preset of the product (`captchaops train --preset` names only the shipped ones).
"""

from __future__ import annotations

from captchaops.model.crnn import Architecture
from captchaops.training.config import TrainConfig


def tiny_config() -> TrainConfig:
    """Seconds of training on 300 generated images with a small network: for tests, not accuracy."""
    return TrainConfig(
        synthetic=300,
        epochs=2,
        batch_size=32,
        max_minutes=2.0,
        workers=1,
        arch=Architecture(height=24, width=72, filters=(8, 16, 16, 16), rnn_units=16),
    )
