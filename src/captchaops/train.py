"""Training: data -> Keras CRNN+CTC -> MLflow run -> registered ONNX pyfunc with @staging or a rejection."""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import keras
import mlflow
import numpy as np
from mlflow.data.code_dataset_source import CodeDatasetSource
from mlflow.data.pandas_dataset import from_pandas
from mlflow.tracking import MlflowClient
from rich.console import Console
from rich.progress import BarColumn, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as ProgressBar

from captchaops.data import synthetic
from captchaops.data.dataset import DataError, LabelledImages, split_indices
from captchaops.data.feedback import download_feedback
from captchaops.data.folder import read_folder
from captchaops.evalset import EvalSet, EvalSetError, folder_evalset
from captchaops.evaluate import character_error_rate, confusions, sequence_accuracy
from captchaops.mlflow_scope import pointed_at
from captchaops.model.crnn import Architecture, build_crnn, ctc_loss
from captchaops.model.ctc import decode_greedy, encode_labels
from captchaops.model.preprocess import image_size, preprocess
from captchaops.model.pyfunc import log_model
from captchaops.model.reader import OnnxReader
from captchaops.model.version import META_SCHEMA, PREPROCESSING, file_sha256
from captchaops.settings import Settings

Progress = Callable[[str, float, dict[str, float]], None]
"""Called with (stage description, fraction done 0..1, latest metrics)."""


class TrainError(RuntimeError):
    """Training cannot start or finish (the message says how to fix it)."""


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
    arch: Architecture = field(default_factory=Architecture)

    @classmethod
    def demo(cls) -> TrainConfig:
        """The demo preset, aimed at >= 95% on 4-character CAPTCHAs in 5 minutes on 2 cores.

        From the 5-minute benchmark runs: 30k images beat 16k (which overfit at 86-92%),
        batch 32 beat 64, and a 2.5e-3 peak with gradient clipping beat 4e-3 (whose
        validation accuracy swung by 50 points between epochs).
        """
        return cls()

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
        """The long preset: an hour on 2 cores, a wider network and five times the data.

        Data is what the demo runs were short of (16k images overfit; 30k reached 95%), so
        this one generates 160k, keeps 2% each for validation and test, and trains a network
        about 1.5x wider for the rest of the hour.
        """
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
    def tiny(cls) -> TrainConfig:
        """Seconds of training on a few hundred images: for tests, not accuracy."""
        return cls(
            synthetic=300,
            epochs=2,
            batch_size=32,
            max_minutes=2.0,
            workers=1,
            arch=Architecture(height=24, width=72, filters=(8, 16, 16, 16), rnn_units=16),
        )

    def params(self) -> dict[str, object]:
        """Flat parameters for MLflow."""
        values = {k: v for k, v in asdict(self).items() if k != "arch"}
        return values | self.arch.params()


@dataclass
class TrainResult:
    """What a training run produced."""

    run_id: str
    version: str
    model_uri: str
    metrics: dict[str, float]
    staged: bool
    rejection_reason: str | None = None
    skipped: str = "none"
    warning: str | None = None
    frozen: str | None = None


def load_data(config: TrainConfig, settings: Settings, report: Progress) -> LabelledImages:
    """The labelled images a config asks for (folder or generated, plus feedback if asked)."""
    if config.data_dir is not None:
        data = read_folder(config.data_dir, alphabet=config.alphabet)
    else:
        if config.synthetic < 10:
            raise DataError("--synthetic needs at least 10 images; try --synthetic 20000")
        report(f"generating {config.synthetic:,} CAPTCHAs", 0.0, {})
        samples = synthetic.generate(
            config.synthetic,
            config.seed,
            alphabet=config.alphabet or synthetic.DIGITS_UPPER,
            length=config.length,
            workers=config.workers,
            preprocess_to=(config.arch.height, config.arch.width),
        )
        data = LabelledImages(
            images=[s.image for s in samples],
            labels=[s.label for s in samples],
            names=[f"synthetic-{config.seed}-{i:07d}" for i in range(len(samples))],
            source=f"synthetic:{config.synthetic}:seed={config.seed}",
            arrays=[s.array for s in samples],
        )
    if config.include_feedback:
        folder = settings.home_dir / "feedback"
        download_feedback(settings, folder)
        if any(folder.glob("*")):
            alphabet = config.alphabet or (
                synthetic.DIGITS_UPPER if config.data_dir is None else data.alphabet()
            )
            try:
                extra = read_folder(folder, alphabet=alphabet, separator="_")
            except DataError:
                extra = None
            if extra is not None:
                extra.names = [f"feedback/{n}" for n in extra.names]
                data.extend(extra)
    return data


