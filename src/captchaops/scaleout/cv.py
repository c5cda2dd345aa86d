"""`captchaops cv`: k-fold cross-validated held-out accuracy of a training preset, folds in parallel.

Each image's fold is decided by hashing its name (the same folds as `benchmarks/bench_folder`);
fold k trains on the other folds (its validation split by name hash, as `train` does) and is
scored on fold k. One parent MLflow run holds the data set and the summary, one child run per
fold its parameters, per-epoch metrics and held-out score. With `--members K` a fold is K
training runs (each its own child run, with its own score), combined as `train --members K`
combines an ensemble's answers, by the rule that reads more of the fold's validation images.
"""

from __future__ import annotations

import hashlib
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from mlflow.tracking import MlflowClient
from scipy import stats

from captchaops import mlflow_scope
from captchaops.data.dataset import DataError, LabelledImages, split_of
from captchaops.data.folder import read_folder
from captchaops.evaluation.accuracy import character_error_rate, sequence_accuracy
from captchaops.model.reader import MAX_CONFIDENCE, RULES, VOTE, better_rule, combine_members
from captchaops.scaleout.board import Board
from captchaops.scaleout.engine import checked, cpus_per_run, ray_session
from captchaops.scaleout.feed import STREAM_ABOVE_BYTES, capped, streams
from captchaops.scaleout.runner import Failure, Interrupted, ParentRun, parent_run, run_jobs
from captchaops.scaleout.shipping import upload
from captchaops.scaleout.work import Job, Outcome
from captchaops.settings import Settings
from captchaops.training.config import TrainConfig
from captchaops.training.tensors import geometry

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
    members: int = 1,
    gpus: float = 0.0,
    stream_above: int = STREAM_ABOVE_BYTES,
) -> CvResult:
    """Train one run (or `members` runs, combined as `train --members` combines them) per fold
    on Ray, each with `gpus` GPUs, log parent and child runs, return the held-out scores. A
    fold whose training arrays would be larger than `stream_above` bytes streams them."""
    if config.data_dir is None:
        raise DataError("cv needs --data DIR, a folder of images named <label>.png")
    if not 2 <= folds <= 20:
        raise DataError(f"--folds {folds} is out of range; use 2 to 20 (5 is usual)")
    if not 1 <= members <= 16:
        raise DataError(f"--members {members} is out of range; use 2 to 16 (or leave it out)")
    data = read_folder(config.data_dir, alphabet=config.alphabet)
    of = [fold_of(name, folds) for name in data.names]
    if min(of.count(k) for k in range(folds)) < 2:
        raise DataError(
            f"{len(data)} images are too few for {folds} folds; add images or use fewer"
        )
    alphabet = config.alphabet or data.alphabet()
    arch = geometry(config, data, max(len(label) for label in data.labels))
    params = config.params() | arch.params() | _data_params(data, alphabet, folds)
    params |= {"members": members} if members > 1 else {}
    params |= {"gpus_per_trial": gpus} if gpus else {}
    name = f"cv-{config.data_dir.name}-{folds}folds" + (f"-{members}members" if members > 1 else "")
    with parent_run(settings, name, "cv", params) as parent:
        plan = _plan(config, settings, parent, data, of, (folds, members, stream_above))
        return _run_folds(plan, parent, cluster, board, redraw, (cpus, gpus), settings)


@dataclass
class _Fold:
    """One fold: its child run and its training runs (one, or one per member)."""

    run_id: str
    test: tuple[int, ...]
    jobs: list[Job]


@dataclass
class _Plan:
    """The data set and every fold's runs, ready to submit."""

    data: LabelledImages
    folds: list[_Fold]


