"""The learning-rate schedule in optimiser steps, and how many steps fit in the time budget.

The schedule (linear warm-up, then cosine decay to 1/1000 of the peak) is a Keras
`LearningRateSchedule`, so it is computed inside the compiled training step: no per-step
callback writes to the optimiser. Its length is a variable, set from a short measurement of
the step time at the start and corrected at epoch ends when the machine turns out slower or
faster, so a slower machine runs fewer steps of the same complete schedule instead of a
schedule cut off by the deadline. The deadline stays a hard cap.

A correction stretches or shrinks what is left of the schedule from the step where it is made
(`WarmupCosine.replan`), so the learning rate never jumps: changing only the length would move
every past step's place on the curve, and a longer plan made after a slow start (the first
steps beside workers that draw the training images) would raise the learning rate half-way
through training, where it undid what the run had learnt (docs/training.md).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import keras


class WarmupCosine(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up over `warmup_fraction` of the planned steps, then cosine decay.

    The curve is a function of progress, 0 at the first step and 1 at the planned end. Progress
    moves linearly from (`since`, `progress_then`), the step of the latest `replan` and the
    progress reached there, to 1 at step `total`: without a replan that is `step / total`.
    """

    def __init__(self, peak: float, warmup_fraction: float, total_steps: int) -> None:
        self.peak, self.warmup_fraction = peak, warmup_fraction
        self.total = keras.Variable(
            float(total_steps), trainable=False, dtype="float32", name="planned_steps"
        )
        self.since = keras.Variable(0.0, trainable=False, dtype="float32", name="replanned_at")
        self.progress_then = keras.Variable(
            0.0, trainable=False, dtype="float32", name="progress_at_replan"
        )

    def progress(self, step: Any) -> Any:
        """How far along the curve `step` is, 0..1."""
        ops = keras.ops
        step, since = ops.cast(step, "float32"), ops.cast(self.since, "float32")
        left = ops.maximum(ops.cast(self.total, "float32") - since, 1.0)
        then = ops.cast(self.progress_then, "float32")
        return ops.clip(then + (1.0 - then) * (step - since) / left, 0.0, 1.0)

    def replan(self, step: int, total: int) -> None:
        """Run what is left of the curve from `step` over `total - step` steps: the learning rate
        at `step` stays where it is, whether the plan grows or shrinks."""
        reached = float(keras.ops.convert_to_numpy(self.progress(step)))
        self.progress_then.assign(reached)
        self.since.assign(float(step))
        self.total.assign(float(total))

    def __call__(self, step: Any) -> Any:
        ops = keras.ops
        progress = self.progress(step)
        warm = max(self.warmup_fraction, 1e-9)
        rising = self.peak * progress / warm
        done = ops.clip((progress - warm) / max(1.0 - warm, 1e-9), 0.0, 1.0)
        falling = self.peak * 0.5 * (1.0 + ops.cos(math.pi * done))
        return ops.maximum(ops.where(progress < warm, rising, falling), self.peak * 1e-3)

    def get_config(self) -> dict[str, Any]:
        return {
            "peak": self.peak,
            "warmup_fraction": self.warmup_fraction,
            "total_steps": int(keras.ops.convert_to_numpy(self.total)),
        }


class StepPlan(keras.callbacks.Callback):
    """Counts steps, sizes the schedule from the measured step time, stops at the plan's end.

    After `settle` steps (tracing and the first shards are behind), or from step `steady_from`
    if that is later (a pool drawn beside the first steps slows them), it times steps for
    `measure_seconds` and plans as many as fit before the deadline, at most `most`. At each
    epoch end it measures again over everything since settling (validation included) and
    re-plans when the two differ by more than 3%. Steps are counted from the batch index Keras
    reports, so a model compiled with `steps_per_execution` (several steps a call, one host
    sync a call) is counted step by step.
    """

    def __init__(
        self,
        schedule: WarmupCosine,
        most: int,
        deadline: float,
        *,
        batch: int = 1,
        settle: int = 10,
        steady_from: int = 0,
        measure_seconds: float = 8.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.schedule, self.most, self.deadline = schedule, most, deadline
        self.batch, self.measure_seconds = batch, measure_seconds
        self.settle = max(settle, steady_from)
        self.clock = clock
        self.planned = most
        self.step = 0
        self._epoch_began_at = 0  # `step` when the current epoch began
        self.first_step_at: float | None = None
        self.step_seconds = math.nan
        self._mark: tuple[int, float] | None = None
        self._measured = False

    def fraction(self) -> float:
        """How much of the planned schedule is done, 0..1."""
        return min(1.0, self.step / max(self.planned, 1))

    def speed(self) -> dict[str, float]:
        """Steps done and planned, and training images per second since the first step."""
        since = self.clock() - (self.first_step_at or self.clock())
        done = max(self.step - 1, 0)
        return {
            "steps": float(self.step),
            "steps_planned": float(self.planned),
            "images_per_second": done * self.batch / since if since > 0 else 0.0,
        }

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._epoch_began_at = self.step

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        # `batch` is the epoch's index of the last step just run: one call covers several
        # steps when the model is compiled with `steps_per_execution`, and Keras reports the
        # last call of an epoch as a whole one even when fewer steps were left in the epoch.
        in_epoch = min(batch + 1, (self.params or {}).get("steps") or math.inf)
        self.step = self._epoch_began_at + int(in_epoch)
        now = self.clock()
        if self.first_step_at is None:
            self.first_step_at = now
        if self._mark is None and self.step >= self.settle:
            self._mark = (self.step, now)
        elif not self._measured and self._mark and now - self._mark[1] >= self.measure_seconds:
            self._measured = True
            self._plan(now)
        if self.step >= self.planned or now >= self.deadline:
            self.model.stop_training = True

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if self._measured:
            self._plan(self.clock())

    def _plan(self, now: float) -> None:
        assert self._mark is not None
        self.step_seconds = (now - self._mark[1]) / max(self.step - self._mark[0], 1)
        fits = self.step + int(max(self.deadline - now, 0.0) / self.step_seconds)
        planned = max(self.step + 1, min(self.most, fits))
        if abs(planned - self.planned) > 0.03 * self.planned:
            self.planned = planned
            self.schedule.replan(self.step, planned)
            if keras.backend.backend() == "jax":  # jit captured the old value: trace again
                self.model.make_train_function(force=True)
