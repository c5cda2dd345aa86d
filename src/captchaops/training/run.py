"""`captchaops train` one way: check the server, prepare the data, fit, publish the version.

The three stages are `training.prepare` (data in), `training.loop.fit` (MLflow-free) and
`training.publish` (export, test, register: a `Candidate`). `train` creates the one
`MlflowClient` the stages use and calls each in turn, handing each the previous one's data
(`Prepared`, `Fitted`, `HeldOut`), never a callable; then it has the gate's staging rule
(`stage_candidate`) judge the candidate, which no stage does. Nothing below it calls back up
into this module. Progress goes to the callback the caller hands down (the CLI's progress bar).
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import keras
import mlflow

from captchaops import mlflow_scope
from captchaops.data.dataset import DataError
from captchaops.mlflow_scope import pointed_at
from captchaops.settings import Settings
from captchaops.stack.promotions_client import ServiceError, stage_candidate
from captchaops.training import TrainError
from captchaops.training.config import TrainConfig, with_overrides
from captchaops.training.loop import Plan, Progress, fit, silent
from captchaops.training.prepare import Prepared, load_data, prepared
from captchaops.training.publish import TrainResult, conclude, publish

__all__ = [
    "DataError",
    "Progress",
    "TrainConfig",
    "TrainError",
    "TrainResult",
    "check_tracking",
    "load_data",
    "train",
    "with_overrides",
]


def check_tracking(settings: Settings) -> None:
    """Fail in one line, before any work, when the tracking server does not answer."""
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
    report = progress or silent
    check_tracking(settings)
    with pointed_at(settings):
        client = mlflow_scope.client(settings)
        keras.utils.set_random_seed(config.seed)
        with prepared(client, config, settings, report, start) as preparation:
            p = preparation.prepared
            mlflow.set_experiment(settings.experiment_name)
            with mlflow.start_run(run_name=_run_name(config, p.n_read)) as run:
                mlflow.log_params(_params(config, settings, p))
                fitted = fit(
                    config,
                    p.arch,
                    p.alphabet,
                    p.train,
                    preparation.val,  # the fresh path's: drawn beside the first steps
                    augment=p.augment,
                    deadline=start + config.max_minutes * 60,
                    report=report,
                    log=mlflow.log_metrics,
                )
                candidate = publish(
                    client,
                    run.info.run_id,
                    settings,
                    p,
                    preparation.held_out(),  # the fresh path's sets, drawn while fitting
                    fitted,
                    report=report,
                )
                try:  # by the promotion service where one signs for the stack
                    rejection = stage_candidate(
                        client, settings, candidate.version, candidate.metrics["test_seq_acc"]
                    )
                except ServiceError as exc:
                    raise TrainError(
                        f"v{candidate.version} of {settings.model_name} is registered but not "
                        f"staged: {exc}"
                    ) from exc
                return conclude(candidate, rejection, fitted, config, settings, p.n_train, start)


def _params(config: TrainConfig, settings: Settings, p: Prepared) -> dict[str, object]:
    """The run's parameters known before fitting."""
    plan = Plan.of(config, p.n_train)
    return (
        config.params()
        | p.arch.params()
        | {
            "alphabet": p.alphabet,
            "num_classes": len(p.alphabet) + 1,
            "min_length": p.lengths[0],
            "max_length": p.lengths[1],
            "data_kind": p.kind,
            "data_path": "fixed" if isinstance(p.train, tuple) else "fresh",
            "scheme": settings.model_name,
            "n_read": p.n_read,
            "n_train": p.n_train,
            "n_val": p.n_val,
            "test_set": "frozen held-out set" if p.frozen is not None else "test split",
            "frozen_evalset_digest": p.frozen.digest if p.frozen is not None else "",
            "augment_applied": p.augment,
            "planned_steps": plan.steps,
            "effective_min_steps": plan.min_steps,
            "optimizer": "AdamW",
            "lr_schedule": "linear warmup + cosine in steps, planned from measured step time",
            "keras_backend": keras.backend.backend(),
            "keras_version": keras.__version__,
        }
    )


def _run_name(config: TrainConfig, n: int) -> str:
    kind = Path(config.data_dir).name if config.data_dir is not None else "synthetic"
    return f"{kind}-{n}-seed{config.seed}"
