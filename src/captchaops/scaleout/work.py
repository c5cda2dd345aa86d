"""The unit of work: one training run (a fold, a trial or a member), the same loop `train` runs.

A worker reads the data set from the tracking server's artifact store by the manifest digest
the driver handed it, a shard at a time (`scaleout.feed`), fits with `training.loop.fit`
unchanged (training arrays, or a stream of batches when the arrays would be larger than
`stream_above` bytes), scores the run's held-out images in chunks and returns picklable
results. Per-epoch metrics go to the run's child run over the tracking server's REST API when
the driver made one; `on_epoch` lets Tune see them too.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import keras
import numpy as np
import ray
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from captchaops.evaluation.accuracy import character_error_rate, sequence_accuracy
from captchaops.model.crnn import Architecture
from captchaops.model.ctc import decode_greedy, encode_labels
from captchaops.scaleout.feed import (
    STREAM_ABOVE_BYTES,
    DataSet,
    input_bytes,
    steps_per_epoch,
    streams,
)
from captchaops.scaleout.shipping import Shipped
from captchaops.training.config import TrainConfig
from captchaops.training.loop import Stream, Validation, fit

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
    parent_run_id: str  # the command's parent run (a trial's weights go there)
    dataset: Shipped  # where the data set's manifest and shards are
    train: tuple[int, ...]
    val: tuple[int, ...]
    test: tuple[int, ...] = ()
    run_id: str | None = None  # the child run per-epoch metrics go to
    keep_weights: bool = False  # return the fitted weights (for export by the driver)
    predict_val: bool = False  # also return the validation answers (to choose how members vote)
    ends_by: float | None = None  # wall clock (time.time()) the run must end by: a search's budget
    stream_above: int = STREAM_ABOVE_BYTES  # training arrays larger than this are streamed


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
    start = time.monotonic()
    attempt = _count_attempt(job)
    data = DataSet(job.tracking_uri, job.dataset)
    keras.utils.set_random_seed(job.config.seed)
    labels = {name: [data.labels[i] for i in idx] for name, idx in _splits(job).items()}
    streamed = streams(len(job.train), job.arch, job.stream_above)
    train: tuple[np.ndarray, np.ndarray] | Stream
    if streamed:
        batch = job.config.batch_size
        train = Stream(
            data.batches(job.train, job.arch, job.alphabet, job.max_length, batch, job.config.seed),
            steps_per_epoch(len(job.train), batch),
            generated=lambda: 0,
        )
    else:
        y_train = encode_labels(labels["train"], job.alphabet, job.max_length)
        train = (data.arrays(job.train, job.arch), y_train)
    _tag(job, "captchaops.data", _how(job, streamed, len(data.manifest.shards)))
    val_x = data.arrays(job.val, job.arch)
    val_y = encode_labels(labels["val"], job.alphabet, job.max_length)
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
        train,
        Validation(val_x, val_y, labels["val"], job.alphabet),
        augment=job.augment,
        deadline=start + seconds_allowed(job),
        report=lambda stage, fraction, metrics: None,
        log=log,
    )
    del train
    metrics = fitted.summary() | {"best_val_cer": best_cer, "wall_seconds": 0.0}
    if fitted.history:
        metrics |= {f"final_{k}": v for k, v in fitted.history[-1].items()}
    predictions: list[tuple[str, float]] = []
    if job.test:
        predictions = [("", 0.0)] * len(job.test)
        for positions, x in data.chunks(job.test, job.arch):
            probs = fitted.infer.predict(x, batch_size=256, verbose=0)
            for pos, answer in zip(positions, decode_greedy(probs, job.alphabet), strict=True):
                predictions[pos] = answer
        texts = [t for t, _ in predictions]
        metrics |= {
            "test_seq_acc": sequence_accuracy(texts, labels["test"]),
            "test_cer": character_error_rate(texts, labels["test"]),
            "n_test": float(len(texts)),
        }
    val_predictions: list[tuple[str, float]] = []
    if job.predict_val:
        probs = fitted.infer.predict(val_x, batch_size=256, verbose=0)
        val_predictions = decode_greedy(probs, job.alphabet)
    metrics["data_streamed"] = float(streamed)
    metrics["data_shards_fetched"] = float(data.fetched)
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


def _how(job: Job, streamed: bool, shards: int) -> str:
    """How the run's training images reached `fit`, in words (the child run's tag)."""
    size = input_bytes(len(job.train), job.arch) / 2**20
    if streamed:
        return (
            f"streamed from {shards} shards: {len(job.train)} training images are {size:.0f} MiB "
            f"as arrays, over {job.stream_above / 2**20:.0f} MiB"
        )
    return f"arrays: {len(job.train)} training images, {size:.0f} MiB, read from {shards} shards"


def _tag(job: Job, key: str, value: str) -> None:
    """Set a tag on the run's child run, when the driver made one."""
    if job.run_id is None:
        return
    MlflowClient(job.tracking_uri, job.tracking_uri).set_tag(job.run_id, key, value)


def _count_attempt(job: Job) -> int:
    """1 on the first try; a retried run (its worker died) finds its earlier attempt's tag."""
    if job.run_id is None:
        return 1
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
        return str(ray.util.get_node_ip_address()), str(ray.get_runtime_context().get_node_id())
    except Exception:  # outside Ray
        return "local", "local"


def _log_metrics(job: Job, metrics: dict[str, float], epoch: int) -> None:
    assert job.run_id is not None
    now = int(time.time() * 1000)
    MlflowClient(job.tracking_uri, job.tracking_uri).log_batch(
        job.run_id, metrics=[Metric(k, float(v), now, epoch) for k, v in metrics.items()]
    )
