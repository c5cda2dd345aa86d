"""`captchaops tune`: Optuna's TPE through Ray Tune, ASHA stopping on validation CER, and the
best trial registered as a candidate the way `train` registers a run.

The search space (docs/training.md): peak learning rate, planned steps, width of the
convolutions and of the GRU, augmentation strength, weight averaging. Each trial is the unit
of work `work.run_job` (the same loop as `train`); Tune reports each epoch's validation
metrics to ASHA and, through a Ray queue, to the driver, which keeps one child run per trial
wherever Tune runs its callbacks (on the head under Ray Client). The best
trial's weights come back through the tracking server, and the version is exported, tested on
the scheme's frozen set (never on the search's validation data) and staged like `train`'s.
"""

from __future__ import annotations

import math
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import ray
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.util.queue import Empty, Queue

from captchaops import mlflow_scope
from captchaops.model.crnn import Architecture, build_crnn
from captchaops.scaleout import ScaleoutError
from captchaops.scaleout.board import Board
from captchaops.scaleout.work import Job, run_job
from captchaops.training.config import TrainConfig
from captchaops.training.loop import Plan

WEIGHTS = "trials"
METRIC = "val_cer"

PUBLISH_SECONDS = 45.0  # a trial's tail past its deadline (last validation, weights upload) and
# the best trial exported, tested and registered after the search
TRIAL_START_SECONDS = 20.0  # a trial's cost before its first step (worker, TensorFlow, data)
MIN_TRIAL_SECONDS = 15.0  # a trial that would train for less than this does not start


@dataclass(frozen=True)
class Budget:
    """How a search spends its time: how many trials run, how long each may take, and the
    wall-clock moment (time.time(), the same on every host) every trial has ended by."""

    trials: int  # trials to run (fewer than asked when --minutes leaves no room for more)
    trial_seconds: float  # each trial's own cap, start-up included
    ends_by: float | None  # None: no --minutes, each trial keeps its preset's budget
    rounds: int  # trials one after another on a slot (trials / trials side by side)

    def describe(self) -> str:
        """One line for the console and the parent run."""
        rounds = "1 round" if self.rounds == 1 else f"{self.rounds} rounds"
        return f"{self.trials} trials in {rounds}, each at most {self.trial_seconds:.0f} s"


