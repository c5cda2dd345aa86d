"""Issue 21's ensemble target: K shorter members against one long run in the same wall time.

Usage:
  python -m benchmarks members              # K=2 on 2 cores, 10 minutes each way (~21 min)
  python -m benchmarks members --cv         # the same by `cv` on 5 folds (~52 min)
  python -m benchmarks.bench_members [--members 2] [--minutes 10] [--count 1040] [--cv]
                                     [--folds 5] [--folder DIR] [--quick]

Both are plain commands on the same folder and scheme, so both are scored on the same frozen
evaluation set: `train --data DIR --max-minutes M` (one run, every core) against
`train --data DIR --members K --max-minutes M*slots/K` (K members on a local Ray; `slots`
run side by side, one core each, so the whole takes about M minutes). If the members win,
issue 21 asks the folder preset to use them. `--quick` checks the path (1 minute, 200 images).

`--cv` compares them by `cv` on the stand-in's fixed folds instead of one split: `cv` (a
fold is one run of the folder preset, 9.5 minutes on one core, folds side by side) against
`cv --members K --max-minutes 9.5/K` (a fold is K runs of 9.5/K minutes on one core each),
the same core-minutes per fold, and prints the per-fold difference's mean with its 95%
t-interval.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from benchmarks.bench_tune import cross_validate, paired_difference
from benchmarks.scaleout_runs import Bench, accuracy, bench, load


def by_cv(b: Bench, members: int, minutes: float | None, folds: int) -> None:
    """One run per fold (the preset as shipped, or M minutes) against K members per fold, the
    same core-minutes, on the same folds."""
    from captchaops.training.config import TrainConfig

    budget = ["--max-minutes", str(minutes)] if minutes else []
    minutes = minutes or TrainConfig.folder().max_minutes
    one = cross_validate(b, folds, budget, "preset (one run a fold)")
    each = ["--members", str(members), "--max-minutes", f"{minutes / members:.2f}"]
    many = cross_validate(b, folds, each, f"{members} members a fold")
    print(paired_difference(f"{members} members - one run", many, one))


def main(argv: list[str] | None = None) -> None:
    """Train one long run and K members in the same budget; print both held-out accuracies."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_members")
    parser.add_argument("--members", type=int, default=2)
    parser.add_argument("--minutes", type=float, default=None, help="10; cv: the preset's")
    parser.add_argument("--count", type=int, default=1040)
    parser.add_argument("--folder", type=Path, default=None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--cv", action="store_true", help="compare by cv on the same folds")
    parser.add_argument("--folds", type=int, default=5)
    args = parser.parse_args(argv if argv is not None else [])
    if args.quick:
        args.count, args.minutes = min(args.count, 200), 1.0
    if args.cv:
        print(f"start: {load()}")
        with bench(args.count, args.folder) as b:
            by_cv(b, args.members, args.minutes, args.folds)
        print(f"end: {load()}")
        return
    args.minutes = args.minutes or 10.0
    slots = max(1, min(args.members, os.cpu_count() or 1))  # members side by side, a core each
    each = args.minutes / math.ceil(args.members / slots)
    print(f"start: {load()}")
    with bench(args.count, args.folder) as b:
        data = ["train", "--data", str(b.folder)]
        one_wall, out = b.run([*data, "--max-minutes", str(args.minutes)], "h")
        one = accuracy(out)
        k = ["--members", str(args.members), "--max-minutes", f"{each:.2f}"]
        k_wall, out = b.run([*data, *k], "h")
        many = accuracy(out)
    print(f"one run, {args.minutes:g} min budget: {one:.4f} held-out, {one_wall / 60:.1f} min wall")
    print(
        f"{args.members} members, {each:.2f} min each ({slots} side by side): {many:.4f} "
        f"held-out, {k_wall / 60:.1f} min wall"
    )
    print(f"members - one run: {(many - one) * 100:+.2f} points on the same frozen set")
    print(f"end: {load()}")


if __name__ == "__main__":
    main(sys.argv[1:])
