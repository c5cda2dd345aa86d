"""The fitting loop: schedule, validation, checkpoint choice and early stopping, in steps.

MLflow-free: metrics leave through the `log` callable the caller passes, so the same loop
runs inside an MLflow run (`captchaops.training.run`) or bare on an accelerator box.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np

from captchaops.evaluation.accuracy import character_error_rate, sequence_accuracy
from captchaops.model.crnn import Architecture, build_crnn, ctc_loss
from captchaops.model.ctc import decode_greedy
from captchaops.training.config import TrainConfig
from captchaops.training.schedule import StepPlan, WarmupCosine

Progress = Callable[[str, float, dict[str, float]], None]
"""Called with (stage description, fraction done 0..1, latest metrics)."""

LogMetrics = Callable[[dict[str, float], int], object]
"""Called with (metrics, epoch) after each epoch (e.g. `mlflow.log_metrics`); its result is unused."""


def silent(stage: str, fraction: float, metrics: dict[str, float]) -> None:
    """A `Progress` that shows nothing."""


Key = tuple[float, float, float]


def key(metrics: dict[str, float]) -> Key:
    """What checkpoints are ranked by: (accuracy, -CER, -loss) on the validation set."""
    return (metrics["val_seq_acc"], -metrics["val_cer"], -metrics["val_loss"])


def better(candidate: Key, best: Key) -> bool:
    """Whether (accuracy, -CER, -loss) beats the best so far.

    Ties on accuracy and CER go to the later epoch once something is read (a small validation
    set ties often, and later weights have seen more of the decaying learning rate); only on
    the blank plateau, where nothing is read yet, does the loss break them.
    """
    if candidate[:2] != best[:2]:
        return candidate[:2] > best[:2]
    return candidate[0] > 0 or candidate[2] > best[2]


@dataclass
class Stream:
    """Endless training batches (fresh images), validated every `steps_per_epoch` steps."""

    batches: Iterator[tuple[np.ndarray, np.ndarray]]
    steps_per_epoch: int
    generated: Callable[[], int]  # fresh training images drawn so far
    on_first_step: Callable[[], None] | None = None  # e.g. start drawing the held-out sets
    steady_from: int = 0  # steps before this one are slower (a pool still being drawn)
    end: Callable[[], object] | None = None  # ends `batches` (called when training ends)


@dataclass
class Validation:
    """The validation split, encoded for the loss and as strings for the metrics."""

    x: np.ndarray
    y: np.ndarray
    labels: list[str]
    alphabet: str


def validate(infer: keras.Model, val: Validation) -> dict[str, float]:
    """Validation loss, sequence accuracy and CER of the network's current weights."""
    probs = infer.predict(val.x, batch_size=256, verbose=0)
    preds = [t for t, _ in decode_greedy(probs, val.alphabet)]
    # One pass over the validation set: CTC on log-probabilities equals CTC on the logits
    # (the loss log-softmaxes its input, and log-softmax of log p is log p).
    val_loss = ctc_loss(val.y, keras.ops.log(keras.ops.maximum(probs, 1e-12)))
    return {
        "val_loss": float(keras.ops.convert_to_numpy(val_loss)),
        "val_seq_acc": sequence_accuracy(preds, val.labels),
        "val_cer": character_error_rate(preds, val.labels),
    }


