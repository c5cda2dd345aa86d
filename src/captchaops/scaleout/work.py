"""The unit of work: one training run (a fold, a trial or a member), the same loop `train` runs.

A worker gets the data set from the tracking server (by the parent run and path the driver
uploaded), fits with `training.loop.fit` unchanged, scores the run's held-out images and
returns picklable results. Per-epoch metrics go to the run's child run over the tracking
server's REST API when the driver made one; `on_epoch` lets Tune see them too.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from captchaops.model.crnn import Architecture
from captchaops.training.config import TrainConfig

EpochHook = Callable[[dict[str, float], int], None]


@dataclass(frozen=True)
class Job:
    """Everything a worker needs for one training run; the images come from the tracking server."""

    name: str
    config: TrainConfig
    arch: Architecture
    alphabet: str
    max_length: int
    augment: bool
    tracking_uri: str
    dataset_run_id: str
    dataset_path: str
    train: tuple[int, ...]
    val: tuple[int, ...]
    test: tuple[int, ...] = ()
    run_id: str | None = None  # the child run per-epoch metrics go to
    keep_weights: bool = False  # return the fitted weights (for export by the driver)
    predict_val: bool = False  # also return the validation answers (to choose how members vote)
    ends_by: float | None = None  # wall clock (time.time()) the run must end by: a search's budget


@dataclass
class Outcome:
    """What one training run produced."""

    name: str
    metrics: dict[str, float]
    predictions: list[tuple[str, float]] = field(default_factory=list)  # test (text, confidence)
    weights: list[np.ndarray] | None = None
    attempt: int = 1
    val_predictions: list[tuple[str, float]] = field(default_factory=list)  # when predict_val


ATTEMPT_TAG = "captchaops.attempt"


def run_job(job: Job, on_epoch: EpochHook | None = None) -> Outcome:
    """Fit one CRNN for `job` and score it on its held-out images (runs inside a Ray worker)."""
    import keras

    from captchaops.evaluation.accuracy import character_error_rate, sequence_accuracy
    from captchaops.model.ctc import decode_greedy, encode_labels
    from captchaops.scaleout.shipping import fetch
    from captchaops.training.loop import Validation, fit
    from captchaops.training.tensors import arrays

    start = time.monotonic()
    attempt = _count_attempt(job)
    data = fetch(job.tracking_uri, job.dataset_run_id, job.dataset_path)
    keras.utils.set_random_seed(job.config.seed)
    x = {name: arrays(data, list(idx), job.arch) for name, idx in _splits(job).items() if idx}
    labels = {name: [data.labels[i] for i in idx] for name, idx in _splits(job).items()}
    y = {name: encode_labels(labels[name], job.alphabet, job.max_length) for name in x}
    best_cer = float("inf")

    def log(metrics: dict[str, float], epoch: int) -> None:
        nonlocal best_cer
        best_cer = min(best_cer, metrics["val_cer"])
        shown = metrics | {"best_val_cer": best_cer}
        if job.run_id is not None:
            _log_metrics(job, shown, epoch)
        if on_epoch is not None:
            on_epoch(shown, epoch)

    fitted = fit(
        job.config,
        job.arch,
        job.alphabet,
        (x["train"], y["train"]),
        Validation(x["val"], y["val"], labels["val"], job.alphabet),
        augment=job.augment,
        deadline=start + seconds_allowed(job),
        report=lambda stage, fraction, metrics: None,
        log=log,
    )
    metrics = fitted.summary() | {"best_val_cer": best_cer, "wall_seconds": 0.0}
    if fitted.history:
        metrics |= {f"final_{k}": v for k, v in fitted.history[-1].items()}
    predictions: list[tuple[str, float]] = []
    if "test" in x:
        probs = fitted.infer.predict(x["test"], batch_size=256, verbose=0)
        predictions = decode_greedy(probs, job.alphabet)
        texts = [t for t, _ in predictions]
        metrics |= {
            "test_seq_acc": sequence_accuracy(texts, labels["test"]),
            "test_cer": character_error_rate(texts, labels["test"]),
            "n_test": float(len(texts)),
        }
    val_predictions: list[tuple[str, float]] = []
    if job.predict_val:
        probs = fitted.infer.predict(x["val"], batch_size=256, verbose=0)
        val_predictions = decode_greedy(probs, job.alphabet)
    metrics["wall_seconds"] = time.monotonic() - start
    weights = fitted.infer.get_weights() if job.keep_weights else None
    return Outcome(job.name, metrics, predictions, weights, attempt, val_predictions)


def seconds_allowed(job: Job, now: float | None = None) -> float:
    """How long `job` may run from now: its preset's budget, cut to what is left of its search's
    (wall clock, so that it means the same on every host)."""
    allowed = job.config.max_minutes * 60
    if job.ends_by is not None:
        allowed = min(allowed, job.ends_by - (time.time() if now is None else now))
    return max(allowed, 0.0)


def _splits(job: Job) -> dict[str, tuple[int, ...]]:
    return {"train": job.train, "val": job.val, "test": job.test}


def _count_attempt(job: Job) -> int:
    """1 on the first try; a retried run (its worker died) finds its earlier attempt's tag."""
    if job.run_id is None:
        return 1
    from mlflow.tracking import MlflowClient

    client = MlflowClient(job.tracking_uri, job.tracking_uri)
    attempt = int(client.get_run(job.run_id).data.tags.get(ATTEMPT_TAG, "0")) + 1
    client.set_tag(job.run_id, ATTEMPT_TAG, str(attempt))
    client.set_tag(job.run_id, "state", "running")
    address, node_id = _node()
    client.set_tag(job.run_id, "captchaops.node", address)
    client.set_tag(job.run_id, "captchaops.node_id", node_id)
    return attempt


def _node() -> tuple[str, str]:
    """The address and id of the Ray node this runs on (where the run trained)."""
    try:
        import ray

        return str(ray.util.get_node_ip_address()), str(ray.get_runtime_context().get_node_id())
    except Exception:  # outside Ray
        return "local", "local"


def _log_metrics(job: Job, metrics: dict[str, float], epoch: int) -> None:
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    assert job.run_id is not None
    now = int(time.time() * 1000)
    MlflowClient(job.tracking_uri, job.tracking_uri).log_batch(
        job.run_id, metrics=[Metric(k, float(v), now, epoch) for k, v in metrics.items()]
    )
