"""The network's input: its geometry for a data set, and the arrays for chosen images.

MLflow-free and apart from the loop, so the stage that prepares data (`training.prepare`,
scale-out's drivers and workers) shapes the input without importing the stage that fits it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from captchaops.data.dataset import DataError, LabelledImages
from captchaops.model.crnn import Architecture
from captchaops.model.preprocess import image_size, preprocess
from captchaops.training.config import TrainConfig


def geometry(config: TrainConfig, data: LabelledImages | None, max_length: int) -> Architecture:
    """The network's input: a folder's width follows its images' aspect ratio; CTC needs
    at least 2 x length + 1 time steps (4 input columns each)."""
    arch = config.arch
    if data is not None and config.data_dir is not None and config.fit_geometry:
        sizes = [image_size(image) for image in data.images[:: max(1, len(data) // 200)]]
        aspect = float(np.median([w / h for w, h in sizes]))
        arch = replace(arch, width=int(np.clip(round(arch.height * aspect / 4) * 4, 16, 256)))
    needed = 4 * (2 * max_length + 1)
    if arch.width < needed:
        arch = replace(arch, width=needed)
    if arch.width > 512:
        raise DataError(
            f"labels of {max_length} characters need an input {arch.width} px wide; use labels "
            "of at most 60 characters"
        )
    return arch


def arrays(data: LabelledImages, idx: Sequence[int], arch: Architecture) -> np.ndarray:
    """The network's input for the images at `idx` (arrays made by the generator are reused)."""
    out = np.empty((len(idx), arch.height, arch.width, 1), dtype=np.float32)
    for row, i in enumerate(idx):
        ready = data.arrays[i] if data.arrays is not None else None
        fits = ready is not None and ready.shape == out.shape[1:]
        out[row] = ready if fits else preprocess(data.images[i], arch.height, arch.width)
    return out
