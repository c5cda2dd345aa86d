"""Training's last stage: a fitted network exported, tested, logged and handed to the registry.

`publish` runs inside the training run, after fitting, on data alone (the prepared data, its
held-out images and the fitted network): it logs what the data turned out to be, exports and
tests the version as a server reads it, registers it through `registry` and lets the gate's
staging rule stage or reject it. Everything goes through the one client it is given.
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow import MlflowClient

from captchaops import registry
from captchaops.decisions.gate import stage_candidate
from captchaops.model.version import META_SCHEMA, PREPROCESSING
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


def publish(
    client: MlflowClient,
    run_id: str,
    config: TrainConfig,
    settings: Settings,
    p: Prepared,
    held_out: HeldOut,
    fitted: Fitted,
    *,
    report: Progress,
    start: float,
) -> TrainResult:
    """Log the data and the test scores, register the version and stage or reject it."""
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
    version = registry.register_version(client, settings.model_name, model_uri, run_id)
    reason = stage_candidate(client, settings, version, metrics["test_seq_acc"])
    timings = fitted.summary() | {"wall_seconds": time.monotonic() - start}
    if math.isfinite(fitted.first_step_at):
        timings["seconds_to_first_step"] = fitted.first_step_at - start
    mlflow.log_metrics(timings)
    result = TrainResult(
        run_id=run_id,
        version=version,
        model_uri=f"models:/{settings.model_name}/{version}",
        metrics=metrics | timings,
        staged=reason is None,
        rejection_reason=reason,
        skipped=data.skipped.summary(),
    )
    result.warning = _reads_nothing(result, p.n_train, config)
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
