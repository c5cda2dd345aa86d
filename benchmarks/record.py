"""The one writer of benchmark results: every file says when, where, under what load, at which
commit and by which command it was measured, beside the figures it reports.

A run writes `bench-results/<name>.json` (scratch: ignored by git, overwritten by the next
run). With `--record` (given to `python -m benchmarks`), it writes
`bench-results/<name>-<YYYY-MM-DD-HHMM>.json` instead: a record, tracked by git (any name in
bench-results/ with a date in it) and committed with the change it measures; `python -m benchmarks report` turns the records
into docs/results.md. `--load TEXT` says what else ran ("idle", "beside a CPU-bound process");
without it the record holds the load average measured when the benchmarks started.

A record is a JSON object: `meta` (date, machine, load, commit, command), `figures` (label ->
text, the numbers docs may cite) and the benchmark's own `result`.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench-results"
META_FIELDS = ("date", "machine", "load", "commit", "command")

KEEP = False  # set by `python -m benchmarks --record`
HALF_SPEED = False  # set by `python -m benchmarks --half-speed`
SPEED_ENV = "CAPTCHAOPS_BENCH_SPEED"
"""Set (to "at half speed (<the quota>)") in the run `--half-speed` starts inside the quota."""
LOAD: str | None = None  # set by `python -m benchmarks --load TEXT`
_START_LOAD = os.getloadavg()[0]


def _git(*args: str) -> str:
    try:
        done = subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30, check=False
        )
    except OSError:
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def commit() -> str:
    """HEAD's short hash, `+changes` when src/ or benchmarks/ differ from it; else 'unknown'."""
    head = _git("rev-parse", "--short=7", "HEAD")
    if not head:
        return "unknown"
    changed = _git("status", "--porcelain", "--", "src", "benchmarks")
    return f"{head}+changes" if changed else head


def machine() -> str:
    """Cores, memory and accelerator, e.g. '2-core x86_64, 8 GiB' or '16-core ..., NVIDIA H200'."""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    text = f"{os.cpu_count()}-core {platform.machine()}, {memory:.0f} GiB"
    try:
        gpus = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        ).stdout.split("\n")
    except OSError:
        gpus = []
    names = [g.strip() for g in gpus if g.strip()]
    return f"{text}, {len(names)}x {names[0]}" if names else text


def speed() -> str | None:
    """ "at half speed (<the quota>)" inside a `--half-speed` run, else None (full speed)."""
    return (os.environ.get(SPEED_ENV) or None) if HALF_SPEED else None


def provenance() -> dict[str, str]:
    """The record's `meta`: when, where, under what load, at which commit, by which command; the
    machine says "at half speed (...)" for a run inside the half-speed quota."""
    load = LOAD or f"load average {_START_LOAD:.1f} on {os.cpu_count()} cores at the start"
    script = Path(sys.argv[0])
    module = "benchmarks" if script.stem == "__main__" else f"benchmarks.{script.stem}"
    command = shlex.join(["python", "-m", module, *sys.argv[1:]])
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": " ".join(filter(None, (machine(), speed()))),
        "load": load,
        "commit": commit(),
        "command": command,
    }


def save(name: str, result: Any, figures: dict[str, str] | None = None) -> Path:
    """Write `result` with its provenance and figures; return the path written."""
    meta = provenance()
    if speed():
        name = f"{name}-half"
    if KEEP:
        stamp = time.strftime("%Y-%m-%d-%H%M", time.gmtime())
        path = RESULTS / f"{name}-{stamp}.json"
    else:
        path = RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"meta": meta, "figures": figures or {}, "result": result}
    path.write_text(json.dumps(record, indent=1) + "\n")
    shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    print(f"(written to {shown})")
    return path
