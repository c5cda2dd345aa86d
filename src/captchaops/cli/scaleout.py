"""Commands whose work is many independent training runs on Ray: cv (folds) and tune (trials).

`train` imports this module (for `--members` and `--submit`), so what it imports at the top is
what `train` loads anyway, and Ray stays out of it. A command imports the scale-out drivers
(Ray, TensorFlow through the training code, MLflow) inside its function: after its cluster's
check on a cluster, so a set-up that cannot work fails in seconds, before TensorFlow (~6 s).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import typer
from rich.live import Live

from captchaops.cli.base import MODEL_NAME_OPTION, app, console, fail, quiet_libraries, settings_for
from captchaops.console import UnexpectedError
from captchaops.data.dataset import DataError
from captchaops.scaleout import ScaleoutError
from captchaops.scaleout.board import Board
from captchaops.scaleout.jobs import Submitted, submit
from captchaops.scaleout.preflight import refuse_loopback
from captchaops.settings import Settings
from captchaops.training import TrainError

if TYPE_CHECKING:
    from captchaops.scaleout.cv import CvResult
    from captchaops.scaleout.sweep import TuneResult
    from captchaops.training.config import TrainConfig

CLUSTER_OPTION = typer.Option(
    None,
    "--cluster",
    envvar="RAY_ADDRESS",
    help="a Ray cluster's address (e.g. 127.0.0.1:6379); default: a local Ray for this command",
    show_default=False,
)
GPUS_OPTION = typer.Option(
    0.0,
    "--gpus-per-trial",
    min=0.0,
    help="GPUs each fold, trial or member asks Ray for; it runs only on a node that has them",
)
SUBMIT_OPTION = typer.Option(
    None,
    "--submit",
    help="run as a Ray job through the head's dashboard (http://HEAD:8265): the sweep goes on "
    "when this terminal closes; prints the job id and returns",
    show_default=False,
)
PRESET_OPTION = typer.Option(
    None,
    "--preset",
    help="demo, folder, accuracy or gpu (default: folder with --data, demo otherwise)",
    show_default=False,
)


@contextmanager
def live_board(title: str) -> Iterator[tuple[Board, Callable[[], None]]]:
    """A board and the function that redraws it as a live table on the console."""
    board = Board(title)
    with Live(board.table(), console=console, refresh_per_second=2, transient=False) as live:
        yield board, lambda: live.update(board.table())


@app.command("cv")
def cv_command(
    data: str = typer.Option(..., "--data", help="folder of images named <label>.png"),
    folds: int = typer.Option(5, "--folds", help="how many folds (each a training run)"),
    cluster: str | None = CLUSTER_OPTION,
    max_minutes: float | None = typer.Option(None, "--max-minutes", help="time budget per fold"),
    steps: int | None = typer.Option(None, "--steps", help="optimiser steps planned per fold"),
    seed: int | None = typer.Option(
        None, "--seed", help="fold k trains with seed + k (member i: seed + k + i * folds)"
    ),
    cpus: int | None = typer.Option(
        None, "--cpus", min=1, help="cores the local Ray offers (default: all of them)"
    ),
    trial: str | None = typer.Option(
        None, "--trial", help="cross-validate the settings of this tune trial (its run id)"
    ),
    members: int = typer.Option(
        1, "--members", help="K runs per fold, combined as `train --members K` combines them"
    ),
    gpus: float = GPUS_OPTION,
    preset: str | None = PRESET_OPTION,
    model_name: str | None = MODEL_NAME_OPTION,
    submit: str | None = SUBMIT_OPTION,
) -> None:
    """Cross-validated held-out accuracy of the folder preset: one training run per fold on Ray."""
    if submit is not None:
        if cpus is not None:
            fail("--cpus sizes a local Ray; a submitted job uses its cluster's: leave it out")
        options: dict[str, object] = {
            "--data": data,
            "--folds": folds,
            "--max-minutes": max_minutes,
        }
        options |= {"--steps": steps, "--seed": seed, "--trial": trial, "--members": members}
        options |= {"--gpus-per-trial": gpus or None, "--preset": preset}
        submitted(submit, "cv", options, model_name)
        return
    settings = settings_for(model_name)
    log = settings.home_dir / "logs" / "libraries.log"
    with reported(log):
        check_tracking(settings)
        with cluster_checked(cluster, settings, gpus, cpus):
            # here, not at the top: Ray and TensorFlow (~6 s, prints) load after the cluster's
            # check, and `train`, which imports this module, never loads cv
            from captchaops.scaleout.cv import INTERVAL, cross_validate
            from captchaops.training.config import from_options

            config = from_options(preset, data, max_minutes=max_minutes, max_steps=steps, seed=seed)
            if trial is not None:
                config = _trial_config(config, settings, trial)
            with live_board(f"cv: {folds} folds of {data}") as (board, redraw):
                result = cross_validate(
                    config, settings, folds, cluster, board, redraw, cpus, members, gpus
                )
    _print(_cv_lines(result, INTERVAL), log)
    if result.interrupted:
        raise typer.Exit(130)
    failed = [f for f in result.folds if f.accuracy is None]
    if failed:
        fail(
            f"{len(failed)} of {len(result.folds)} folds failed (fold {failed[0].fold}: "
            f"{failed[0].note}); see the Ray logs and run cv again"
        )


def _cv_lines(result: CvResult, interval_kind: str) -> list[str]:
    """What cv prints: each fold's score, the summary (its interval of `interval_kind`)."""
    lines = []
    for f in result.folds:
        if f.accuracy is None:
            lines.append(f"fold {f.fold}: no score ({f.note})")
            continue
        correct = round(f.accuracy * f.n)
        retried = f" ({f.note})" if f.note else ""
        lines.append(
            f"fold {f.fold}: {f.accuracy:.1%} held-out accuracy ({correct} of {f.n} images), "
            f"best val CER {f.best_val_cer:.4f}, {f.minutes:.1f} min{retried}"
        )
    if result.mean is not None and result.worst is not None:
        scored = [f for f in result.folds if f.accuracy is not None]
        worst = min(scored, key=lambda f: f.accuracy or 0.0)
        interval = (
            f"{result.interval[0]:.1%} to {result.interval[1]:.1%} ({interval_kind})"
            if result.interval
            else "none (fewer than two folds scored)"
        )
        lines.append(
            f"mean {result.mean:.1%} over {len(scored)} folds, worst fold {result.worst:.1%} "
            f"(fold {worst.fold}), 95% interval {interval}"
        )
    if result.interrupted:
        lines.append("stopped by Ctrl-C: the folds that finished are logged")
    lines.append(f"parent run {result.parent_run_id} ({len(result.folds)} child runs)")
    return lines


