"""What the CLI shows: training progress and summaries, sized for an 80-column terminal."""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from rich.console import Console
from rich.progress import BarColumn, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as ProgressBar
from rich.table import Column, Table

if TYPE_CHECKING:
    from captchaops.gate import Decision
    from captchaops.live import LiveState
    from captchaops.registry import Listing
    from captchaops.settings import Settings
    from captchaops.stack.control import ServiceStatus
    from captchaops.train import TrainConfig, TrainResult


class UnexpectedError(RuntimeError):
    """A library failed in a way no check foresaw; the message names the log with the traceback."""


@contextmanager
def library_output_to(path: Path) -> Iterator[TextIO]:
    """Send what libraries print to `path`; yields a stream that still reaches the terminal.

    TensorFlow and absl write C++ log lines straight to file descriptor 2, MLflow logs run
    links and registry lines to `sys.stderr`, NumPy and Keras raise warnings: all of them go
    to fd 2, so fd 2 is pointed at the log and the project's own error stream is a duplicate
    of the original. An unexpected exception leaves its traceback in the log and comes out as
    `UnexpectedError` (one line for the user).
    """
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    log_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    sys.stderr.flush()
    saved = os.dup(2)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    terminal = os.fdopen(os.dup(saved), "w", buffering=1)
    try:
        yield terminal
    except Exception as exc:
        if type(exc).__module__.startswith(("captchaops", "typer", "click")):
            raise
        traceback.print_exc(file=sys.stderr)
        raise UnexpectedError(f"{type(exc).__name__}: {exc} (traceback in {path})") from exc
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        terminal.close()


def train_with_progress(config: TrainConfig, settings: Settings, console: Console) -> TrainResult:
    """`train` with a rich progress bar showing the stage and the latest validation metrics."""
    from captchaops.train import train

    columns = (  # 24 + 16 + 4 + 7 + 19 characters and 4 gaps: fits 80 columns
        # "epoch 12 step 5400/6000" and "acc 0.953 812 img/s"
        TextColumn("[bold]{task.description}", table_column=_fixed(24)),
        BarColumn(bar_width=16),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[metrics]}", table_column=_fixed(19)),
    )
    with ProgressBar(*columns, console=console, transient=False) as bar:
        task = bar.add_task("starting", total=1.0, metrics="")

        def report(stage: str, fraction: float, metrics: dict[str, float]) -> None:
            if "steps" in metrics:
                stage = f"{stage} step {metrics['steps']:.0f}/{metrics['steps_planned']:.0f}"
            shown = []
            if "val_seq_acc" in metrics:
                shown.append(f"acc {metrics['val_seq_acc']:.3f}")
            if metrics.get("images_per_second"):
                shown.append(f"{metrics['images_per_second']:.0f} img/s")
            bar.update(task, description=stage, completed=fraction, metrics=" ".join(shown))

        return train(config, settings, progress=report)


def _fixed(width: int) -> Column:
    return Column(width=width, min_width=width, max_width=width, no_wrap=True, overflow="ellipsis")


def print_summary(result: TrainResult, console: Console) -> None:
    """A few lines: metrics, the registered version and whether it was staged."""
    m = result.metrics
    console.print(
        f"test sequence accuracy {m['test_seq_acc']:.4f}, CER {m['test_cer']:.4f}, "
        f"{m['epochs_run']:.0f} epochs in {m['wall_seconds']:.0f}s",
        highlight=False,
    )
    console.print(training_speed(m), highlight=False)
    if result.skipped != "none":
        console.print(f"skipped files: {result.skipped}", highlight=False)
    if result.frozen:
        console.print(result.frozen, highlight=False)
    console.print(f"run {result.run_id}; registered {result.model_uri}", highlight=False)
    if result.staged:
        console.print("alias staging -> this version", highlight=False)
    else:
        console.print(f"not staged: {result.rejection_reason}", highlight=False)
    if result.warning:
        console.print(f"[yellow]warning:[/yellow] {result.warning}", highlight=False)


def training_speed(m: dict[str, float]) -> str:
    """One line: steps done of those planned, images per second, time to the first step."""
    fresh = f", {m['fresh_images']:,.0f} fresh images" if m.get("fresh_images") else ""
    return (
        f"{m['steps_run']:,.0f} of {m['steps_planned']:,.0f} planned steps, "
        f"{m['images_per_second']:,.0f} images/s{fresh}, "
        f"first step after {m['seconds_to_first_step']:.0f}s"
    )


def services_table(rows: list[ServiceStatus]) -> Table:
    """`status`: one row per service."""
    table = Table(title="captchaops services")
    for column in ("service", "pid", "state", "URL", "health", "RSS MB"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            row.name,
            str(row.pid or "-"),
            row.state,
            row.url,
            "[green]ok[/green]" if row.healthy else "[red]down[/red]",
            f"{row.rss_mb:.0f}",
        )
    return table


def settings_table(values: dict[str, str]) -> Table:
    """`status`: every effective setting, secrets already masked by the caller."""
    table = Table(title="effective settings")
    table.add_column("setting")
    table.add_column("value")
    for key, value in values.items():
        table.add_row(key, value)
    return table


def versions_table(listing: Listing) -> Table:
    """`models`: one row per version with aliases, scores and validation status."""
    table = Table(title=f"{listing.name} versions")
    for column in (
        "version",
        "aliases",
        "stage",
        "status",
        "test acc",
        "frozen acc",
        "frozen CER",
        "live est.",
        "created (UTC)",
        "note",
    ):
        table.add_column(column)
    for row in listing.rows:
        live = ", ".join(s.short() for s in listing.live_of(row.version)) or "-"
        table.add_row(
            row.version,
            ", ".join(f"@{a}" for a in row.aliases) or "-",
            row.stage,
            row.status,
            *(
                f"{v:.4f}" if v is not None else "-"
                for v in (row.test_seq_acc, row.eval_seq_acc, row.eval_cer)
            ),
            live,
            row.created,
            row.note[:60],
        )
    return table


def live_lines(states: list[LiveState]) -> list[str]:
    """`models` and `status`: one line per served version's live estimate, and its alert."""
    lines = []
    for state in states:
        lines.append(f"live {state.alias} v{state.version}: {state.line()}")
        if state.alert:
            lines.append(f"[red]ALERT[/red] {state.alias} v{state.version}: {state.alert}")
    return lines


def print_decision(console: Console, decision: Decision) -> None:
    """The gate's two scores and its verdict, one line each."""
    for role, result in (("candidate", decision.candidate), ("champion", decision.champion)):
        if result is not None and result.ok:
            console.print(
                f"{role} v{result.version}: accuracy {result.seq_acc:.4f}  CER {result.cer:.4f}  "
                f"p50 {result.p50_ms:.1f} ms  p95 {result.p95_ms:.1f} ms  ({result.n} images)",
                highlight=False,
            )
        elif result is not None:
            console.print(f"{role} v{result.version}: failed ({result.error})", highlight=False)
    verdict = "[green]promoted[/green]" if decision.promote else "[yellow]rejected[/yellow]"
    console.print(f"{verdict} v{decision.candidate_version}: {decision.reason()}", highlight=False)
