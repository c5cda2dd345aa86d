"""Every training default in one place (MLflow-free, so the loop runs where MLflow is not installed)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from captchaops.model.crnn import Architecture
from captchaops.training import TrainError


@dataclass(frozen=True)
class TrainConfig:
    """Every training default in one place; the final values are logged with the run."""

    data_dir: Path | None = None  # a folder of <label>.png files; None = synthetic data
    synthetic: int = 30_000  # how many CAPTCHAs to generate when data_dir is None
    alphabet: str | None = None  # None: digits + uppercase for synthetic, derived for folders
    length: tuple[int, int] = (4, 4)  # synthetic label length range
    epochs: int = 40  # an upper bound: the time budget usually ends training first
    batch_size: int = 32
    max_minutes: float = 4.6  # hard budget from the start of train() to the end of fitting
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    seed: int = 0
    include_feedback: bool = False
    learning_rate: float = 2.5e-3  # AdamW peak of a warmup + cosine schedule
    weight_decay: float = 1e-4
    clipnorm: float | None = 1.0  # clip each gradient's norm (tames CTC loss spikes)
    warmup_fraction: float = 0.05
    max_steps: int | None = None  # optimiser steps the schedule plans for; None: epochs x batches
    min_steps: int = 1500  # never stop early before this many steps (or 20 epochs, if more)...
    patience_steps: int = 3000  # ...then stop after this many without a better val loss/CER/acc
    ema_momentum: float | None = None  # average the weights (EMA); kept when it validates as well
    holdout_fraction: float = 0.2  # folders: share frozen as the scheme's evaluation set
    fit_geometry: bool = True  # folders: input width from the images' aspect ratio
    augment: bool | None = None  # None: on for folders (small real sets), off for synthetic
    workers: int = 2  # processes generating synthetic data
    fresh: bool = True  # synthetic: draw new images while training (False: one fixed set first)
    reuse: float = 3.0  # fresh: each generated training image is used this often on average
    fill_steps: int | None = None  # fresh: draw one pool (no more), all of it in by this step
    draw_niceness: int = 0  # fresh: the drawing workers' `nice` increment (0: as the steps)
    steps_per_execution: int = 1  # optimiser steps per call into the compiled step (one host sync)
    draw_share: float = 0.5  # fixed generated set: drawing stops at this share of max_minutes
    arch: Architecture = field(default_factory=Architecture)

    @classmethod
    def demo(cls) -> TrainConfig:
        """The demo preset: 4-character CAPTCHAs in 5 minutes on 2 cores (docs/training.md).

        One pool of 24,064 training images, drawn beside the first 800 steps (`fill_steps`)
        instead of before the first step: idle, three runs read 95.15-95.60% (median 95.50%)
        of 2,000 held-out CAPTCHAs with the first step after 8.8-10.6 s
        (docs/results.md#demo-2026-12-04), against 94.25/94.80% and 54 s for the set drawn first.
        """
        return cls(fresh=True, fill_steps=800)

    @classmethod
    def folder(cls) -> TrainConfig:
        """The preset for a team's folder of about 1,000 real CAPTCHAs: at most 10 min on 2 cores.

        CTC first sits on a plateau where every prediction is blank (0% exact matches for
        hundreds of steps while the loss and CER still move), so stopping waits for a minimum
        number of steps and then follows validation loss and CER as well as accuracy. The
        schedule is planned in steps (about 170 epochs of 750 images); the time budget is a cap.
        """
        return cls(
            epochs=1000,
            max_steps=4000,
            patience_steps=2500,
            ema_momentum=0.99,
            max_minutes=9.5,
            learning_rate=2e-3,
            val_fraction=0.1,
            test_fraction=0.0,
        )

    @classmethod
    def accuracy(cls) -> TrainConfig:
        """The long preset: an hour on 2 cores, 160k images and a 1.5x wider network."""
        return cls(
            synthetic=160_000,
            epochs=60,
            max_minutes=60.0,
            learning_rate=2e-3,
            patience_steps=40_000,
            val_fraction=0.02,
            test_fraction=0.02,
            arch=Architecture(height=32, width=88, filters=(32, 48, 64, 96), rnn_units=96),
        )

    @classmethod
    def gpu(cls) -> TrainConfig:
        """One H100/H200-class GPU for at most 10 minutes: a pool of 400k fresh images, batch 256,
        a 2x wider network and weight averaging (`benchmarks/bench_gpu.py`, docs/training.md)."""
        return cls(
            synthetic=400_000,
            epochs=200,
            batch_size=256,
            max_minutes=8.0,
            learning_rate=3e-3,
            patience_steps=1_000_000,
            ema_momentum=0.999,
            val_fraction=0.01,
            test_fraction=0.005,
            workers=15,
            reuse=16.0,  # 15 processes drew 2,800 images/s on an H200 machine (docs/training.md)
            steps_per_execution=32,  # the host waits for the device once a call: with one step
            # a call, steps took 11.4 ms against 4.0 ms for the device alone (8.7 ms with 32)
            arch=Architecture(height=32, width=88, filters=(32, 64, 96, 128), rnn_units=128),
        )

    def params(self) -> dict[str, object]:
        """Flat parameters for MLflow."""
        values = {k: v for k, v in asdict(self).items() if k != "arch"}
        return values | self.arch.params()


PRESETS = ("demo", "folder", "accuracy", "gpu")  # what `--preset` names


def from_options(preset: str | None, data: str | Path | None, **overrides: Any) -> TrainConfig:
    """The config `train`, `cv`, `tune` and `train --members` run: the preset named, else the
    folder preset for a folder of images (`data`) and the demo preset otherwise, with the
    command's options that are not None; a one-line TrainError naming the presets for a name
    that is none of them."""
    chosen = preset or ("folder" if data is not None else "demo")
    if chosen not in PRESETS:
        raise TrainError(f"--preset {preset!r} is not a preset; use one of {', '.join(PRESETS)}")
    made: TrainConfig = getattr(TrainConfig, chosen)()
    return with_overrides(made, data_dir=Path(data) if data else None, **overrides)


def with_overrides(config: TrainConfig, **overrides: Any) -> TrainConfig:
    """A copy of `config` with the non-None overrides applied."""
    return replace(config, **{k: v for k, v in overrides.items() if v is not None})