def _trial_config(config: TrainConfig, settings: Settings, run_id: str) -> TrainConfig:
    """`config` with the settings a tune trial used (they win over --steps)."""
    # here, not at the top: MLflow and Ray Tune, for `cv --trial` alone, after the cluster's check
    from captchaops import mlflow_scope
    from captchaops.scaleout.tune import trial_settings, with_trial

    params = trial_settings(mlflow_scope.client(settings), run_id)
    return with_trial(config, config.arch, params)


@contextmanager
def reported(log: Path) -> Iterator[None]:
    """Libraries' output to `log`; a failure the user can fix as one line (exit 1), Ctrl-C as
    one line (exit 130), never a traceback."""
    main = threading.current_thread() is threading.main_thread()  # signals: main thread only
    previous = signal.signal(signal.SIGINT, _ctrl_c_with_deadline) if main else None
    try:
        with quiet_libraries(log):
            yield
    except (DataError, TrainError, UnexpectedError) as exc:  # ScaleoutError is a TrainError
        fail(str(exc))
    except KeyboardInterrupt:
        stopped()
    finally:
        if main:
            signal.signal(signal.SIGINT, previous)


STOP_DEADLINE_S = 90.0
"""How long ending the runs and Ray may take after Ctrl-C before the command exits anyway."""