def _arrays(data: LabelledImages, idx: list[int], arch: Architecture) -> np.ndarray:
    out = np.empty((len(idx), arch.height, arch.width, 1), dtype=np.float32)
    for row, i in enumerate(idx):
        ready = data.arrays[i] if data.arrays is not None else None
        fits = ready is not None and ready.shape == out.shape[1:]
        out[row] = ready if fits else preprocess(data.images[i], arch.height, arch.width)
    return out


class _Schedule(keras.callbacks.Callback):
    """Warmup + cosine learning rate over whichever ends first: the steps or the time budget."""

    def __init__(self, config: TrainConfig, total_steps: int, deadline: float, start: float):
        super().__init__()
        self.config, self.total_steps, self.deadline, self.start = (
            config,
            total_steps,
            deadline,
            start,
        )
        self.step = 0

    def fraction(self) -> float:
        by_time = (time.monotonic() - self.start) / max(self.deadline - self.start, 1e-9)
        return min(1.0, max(self.step / self.total_steps, by_time))

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        f, warm = self.fraction(), self.config.warmup_fraction
        peak = self.config.learning_rate
        lr = (
            peak * f / warm
            if f < warm
            else peak * 0.5 * (1 + math.cos(math.pi * (f - warm) / (1 - warm)))
        )
        self.model.optimizer.learning_rate.assign(max(lr, peak * 1e-3))

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self.step += 1
        if self.step >= self.total_steps or time.monotonic() >= self.deadline:
            self.model.stop_training = True


class _Monitor(keras.callbacks.Callback):
    """Per epoch: validation metrics to MLflow, the best weights, and early stopping in steps.

    Best means highest sequence accuracy, then lowest CER (see `_better`), so checkpoints
    still improve on CTC's blank plateau where no sequence is right yet. Training stops only
    after `min_steps`, once none of val loss, CER or accuracy has improved for `patience` steps.
    """

    def __init__(
        self,
        infer: keras.Model,
        x_val,
        y_val,
        labels_val,
        alphabet,
        schedule,
        report,
        *,
        min_steps: int,
        patience: int,
    ):
        super().__init__()
        self.infer, self.alphabet = infer, alphabet
        self.x_val, self.y_val, self.labels_val = x_val, y_val, labels_val
        self.schedule, self.report = schedule, report
        self.min_steps, self.patience = min_steps, patience
        self.best_key: tuple[float, float, float] = (-1.0, -math.inf, -math.inf)
        self.best_epoch, self.best_weights = -1, None
        self.lowest = {"val_loss": math.inf, "val_cer": math.inf, "neg_acc": math.inf}
        self.improved_at = 0
        self.history: list[dict[str, float]] = []
        self._last_report = 0.0

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        now = time.monotonic()
        if now - self._last_report > 0.5:
            self._last_report = now
            latest = self.history[-1] if self.history else {}
            self.report(f"epoch {len(self.history) + 1}", self.schedule.fraction(), latest)

    def validate(self) -> dict[str, float]:
        """Validation loss, sequence accuracy and CER of the network's current weights."""
        probs = self.infer.predict(self.x_val, batch_size=256, verbose=0)
        preds = [t for t, _ in decode_greedy(probs, self.alphabet)]
        # One pass over the validation set: CTC on log-probabilities equals CTC on the logits
        # (the loss log-softmaxes its input, and log-softmax of log p is log p).
        val_loss = ctc_loss(self.y_val, keras.ops.log(keras.ops.maximum(probs, 1e-12)))
        return {
            "val_loss": float(keras.ops.convert_to_numpy(val_loss)),
            "val_seq_acc": sequence_accuracy(preds, self.labels_val),
            "val_cer": character_error_rate(preds, self.labels_val),
        }

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        logs = logs or {}
        metrics = {
            "loss": float(logs.get("loss", float("nan"))),
            **self.validate(),
            "learning_rate": float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)),
        }
        mlflow.log_metrics(metrics, step=epoch)
        self.history.append(metrics)
        key = _key(metrics)
        if _better(key, self.best_key):
            self.best_key, self.best_epoch = key, epoch
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