def plan_budget(
    minutes: float | None,
    trials: int,
    parallel: int,
    trial_minutes: float,
    *,
    started: float,
    now: float,
) -> Budget:
    """Plan `trials` (at most `parallel` side by side) inside what is left of `minutes` counted
    from `started` (time.time() values): the best trial's publishing is kept out of the budget,
    the rest is shared between the rounds, each trial capped at its preset's `trial_minutes`.
    A budget too short for all the rounds runs the rounds that fit; one too short for any
    trial is a ScaleoutError naming the minutes it would need."""
    parallel = max(1, parallel)
    cap = trial_minutes * 60
    wanted = math.ceil(trials / parallel)
    if minutes is None:
        return Budget(trials, cap, None, wanted)
    ends_by = started + minutes * 60 - PUBLISH_SECONDS
    left = ends_by - now
    slot = TRIAL_START_SECONDS + MIN_TRIAL_SECONDS
    if left < slot:
        need = (now - started + slot + PUBLISH_SECONDS) / 60
        raise ScaleoutError(
            f"--minutes {minutes:g} leaves {max(left, 0):.0f} s for trials after start-up and "
            f"publishing; a trial needs {slot:.0f} s: give the search --minutes {math.ceil(need)} "
            "or more"
        )
    rounds = max(1, min(wanted, int(left // slot)))
    share = min(cap, left / rounds)
    return Budget(min(trials, rounds * parallel), share, ends_by, rounds)


def search_space(base: TrainConfig) -> dict[str, Any]:
    """What TPE searches, around the preset `base` (docs/training.md lists it); every range
    holds the preset's own value, which the search tries first."""
    steps = base.max_steps or 4000
    lr, arch = base.learning_rate, base.arch
    return {
        "learning_rate": tune.loguniform(min(5e-4, lr), max(5e-3, lr)),
        "max_steps": tune.choice([max(2, steps // 2), steps, steps * 3 // 2]),
        "conv_scale": tune.choice([0.75, 1.0, 1.5]),
        "rnn_units": tune.choice(sorted({48, 64, 96, arch.rnn_units})),
        "augment_strength": tune.uniform(
            min(0.5, arch.augment_strength), max(1.5, arch.augment_strength)
        ),
        "ema_momentum": tune.choice(sorted({0.0, 0.99, 0.995, base.ema_momentum or 0.0})),
    }


def preset_point(base: TrainConfig) -> dict[str, Any]:
    """The preset itself as a point of the search space: every search's first trial, so one
    trial trains what `train` trains and the best is never a guess worse than the preset."""
    return {
        "learning_rate": base.learning_rate,
        "max_steps": base.max_steps or 4000,
        "conv_scale": 1.0,
        "rnn_units": base.arch.rnn_units,
        "augment_strength": base.arch.augment_strength,
        "ema_momentum": base.ema_momentum or 0.0,
    }


KINDS: dict[str, Callable[[str], Any]] = {
    "learning_rate": float,
    "max_steps": lambda text: int(float(text)),
    "conv_scale": float,
    "rnn_units": lambda text: int(float(text)),
    "augment_strength": float,
    "ema_momentum": float,
}


def with_trial(config: TrainConfig, arch: Architecture, params: dict[str, Any]) -> TrainConfig:
    """`config` with one trial's settings applied to it and to `arch` (its `arch` is the result)."""
    arch = replace(
        arch,
        filters=tuple(max(4, round(f * params["conv_scale"])) for f in arch.filters),
        rnn_units=int(params["rnn_units"]),
        augment_strength=float(params["augment_strength"]),
    )
    return replace(
        config,
        learning_rate=float(params["learning_rate"]),
        max_steps=int(params["max_steps"]),
        ema_momentum=float(params["ema_momentum"]) or None,
        arch=arch,
    )


def configure(job: Job, params: dict[str, Any]) -> Job:
    """The job with one trial's sampled settings applied."""
    config = with_trial(job.config, job.arch, params)
    return replace(job, config=config, arch=config.arch)


def trial_settings(client: MlflowClient, run_id: str) -> dict[str, Any]:
    """The settings a `tune` trial used, read from its child run's parameters."""
    try:
        params = client.get_run(run_id).data.params
    except MlflowException as exc:
        raise ScaleoutError(f"no run {run_id} on the tracking server ({exc.message})") from exc
    missing = sorted(set(KINDS) - set(params))
    if missing:
        raise ScaleoutError(
            f"run {run_id} is not a tune trial (it has no {', '.join(missing)}); give the run id "
            "of a trial (a child of a tune parent run)"
        )
    return {name: kind(params[name]) for name, kind in KINDS.items()}


def trial(params: dict[str, Any], job: Job) -> None:
    """One trial (runs in a Tune worker): fit inside what is left of the search's budget, report
    every epoch, log the weights it keeps. A trial that starts with too little time left (a
    slow start-up ate it) reports that it was skipped and trains nothing."""
    trial_id = tune.get_context().get_trial_id()
    if job.ends_by is not None and job.ends_by - time.time() < MIN_TRIAL_SECONDS:
        tune.report({METRIC: math.inf, "skipped": 1.0})
        return
    mine = replace(configure(job, params), name=trial_id, keep_weights=True)
    outcome = run_job(mine, on_epoch=lambda metrics, epoch: tune.report(metrics))
    assert outcome.weights is not None
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "weights.npz"
        np.savez(path, *outcome.weights)
        client = MlflowClient(job.tracking_uri, job.tracking_uri)
        client.log_artifact(job.parent_run_id, str(path), f"{WEIGHTS}/{trial_id}")
    final = {k.removeprefix("final_"): v for k, v in outcome.metrics.items() if "final_" in k}
    tune.report(final | {"best_val_cer": outcome.metrics["best_val_cer"], "weights_logged": 1.0})


@dataclass
class Best:
    """The trial a search chose."""

    trial_id: str
    run_id: str
    params: dict[str, Any]
    val_cer: float
    job: Job


class ChildRuns:
    """A Tune callback in the driver: one child run per trial, its metrics, the live table."""

    def __init__(
        self,
        client: MlflowClient,
        experiment: str,
        parent: str,
        board: Board,
        redraw: Callable[[], None],
        user: str,
    ) -> None:
        self.client, self.experiment, self.parent = client, experiment, parent
        self.user = user  # who ran the command, credited with every trial's run
        self.board, self.redraw = board, redraw
        self.runs: dict[str, str] = {}
        self.failures: list[str] = []  # "trial ID: why", for each trial that failed
        self.skipped: set[str] = set()  # trials that started with no time left to train

    def start(self, trial_id: str, config: dict[str, Any]) -> None:
        """A trial started: its child run, with the sampled settings as parameters."""
        run = self.client.create_run(
            self.experiment,
            run_name=f"trial {trial_id}",
            tags={
                "mlflow.parentRunId": self.parent,
                "captchaops.kind": "tune-trial",
                "mlflow.user": self.user,
            },
        )
        self.runs[trial_id] = run.info.run_id
        self.client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in config.items()])
        self.board.running(trial_id)
        self.redraw()

    def result(self, trial_id: str, result: dict[str, Any]) -> None:
        """An epoch's metrics from a trial."""
        run_id = self.runs.get(trial_id)
        if run_id is None:
            return
        if result.get("skipped"):
            self.skipped.add(trial_id)
            self.client.set_tag(run_id, "state", "skipped: no time left in --minutes")
        step, now = int(result.get("training_iteration", 0)), int(time.time() * 1000)
        metrics = [
            Metric(k, float(v), now, step)
            for k, v in result.items()
            if k in ("loss", "val_loss", "val_cer", "val_seq_acc", "learning_rate", "best_val_cer")
            and isinstance(v, int | float)
            and math.isfinite(v)
        ]
        self.client.log_batch(run_id, metrics=metrics)
        self.board.running(trial_id, result.get("best_val_cer"))
        self.redraw()

    def end(self, trial_id: str, status: str, note: str = "") -> None:
        """A trial ended (FINISHED, FAILED)."""
        run_id = self.runs.get(trial_id)
        if run_id is not None:
            mlflow_scope.finish_run(self.client, run_id, status)
        if status != "FINISHED":
            self.failures.append(f"trial {trial_id}: {note}")
        if trial_id in self.skipped:
            note = "skipped: no time left"
        self.board.end(trial_id, "done" if status == "FINISHED" else "failed", note=note)
        self.redraw()


class _Callback(tune.Callback):  # type: ignore[misc]
    """Sends Tune's trial events to the driver through `events` (a Ray queue): Tune runs its
    callbacks where its own driver runs, which is the head under Ray Client, not this process;
    the driver's `ChildRuns` takes them from the queue in the order they were sent."""

    def __init__(self, events: Any) -> None:
        self.events = events

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.events.put(("start", trial.trial_id, dict(trial.config)))

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
    ) -> None:
        self.events.put(("result", trial.trial_id, dict(result)))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.events.put(("end", trial.trial_id, "FINISHED"))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.events.put(("end", trial.trial_id, "FAILED"))


def apply(children: ChildRuns, event: tuple[str, str, Any]) -> None:
    """One trial event from `_Callback`, written by the driver's `ChildRuns`."""
    kind, trial_id, payload = event
    if kind == "start":
        children.start(trial_id, payload)
    elif kind == "result":
        children.result(trial_id, payload)
    elif payload == "FINISHED":
        children.end(trial_id, "FINISHED")
    else:
        children.end(trial_id, "FAILED", "failed twice (see the Ray logs)")


@contextmanager
def relayed(children: ChildRuns) -> Iterator[Any]:
    """A Ray queue for `_Callback`, emptied into `children` by a thread of this process while
    the search runs and to its last event after: the child runs are written with the driver's
    credentials wherever Tune runs its callbacks. An error writing them is raised at the end."""
    events = Queue(actor_options={"num_cpus": 0})  # no CPU: trials get every core
    done = threading.Event()
    errors: list[BaseException] = []

    def pump() -> None:
        while True:
            try:
                event = events.get(timeout=0.5)
            except Empty:
                if done.is_set():
                    return
                continue
            if not errors:
                try:
                    apply(children, event)
                except Exception as exc:  # raised in the driver's thread below
                    errors.append(exc)

    thread = threading.Thread(target=pump, name="tune-events", daemon=True)
    thread.start()
    try:
        yield events
    finally:
        done.set()
        thread.join()
        events.shutdown()
    if errors:
        raise errors[0]


def search(
    job: Job,
    budget: Budget,
    resources: tuple[float, float],
    storage: Path,
    children: ChildRuns,
    seed: int,
) -> Best | None:
    """Run the search on the connected Ray inside `budget`, each trial with `resources` (CPUs,
    GPUs); the best trial that logged its weights, if any."""
    # here, not at the top: Tune's workers import this module to run `trial`; Optuna (its
    # samplers and storages) is the search's, which runs in Tune's driver alone
    from ray.tune.search.optuna import OptunaSearch

    # Tune's own console report would interleave with the live table: the legacy reporter
    # honours verbose=0 and prints nothing.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # Ctrl-C is the command's to handle (its runs end KILLED, Ray shuts down, one line is
    # printed); Tune's own handler would swallow it and save the experiment for a resume.
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    plan = Plan.of(job.config, len(job.train))
    epochs = max(1, math.ceil(plan.steps / plan.steps_per_epoch) * 2)
    budgeted = replace(job.config, max_minutes=budget.trial_seconds / 60)
    job = replace(job, config=budgeted, ends_by=budget.ends_by)
    # Tune's own clock only backs the trials' up: they end by `ends_by` and then log weights.
    backstop = None if budget.ends_by is None else budget.ends_by - time.time() + 60
    cpus, gpus = resources
    # Under Ray Client Tune's driver runs on the head, where this machine's folder may not
    # exist: it keeps its results in its own default folder there.
    path = None if ray.util.client.ray.is_connected() else str(storage)
    with relayed(children) as events:
        tuner = tune.Tuner(
            tune.with_resources(tune.with_parameters(trial, job=job), {"cpu": cpus, "gpu": gpus}),
            param_space=search_space(job.config),
            tune_config=tune.TuneConfig(
                metric=METRIC,
                mode="min",
                search_alg=OptunaSearch(points_to_evaluate=[preset_point(job.config)], seed=seed),
                scheduler=ASHAScheduler(
                    time_attr="training_iteration",
                    max_t=epochs,
                    grace_period=max(1, epochs // 8),
                    reduction_factor=3,
                ),
                num_samples=budget.trials,
                time_budget_s=backstop,
            ),
            run_config=tune.RunConfig(
                name="captchaops-tune",
                storage_path=path,
                verbose=0,
                callbacks=[_Callback(events)],
                # a dead trial is tried once more
                failure_config=tune.FailureConfig(max_failures=1),
            ),
        )
        results = tuner.fit()
    done = [
        (dict(r.metrics), dict(r.config or {}))
        for r in (results[i] for i in range(len(results)))
        if r.metrics and r.metrics.get("weights_logged")
    ]
    if not done:
        return None
    metrics, config = min(done, key=lambda pair: rank(pair[0]))
    trial_id = str(metrics["trial_id"])
    return Best(
        trial_id=trial_id,
        run_id=children.runs[trial_id],
        params=config,
        val_cer=float(metrics[METRIC]),
        job=configure(job, config),
    )


def why_none(children: ChildRuns, budget: Budget, minutes: float | None) -> str:
    """The one line that says why a search has no trial to register."""
    if children.runs and len(children.failures) == len(children.runs):
        return f"every trial failed ({children.failures[0]}); nothing registered"
    if minutes is not None:
        return (
            f"no trial finished training inside --minutes {minutes:g} ({budget.describe()}); "
            "nothing registered: give the search more minutes or fewer trials"
        )
    return (
        "no trial finished; give trials more time (--max-minutes) or more data; nothing registered"
    )


def rank(metrics: dict[str, Any]) -> tuple[float, float]:
    """How trials are ordered for "best": validation CER, then validation loss. On a folder of
    about 1,000 images the validation split is about 80 images, and half of a 16-trial search
    read none of them wrong (measured 2026-12-03: 8 of 16 trials at CER 0), so the loss, which
    still tells those apart, breaks the tie instead of the order the trials finished in."""
    return float(metrics[METRIC]), float(metrics.get("val_loss", math.inf))


def best_network(best: Best, client: MlflowClient) -> Any:
    """The best trial's inference network, rebuilt from the weights it logged."""
    with tempfile.TemporaryDirectory() as tmp:
        local = client.download_artifacts(
            best.job.parent_run_id, f"{WEIGHTS}/{best.trial_id}/weights.npz", tmp
        )
        with np.load(local) as saved:
            weights = [saved[f"arr_{i}"] for i in range(len(saved.files))]
    _, infer = build_crnn(best.job.arch, len(best.job.alphabet) + 1)
    infer.set_weights(weights)
    return infer