class Monitor(keras.callbacks.Callback):
    """Per epoch: validation metrics out through `log`, the best weights, early stopping in steps.

    Best means highest sequence accuracy, then lowest CER (see `better`), so checkpoints
    still improve on CTC's blank plateau where no sequence is right yet. Training stops only
    after `min_steps`, once none of val loss, CER or accuracy has improved for `patience` steps.
    """

    def __init__(
        self,
        infer: keras.Model,
        val: Validation | Callable[[], Validation],
        schedule: StepPlan,
        report: Progress,
        log: LogMetrics,
        *,
        min_steps: int,
        patience: int,
    ):
        super().__init__()
        self.infer, self.schedule = infer, schedule
        self._val = val
        self.report, self.log = report, log
        self.min_steps, self.patience = min_steps, patience
        self.best_key: Key = (-1.0, -math.inf, -math.inf)
        self.best_epoch = -1
        self.best_weights: list[np.ndarray] | None = None
        self.lowest = {"val_loss": math.inf, "val_cer": math.inf, "neg_acc": math.inf}
        self.improved_at = 0
        self.history: list[dict[str, float]] = []
        self._last_report = 0.0

    @property
    def val(self) -> Validation:
        """The validation set (one that is still being drawn is waited for once, here)."""
        if not isinstance(self._val, Validation):
            self._val = self._val()
        return self._val

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        now = time.monotonic()
        if now - self._last_report > 0.5:
            self._last_report = now
            latest = self.history[-1] if self.history else {}
            stage = f"epoch {len(self.history) + 1}"
            self.report(stage, self.schedule.fraction(), latest | self.schedule.speed())

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        logs = logs or {}
        metrics = {
            "loss": float(logs.get("loss", float("nan"))),
            **validate(self.infer, self.val),
            "learning_rate": float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)),
            **self.schedule.speed(),
        }
        self.log(metrics, epoch)
        self.history.append(metrics)
        if better(key(metrics), self.best_key):
            self.best_key, self.best_epoch = key(metrics), epoch
            self.best_weights = self.model.get_weights()
        current = {
            "val_loss": metrics["val_loss"],
            "val_cer": metrics["val_cer"],
            "neg_acc": -metrics["val_seq_acc"],
        }
        for name, value in current.items():
            if value < self.lowest[name] - 1e-6:
                self.lowest[name] = value
                self.improved_at = self.schedule.step
        step = self.schedule.step
        if step >= self.min_steps and step - self.improved_at >= self.patience:
            self.model.stop_training = True
        self.report(f"epoch {epoch + 1}", self.schedule.fraction(), metrics)


@dataclass
class Plan:
    """How long a fit may run, in optimiser steps and wall time."""

    steps: int
    min_steps: int
    steps_per_epoch: int

    @classmethod
    def of(cls, config: TrainConfig, n_train: int, steps_per_epoch: int | None = None) -> Plan:
        per_epoch = steps_per_epoch or math.ceil(n_train / config.batch_size)
        steps = int(min(config.max_steps or math.inf, per_epoch * config.epochs))
        return cls(steps, min(max(config.min_steps, 20 * per_epoch), steps), per_epoch)


@dataclass
class Fitted:
    """A fitted inference network and how it got there."""

    infer: keras.Model
    history: list[dict[str, float]]
    best_epoch: int
    steps: int
    fit_seconds: float
    averaged: dict[str, float] | None  # the EMA weights' validation metrics, when EMA was on
    kept_final: bool = True  # the final weights, not an earlier checkpoint
    planned: int = 0  # steps the schedule ran over, as planned from the measured step time
    step_seconds: float = math.nan  # measured seconds per step (validation included)
    first_step_at: float = math.nan  # time.monotonic() when the first step finished
    images: int = 0  # training images seen (steps x batch)
    fresh_images: int = 0  # distinct training images drawn while training (fresh path)

    def summary(self) -> dict[str, float]:
        """The run's step and speed figures, as logged with it (those it could not measure, such
        as the step time of a run too short to time, are left out: a NaN metric equals nothing,
        not even itself, so a run that logged one would never compare equal to its own copy)."""
        figures = {
            "best_epoch": float(self.best_epoch + 1),
            "kept_final_weights": float(self.kept_final),
            "epochs_run": float(len(self.history)),
            "steps_run": float(self.steps),
            "steps_planned": float(self.planned),
            "step_ms": self.step_seconds * 1000,
            "images_per_second": self.images / max(self.fit_seconds, 1e-9),
            "fresh_images": float(self.fresh_images),
            "fit_seconds": self.fit_seconds,
        }
        return {name: value for name, value in figures.items() if math.isfinite(value)}


