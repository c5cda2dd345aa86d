"""Training: data -> Keras CRNN+CTC -> MLflow run -> registered ONNX pyfunc with @staging or a rejection."""

from __future__ import annotations

import json
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
from captchaops.evaluate import character_error_rate, confusions, sequence_accuracy
from captchaops.mlflow_scope import pointed_at
from captchaops.model.crnn import Architecture, build_crnn, ctc_loss
from captchaops.model.ctc import decode_greedy, encode_labels
from captchaops.model.preprocess import preprocess
from captchaops.model.pyfunc import CaptchaModel, log_model
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
    patience: int = 6  # epochs without a better val sequence accuracy before stopping
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
            patience=8,
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
        out[row] = (
            ready if ready is not None else preprocess(data.images[i], arch.height, arch.width)
        )
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
        if time.monotonic() >= self.deadline:
            self.model.stop_training = True


class _Monitor(keras.callbacks.Callback):
    """Per epoch: val sequence accuracy and CER, MLflow metrics, best weights, early stopping."""

    def __init__(
        self, infer: keras.Model, x_val, y_val, labels_val, alphabet, config, schedule, report
    ):
        super().__init__()
        self.infer, self.alphabet = infer, alphabet
        self.x_val, self.y_val, self.labels_val = x_val, y_val, labels_val
        self.config, self.schedule, self.report = config, schedule, report
        self.best_acc, self.best_epoch, self.best_weights = -1.0, -1, None
        self.history: list[dict[str, float]] = []
        self._last_report = 0.0

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        now = time.monotonic()
        if now - self._last_report > 0.5:
            self._last_report = now
            latest = self.history[-1] if self.history else {}
            self.report(f"epoch {len(self.history) + 1}", self.schedule.fraction(), latest)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        logs = logs or {}
        probs = self.infer.predict(self.x_val, batch_size=256, verbose=0)
        preds = [t for t, _ in decode_greedy(probs, self.alphabet)]
        # One pass over the validation set: CTC on log-probabilities equals CTC on the logits
        # (the loss log-softmaxes its input, and log-softmax of log p is log p).
        val_loss = ctc_loss(self.y_val, keras.ops.log(keras.ops.maximum(probs, 1e-12)))
        metrics = {
            "loss": float(logs.get("loss", float("nan"))),
            "val_loss": float(keras.ops.convert_to_numpy(val_loss)),
            "val_seq_acc": sequence_accuracy(preds, self.labels_val),
            "val_cer": character_error_rate(preds, self.labels_val),
            "learning_rate": float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)),
        }
        mlflow.log_metrics(metrics, step=epoch)
        self.history.append(metrics)
        if metrics["val_seq_acc"] > self.best_acc:
            self.best_acc, self.best_epoch = metrics["val_seq_acc"], epoch
            self.best_weights = self.model.get_weights()
        elif epoch - self.best_epoch >= self.config.patience:
            self.model.stop_training = True
        self.report(f"epoch {epoch + 1}", self.schedule.fraction(), metrics)


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


def _train(config: TrainConfig, settings: Settings, report: Progress, start: float) -> TrainResult:
    keras.utils.set_random_seed(config.seed)

    data = load_data(config, settings, report)
    alphabet = config.alphabet or (
        synthetic.DIGITS_UPPER if config.data_dir is None else data.alphabet()
    )
    lengths = [len(label) for label in data.labels]
    arch = config.arch
    if max(lengths) * 2 > arch.time_steps:
        raise DataError(
            f"labels up to {max(lengths)} characters need a wider input than {arch.width} px; use shorter labels"
        )
    splits = split_indices(data.names, config.val_fraction, config.test_fraction)
    if not splits["train"] or not splits["val"] or not splits["test"]:
        raise DataError(
            f"{len(data)} usable images are too few to split into train/val/test; add more images"
        )
    report("preprocessing", 0.0, {})
    x = {name: _arrays(data, idx, arch) for name, idx in splits.items()}
    labels = {name: [data.labels[i] for i in idx] for name, idx in splits.items()}
    y = {name: encode_labels(labels[name], alphabet, max(lengths)) for name in splits}
    augment = config.augment if config.augment is not None else config.data_dir is not None

    mlflow.set_experiment(settings.experiment_name)
    with mlflow.start_run(run_name=_run_name(config, data)) as run:
        digest = data.digest()
        mlflow.log_params(
            config.params()
            | {
                "alphabet": alphabet,
                "num_classes": len(alphabet) + 1,
                "min_length": min(lengths),
                "max_length": max(lengths),
                "data_source": data.source,
                "dataset_sha256": digest,
                "n_train": len(splits["train"]),
                "n_val": len(splits["val"]),
                "n_test": len(splits["test"]),
                "skipped_files": data.skipped.total,
                "augment_applied": augment,
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
                config.learning_rate, weight_decay=config.weight_decay, clipnorm=config.clipnorm
            ),
            loss=ctc_loss,
        )
        steps = math.ceil(len(splits["train"]) / config.batch_size) * config.epochs
        deadline = start + config.max_minutes * 60
        schedule = _Schedule(config, steps, deadline, time.monotonic())
        monitor = _Monitor(
            infer, x["val"], y["val"], labels["val"], alphabet, config, schedule, report
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
        if monitor.best_weights is not None:
            train_model.set_weights(monitor.best_weights)
        fit_seconds = time.monotonic() - fit_start
        report("exporting and evaluating", 1.0, monitor.history[-1] if monitor.history else {})
        meta = {
            "alphabet": alphabet,
            "height": arch.height,
            "width": arch.width,
            "min_length": min(lengths),
            "max_length": max(lengths),
            "model_format": "onnx",
        }
        with tempfile.TemporaryDirectory() as tmp:
            result = _finish(
                run.info.run_id, infer, meta, data, splits, labels["test"], Path(tmp), settings
            )
        result.metrics |= {
            "best_epoch": float(monitor.best_epoch + 1),
            "epochs_run": float(len(monitor.history)),
            "fit_seconds": fit_seconds,
            "wall_seconds": time.monotonic() - start,
        }
        mlflow.log_metrics(
            {
                k: result.metrics[k]
                for k in ("best_epoch", "epochs_run", "fit_seconds", "wall_seconds")
            }
        )
        result.skipped = data.skipped.summary()
        return result


def _finish(
    run_id, infer, meta, data, splits, true_test, tmp: Path, settings: Settings
) -> TrainResult:
    infer.predict(np.zeros((1, meta["height"], meta["width"], 1), np.float32), verbose=0)
    onnx_path = tmp / "crnn.onnx"
    infer.export(str(onnx_path), format="onnx", verbose=False)
    keras_path = tmp / "crnn.keras"
    infer.save(keras_path)
    mlflow.log_artifact(str(keras_path), "keras")
    (tmp / "meta.json").write_text(json.dumps(meta))
    served = CaptchaModel()
    served.load(onnx_path, tmp / "meta.json")
    test_images = [data.images[i] for i in splits["test"]]
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
    console.print(f"run {result.run_id}; registered {result.model_uri}", highlight=False)
    if result.staged:
        console.print("alias staging -> this version", highlight=False)
    else:
        console.print(f"not staged: {result.rejection_reason}", highlight=False)
