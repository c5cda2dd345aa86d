"""Stalls at the end of short stream runs: how long training takes to hand back after its last step.

Usage:
  python -m benchmarks stall [--runs 20] [--seconds 30] [--synthetic 10000]
  python -m benchmarks stall --baseline-src /tmp/old/src    # A/B: alternate with an older tree
         [--baseline-runs 10] [--parallel 2] [--minutes 25]   # a busy box: fewer, paired, capped

Each run is a child process of its own that imports `captchaops` (this tree's `src`, or the
`--baseline-src` tree's, put first on PYTHONPATH), draws the demo preset's fresh images
(`training.fresh.fresh_data`, one pool filled beside the first steps) and fits them with
`training.loop.fit` for `--seconds` of budget, as `captchaops train` does between reading the
data and publishing, without MLflow. A short run ends while its pool is still being drawn,
so the stream is waiting for shards when training ends: where the stalls were seen.

Per run it measures, on the main thread: the time from the last optimiser step's end to
`loop.fit_stream` returning (the 37-60 s stalls sat in a garbage collection inside it, right
after Keras's `fit`), from `on_train_end` to that return, a full collection run right after
`fit` returns (whatever a destructor left for later), the longest collection of the whole run,
the time to leave the data block (the drawing workers joined), and the median time between
optimiser steps. `fit_stream` is timed by wrapping the module's function for the child's
lifetime (so both trees are timed the same way, whatever their `fit_stream` does inside).
A run counts as stalled when the training thread sleeps 10 s or more between `on_train_end` and
`fit_stream`'s return, or inside one collection (issue 40: 0 of 20 runs). Sleeping is wall time
less the thread's CPU time and its run-queue wait (the kernel's `/proc/thread-self/schedstat`),
so a thread that waits for a core on a busy box is not counted as stalled; the wall-clock count
(10 s or more of wall time there, whatever the thread did) is printed and recorded beside it.
Each child runs in a session of its own, killed as a group, so no drawing worker outlives it. With `--baseline-src` the runs
alternate between the two trees (the baseline first in odd rounds), so both see the same load;
`--parallel 2` runs a baseline run beside each run of this tree while both have runs left, and
`--minutes` starts no run after that long and records the runs done.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from benchmarks import record
from harness.schedstat import Blocked

_ORIGINAL: dict[str, Any] = {}  # the module's own `fit_stream`, before the timing wrapper
STALL_S = 10.0  # a wait this long after on_train_end, or a collection this long, is a stall
SRC = record.ROOT / "src"


class Collections:
    """A `gc.callbacks` hook: the longest garbage collection's wall time, and the longest time a
    collection slept (a finaliser blocked on a lock or a join) rather than ran or waited for a core.
    Collections run on whichever thread allocates; the schedstat read is that thread's."""

    def __init__(self) -> None:
        self.longest = 0.0
        self.longest_asleep = 0.0
        self._timer = Blocked()

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._timer.start()
        else:
            wall, asleep = self._timer.stop()
            self.longest = max(self.longest, wall)
            self.longest_asleep = max(self.longest_asleep, asleep)


def one_run(seconds: float, synthetic: int) -> dict[str, Any]:
    """Fit the demo preset's fresh stream for `seconds` of budget in this process; the timings."""
    import keras

    import captchaops
    from captchaops.data import synthetic as generator
    from captchaops.training import loop
    from captchaops.training.config import TrainConfig, with_overrides
    from captchaops.training.fresh import fresh_data
    from captchaops.training.tensors import geometry

    config = with_overrides(TrainConfig.demo(), max_minutes=seconds / 60, synthetic=synthetic)
    alphabet = config.alphabet or generator.DIGITS_UPPER
    arch = geometry(config, None, config.length[1])
    steps: list[float] = []
    marks: dict[str, float] = {}
    after_end = Blocked()  # from on_train_end to fit_stream's return, on the training thread
    fit_stream = _ORIGINAL.setdefault("fit_stream", loop.fit_stream)  # unwrapped, run after run

    def ended() -> None:
        marks.setdefault("train_end", time.monotonic())
        after_end.start()

    def timed(model: Any, train: Any, epochs: int, callbacks: list[Any]) -> None:
        clock = keras.callbacks.LambdaCallback(
            on_train_batch_end=lambda batch, logs: steps.append(time.monotonic()),
            on_train_end=lambda logs: ended(),
        )
        try:
            fit_stream(model, train, epochs, [*callbacks, clock])
        finally:
            marks["returned"] = time.monotonic()
            if "train_end" in marks:
                marks["asleep_after_train_end"] = after_end.stop()[1]

    loop.fit_stream = timed  # `loop.fit` looks it up at call time
    collections = Collections()
    gc.callbacks.append(collections)
    start = time.monotonic()
    keras.utils.set_random_seed(config.seed)
    try:
        with fresh_data(config, arch, alphabet) as fresh:
            fitted = loop.fit(
                config,
                arch,
                alphabet,
                fresh.stream(math.ceil(fresh.capacity / config.batch_size)),
                fresh.validation,
                augment=bool(config.augment),
                deadline=start + seconds,
                report=loop.silent,
                log=lambda metrics, epoch: None,
            )
            began = time.monotonic()
            gc.collect()
            next_collection = time.monotonic() - began
            leaving = time.monotonic()
        left = time.monotonic() - leaving
    finally:
        gc.callbacks.remove(collections)
    gaps = [b - a for a, b in itertools.pairwise(steps[20:])]
    last = steps[-1] if steps else marks["returned"]
    return {
        "captchaops": str(Path(captchaops.__file__).parents[1]),
        "steps": len(steps),
        "epochs": len(fitted.history),
        "first_step_s": steps[0] - start if steps else None,
        "step_ms_median": 1000 * statistics.median(gaps) if gaps else None,
        "returned_after_last_step_s": marks["returned"] - last,
        "returned_after_train_end_s": marks["returned"] - marks.get("train_end", last),
        "next_collection_s": next_collection,
        "longest_collection_s": collections.longest,
        "longest_collection_asleep_s": collections.longest_asleep,
        "asleep_after_train_end_s": marks.get("asleep_after_train_end", 0.0),
        "leaving_data_block_s": left,
        "load_avg_1m": os.getloadavg()[0],
    }


