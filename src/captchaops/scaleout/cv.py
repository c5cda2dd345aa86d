"""`captchaops cv`: k-fold cross-validated held-out accuracy of a training preset, folds in parallel.

Each image's fold is decided by hashing its name (the same folds as `benchmarks/bench_folder`);
fold k trains on the other folds (its validation split by name hash, as `train` does) and is
scored on fold k. One parent MLflow run holds the data set and the summary, one child run per
fold its parameters, per-epoch metrics and held-out score.
"""

from __future__ import annotations

import hashlib
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from mlflow.tracking import MlflowClient

from captchaops import mlflow_scope
from captchaops.data.dataset import DataError, LabelledImages, split_of
from captchaops.data.folder import read_folder
from captchaops.scaleout.board import Board
from captchaops.scaleout.engine import cpus_per_run, ray_session
from captchaops.scaleout.runner import Failure, Interrupted, ParentRun, parent_run, run_jobs
from captchaops.scaleout.shipping import publish
from captchaops.scaleout.work import Job, Outcome
from captchaops.settings import Settings
from captchaops.training.config import TrainConfig
from captchaops.training.loop import geometry

INTERVAL = "t-interval over folds (95%)"


@dataclass
class FoldScore:
    """One fold's held-out result (accuracy None when it failed)."""

    fold: int
    n: int
    accuracy: float | None
    cer: float | None
    best_val_cer: float | None
    minutes: float
    run_id: str
    note: str = ""


@dataclass
class CvResult:
    """Per-fold scores and their summary."""

    parent_run_id: str
    folds: list[FoldScore]
    mean: float | None
    worst: float | None
    interval: tuple[float, float] | None
    interrupted: bool = False


