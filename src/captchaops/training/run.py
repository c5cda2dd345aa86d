"""Train inside an MLflow run: data in, the fitted version registered and staged or rejected.

The loop itself lives in `captchaops.training` (MLflow-free); this module supplies the data,
the run's parameters and artefacts, and hands the exported version to the registry.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import keras
import mlflow
import numpy as np
from mlflow import MlflowClient

from captchaops import registry
from captchaops.data import synthetic
from captchaops.data.corrections import download_feedback
from captchaops.data.dataset import DataError, LabelledImages, split_indices
from captchaops.data.folder import read_folder
from captchaops.evaluation.evalset import EvalSet, EvalSetError, folder_evalset
from captchaops.mlflow_scope import pointed_at
from captchaops.model.crnn import Architecture
from captchaops.model.ctc import encode_labels
from captchaops.model.version import META_SCHEMA, PREPROCESSING
from captchaops.settings import Settings
from captchaops.training import TrainError
from captchaops.training.artifacts import export_and_test, log_dataset
from captchaops.training.config import TrainConfig, with_overrides
from captchaops.training.fresh import fresh_data
from captchaops.training.loop import Plan, Progress, Stream, Validation, arrays, fit, geometry

__all__ = [
    "DataError",
    "Progress",
    "TrainConfig",
    "TrainError",
    "TrainResult",
    "load_data",
    "train",
    "with_overrides",
]


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


def check_tracking(settings: Settings) -> None:
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
    check_tracking(settings)
    with pointed_at(settings):
        return _train(config, settings, progress or (lambda stage, fraction, metrics: None), start)


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


@dataclass
class _Prepared:
    """What `_run` trains on: the fixed path's arrays or the fresh path's stream."""

    kind: str
    alphabet: str
    lengths: tuple[int, int]
    arch: Architecture
    train: tuple[np.ndarray, np.ndarray] | Stream
    n_train: int
    val: Validation | Callable[[], Validation]  # fresh: drawn while training starts
    n_val: int
    held_out: Callable[[], tuple[LabelledImages, dict[str, list[int]]]]  # after fitting
    test: Callable[[LabelledImages, dict[str, list[int]]], tuple[list[bytes], list[str]]]
    augment: bool
    n_read: int
    frozen: EvalSet | None = None


def _train(config: TrainConfig, settings: Settings, report: Progress, start: float) -> TrainResult:
    keras.utils.set_random_seed(config.seed)
    if config.data_dir is None and config.fresh and not config.include_feedback:
        alphabet = config.alphabet or synthetic.DIGITS_UPPER
        arch = geometry(config, None, config.length[1])
        report("starting the generators", 0.0, {})
        with fresh_data(config, arch, alphabet) as fresh:
            n_val, n_test = fresh.n_val, fresh.n_test
            splits = {
                "train": [],
                "val": list(range(n_val)),
                "test": list(range(n_val, n_val + n_test)),
            }
            prepared = _Prepared(
                kind="synthetic",
                alphabet=alphabet,
                lengths=config.length,
                arch=arch,
                train=fresh.stream(math.ceil(fresh.capacity / config.batch_size)),
                n_train=fresh.capacity,
                val=fresh.validation,
                n_val=n_val,
                held_out=lambda: (fresh.held_out(config.seed), splits),
                test=lambda data, splits: (
                    [data.images[i] for i in splits["test"]],
                    [data.labels[i] for i in splits["test"]],
                ),
                augment=bool(config.augment),
                n_read=config.synthetic,
            )
            return _run(config, settings, report, start, prepared)
    return _run(config, settings, report, start, _prepare_fixed(config, settings, report))


def _prepare_fixed(config: TrainConfig, settings: Settings, report: Progress) -> _Prepared:
    """A folder, or one generated set drawn before training starts, split and preprocessed."""
    data = load_data(config, settings, report)
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
    arch = geometry(config, data, max(lengths))
    test_fraction = 0.0 if frozen is not None else config.test_fraction
    splits = split_indices(data.names, config.val_fraction, test_fraction)
    if not splits["train"] or not splits["val"] or (frozen is None and not splits["test"]):
        raise DataError(
            f"{len(data)} usable images are too few to split into train/val/test; add more images"
        )
    report("preprocessing", 0.0, {})
    x = {name: arrays(data, idx, arch) for name, idx in splits.items() if idx}
    labels = {name: [data.labels[i] for i in idx] for name, idx in splits.items()}
    y = {name: encode_labels(labels[name], alphabet, max(lengths)) for name in x}

    def test(data: LabelledImages, splits: dict[str, list[int]]) -> tuple[list[bytes], list[str]]:
        if frozen is not None:
            return frozen.images, frozen.labels
        return [data.images[i] for i in splits["test"]], labels["test"]

    return _Prepared(
        kind="synthetic" if config.data_dir is None else "folder",
        alphabet=alphabet,
        lengths=(min(lengths), max(lengths)),
        arch=arch,
        train=(x["train"], y["train"]),
        n_train=len(splits["train"]),
        val=Validation(x["val"], y["val"], labels["val"], alphabet),
        n_val=len(splits["val"]),
        held_out=lambda: (data, splits),
        test=test,
        augment=config.augment if config.augment is not None else config.data_dir is not None,
        n_read=n_read,
        frozen=frozen,
    )


def _run(
    config: TrainConfig, settings: Settings, report: Progress, start: float, p: _Prepared
) -> TrainResult:
    frozen, arch, alphabet = p.frozen, p.arch, p.alphabet
    mlflow.set_experiment(settings.experiment_name)
    with mlflow.start_run(run_name=_run_name(config, p.n_read)) as run:
        plan = Plan.of(config, p.n_train)
        mlflow.log_params(
            config.params()
            | arch.params()
            | {
                "alphabet": alphabet,
                "num_classes": len(alphabet) + 1,
                "min_length": p.lengths[0],
                "max_length": p.lengths[1],
                "data_kind": p.kind,
                "data_path": "fresh" if isinstance(p.train, Stream) else "fixed",
                "scheme": settings.model_name,
                "n_read": p.n_read,
                "n_train": p.n_train,
                "n_val": p.n_val,
                "test_set": "frozen held-out set" if frozen is not None else "test split",
                "frozen_evalset_digest": frozen.digest if frozen is not None else "",
                "augment_applied": p.augment,
                "planned_steps": plan.steps,
                "effective_min_steps": plan.min_steps,
                "optimizer": "AdamW",
                "lr_schedule": "linear warmup + cosine in steps, planned from measured step time",
                "keras_backend": keras.backend.backend(),
                "keras_version": keras.__version__,
            }
        )
        fitted = fit(
            config,
            arch,
            alphabet,
            p.train,
            p.val,
            augment=p.augment,
            deadline=start + config.max_minutes * 60,
            report=report,
            log=_log_epoch,
        )
        data, splits = p.held_out()
        test_images, test_labels = p.test(data, splits)
        digest = data.digest()
        mlflow.log_params(
            {
                "data_source": data.source,
                "dataset_sha256": digest,
                "n_test": len(test_labels),
                "excluded_frozen_images": p.n_read - len(data) if frozen is not None else 0,
                "skipped_files": data.skipped.total,
            }
        )
        log_dataset(data, splits, digest)
        mlflow.log_param("model_parameters", fitted.infer.count_params())
        if fitted.averaged is not None:
            mlflow.log_metrics({f"ema_{k}": v for k, v in fitted.averaged.items()})
        report("exporting and evaluating", 1.0, fitted.history[-1] if fitted.history else {})
        meta = {
            "schema_version": META_SCHEMA,
            "alphabet": alphabet,
            "height": arch.height,
            "width": arch.width,
            "min_length": p.lengths[0],
            "max_length": p.lengths[1],
            "preprocessing": PREPROCESSING,
            "dataset_sha256": digest,
            "scheme": settings.model_name,
            "data_kind": p.kind,
            "model_format": "onnx",
        }
        with tempfile.TemporaryDirectory() as tmp:
            model_uri, metrics = export_and_test(
                fitted.infer, meta, test_images, test_labels, Path(tmp)
            )
        mlflow_client = registry.client(settings)
        version = registry.register_version(
            mlflow_client, settings.model_name, model_uri, run.info.run_id
        )
        result = _stage(mlflow_client, run.info.run_id, version, metrics, settings)
        timings = fitted.summary() | {"wall_seconds": time.monotonic() - start}
        if math.isfinite(fitted.first_step_at):
            timings["seconds_to_first_step"] = fitted.first_step_at - start
        mlflow.log_metrics(timings)
        result.metrics = metrics | timings
        result.skipped = data.skipped.summary()
        result.warning = _reads_nothing(result, p.n_train, config)
        if frozen is not None:
            result.frozen = (
                f"tested on {settings.model_name}'s frozen evaluation set {frozen.digest[:12]}: "
                f"{len(frozen)} held-out images, none of them trained on"
            )
        return result


def _log_epoch(metrics: dict[str, float], epoch: int) -> None:
    mlflow.log_metrics(metrics, step=epoch)


def _stage(
    mlflow_client: MlflowClient,
    run_id: str,
    version: str,
    metrics: dict[str, float],
    settings: Settings,
) -> TrainResult:
    """Hand the version to the registry, which stages it or records why not (both audited)."""
    reason = registry.stage_candidate(
        mlflow_client,
        settings.model_name,
        version,
        accuracy=metrics["test_seq_acc"],
        floor=settings.staging_floor,
    )
    return TrainResult(
        run_id=run_id,
        version=version,
        model_uri=f"models:/{settings.model_name}/{version}",
        metrics=metrics,
        staged=reason is None,
        rejection_reason=reason,
    )


def _reads_nothing(result: TrainResult, n: int, config: TrainConfig) -> str | None:
    """One line with the likely fix when the model reads no test image at all."""
    if result.metrics["test_seq_acc"] > 0:
        return None
    return (
        f"the model reads none of its test images (CER {result.metrics['test_cer']:.2f}) after "
        f"{result.metrics['steps_run']:.0f} steps on {n} images: it stopped before it learned; "
        f"give it more time (--max-minutes {max(2 * config.max_minutes, 10):.0f}) or more images"
    )


def _run_name(config: TrainConfig, n: int) -> str:
    kind = Path(config.data_dir).name if config.data_dir is not None else "synthetic"
    return f"{kind}-{n}-seed{config.seed}"