def _key(metrics: dict[str, float]) -> tuple[float, float, float]:
    """What checkpoints are ranked by: (accuracy, -CER, -loss) on the validation set."""
    return (metrics["val_seq_acc"], -metrics["val_cer"], -metrics["val_loss"])


def _better(key: tuple[float, float, float], best: tuple[float, float, float]) -> bool:
    """Whether (accuracy, -CER, -loss) beats the best so far.

    Ties on accuracy and CER go to the later epoch once something is read (a small validation
    set ties often, and later weights have seen more of the decaying learning rate); only on
    the blank plateau, where nothing is read yet, does the loss break them.
    """
    if key[:2] != best[:2]:
        return key[:2] > best[:2]
    return key[0] > 0 or key[2] > best[2]


def _check_tracking(settings: Settings) -> None:
    uri = settings.effective_tracking_uri
    if not uri.startswith("http"):
        return
    try:
        httpx.get(f"{uri}/health", timeout=5).raise_for_status()
    except httpx.HTTPError as exc:
        raise TrainError(
            f"cannot reach the tracking server at {uri}; start it with `captchaops up` or set CAPTCHAOPS_TRACKING_URI"
        ) from exc


def train(config: TrainConfig, settings: Settings, progress: Progress | None = None) -> TrainResult:
    """Train, log everything to MLflow, register a version and stage or reject it.

    MLflow's process-wide state (URIs, credentials, experiment) is restored afterwards, so
    the caller's process is left talking to whatever it talked to before.
    """
    start = time.monotonic()
    _check_tracking(settings)
    with pointed_at(settings):
        return _train(config, settings, progress or (lambda stage, fraction, metrics: None), start)


def _geometry(config: TrainConfig, data: LabelledImages | None, max_length: int) -> Architecture:
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


def _frozen_for_folder(
    config: TrainConfig, settings: Settings, data: LabelledImages, report: Progress
) -> tuple[EvalSet, LabelledImages]:
    """The scheme's frozen set (held out now on first use) and the data without any of it."""
    report("holding out the frozen evaluation set", 0.0, {})
    try:
        frozen = folder_evalset(settings, data, config.holdout_fraction)
    except EvalSetError as exc:
        raise TrainError(str(exc)) from exc
    keep = frozen.unseen(data.images)
    return frozen, data.subset(keep)


