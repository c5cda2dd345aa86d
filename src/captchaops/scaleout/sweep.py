"""The `tune` driver: data and frozen set as `train` makes them (`training.prepare.split_fixed`),
the parent run, the search on Ray, and the best trial handed to the registry through `train`'s
publish path."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from captchaops import mlflow_scope
from captchaops.data.dataset import DataError, LabelledImages
from captchaops.evaluation.evalset import EvalSet
from captchaops.model.version import META_SCHEMA, PREPROCESSING
from captchaops.registry.versions import register_version
from captchaops.scaleout.board import Board
from captchaops.scaleout.engine import checked, cpus_per_run, parallel_runs, ray_session
from captchaops.scaleout.feed import STREAM_ABOVE_BYTES, capped, streams
from captchaops.scaleout.runner import ParentRun, parent_run
from captchaops.scaleout.shipping import upload
from captchaops.scaleout.tune import Best, ChildRuns, best_network, plan_budget, search, why_none
from captchaops.scaleout.work import Job
from captchaops.settings import Settings
from captchaops.stack.promotions_client import ServiceError, stage_candidate
from captchaops.training import TrainError
from captchaops.training.artifacts import export_and_test
from captchaops.training.config import TrainConfig
from captchaops.training.prepare import FixedSplit, split_fixed


@dataclass
class TuneResult:
    """What a search produced: the parent run and the best trial's registered version."""

    parent_run_id: str
    trials: int
    best: Best | None
    version: str | None = None
    metrics: dict[str, float] | None = None
    staged: bool = False
    rejection_reason: str | None = None
    frozen: str | None = None
    failed: list[str] = field(default_factory=list)  # why each failed trial failed
    why_none: str | None = None  # why no trial could be registered
    budget: str = ""


def base_job(
    name: str, p: FixedSplit, config: TrainConfig, settings: Settings, parent: ParentRun
) -> Job:
    """The unit of work every trial or member starts from: the data set uploaded once as shards
    (its manifest recorded on the parent run), the train and validation splits (at most
    `feed.VAL_CAP` validation images when the training images stream), the preset's settings."""
    train = tuple(p.splits["train"])
    val = tuple(p.splits["val"])
    if streams(len(train), p.arch, STREAM_ABOVE_BYTES):
        val = capped(val)
    return Job(
        name=name,
        config=config,
        arch=p.arch,
        alphabet=p.alphabet,
        max_length=max(len(label) for label in p.data.labels),
        augment=config.augment if config.augment is not None else config.data_dir is not None,
        tracking_uri=mlflow_scope.tracking_uri(settings),
        parent_run_id=parent.run_id,
        dataset=upload(parent.client, parent.experiment, p.data, parent.run_id),
        train=train,
        val=val,
    )


def prepare(config: TrainConfig, settings: Settings) -> FixedSplit:
    """Read or generate the data, hold out the scheme's frozen set, split the rest by name:
    `train`'s own split (`split_fixed`), without its progress lines."""
    client = mlflow_scope.client(settings)
    return split_fixed(client, config, settings, lambda stage, fraction, metrics: None)


def tune_settings(
    config: TrainConfig,
    settings: Settings,
    trials: int,
    minutes: float | None,
    cluster: str | None,
    board: Board,
    redraw: Callable[[], None] = lambda: None,
    gpus: float = 0.0,
) -> TuneResult:
    """Search training settings on Ray (each trial with `gpus` GPUs), register the best trial
    and stage it like `train`."""
    if not 1 <= trials <= 1000:
        raise DataError(f"--trials {trials} is out of range; use 1 to 1000 (16 is a good start)")
    started = time.time()
    prepared = prepare(config, settings)
    data, alphabet = prepared.data, prepared.alphabet
    source = config.data_dir.name if config.data_dir else "synthetic"
    params = config.params() | {"trials": trials, "search": "Optuna TPE via Ray Tune, ASHA"}
    params |= {"dataset_sha256": data.digest(), "alphabet": alphabet, "n_read": len(data)}
    params |= {"gpus_per_trial": gpus} if gpus else {}
    asked = (trials, minutes, started, gpus)
    with parent_run(settings, f"tune-{source}-{trials}trials", "tune", params) as parent:
        return _search(config, settings, prepared, parent, asked, cluster, board, redraw)


