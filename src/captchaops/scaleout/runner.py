"""Independent training runs as Ray tasks: submitted at once, each retried once if its worker
dies, followed on the board from their child runs, all cancelled on Ctrl-C.

Ray schedules them (a task asks for `cpus` cores, so a cluster runs as many side by side as it
has room for); this module only submits, waits and reports.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import ray
from mlflow.entities import Param
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from ray.exceptions import RayError, RayTaskError

from captchaops import mlflow_scope
from captchaops.access import login
from captchaops.registry.names import default_actor
from captchaops.scaleout.board import Board
from captchaops.scaleout.work import Job, Outcome, run_job
from captchaops.settings import Settings

POLL_SECONDS = 2.0


class Interrupted(KeyboardInterrupt):
    """Ctrl-C stopped the work; the runs that finished are kept."""

    def __init__(self, finished: dict[str, Outcome]) -> None:
        super().__init__("interrupted")
        self.finished = finished


@dataclass
class Failure:
    """A run that failed on both tries (or with an error a retry cannot fix)."""

    name: str
    reason: str


@dataclass(frozen=True)
class ParentRun:
    """The MLflow run that holds a command's data set and summary; its child runs hold the work."""

    client: MlflowClient
    experiment: str
    run_id: str
    user: str  # who ran the command: every run it makes is credited to them (`mlflow.user`)

    def child(self, name: str, kind: str, params: Mapping[str, object] | None = None) -> str:
        """A child run for one piece of work (pending until its worker starts); its id."""
        tags = {"mlflow.parentRunId": self.run_id, "captchaops.kind": kind, "state": "pending"}
        tags[USER_TAG] = self.user
        run = self.client.create_run(self.experiment, run_name=name, tags=tags)
        if params:
            self.client.log_batch(run.info.run_id, params=as_params(params))
        return str(run.info.run_id)


USER_TAG = "mlflow.user"  # MLflow's own: the UI's "User" and a run's user_id


def who_ran(settings: Settings) -> str:
    """Who a command's runs are credited to: the tracking account the driver logs in with (the
    settings', else MLflow's own), else the login name of the process that ran the command;
    never the account a worker runs as (the driver makes every run, workers only log into
    them)."""
    account = settings.tracking_username or (login(settings) or ("",))[0]
    return account or default_actor()


def as_params(values: Mapping[str, object]) -> list[Param]:
    """MLflow parameters, each value cut to MLflow's limit."""
    return [Param(k, str(v)[:6000]) for k, v in values.items()]


@contextmanager
def parent_run(
    settings: Settings, name: str, kind: str, params: Mapping[str, object]
) -> Iterator[ParentRun]:
    """The command's parent run, with `params`; if the block is stopped by Ctrl-C it ends KILLED
    (and so does every child run still open), if it fails FAILED. Ending it when the work
    succeeds is the block's job (it logs its summary first)."""
    client = mlflow_scope.client(settings)
    experiment = mlflow_scope.experiment_id(client, settings.experiment_name, {})
    user = who_ran(settings)
    run = client.create_run(
        experiment, run_name=name, tags={"captchaops.kind": kind, USER_TAG: user}
    )
    parent = ParentRun(client, experiment, str(run.info.run_id), user)
    client.log_batch(parent.run_id, params=as_params(params))
    try:
        yield parent
    except KeyboardInterrupt:
        end_open_runs(parent, "KILLED")
        raise
    except BaseException:
        end_open_runs(parent, "FAILED")
        raise


def end_open_runs(parent: ParentRun, status: str) -> None:
    """End the parent run and each of its child runs still open with `status`."""
    open_children = parent.client.search_runs(
        [parent.experiment],
        filter_string=f"tags.mlflow.parentRunId = '{parent.run_id}' and "
        "attributes.status = 'RUNNING'",
    )
    for run in open_children:
        parent.client.set_tag(
            run.info.run_id, "state", "stopped" if status == "KILLED" else "failed"
        )
        mlflow_scope.finish_run(parent.client, run.info.run_id, status)
    mlflow_scope.finish_run(parent.client, parent.run_id, status)


def run_jobs(
    jobs: list[Job],
    cpus: float,
    board: Board,
    client: MlflowClient,
    redraw: Callable[[], None] = lambda: None,
    gpus: float = 0.0,
) -> dict[str, Outcome | Failure]:
    """Run every job as a Ray task of `cpus` CPUs and `gpus` GPUs (so Ray places it on a node
    that has them); a job's outcome, or why it failed, by job name."""
    task = ray.remote(run_job).options(
        num_cpus=cpus,
        num_gpus=gpus,
        max_retries=1,  # a worker that dies (killed, out of memory) is tried once more
        retry_exceptions=False,  # an error in the training code would fail the same way again
        runtime_env={"env_vars": {"TF_NUM_INTRAOP_THREADS": str(max(1, int(cpus)))}},
    )
    refs: dict[Any, Job] = {task.remote(job): job for job in jobs}
    for job in jobs:
        board.add(job.name)
    results: dict[str, Outcome | Failure] = {}
    pending = list(refs)
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=POLL_SECONDS)
            for ref in done:
                job = refs[ref]
                results[job.name] = _collect(ref, job, board)
            _follow(client, [refs[r] for r in pending], board)
            redraw()
    except KeyboardInterrupt:
        for ref in pending:
            ray.cancel(ref, force=True)
            board.end(refs[ref].name, "stopped", note="Ctrl-C")
        redraw()
        raise Interrupted({k: v for k, v in results.items() if isinstance(v, Outcome)}) from None
    return results


def _collect(ref: Any, job: Job, board: Board) -> Outcome | Failure:
    try:
        outcome: Outcome = ray.get(ref)
    except RayError as exc:
        reason = one_line(exc)
        board.end(job.name, "failed", note=reason[:60])
        return Failure(job.name, reason)
    note = "retried once: its first worker died" if outcome.attempt > 1 else ""
    board.end(job.name, "done", outcome.metrics.get("best_val_cer"), note)
    return outcome


def one_line(exc: BaseException) -> str:
    """A Ray error as one line: what died and why, without the remote traceback."""
    if isinstance(exc, RayTaskError):
        cause = exc.cause
        return f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}"
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def _follow(client: MlflowClient, jobs: list[Job], board: Board) -> None:
    """Each pending job's state and best validation CER so far, read from its child run."""
    for job in jobs:
        if job.run_id is None:
            continue
        try:
            run = client.get_run(job.run_id)
        except MlflowException:
            continue
        if run.data.tags.get("state") == "running":
            board.running(job.name, run.data.metrics.get("best_val_cer"))