def _train(config: TrainConfig, settings: Settings, report: Progress, start: float) -> TrainResult:
    keras.utils.set_random_seed(config.seed)

    data = load_data(config, settings, report)
    kind = "synthetic" if config.data_dir is None else "folder"
    frozen: EvalSet | None = None
    n_read = len(data)
    if config.data_dir is not None:
        frozen, data = _frozen_for_folder(config, settings, data, report)
    alphabet = config.alphabet or (
        synthetic.DIGITS_UPPER
        if config.data_dir is None
        else "".join(sorted(set(data.alphabet()) | set(frozen.alphabet() if frozen else "")))
    )
    if frozen is not None and set(frozen.alphabet()) - set(alphabet):
        raise DataError(
            f"the frozen evaluation set uses characters outside --alphabet {alphabet!r}; "
            "leave --alphabet out or train under another --model-name"
        )
    lengths = [len(label) for label in data.labels]
    arch = _geometry(config, data, max(lengths))
    test_fraction = 0.0 if frozen is not None else config.test_fraction
    splits = split_indices(data.names, config.val_fraction, test_fraction)
    if not splits["train"] or not splits["val"] or (frozen is None and not splits["test"]):
        raise DataError(
            f"{len(data)} usable images are too few to split into train/val/test; add more images"
        )
    report("preprocessing", 0.0, {})
    x = {name: _arrays(data, idx, arch) for name, idx in splits.items() if idx}
    labels = {name: [data.labels[i] for i in idx] for name, idx in splits.items()}
    y = {name: encode_labels(labels[name], alphabet, max(lengths)) for name in x}
    augment = config.augment if config.augment is not None else config.data_dir is not None
    if frozen is not None:
        test_images, test_labels = frozen.images, frozen.labels
    else:
        test_images, test_labels = [data.images[i] for i in splits["test"]], labels["test"]

    mlflow.set_experiment(settings.experiment_name)
    with mlflow.start_run(run_name=_run_name(config, data)) as run:
        digest = data.digest()
        steps_per_epoch = math.ceil(len(splits["train"]) / config.batch_size)
        steps = min(config.max_steps or math.inf, steps_per_epoch * config.epochs)
        min_steps = min(max(config.min_steps, 20 * steps_per_epoch), steps)
        mlflow.log_params(
            config.params()
            | arch.params()
            | {
                "alphabet": alphabet,
                "num_classes": len(alphabet) + 1,
                "min_length": min(lengths),
                "max_length": max(lengths),
                "data_kind": kind,
                "scheme": settings.model_name,
                "data_source": data.source,
                "dataset_sha256": digest,
                "n_read": n_read,
                "n_train": len(splits["train"]),
                "n_val": len(splits["val"]),
                "n_test": len(test_labels),
                "test_set": "frozen held-out set" if frozen is not None else "test split",
                "frozen_evalset_digest": frozen.digest if frozen is not None else "",
                "excluded_frozen_images": n_read - len(data),
                "skipped_files": data.skipped.total,
                "augment_applied": augment,
                "planned_steps": steps,
                "effective_min_steps": min_steps,
                "optimizer": "AdamW",
                "lr_schedule": "linear warmup + cosine (steps or time budget)",
                "keras_backend": keras.backend.backend(),
                "keras_version": keras.__version__,
            }
        )
        _log_dataset(data, splits, digest)
        train_model, infer = build_crnn(arch, len(alphabet) + 1, augment=augment)
        mlflow.log_param("model_parameters", infer.count_params())
        train_model.compile(
            optimizer=keras.optimizers.AdamW(
                config.learning_rate,
                weight_decay=config.weight_decay,
                clipnorm=config.clipnorm,
                use_ema=config.ema_momentum is not None,
                ema_momentum=config.ema_momentum or 0.99,
            ),
            loss=ctc_loss,
        )
        deadline = start + config.max_minutes * 60
        schedule = _Schedule(config, int(steps), deadline, time.monotonic())
        monitor = _Monitor(
            infer,
            x["val"],
            y["val"],
            labels["val"],
            alphabet,
            schedule,
            report,
            min_steps=int(min_steps),
            patience=config.patience_steps,
        )
        fit_start = time.monotonic()
        train_model.fit(
            x["train"],
            y["train"],
            batch_size=config.batch_size,
            epochs=config.epochs,
            callbacks=[schedule, monitor],
            verbose=0,
        )
        averaged = monitor.validate() if config.ema_momentum else None  # fit swapped the EMA in
        if averaged is not None:
            mlflow.log_metrics({f"ema_{k}": v for k, v in averaged.items()})
        keep_average = averaged is not None and _better(_key(averaged), monitor.best_key)
        if monitor.best_weights is not None and not keep_average:
            train_model.set_weights(monitor.best_weights)
        fit_seconds = time.monotonic() - fit_start
        report("exporting and evaluating", 1.0, monitor.history[-1] if monitor.history else {})
        meta = {
            "schema_version": META_SCHEMA,
            "alphabet": alphabet,
            "height": arch.height,
            "width": arch.width,
            "min_length": min(lengths),
            "max_length": max(lengths),
            "preprocessing": PREPROCESSING,
            "dataset_sha256": digest,
            "scheme": settings.model_name,
            "data_kind": kind,
            "model_format": "onnx",
        }
        with tempfile.TemporaryDirectory() as tmp:
            result = _finish(
                run.info.run_id, infer, meta, test_images, test_labels, Path(tmp), settings
            )
        result.metrics |= {
            "best_epoch": float(monitor.best_epoch + 1),
            "epochs_run": float(len(monitor.history)),
            "steps_run": float(schedule.step),
            "fit_seconds": fit_seconds,
            "wall_seconds": time.monotonic() - start,
        }
        mlflow.log_metrics(
            {
                k: result.metrics[k]
                for k in ("best_epoch", "epochs_run", "steps_run", "fit_seconds", "wall_seconds")
            }
        )
        result.skipped = data.skipped.summary()
        result.warning = _reads_nothing(result, len(data), config)
        if frozen is not None:
            result.frozen = (
                f"tested on {settings.model_name}'s frozen evaluation set {frozen.digest[:12]}: "
                f"{len(frozen)} held-out images, none of them trained on"
            )
        return result