def trace_quickly() -> None:
    """On TensorFlow, run compiled functions without Grappler's graph rewrites: the first
    step of the demo preset came 2 s sooner (median 7.1 s against 9.1 s from `fit`, five
    alternating runs each) and steps were no slower (32.4 against 33.4 ms, docs/training.md).
    Process-wide: TensorFlow has no per-function switch for it."""
    if keras.backend.backend() == "tensorflow":
        # here, not at the top: TensorFlow is one Keras backend; the loop runs on the others too
        import tensorflow as tf

        tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": True})


def compiled_crnn(
    config: TrainConfig,
    arch: Architecture,
    n_classes: int,
    *,
    augment: bool,
    total_steps: int,
    deadline: float,
    steady_from: int = 0,
) -> tuple[keras.Model, keras.Model, StepPlan]:
    """A fresh CRNN (training and inference networks) compiled with the loop's optimiser:
    AdamW with weight decay, clipping and, when the config asks, an EMA of the weights, on the
    warm-up + cosine schedule counted in steps; and the callback that plans and counts them
    (timing no step before `steady_from`)."""
    trace_quickly()
    train_model, infer = build_crnn(arch, n_classes, augment=augment)
    schedule = WarmupCosine(config.learning_rate, config.warmup_fraction, total_steps)
    train_model.compile(
        optimizer=keras.optimizers.AdamW(
            schedule,
            weight_decay=config.weight_decay,
            clipnorm=config.clipnorm,
            use_ema=config.ema_momentum is not None,
            ema_momentum=config.ema_momentum or 0.99,
        ),
        loss=ctc_loss,
        steps_per_execution=config.steps_per_execution,
    )
    plan = StepPlan(
        schedule, total_steps, deadline, batch=config.batch_size, steady_from=steady_from
    )
    return train_model, infer, plan


def fit(
    config: TrainConfig,
    arch: Architecture,
    alphabet: str,
    train: tuple[np.ndarray, np.ndarray] | Stream,
    val: Validation | Callable[[], Validation],
    *,
    augment: bool,
    deadline: float,
    report: Progress,
    log: LogMetrics,
) -> Fitted:
    """Fit a fresh CRNN and keep the best weights (the averaged ones when they validate as well)."""
    if isinstance(train, Stream):
        plan = Plan.of(config, 0, train.steps_per_epoch)
    else:
        plan = Plan.of(config, len(train[0]))
    train_model, infer, steps = compiled_crnn(
        config,
        arch,
        len(alphabet) + 1,
        augment=augment,
        total_steps=plan.steps,
        deadline=deadline,
        steady_from=train.steady_from if isinstance(train, Stream) else 0,
    )
    monitor = Monitor(
        infer,
        val,
        steps,
        report,
        log,
        min_steps=plan.min_steps,
        patience=config.patience_steps,
    )
    fit_start = time.monotonic()
    callbacks: list[keras.callbacks.Callback] = [steps, monitor]
    if isinstance(train, Stream) and train.on_first_step is not None:
        first = train.on_first_step
        callbacks.append(
            keras.callbacks.LambdaCallback(on_train_batch_end=lambda batch, logs: first())
        )
    if isinstance(train, Stream):
        fit_stream(train_model, train, config.epochs, callbacks)
    else:
        train_model.fit(
            train[0],
            train[1],
            batch_size=config.batch_size,
            epochs=config.epochs,
            callbacks=callbacks,
            verbose=0,
        )
    averaged = validate(infer, monitor.val) if config.ema_momentum else None  # EMA swapped in
    final = averaged if averaged is not None else (monitor.history[-1] if monitor.history else None)
    keep_final = final is not None and holds_up(final, monitor.best_key, len(monitor.val.labels))
    if monitor.best_weights is not None and not keep_final:
        train_model.set_weights(monitor.best_weights)
    return Fitted(
        infer=infer,
        history=monitor.history,
        best_epoch=len(monitor.history) - 1 if keep_final else monitor.best_epoch,
        steps=steps.step,
        fit_seconds=time.monotonic() - fit_start,
        averaged=averaged,
        kept_final=keep_final,
        planned=steps.planned,
        step_seconds=steps.step_seconds,
        first_step_at=steps.first_step_at or math.nan,
        images=steps.step * config.batch_size,
        fresh_images=train.generated() if isinstance(train, Stream) else 0,
    )


