"""What the CLI shows: training progress and summaries, sized for an 80-column terminal."""

from __future__ import annotations

import os
import re
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from rich import box
from rich.console import Console
from rich.progress import BarColumn, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as ProgressBar
from rich.table import Column, Table
from rich.text import Text

from captchaops.live.reported import NO_CALIBRATION

if TYPE_CHECKING:
    from captchaops.decisions.gate import Decision
    from captchaops.live.reported import LiveState
    from captchaops.registry.listing import Listing, VersionRow
    from captchaops.stack.control import ServiceStatus
    from captchaops.training.loop import Progress
    from captchaops.training.run import TrainResult


_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")
"""Control characters, and the bidirectional overrides that reorder what a terminal shows."""


def literal(value: object) -> Text:
    """Text read from the registry, runs or a server, shown as it is: never markup, control
    characters escaped (`\\x1b`), so a tag cannot restyle, hide or break the output."""
    return Text(_CONTROL.sub(_escaped, str(value)))


def _escaped(found: re.Match[str]) -> str:
    code = ord(found.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


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


@contextmanager
def progress_bar(console: Console) -> Iterator[Progress]:
    """A rich progress bar for training, drawn while the block runs; yields the `Progress`
    callback to hand to `training.run.train` (this module only draws, it runs nothing)."""
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

        yield report


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
        console.print(literal(result.frozen), highlight=False)
    console.print(literal(f"run {result.run_id}; registered {result.model_uri}"), highlight=False)
    if result.staged:
        console.print("alias staging -> this version", highlight=False)
    else:
        console.print(literal(f"not staged: {result.rejection_reason}"), highlight=False)
    if result.warning:
        console.print(
            Text.assemble(("warning:", "yellow"), " ", literal(result.warning)), highlight=False
        )


WIDE = 110
"""From this many columns on, tables show more (the deprecated stage, full dates, a settings table)."""
SERVED = ("production", "staging", "canary")


def _table(title: str | Text) -> Table:
    """A table without vertical rules, so short columns fit 80 columns; cells fold, never `…`."""
    return Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)


def training_speed(m: dict[str, float]) -> str:
    """One line: steps done of those planned, images per second, time to the first step."""
    fresh = f", {m['fresh_images']:,.0f} fresh images" if m.get("fresh_images") else ""
    first = m.get("seconds_to_first_step")
    return (
        f"{m.get('steps_run', 0):,.0f} of {m.get('steps_planned', 0):,.0f} planned steps, "
        f"{m.get('images_per_second', 0):,.0f} images/s{fresh}"
        + (f", first step after {first:.0f}s" if first is not None else "")
    )


def services_table(rows: list[ServiceStatus]) -> Table:
    """`status`: one row per service."""
    table = _table("captchaops services")
    for column in ("service", "pid", "state", "URL", "health", "RSS MB"):
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(
            literal(row.name),
            str(row.pid or "-"),
            literal(row.state),
            literal(row.url),
            Text("ok", style="green") if row.healthy else Text("down", style="red"),
            f"{row.rss_mb:.0f}",
        )
    return table


def print_settings(console: Console, values: dict[str, str]) -> None:
    """`status`: every effective setting (secrets already masked by the caller); a table on a
    wide terminal, else one line each, a value too long for its line on a line of its own."""
    if console.width >= WIDE:
        table = _table("effective settings")
        table.add_column("setting", no_wrap=True)
        table.add_column("value", overflow="fold")
        for key, value in values.items():
            table.add_row(key, value)
        console.print(table)
        return
    console.print("effective settings", style="italic", highlight=False)
    pad = max((len(key) for key in values), default=0)
    for key, value in values.items():
        if pad + 2 + len(value) <= console.width:
            console.print(literal(f"{key:<{pad}}  {value}"), highlight=False)
        else:
            console.print(literal(key), highlight=False)
            console.print(literal(f"    {value}"), highlight=False, overflow="fold")


def _live_cell(listing: Listing, row: VersionRow) -> str:
    states = listing.live_of(row.version)
    if states:
        return ", ".join(s.short() for s in states)
    return "none" if _uncalibrated_and_served(row) else "-"


def _uncalibrated_and_served(row: VersionRow) -> bool:
    return not row.calibrated and any(alias in SERVED for alias in row.aliases)


def versions_table(listing: Listing, width: int = 80) -> Table:
    """`models`: one short row per version (notes go below, `version_notes`); a wide terminal
    also gets the deprecated stage and full dates."""
    wide = width >= WIDE
    table = _table(literal(f"{listing.name} versions"))
    columns = ["ver", "aliases", "status", "test", "frozen", "CER", "live", "created"]
    if wide:
        columns.insert(3, "stage")
    for column in columns:
        table.add_column(column, overflow="fold", justify="right" if column == "ver" else "left")
    for row in listing.rows:
        scores = [
            f"{v:.3f}" if v is not None else "-"
            for v in (row.test_seq_acc, row.eval_seq_acc, row.eval_cer)
        ]
        cells: list[Text | str] = [
            literal(row.version),
            literal(" ".join(f"@{a}" for a in row.aliases) or "-"),
            literal(row.status),
            *scores,
            literal(_live_cell(listing, row)),
            literal(row.created if wide else row.created[5:]),
        ]
        if wide:
            cells.insert(3, literal(row.stage))
        table.add_row(*cells)
    return table


def version_notes(listing: Listing) -> list[Text]:
    """`models`: each version's note (why it was promoted or rejected) and missing live
    estimate, one line each below the table."""
    lines = []
    for row in listing.rows:
        if _uncalibrated_and_served(row):
            lines.append(literal(f"v{row.version}: {NO_CALIBRATION}"))
        if row.note:
            lines.append(literal(f"v{row.version}: {row.note}"))
    return lines


def unaudited_lines(unaudited: dict[str, str]) -> list[Text]:
    """Two lines (under 80 columns) per alias whose version no audited move put there."""
    lines = []
    for alias, version in sorted(unaudited.items()):
        line = literal(f"UNAUDITED: @{alias} -> v{version}: no audit record (moved around the CLI)")
        line.stylize("red")
        lines += [line, Text("  audit it with `captchaops promote` or move it back")]
    return lines


def live_lines(states: list[LiveState]) -> list[Text]:
    """`models` and `status`: one line per served version's live estimate, and its alert."""
    lines = []
    for state in states:
        lines.append(literal(f"live {state.alias} v{state.version}: {state.line()}"))
        if state.alert:
            where = literal(f" {state.alias} v{state.version}: {state.alert}")
            lines.append(Text.assemble(("ALERT", "red"), where))
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
            line = f"{role} v{result.version}: failed ({result.error})"
            console.print(literal(line), highlight=False)
    verdict = ("promoted", "green") if decision.promote else ("rejected", "yellow")
    reason = literal(f" v{decision.candidate_version}: {decision.reason()}")
    console.print(Text.assemble(verdict, reason), highlight=False)