def _reads_nothing(result: TrainResult, n: int, config: TrainConfig) -> str | None:
    """One line with the likely fix when the model reads no test image at all."""
    if result.metrics["test_seq_acc"] > 0:
        return None
    return (
        f"the model reads none of its test images (CER {result.metrics['test_cer']:.2f}) after "
        f"{result.metrics['steps_run']:.0f} steps on {n} images: it stopped before it learned; "
        f"give it more time (--max-minutes {max(2 * config.max_minutes, 10):.0f}) or more images"
    )


def _finish(
    run_id, infer, meta, test_images, true_test, tmp: Path, settings: Settings
) -> TrainResult:
    infer.predict(np.zeros((1, meta["height"], meta["width"], 1), np.float32), verbose=0)
    onnx_path = tmp / "crnn.onnx"
    infer.export(str(onnx_path), format="onnx", verbose=False)
    keras_path = tmp / "crnn.keras"
    infer.save(keras_path)
    mlflow.log_artifact(str(keras_path), "keras")
    meta = meta | {"onnx_sha256": file_sha256(onnx_path)}
    served = OnnxReader(onnx_path, meta)
    outputs = [
        o
        for s in range(0, len(test_images), 256)
        for o in served.predict_images(test_images[s : s + 256])
    ]
    pred = [o["text"] for o in outputs]
    metrics = {
        "test_seq_acc": sequence_accuracy(pred, true_test),
        "test_cer": character_error_rate(pred, true_test),
        "test_mean_confidence": float(np.mean([o["confidence"] for o in outputs])),
    }
    mlflow.log_metrics(metrics)
    top = confusions(pred, true_test, top=15)
    mlflow.log_dict(
        {"confusions": [{"true": t, "pred": p, "count": n} for t, p, n in top]}, "confusions.json"
    )
    mlflow.log_figure(
        _sample_figure(test_images[:16], true_test[:16], pred[:16]), "test_samples.png"
    )
    mlflow.set_tag("mlflow.note.content", _note(meta, metrics, top))
    info = log_model(onnx_path, meta, test_images[0], registered_model_name=settings.model_name)
    version = str(info.registered_model_version)
    uri = settings.effective_tracking_uri
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    staged = metrics["test_seq_acc"] >= settings.staging_floor
    reason = None
    client.set_model_version_tag(
        settings.model_name, version, "test_seq_acc", f"{metrics['test_seq_acc']:.4f}"
    )
    if staged:
        client.set_registered_model_alias(settings.model_name, "staging", version)
        client.set_model_version_tag(settings.model_name, version, "validation_status", "pending")
    else:
        reason = f"test sequence accuracy {metrics['test_seq_acc']:.4f} is below the staging floor {settings.staging_floor}"
        client.set_model_version_tag(settings.model_name, version, "validation_status", "rejected")
        client.set_model_version_tag(settings.model_name, version, "rejection_reason", reason)
    return TrainResult(
        run_id=run_id,
        version=version,
        model_uri=f"models:/{settings.model_name}/{version}",
        metrics=metrics,
        staged=staged,
        rejection_reason=reason,
    )