def fit_stream(
    model: keras.Model, train: Stream, epochs: int, callbacks: list[keras.callbacks.Callback]
) -> None:
    """Fit on a stream's batches, pulled on this thread; the stream ends and closes with training.

    Not `model.fit` on TensorFlow: Keras wraps a generator in `tf.data.Dataset.from_generator`,
    whose prefetch thread pulls batches beside the steps, and the dataset's iterator, dropped
    when `fit` returns, blocked the garbage collection after it for 37-60 s in about a quarter
    of short stream runs, even with the stream ended first (docs/training.md, "Speed"; the
    `stall` benchmark counts them). Here each call of the compiled training step that `fit`
    calls (`model.train_function`, `steps_per_execution` steps a call) takes its batches from
    the stream on the calling thread, and the callbacks get what `fit` gives them: the same
    hooks in the same order, batch indices, epoch logs (the metrics' means over the epoch),
    `stop_training`, a `History`, and the optimiser's averaged weights swapped in before
    `on_train_end`. Other backends' `fit` iterates a generator on the calling thread already,
    so they keep it.
    """
    try:
        if keras.backend.backend() == "tensorflow":
            _step_loop(model, train, epochs, callbacks)
        else:
            model.fit(
                train.batches,
                steps_per_epoch=train.steps_per_epoch,
                epochs=epochs,
                callbacks=callbacks,
                shuffle=False,  # the stream's batches are already drawn at random
                verbose=0,
            )
    finally:
        if train.end is not None:
            train.end()
        if isinstance(train.batches, Generator):
            train.batches.close()


def _step_loop(
    model: keras.Model, train: Stream, epochs: int, callbacks: list[keras.callbacks.Callback]
) -> None:
    """`model.fit`'s epoch loop (Keras 3, TensorFlow) over `train.batches` on this thread."""
    hooks = keras.callbacks.CallbackList(
        callbacks,
        add_history=True,
        model=model,
        verbose=0,
        epochs=epochs,
        steps=train.steps_per_epoch,
    )
    per_call = max(1, int(model.steps_per_execution))
    model.stop_training = False
    model.make_train_function()
    hooks.on_train_begin()
    epoch_logs: dict[str, Any] | None = None
    ran_out = False
    for epoch in range(epochs):
        model.reset_metrics()
        hooks.on_epoch_begin(epoch)
        step = 0
        while step < train.steps_per_epoch and not model.stop_training:
            data = list(
                itertools.islice(train.batches, min(per_call, train.steps_per_epoch - step))
            )
            if not data:  # the stream ended (as `fit` does when its data runs out)
                ran_out = True
                break
            hooks.on_train_batch_begin(step)
            logs = model.train_function(iter(data))
            step += len(data)
            hooks.on_train_batch_end(step - 1, logs)
        if step == 0:
            break
        epoch_logs = dict(model.get_metrics_result())  # the means over the epoch, as `fit` logs
        hooks.on_epoch_end(epoch, epoch_logs)
        if model.stop_training or ran_out:
            break
    if epochs > 0 and isinstance(model.optimizer, keras.optimizers.Optimizer):
        model.optimizer.finalize_variable_values(model.trainable_weights)
    hooks.on_train_end(epoch_logs)


def holds_up(final: dict[str, float], best: Key, n_val: int) -> bool:
    """Whether the final weights (averaged, when EMA is on) are kept over the best checkpoint.

    The final weights have seen the whole decaying schedule; a checkpoint that beats them by a
    couple of validation images is more likely picked by the noise of a small validation set
    than better (docs/training.md has the measurements). So the final weights stay unless
    the best checkpoint reads 2.5 validation images more, or unless nothing is read yet and
    the usual ranking (`better`) prefers the checkpoint.
    """
    if final["val_seq_acc"] > 0 and final["val_seq_acc"] + 2.5 / max(n_val, 1) >= best[0]:
        return True
    return better(key(final), best) or key(final) == best