def stalled(row: dict[str, Any]) -> bool:
    """Whether the run stalled (or never came back): the training thread slept 10 s or more
    between on_train_end and fit_stream's return, or inside one collection. Time it ran, or
    waited for a core on a busy box, is not a stall (older records, without the sleep figures,
    are judged on wall time)."""
    if row.get("failed"):
        return True
    waits = (
        row.get("asleep_after_train_end_s", row["returned_after_train_end_s"]),
        row.get("longest_collection_asleep_s", row["longest_collection_s"]),
    )
    return max(waits) >= STALL_S


def wall_stalled(row: dict[str, Any]) -> bool:
    """The older, wall-clock count: 10 s or more of wall time after on_train_end or in one
    collection, whatever the thread did meanwhile (a busy box counts)."""
    if row.get("failed"):
        return True
    return max(row["returned_after_train_end_s"], row["longest_collection_s"]) >= STALL_S


def in_child(
    src: Path, seconds: float, synthetic: int, runs: int, stop_at: float = math.inf
) -> list[dict[str, Any]]:
    """`runs` of `one_run`, one after another in a child process that imports `captchaops`
    from `src`; at `stop_at` (`time.monotonic()`) the child is stopped and the runs it finished
    are returned."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(src), str(record.ROOT)]))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.jsonl"
        argv = [sys.executable, "-m", "benchmarks.bench_stall", "--row", str(out)]
        argv += [
            "--seconds",
            str(seconds),
            "--synthetic",
            str(synthetic),
            "--per-process",
            str(runs),
        ]
        began = time.monotonic()
        timeout = min(runs * (seconds + 600), max(stop_at - began, 1.0))
        failed = None
        # a session of its own: on a timeout the whole group goes, drawing workers included
        child = subprocess.Popen(
            argv,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            _, err = child.communicate(timeout=timeout)
            if child.returncode != 0:
                failed = {"failed": err.strip()[-400:], "src": str(src)}
        except subprocess.TimeoutExpired:  # the run under way when time ran out is not counted
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)
            child.communicate()
            if stop_at - began > timeout + 1:
                failed = {"failed": "no answer in 10 minutes a run past its budget"}
        finally:  # a run that exited (or was killed) leaves no drawing worker behind
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)
        lines = out.read_text().splitlines() if out.exists() else []
        rows = [json.loads(line) | {"src": str(src)} for line in lines]
        return rows + ([failed | {"src": str(src)}] if failed else [])


def tree_commit(src: Path) -> str:
    """The short commit of the tree holding `src`, `+changes` when its src/ differs from it."""

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", "-C", str(src.parent), *args], capture_output=True, text=True, check=False
        )
        return done.stdout.strip()

    head = git("rev-parse", "--short=7", "HEAD") or "unknown"
    return f"{head}+changes" if git("status", "--porcelain", "--", "src") else head


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Stalls, step time and the wait after the last step, over one tree's runs."""
    ok = [r for r in rows if not r.get("failed")]
    waits = [r["returned_after_last_step_s"] for r in ok]
    step_ms = [r["step_ms_median"] for r in ok if r["step_ms_median"] is not None]
    return {
        "runs": len(rows),
        "stalled": sum(stalled(r) for r in rows),
        "stalled_wall_clock": sum(wall_stalled(r) for r in rows),
        "failed": len(rows) - len(ok),
        "step_ms_median": statistics.median(step_ms) if step_ms else None,
        "returned_after_last_step_median_s": statistics.median(waits) if waits else None,
        "returned_after_last_step_max_s": max(waits) if waits else None,
        "longest_collection_max_s": max((r["longest_collection_s"] for r in ok), default=None),
        "steps_median": statistics.median(r["steps"] for r in ok) if ok else None,
    }


