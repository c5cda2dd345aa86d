"""Training's last stage: a fitted network exported, tested, logged and handed to the registry.

`publish` runs inside the training run, after fitting, on data alone (the prepared data, its
held-out images and the fitted network): it logs what the data turned out to be, exports and
tests the version as a server reads it and registers it through `registry`, a `Candidate`;
`training.run` has the gate stage or reject it, then `conclude` logs the run's times.
Everything goes through the one client it is given.
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow import MlflowClient

from captchaops.model.version import META_SCHEMA, PREPROCESSING
from captchaops.registry.versions import register_version
from captchaops.settings import Settings
from captchaops.training.artifacts import export_and_test, log_dataset
from captchaops.training.config import TrainConfig
from captchaops.training.loop import Fitted, Progress
from captchaops.training.prepare import HeldOut, Prepared


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


@dataclass(frozen=True)
class Candidate:
    """A registered version the gate has not judged yet: what `publish` hands back."""

    run_id: str
    version: str
    metrics: dict[str, float]  # its test scores
    skipped: str  # the files left out of the data, as `SkipReport.summary` says
    frozen: str | None  # which frozen evaluation set it was tested on, if any


def publish(
    client: MlflowClient,
    run_id: str,
    settings: Settings,
    p: Prepared,
    held_out: HeldOut,
    fitted: Fitted,
    *,
    report: Progress,
) -> Candidate:
    """Log the data and the test scores and register the version (the caller has the gate
    stage or reject it)."""
    frozen, arch = p.frozen, p.arch
    data, digest = held_out.data, held_out.digest
    test_images, test_labels = held_out.test_images, held_out.test_labels
    mlflow.log_params(
        {
            "data_source": data.source,
            "dataset_sha256": digest,
            "n_test": len(test_labels),
            "excluded_frozen_images": p.n_read - len(data) if frozen is not None else 0,
            "skipped_files": data.skipped.total,
        }
    )
    log_dataset(data, held_out.splits, digest)
    mlflow.log_param("model_parameters", fitted.infer.count_params())
    if fitted.averaged is not None:
        mlflow.log_metrics({f"ema_{k}": v for k, v in fitted.averaged.items()})
    report("exporting and evaluating", 1.0, fitted.history[-1] if fitted.history else {})
    meta = {
        "schema_version": META_SCHEMA,
        "alphabet": p.alphabet,
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
            client, fitted.infer, meta, test_images, test_labels, Path(tmp)
        )
    version = register_version(client, settings.model_name, model_uri, run_id)
    tested_on = (
        None
        if frozen is None
        else f"tested on {settings.model_name}'s frozen evaluation set {frozen.digest[:12]}: "
        f"{len(frozen)} held-out images, none of them trained on"
    )
    return Candidate(run_id, version, metrics, data.skipped.summary(), tested_on)


def conclude(
    candidate: Candidate,
    rejection: str | None,
    fitted: Fitted,
    config: TrainConfig,
    settings: Settings,
    n_train: int,
    start: float,
) -> TrainResult:
    """Log the run's step and time figures once the gate has judged the candidate (`rejection`:
    why it was not staged, None when it was) and say what the run produced."""
    timings = fitted.summary() | {"wall_seconds": time.monotonic() - start}
    if math.isfinite(fitted.first_step_at):
        timings["seconds_to_first_step"] = fitted.first_step_at - start
    mlflow.log_metrics(timings)
    result = TrainResult(
        run_id=candidate.run_id,
        version=candidate.version,
        model_uri=f"models:/{settings.model_name}/{candidate.version}",
        metrics=candidate.metrics | timings,
        staged=rejection is None,
        rejection_reason=rejection,
        skipped=candidate.skipped,
        frozen=candidate.frozen,
    )
    result.warning = _reads_nothing(result, n_train, config)
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