def _search(
    config: TrainConfig,
    settings: Settings,
    prepared: FixedSplit,
    parent: ParentRun,
    asked: tuple[int, float | None, float, float],
    cluster: str | None,
    board: Board,
    redraw: Callable[[], None],
) -> TuneResult:
    """The search on Ray under `parent` inside the budget `asked` (trials, minutes, started at
    time.time(), GPUs per trial), then the best trial published."""
    trials, minutes, started, gpus = asked
    data, frozen, splits = prepared.data, prepared.frozen, prepared.splits
    client, parent_id = parent.client, parent.run_id
    lengths = [len(label) for label in data.labels]
    job = base_job("trial", prepared, config, settings, parent)
    children = ChildRuns(client, parent.experiment, parent_id, board, redraw, parent.user)
    start = time.monotonic()
    with ray_session(cluster, home=settings.home_dir) as engine:
        checked(engine, parent, job.tracking_uri, gpus)
        board.dashboard_url = engine.dashboard_url
        cpus = cpus_per_run(engine, trials)
        parallel = parallel_runs(engine, cpus, gpus)
        budget = plan_budget(
            minutes, trials, parallel, config.max_minutes, started=started, now=time.time()
        )
        client.set_tag(parent_id, "captchaops.budget", budget.describe())
        results = settings.home_dir / "ray-results"
        best = search(job, budget, (cpus, gpus), results, children, config.seed)
    client.log_metric(parent_id, "tune_wall_seconds", time.monotonic() - start)
    result = TuneResult(parent_id, len(children.runs), best, budget=budget.describe())
    result.failed = list(children.failures)
    if best is None:
        result.why_none = why_none(children, budget, minutes)
    if best is not None:
        test = _test_set(data, splits["test"], frozen)
        _publish(best, settings, client, test, result, min(lengths), data.digest())
        client.set_tag(parent_id, "best_trial_run", best.run_id)
        if frozen is not None:
            result.frozen = (
                f"tested on {settings.model_name}'s frozen evaluation set {frozen.digest[:12]}: "
                f"{len(frozen)} held-out images, none of them searched on"
            )
    mlflow_scope.finish_run(client, parent_id)
    return result


def _test_set(
    data: LabelledImages, test: list[int], frozen: EvalSet | None
) -> tuple[list[bytes], list[str]]:
    if frozen is not None:
        return frozen.images, frozen.labels
    return [data.images[i] for i in test], [data.labels[i] for i in test]


def _publish(
    best: Best,
    settings: Settings,
    client: MlflowClient,
    test: tuple[list[bytes], list[str]],
    result: TuneResult,
    min_length: int,
    digest: str,
) -> None:
    """Export, test, log and register the best trial in its child run, then stage it."""
    infer = best_network(best, client)
    job = best.job
    meta = {
        "schema_version": META_SCHEMA,
        "alphabet": job.alphabet,
        "height": job.arch.height,
        "width": job.arch.width,
        "min_length": min_length,
        "max_length": job.max_length,
        "preprocessing": PREPROCESSING,
        "dataset_sha256": digest,
        "scheme": settings.model_name,
        "data_kind": "folder" if job.config.data_dir is not None else "synthetic",
        "model_format": "onnx",
    }
    with (
        mlflow_scope.pointed_at(settings),
        mlflow.start_run(run_id=best.run_id),
        tempfile.TemporaryDirectory() as tmp,
    ):
        client = mlflow_scope.client(settings)
        model_uri, metrics = export_and_test(client, infer, meta, test[0], test[1], Path(tmp))
        version = register_version(client, settings.model_name, model_uri, best.run_id)
    try:  # by the promotion service, where one signs for the stack
        reason = stage_candidate(client, settings, version, metrics["test_seq_acc"])
    except ServiceError as exc:
        raise TrainError(f"v{version} was registered but not staged: {exc}") from exc
    result.version, result.metrics = version, metrics
    result.staged, result.rejection_reason = reason is None, reason
