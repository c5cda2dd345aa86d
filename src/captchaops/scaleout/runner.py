"""Independent training runs as Ray tasks: submitted at once, each retried once if its worker
dies, followed on the board from their child runs, all cancelled on Ctrl-C.

Ray schedules them (a task asks for `cpus` cores, so a cluster runs as many side by side as it
has room for); this module only submits, waits and reports.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mlflow.tracking import MlflowClient

from captchaops.scaleout.board import Board
from captchaops.scaleout.work import Job, Outcome, run_job

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


def run_jobs(
    jobs: list[Job],
    cpus: float,
    board: Board,
    client: MlflowClient,
    redraw: Callable[[], None] = lambda: None,
) -> dict[str, Outcome | Failure]:
    """Run every job as a Ray task; a job's outcome, or why it failed, by job name."""
    import ray

    task = ray.remote(run_job).options(
        num_cpus=cpus,
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
    import ray
    from ray.exceptions import RayError

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
    from ray.exceptions import RayTaskError

    if isinstance(exc, RayTaskError):
        cause = exc.cause
        return f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}"
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def _follow(client: MlflowClient, jobs: list[Job], board: Board) -> None:
    """Each pending job's state and best validation CER so far, read from its child run."""
    from mlflow.exceptions import MlflowException

    for job in jobs:
        if job.run_id is None:
            continue
        try:
            run = client.get_run(job.run_id)
        except MlflowException:
            continue
        if run.data.tags.get("state") == "running":
            board.running(job.name, run.data.metrics.get("best_val_cer"))