def _ctrl_c_with_deadline(signum: int, frame: object) -> None:
    """Ctrl-C as usual (KeyboardInterrupt: the runs end KILLED, Ray shuts down), with a
    deadline: a shutdown that waits on a Ray process the same Ctrl-C ended (CI saw one wait
    past 240 s) must not keep the terminal. The local Ray's processes share the command's
    fate, so exiting ends them too."""
    timer = threading.Timer(STOP_DEADLINE_S, _exit_stopped)
    timer.daemon = True
    timer.start()
    signal.signal(signal.SIGINT, signal.default_int_handler)
    raise KeyboardInterrupt


def _exit_stopped() -> None:
    console.print()
    console.print(
        f"stopped by Ctrl-C: shutting down took over {STOP_DEADLINE_S:g} s, so the command "
        "exits now; runs still RUNNING in MLflow can be ended in its UI",
        highlight=False,
    )
    sys.stdout.flush()
    os._exit(130)


def _print(lines: list[str], log: Path) -> None:
    console.print()
    for line in lines:
        console.print(line, highlight=False)
    console.print(f"library messages: {log}", highlight=False, style="dim")


def stopped() -> None:
    """Ctrl-C: one line (the runs are already ended as KILLED, Ray shut down), exit 130."""
    console.print()
    console.print(
        "stopped by Ctrl-C: the runs that finished are logged, the rest are marked KILLED",
        highlight=False,
    )
    raise typer.Exit(130)


@contextmanager
def cluster_checked(
    cluster: str | None, settings: Settings, gpus: float = 0.0, cpus: int | None = None
) -> Iterator[None]:
    """On a cluster, or where each run asks for GPUs: join the cluster (or start the local Ray
    with `cpus`) and run its check (a node has the GPUs, workers reach the tracking server, may
    write runs and run the driver's versions) before the command's heavy imports and any work,
    so a set-up that cannot work fails in seconds; the work then runs in this same session."""
    if not cluster and not gpus:
        yield
        return
    if cluster:
        refuse_loopback(settings.effective_tracking_uri, cluster)
    # here, not at the top: Ray and MLflow load only for work on Ray, never in `train` alone,
    # and after a refusal that needs neither
    from captchaops import mlflow_scope
    from captchaops.scaleout.engine import check, ray_session

    with ray_session(cluster, home=settings.home_dir, cpus=cpus) as engine:
        client = mlflow_scope.client(settings)
        experiment = mlflow_scope.experiment_id(client, settings.experiment_name, {})
        check(engine, mlflow_scope.tracking_uri(settings), experiment, gpus)
        yield


def submitted(
    address: str, command: str, options: dict[str, object], model_name: str | None
) -> None:
    """`captchaops COMMAND OPTIONS` submitted as a Ray job to the dashboard at `address` (with
    --model-name); prints its id and how to follow it, and returns at once."""
    settings = settings_for(model_name)
    log = settings.home_dir / "logs" / "libraries.log"
    job: Submitted | None = None
    with reported(log):
        job = submit(address, command, options | {"--model-name": model_name}, settings)
    assert job is not None
    for line in job.lines():
        console.print(line, highlight=False)


def check_tracking(settings: Settings) -> None:
    """The tracking server answers, and is one Ray workers can reach (http(s))."""
    uri = settings.effective_tracking_uri
    if uri.startswith("http"):
        try:  # training.run's check, without importing TensorFlow before the cluster's check
            httpx.get(f"{uri}/health", timeout=5).raise_for_status()
        except httpx.HTTPError as exc:
            raise ScaleoutError(
                f"cannot reach the tracking server at {uri}; start it with `captchaops up` or "
                "set CAPTCHAOPS_TRACKING_URI"
            ) from exc
    else:
        raise ScaleoutError(
            "Ray workers reach the data and log through a tracking server; start one with "
            "`captchaops up` or set CAPTCHAOPS_TRACKING_URI to an http(s) URL"
        )


