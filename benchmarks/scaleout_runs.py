"""Shared set-up for the Ray benchmarks: a stand-in folder, a tracking server, commands timed.

Every benchmark runs `captchaops` as a user does (a subprocess with its own home, a real
tracking server, a local Ray of the machine's cores) and reads what it printed and logged.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from harness.processes import VENV_BIN, start_tracking_server, stop_process


@dataclass
class Bench:
    """A work folder, a stand-in folder in it and a running tracking server."""

    work: Path
    folder: Path
    uri: str

    def run(self, args: list[str], home: str) -> tuple[float, str]:
        """Run `captchaops ARGS` with its own home; wall seconds and stdout (raises on failure)."""
        env = {
            **os.environ,
            "CAPTCHAOPS_TRACKING_URI": self.uri,
            "CAPTCHAOPS_HOME": str(self.work / home),
            "CAPTCHAOPS_STAGING_FLOOR": "0",
            "COLUMNS": "120",
        }
        env.pop("RAY_ADDRESS", None)
        started = time.monotonic()
        done = subprocess.run(
            [str(VENV_BIN / "captchaops"), *args], env=env, capture_output=True, text=True
        )
        wall = time.monotonic() - started
        if done.returncode != 0:
            raise RuntimeError(f"captchaops {' '.join(args[:3])} failed: {done.stderr[-1500:]}")
        return wall, done.stdout

    def parent_metrics(self, stdout: str) -> tuple[str, dict[str, float]]:
        """The parent run a `cv`/`tune` printed, and its metrics."""
        from mlflow.tracking import MlflowClient

        [line] = [x for x in stdout.splitlines() if x.startswith("parent run ")]
        run_id = line.split()[2]
        return run_id, dict(MlflowClient(self.uri).get_run(run_id).data.metrics)


@contextmanager
def bench(count: int, folder: Path | None = None) -> Iterator[Bench]:
    """A stand-in folder of `count` images (or `folder`) and a tracking server, for one run."""
    from captchaops.data import standin

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = folder or work / "standin"
        if folder is None:
            standin.build(data, count, seed=0)
        (work / "tracking").mkdir()
        tracking = start_tracking_server(work / "tracking")
        try:
            yield Bench(work, data, tracking.uri)
        finally:
            stop_process(tracking.proc)


def stand_in_options(parser: argparse.ArgumentParser) -> None:
    """The options every Ray benchmark takes: the folder's size (or a folder), steps, budget."""
    parser.add_argument("--count", type=int, default=1040, help="stand-in images to build")
    parser.add_argument("--steps", type=int, default=None, help="optimiser steps per run")
    parser.add_argument("--max-minutes", type=float, default=None, help="budget per run")
    parser.add_argument("--folder", type=Path, default=None, help="a folder instead")
    parser.add_argument("--quick", action="store_true", help="check the path, in minutes")


def accuracy(stdout: str) -> float:
    """The held-out sequence accuracy `train` printed."""
    [line] = [x for x in stdout.splitlines() if x.startswith("test sequence accuracy ")]
    return float(line.split()[3].rstrip(","))


def load() -> str:
    """The load average, as reported next to every number."""
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} / {five:.2f} on {os.cpu_count()} cores"