def _plan(
    config: TrainConfig,
    settings: Settings,
    parent: ParentRun,
    data: LabelledImages,
    of: list[int],
    shape: tuple[int, int, int],
) -> _Plan:
    """Publish the data as shards; a child run per fold (and per member), a job per training
    run (`shape`: folds, members, and the training arrays' size in bytes above which a fold
    streams them; a streamed fold validates on at most `feed.VAL_CAP` images, spread over its
    validation split). Fold k trains with seed + k; with members, member i of fold k with
    seed + k + i * folds."""
    folds, members, stream_above = shape
    alphabet = config.alphabet or data.alphabet()
    max_length = max(len(label) for label in data.labels)
    arch = geometry(config, data, max_length)
    augment = config.augment if config.augment is not None else True
    shipped = upload(parent.client, parent.experiment, data, parent.run_id)
    planned = []
    for k in range(folds):
        test = tuple(i for i in range(len(data)) if of[i] == k)
        rest = [i for i in range(len(data)) if of[i] != k]
        val = tuple(i for i in rest if split_of(data.names[i], config.val_fraction, 0.0) == "val")
        held = set(val)
        train = tuple(i for i in rest if i not in held)
        if streams(len(train), arch, stream_above):
            val = capped(val)
        sizes = {"n_train": len(train), "n_val": len(val), "n_test": len(test)}
        fold = {"fold": k + 1, "folds": folds} | sizes
        child = parent.child(f"fold {k + 1}", "cv-fold", fold | _members(members))
        job = Job(
            name=f"fold {k + 1}",
            config=replace(config, seed=config.seed + k),
            arch=arch,
            alphabet=alphabet,
            max_length=max_length,
            augment=augment,
            tracking_uri=mlflow_scope.tracking_uri(settings),
            parent_run_id=parent.run_id,
            dataset=shipped,
            train=train,
            val=val,
            test=test,
            run_id=child,
            stream_above=stream_above,
        )
        if members == 1:
            planned.append(_Fold(child, test, [job]))
            continue
        jobs = []
        for i in range(members):
            name = f"fold {k + 1} member {i + 1}"
            seeded = replace(job.config, seed=config.seed + k + i * folds)
            run = parent.child(name, "cv-member", fold | {"member": i + 1, "seed": seeded.seed})
            jobs.append(replace(job, name=name, config=seeded, run_id=run, predict_val=True))
        planned.append(_Fold(child, test, jobs))
    return _Plan(data, planned)


def _members(members: int) -> dict[str, object]:
    if members == 1:
        return {}
    return {"members": members, "combine": f"chosen on validation: {MAX_CONFIDENCE} or {VOTE}"}


def _run_folds(
    plan: _Plan,
    parent: ParentRun,
    cluster: str | None,
    board: Board,
    redraw: Callable[[], None],
    resources: tuple[int | None, float],
    settings: Settings,
) -> CvResult:
    """Every fold's jobs as Ray tasks (after the cluster's check, on a cluster), with the local
    Ray's `resources` (its CPUs) and each run's GPUs; the folds scored and the summary logged."""
    client, parent_id = parent.client, parent.run_id
    jobs = [job for fold in plan.folds for job in fold.jobs]
    start = time.monotonic()
    interrupted = False
    cpus, gpus = resources
    try:
        with ray_session(cluster, cpus=cpus, home=settings.home_dir) as engine:
            checked(engine, parent, jobs[0].tracking_uri, gpus)
            board.dashboard_url = engine.dashboard_url
            per_run = cpus_per_run(engine, len(jobs))
            results: dict[str, Outcome | Failure] = dict(
                run_jobs(jobs, per_run, board, client, redraw, gpus=gpus)
            )
    except Interrupted as stop:
        results, interrupted = dict(stop.finished), True
    scores = [_close(client, plan, fold, results, k) for k, fold in enumerate(plan.folds)]
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