@app.command("tune")
def tune_command(
    data: str | None = typer.Option(None, "--data", help="folder of images named <label>.png"),
    synthetic: int | None = typer.Option(None, "--synthetic", help="search on N generated images"),
    trials: int = typer.Option(16, "--trials", help="how many settings to try"),
    minutes: float | None = typer.Option(None, "--minutes", help="time budget of the whole search"),
    cluster: str | None = CLUSTER_OPTION,
    max_minutes: float | None = typer.Option(None, "--max-minutes", help="time budget per trial"),
    steps: int | None = typer.Option(None, "--steps", help="steps the search is centred on"),
    seed: int | None = typer.Option(None, "--seed"),
    gpus: float = GPUS_OPTION,
    preset: str | None = PRESET_OPTION,
    model_name: str | None = MODEL_NAME_OPTION,
    submit: str | None = SUBMIT_OPTION,
) -> None:
    """Search training settings (Optuna TPE on Ray Tune, ASHA) and register the best trial."""
    if (data is None) == (synthetic is None):
        fail("use either --data DIR or --synthetic N")
    if submit is not None:
        options: dict[str, object] = {"--data": data, "--synthetic": synthetic, "--trials": trials}
        options |= {"--minutes": minutes, "--max-minutes": max_minutes, "--steps": steps}
        options |= {"--seed": seed, "--gpus-per-trial": gpus or None, "--preset": preset}
        submitted(submit, "tune", options, model_name)
        return
    settings = settings_for(model_name)
    log = settings.home_dir / "logs" / "libraries.log"
    with reported(log):
        check_tracking(settings)
        with cluster_checked(cluster, settings, gpus):
            # here, not at the top: Ray Tune and TensorFlow (~6 s, prints) load after the
            # cluster's check, and `train`, which imports this module, never loads the search
            from captchaops.scaleout.sweep import tune_settings
            from captchaops.training.config import from_options

            config = from_options(
                preset,
                data,
                synthetic=synthetic,
                max_minutes=max_minutes,
                max_steps=steps,
                seed=seed,
            )
            with live_board(f"tune: {trials} trials") as (board, redraw):
                result = tune_settings(
                    config, settings, trials, minutes, cluster, board, redraw, gpus
                )
    _print(_tune_lines(result), log)
    if result.best is None:
        raise typer.Exit(1)
    if result.failed:
        fail(
            f"{len(result.failed)} of {result.trials} trials failed ({result.failed[0]}); "
            "the best finished trial is registered; see the Ray logs"
        )


def _tune_lines(result: TuneResult) -> list[str]:
    """What tune prints: the parent run, the best trial, its test scores and where it went."""
    lines = [f"parent run {result.parent_run_id} ({result.trials} trials)"]
    best = result.best
    if best is None or result.metrics is None:
        return [*lines, result.why_none or "no trial finished; give trials more time or more data"]
    shown = ", ".join(
        f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in best.params.items()
    )
    lines.append(f"best trial {best.trial_id} (val CER {best.val_cer:.4f}): {shown}")
    m = result.metrics
    lines.append(f"test sequence accuracy {m['test_seq_acc']:.4f}, CER {m['test_cer']:.4f}")
    if result.frozen:
        lines.append(result.frozen)
    lines.append(f"run {best.run_id}; registered version {result.version}")
    if result.staged:
        lines.append("alias staging -> this version; next: captchaops promote --auto")
    else:
        lines.append(f"not staged: {result.rejection_reason}")
    return lines


def train_ensemble(
    config: TrainConfig, settings: Settings, members: int, cluster: str | None, gpus: float = 0.0
) -> None:
    """`train --members K`: the members on Ray (each with `gpus` GPUs), registered as one
    version; prints the result."""
    # here, not at the top: `train` imports this module and loads Ray only with --members
    from captchaops.scaleout.members import train_members

    check_tracking(settings)
    try:
        with (
            cluster_checked(cluster, settings, gpus),
            live_board(f"train: {members} members") as (board, _),
        ):
            run_id, version, metrics, reason, rule = train_members(
                config, settings, members, cluster, board, gpus
            )
    except KeyboardInterrupt:
        stopped()
    console.print()
    console.print(
        f"test sequence accuracy {metrics['test_seq_acc']:.4f}, CER {metrics['test_cer']:.4f} "
        f"({members} members, combined by {rule.replace('_', ' ')})",
        highlight=False,
    )
    console.print(
        f"run {run_id}; registered models:/{settings.model_name}/{version}", highlight=False
    )
    console.print(
        "alias staging -> this version" if reason is None else f"not staged: {reason}",
        highlight=False,
    )