def _line(row: dict[str, Any]) -> str:
    """One run, as printed."""
    if row.get("failed"):
        return f"FAILED {row['failed']}"
    return (
        f"{row['steps']} steps, {_s(row['step_ms_median'], 'ms', 0)} a step; fit_stream "
        f"returned {_s(row['returned_after_last_step_s'], digits=2)} after the last step "
        f"({_s(row['returned_after_train_end_s'], digits=2)} after on_train_end, "
        f"{_s(row.get('asleep_after_train_end_s'), digits=2)} of it asleep); longest "
        f"collection {_s(row['longest_collection_s'], digits=2)} "
        f"({_s(row.get('longest_collection_asleep_s'), digits=2)} asleep), the one after fit "
        f"{_s(row['next_collection_s'], digits=2)}; load {row['load_avg_1m']:.1f}"
        + ("  STALLED" if stalled(row) else "")
    )


def _s(value: float | None, unit: str = "s", digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f} {unit}"


def main(argv: list[str] | None = None) -> None:
    """Run the stall series, print it beside its target and save bench-results/stall.json."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20, help="runs per tree")
    parser.add_argument("--seconds", type=float, default=30.0, help="each run's time budget")
    parser.add_argument("--synthetic", type=int, default=10_000, help="held-out sets and pool")
    parser.add_argument("--baseline-src", type=Path, help="an older tree's src/ to alternate with")
    parser.add_argument("--baseline-runs", type=int, help="runs of the baseline (default: --runs)")
    parser.add_argument(
        "--per-process", type=int, default=1, help="runs a child process does (one import)"
    )
    parser.add_argument("--parallel", type=int, default=1, help="runs at a time (a busy box)")
    parser.add_argument(
        "--minutes", type=float, help="start no run after this long; record the runs done"
    )
    parser.add_argument("--row", help=argparse.SUPPRESS)  # one run in this process
    args = parser.parse_args(argv if argv is not None else [])
    if args.row:
        for _ in range(args.per_process):
            row = json.dumps(one_run(args.seconds, args.synthetic))
            with Path(args.row).open("a") as rows_file:
                rows_file.write(row + "\n")
        return
    trees = {"this tree": SRC}
    if args.baseline_src:
        trees["baseline"] = args.baseline_src.resolve()
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in trees}
    wanted = {"this tree": args.runs, "baseline": args.baseline_runs or args.runs}
    per = args.per_process
    queue = [
        name
        for i in range(0, max(wanted.values()), per)
        for name in (list(trees) if i // per % 2 else list(trees)[::-1])
        if i < wanted[name]
    ]
    stop_at = time.monotonic() + 60 * args.minutes if args.minutes else math.inf

    def take(name: str) -> None:
        if time.monotonic() >= stop_at:
            return
        for row in in_child(trees[name], args.seconds, args.synthetic, per, stop_at):
            rows[name].append(row)
            print(f"run {len(rows[name]):2d} {name:9s}: {_line(row)}", flush=True)

    with ThreadPoolExecutor(args.parallel) as pool:
        list(pool.map(take, queue))
    figures = {}
    result: dict[str, Any] = {
        "seconds": args.seconds,
        "synthetic": args.synthetic,
        "parallel": args.parallel,
    }
    for name, src in trees.items():
        totals = summary(rows[name]) | {"commit": tree_commit(src)}
        result[name] = totals | {"rows": rows[name]}
        print(
            f"{name} ({totals['commit']}): stalled {totals['stalled']} of {totals['runs']} "
            f"(target 0 of 20; {totals['stalled_wall_clock']} by wall clock); step {_s(totals['step_ms_median'], 'ms', 0)} (median); "
            f"fit_stream returned {_s(totals['returned_after_last_step_median_s'], digits=2)} "
            f"after the last step (median), "
            f"{_s(totals['returned_after_last_step_max_s'], digits=2)} at most"
        )
        label = f"{name} ({totals['commit']})"
        figures[f"short stream runs stalled (asleep >= 10 s), {label}"] = (
            f"{totals['stalled']} of {totals['runs']}"
        )
        figures[f"short stream runs with >= 10 s of wall time after training, {label}"] = (
            f"{totals['stalled_wall_clock']} of {totals['runs']}"
        )
        figures[f"step time, median of runs, {label}"] = _s(totals["step_ms_median"], "ms", 1)
        figures[f"fit_stream returned after the last step, median / max, {label}"] = (
            f"{_s(totals['returned_after_last_step_median_s'], digits=2)} / "
            f"{_s(totals['returned_after_last_step_max_s'], digits=2)}"
        )
    record.save("stall", result, figures)


if __name__ == "__main__":
    main(sys.argv[1:])