def _close(
    client: MlflowClient,
    plan: _Plan,
    fold: _Fold,
    results: dict[str, Outcome | Failure],
    k: int,
) -> FoldScore:
    """Log a fold's end to its child runs and return its score."""
    outcomes = [results.get(job.name) for job in fold.jobs]
    if len(fold.jobs) > 1:
        for job, outcome in zip(fold.jobs, outcomes, strict=True):
            _end_job(client, job, outcome)
    missing = [
        (job, o) for job, o in zip(fold.jobs, outcomes, strict=True) if not isinstance(o, Outcome)
    ]
    if missing:
        job, result = missing[0]
        note = result.reason if isinstance(result, Failure) else "stopped by Ctrl-C"
        if len(fold.jobs) > 1:
            note = f"{job.name}: {note}"
        _fail(client, fold.run_id, note, any(isinstance(o, Failure) for _, o in missing))
        return FoldScore(k + 1, len(fold.test), None, None, None, 0.0, fold.run_id, note)
    done = [o for o in outcomes if isinstance(o, Outcome)]
    m = done[0].metrics
    if len(done) > 1:
        labels = plan.data.labels
        val_labels = [labels[i] for i in fold.jobs[0].val]
        m, rule, val = combined(done, val_labels, [labels[i] for i in fold.test])
        client.set_tag(fold.run_id, "combine", rule)
        for name, value in val.items():
            client.log_metric(fold.run_id, f"val_seq_acc_{name}", value)
    _finish(client, fold.run_id, m)
    retried = any(o.attempt > 1 for o in done)
    note = "retried once: its first worker died" if retried else ""
    return FoldScore(
        k + 1,
        len(fold.test),
        m["test_seq_acc"],
        m["test_cer"],
        m["best_val_cer"],
        m["wall_seconds"] / 60,
        fold.run_id,
        note,
    )


def _end_job(client: MlflowClient, job: Job, result: Outcome | Failure | None) -> None:
    """End a member's own child run (its score and state)."""
    assert job.run_id is not None
    if isinstance(result, Outcome):
        _finish(client, job.run_id, result.metrics)
        return
    note = result.reason if isinstance(result, Failure) else "stopped by Ctrl-C"
    _fail(client, job.run_id, note, result is not None)


SCORES = ("test_seq_acc", "test_cer", "best_val_cer", "wall_seconds", "steps_run")


def _finish(client: MlflowClient, run_id: str, metrics: dict[str, float]) -> None:
    """A run that trained: its scores, state done, FINISHED."""
    for name in SCORES:
        client.log_metric(run_id, name, metrics[name])
    client.set_tag(run_id, "state", "done")
    mlflow_scope.finish_run(client, run_id)


def _fail(client: MlflowClient, run_id: str, note: str, failed: bool) -> None:
    """A run that died (FAILED) or was stopped by Ctrl-C (KILLED), with the reason."""
    client.set_tag(run_id, "state", "failed" if failed else "stopped")
    client.set_tag(run_id, "captchaops.failure", note)
    mlflow_scope.finish_run(client, run_id, "FAILED" if failed else "KILLED")


def combined(
    members: list[Outcome], val_labels: list[str], test_labels: list[str]
) -> tuple[dict[str, float], str, dict[str, float]]:
    """The members' answers combined as `train --members` combines them: each rule scored on
    the validation images, the better one (a tie keeps max_confidence) scored on the held-out
    images. Returns (the fold's metrics, the rule, validation accuracy by rule)."""
    ordered = sorted(members, key=lambda o: o.name)
    val = {}
    for rule in RULES:
        texts = [t for t, _ in combine_members([o.val_predictions for o in ordered], rule)]
        val[rule] = sequence_accuracy(texts, val_labels)
    rule = better_rule(val)
    texts = [t for t, _ in combine_members([o.predictions for o in ordered], rule)]
    metrics = {
        "test_seq_acc": sequence_accuracy(texts, test_labels),
        "test_cer": character_error_rate(texts, test_labels),
        "best_val_cer": min(o.metrics["best_val_cer"] for o in ordered),
        "wall_seconds": max(o.metrics["wall_seconds"] for o in ordered),
        "steps_run": sum(o.metrics["steps_run"] for o in ordered),
    }
    return metrics, rule, val


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