def _run_name(config: TrainConfig, data: LabelledImages) -> str:
    kind = Path(config.data_dir).name if config.data_dir is not None else "synthetic"
    return f"{kind}-{len(data)}-seed{config.seed}"


def _log_dataset(data: LabelledImages, splits: dict[str, list[int]], digest: str) -> None:
    import pandas as pd

    split_of = {i: name for name, idx in splits.items() for i in idx}
    frame = pd.DataFrame(
        {"name": data.names, "label": data.labels, "split": [split_of[i] for i in range(len(data))]}
    )
    dataset = from_pandas(
        frame,
        source=CodeDatasetSource({"data_source": data.source, "sha256": digest}),
        targets="label",
        name=_dataset_name(data),
        digest=digest[:32],
    )
    mlflow.log_input(dataset, context="training")


def _dataset_name(data: LabelledImages) -> str:
    return data.source.split(" + ")[0].rsplit("/", 1)[-1] or "dataset"


def _sample_figure(images: list[bytes], true: list[str], pred: list[str]):
    import matplotlib

    matplotlib.use("Agg")
    import io

    import matplotlib.pyplot as plt
    from PIL import Image

    cols = 4
    rows = max(1, math.ceil(len(images) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 2.6, rows * 1.3))
    for ax in np.ravel(axes):
        ax.axis("off")
    for ax, data, t, p in zip(np.ravel(axes), images, true, pred, strict=False):
        ax.imshow(Image.open(io.BytesIO(data)).convert("RGB"))
        ax.set_title(f"true {t} / pred {p}", fontsize=8, color="green" if t == p else "red")
    fig.tight_layout()
    return fig


def _note(meta: dict[str, Any], metrics: dict[str, float], top: list[tuple[str, str, int]]) -> str:
    confused = ", ".join(f"{t}->{p} ({n})" for t, p, n in top[:5]) or "none"
    return (
        f"CRNN+CTC on {meta['height']}x{meta['width']} grayscale, alphabet `{meta['alphabet']}`.\n\n"
        f"Test sequence accuracy **{metrics['test_seq_acc']:.4f}**, CER {metrics['test_cer']:.4f}.\n\n"
        f"Most confused (true->pred): {confused}."
    )


def with_overrides(config: TrainConfig, **overrides: Any) -> TrainConfig:
    """A copy of `config` with the non-None overrides applied."""
    return replace(config, **{k: v for k, v in overrides.items() if v is not None})


def train_with_progress(config: TrainConfig, settings: Settings, console: Console) -> TrainResult:
    """`train` with a rich progress bar showing the stage and the latest validation metrics."""
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[metrics]}"),
    )
    with ProgressBar(*columns, console=console, transient=False) as bar:
        task = bar.add_task("starting", total=1.0, metrics="")

        def report(stage: str, fraction: float, metrics: dict[str, float]) -> None:
            shown = "  ".join(
                f"{k} {metrics[k]:.3f}" for k in ("loss", "val_seq_acc", "val_cer") if k in metrics
            )
            bar.update(task, description=stage, completed=fraction, metrics=shown)

        return train(config, settings, progress=report)


def print_summary(result: TrainResult, console: Console) -> None:
    """A few lines: metrics, the registered version and whether it was staged."""
    m = result.metrics
    console.print(
        f"test sequence accuracy {m['test_seq_acc']:.4f}, CER {m['test_cer']:.4f}, "
        f"{m['epochs_run']:.0f} epochs in {m['wall_seconds']:.0f}s",
        highlight=False,
    )
    if result.skipped != "none":
        console.print(f"skipped files: {result.skipped}", highlight=False)
    if result.frozen:
        console.print(result.frozen, highlight=False)
    console.print(f"run {result.run_id}; registered {result.model_uri}", highlight=False)
    if result.staged:
        console.print("alias staging -> this version", highlight=False)
    else:
        console.print(f"not staged: {result.rejection_reason}", highlight=False)
    if result.warning:
        console.print(f"[yellow]warning:[/yellow] {result.warning}", highlight=False)
