"""What long work shows while it runs: one row per fold, trial or member (state, best val CER,
minutes), drawn as a rich table; the drivers update it, the CLI draws it live."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from rich.table import Table


@dataclass
class Row:
    """One fold, trial or member as the table shows it."""

    name: str
    state: str = "pending"
    best_val_cer: float | None = None
    started: float | None = None
    minutes: float | None = None  # set when it ended
    note: str = ""


@dataclass
class Board:
    """The rows of a piece of long work and the Ray dashboard's address, if there is one."""

    title: str
    rows: dict[str, Row] = field(default_factory=dict)
    dashboard_url: str | None = None

    def add(self, name: str) -> None:
        """A new row, pending."""
        self.rows.setdefault(name, Row(name))

    def running(self, name: str, best_val_cer: float | None = None) -> None:
        """The row's run has started (and its best validation CER so far)."""
        row = self.rows.setdefault(name, Row(name))
        if row.state in ("done", "failed", "stopped"):
            return
        row.state = "running"
        row.started = row.started or time.monotonic()
        if best_val_cer is not None:
            row.best_val_cer = best_val_cer

    def end(self, name: str, state: str, best_val_cer: float | None = None, note: str = "") -> None:
        """The row's run ended: done, failed or stopped."""
        row = self.rows.setdefault(name, Row(name))
        row.state, row.note = state, note or row.note
        if best_val_cer is not None:
            row.best_val_cer = best_val_cer
        if row.started is not None:
            row.minutes = (time.monotonic() - row.started) / 60

    def table(self) -> Table:
        """The rows as a table that fits 80 columns."""
        table = Table(title=self.title, title_justify="left")
        for column in ("run", "state", "best val CER", "minutes", "note"):
            table.add_column(column, no_wrap=column != "note")
        now = time.monotonic()
        for row in self.rows.values():
            minutes = row.minutes
            if minutes is None and row.started is not None:
                minutes = (now - row.started) / 60
            table.add_row(
                row.name,
                row.state,
                "" if row.best_val_cer is None else f"{row.best_val_cer:.4f}",
                "" if minutes is None else f"{minutes:.1f}",
                row.note,
            )
        if self.dashboard_url:
            table.caption = f"Ray dashboard: {self.dashboard_url}"
        return table