def fold_of(name: str, k: int) -> int:
    """The fold (0..k-1) an image belongs to, by hashing its name."""
    digest = hashlib.sha256(f"fold/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % k


def t_interval(values: list[float]) -> tuple[float, float] | None:
    """The 95% t-interval of the mean of `values` (None for fewer than two)."""
    if len(values) < 2:
        return None
    from scipy import stats

    mean = statistics.fmean(values)
    half = float(stats.t.ppf(0.975, len(values) - 1)) * statistics.stdev(values)
    half /= math.sqrt(len(values))
    return max(0.0, mean - half), min(1.0, mean + half)


def cross_validate(
    config: TrainConfig,
    settings: Settings,
    folds: int,
    cluster: str | None,
    board: Board,
    redraw: Callable[[], None] = lambda: None,
    cpus: int | None = None,
) -> CvResult:
    """Train one run per fold on Ray, log parent and child runs, return the held-out scores."""
    if config.data_dir is None:
        raise DataError("cv needs --data DIR, a folder of images named <label>.png")
    if not 2 <= folds <= 20:
        raise DataError(f"--folds {folds} is out of range; use 2 to 20 (5 is usual)")
    data = read_folder(config.data_dir, alphabet=config.alphabet)
    of = [fold_of(name, folds) for name in data.names]
    if min(of.count(k) for k in range(folds)) < 2:
        raise DataError(
            f"{len(data)} images are too few for {folds} folds; add images or use fewer"
        )
    alphabet = config.alphabet or data.alphabet()
    arch = geometry(config, data, max(len(label) for label in data.labels))
    params = config.params() | arch.params() | _data_params(data, alphabet, folds)
    name = f"cv-{config.data_dir.name}-{folds}folds"
    with parent_run(settings, name, "cv", params) as parent:
        return _run_folds(config, settings, parent, data, of, folds, cluster, board, redraw, cpus)


def _run_folds(
    config: TrainConfig,
    settings: Settings,
    parent: ParentRun,
    data: LabelledImages,
    of: list[int],
    folds: int,
    cluster: str | None,
    board: Board,
    redraw: Callable[[], None],
    cpus: int | None,
) -> CvResult:
    """Publish the data, a child run and a Ray task per fold; log the summary."""
    client, parent_id = parent.client, parent.run_id
    alphabet = config.alphabet or data.alphabet()
    max_length = max(len(label) for label in data.labels)
    arch = geometry(config, data, max_length)
    augment = config.augment if config.augment is not None else True
    dataset_path = publish(client, parent_id, data)
    jobs: list[Job] = []
    for k in range(folds):
        test = tuple(i for i in range(len(data)) if of[i] == k)
        rest = [i for i in range(len(data)) if of[i] != k]
        val = tuple(i for i in rest if split_of(data.names[i], config.val_fraction, 0.0) == "val")
        held = set(val)
        train = tuple(i for i in rest if i not in held)
        sizes = {"n_train": len(train), "n_val": len(val), "n_test": len(test)}
        child = parent.child(f"fold {k + 1}", "cv-fold", {"fold": k + 1, "folds": folds} | sizes)
        jobs.append(
            Job(
                name=f"fold {k + 1}",
                config=replace(config, seed=config.seed + k),
                arch=arch,
                alphabet=alphabet,
                max_length=max_length,
                augment=augment,
                tracking_uri=mlflow_scope.tracking_uri(settings),
                dataset_run_id=parent_id,
                dataset_path=dataset_path,
                train=train,
                val=val,
                test=test,
                run_id=child,
            )
        )
    start = time.monotonic()
    interrupted = False
    try:
        with ray_session(cluster, cpus=cpus) as engine:
            board.dashboard_url = engine.dashboard_url
            results: dict[str, Outcome | Failure] = dict(
                run_jobs(jobs, cpus_per_run(engine, folds), board, client, redraw)
            )
    except Interrupted as stop:
        results, interrupted = dict(stop.finished), True
    scores = [_close(client, job, results.get(job.name), k) for k, job in enumerate(jobs)]
    result = _summary(parent_id, scores, interrupted)
    summary = {"cv_wall_seconds": time.monotonic() - start}
    if result.mean is not None and result.worst is not None:
        summary |= {"cv_mean_seq_acc": result.mean, "cv_worst_seq_acc": result.worst}
    if result.interval is not None:
        summary |= {"cv_ci95_low": result.interval[0], "cv_ci95_high": result.interval[1]}
    for name, value in summary.items():
        client.log_metric(parent_id, name, value)
    mlflow_scope.finish_run(client, parent_id, "KILLED" if interrupted else "FINISHED")
    return result


def _close(client: MlflowClient, job: Job, result: Outcome | Failure | None, k: int) -> FoldScore:
    """Log a fold's end to its child run and return its score."""
    assert job.run_id is not None
    if not isinstance(result, Outcome):
        note = result.reason if isinstance(result, Failure) else "stopped by Ctrl-C"
        client.set_tag(job.run_id, "state", "failed" if result else "stopped")
        client.set_tag(job.run_id, "captchaops.failure", note)
        mlflow_scope.finish_run(client, job.run_id, "FAILED" if result else "KILLED")
        return FoldScore(k + 1, len(job.test), None, None, None, 0.0, job.run_id, note)
    m = result.metrics
    for name in ("test_seq_acc", "test_cer", "best_val_cer", "wall_seconds", "steps_run"):
        client.log_metric(job.run_id, name, m[name])
    client.set_tag(job.run_id, "state", "done")
    mlflow_scope.finish_run(client, job.run_id)
    note = "retried once: its first worker died" if result.attempt > 1 else ""
    return FoldScore(
        k + 1,
        len(job.test),
        m["test_seq_acc"],
        m["test_cer"],
        m["best_val_cer"],
        m["wall_seconds"] / 60,
        job.run_id,
        note,
    )


def _summary(parent_id: str, scores: list[FoldScore], interrupted: bool) -> CvResult:
    values = [s.accuracy for s in scores if s.accuracy is not None]
    return CvResult(
        parent_run_id=parent_id,
        folds=scores,
        mean=statistics.fmean(values) if values else None,
        worst=min(values) if values else None,
        interval=t_interval(values),
        interrupted=interrupted,
    )


def _data_params(data: LabelledImages, alphabet: str, folds: int) -> dict[str, object]:
    return {
        "folds": folds,
        "alphabet": alphabet,
        "data_source": data.source,
        "dataset_sha256": data.digest(),
        "n_read": len(data),
        "skipped_files": data.skipped.total,
        "interval": INTERVAL,
    }
