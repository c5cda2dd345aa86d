"""Issue 21's seed spread: plain `captchaops train --data DIR` on the stand-in with 3 seeds.

Usage:
  python -m benchmarks seeds                   # 3 seeds, folder preset, 1,040 images (~30 min)
  python -m benchmarks.bench_seeds [--seeds 0 1 2] [--count 1040] [--steps N]
                                   [--max-minutes M] [--folder DIR] [--quick]

The three runs share one scheme, so each is scored on the same frozen evaluation set (the same
split); the spread is the largest minus the smallest held-out accuracy, in points (target
<= 1 point). `--quick` checks the path in about 3 minutes (60 steps, 300 images): its numbers
mean nothing.
"""

from __future__ import annotations

import argparse
import sys

from benchmarks.scaleout_runs import accuracy, bench, load, stand_in_options

SPREAD_TARGET = 1.0  # points


def main(argv: list[str] | None = None) -> None:
    """Train once per seed on the same split and print the spread next to the target."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_seeds")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    stand_in_options(parser)
    args = parser.parse_args(argv if argv is not None else [])
    if args.quick:
        args.count, args.steps = min(args.count, 300), args.steps or 60
    print(f"start: {load()}")
    with bench(args.count, args.folder) as b:
        extra = ["--steps", str(args.steps)] if args.steps else []
        extra += ["--max-minutes", str(args.max_minutes)] if args.max_minutes else []
        scores = {}
        for seed in args.seeds:
            wall, out = b.run(["train", "--data", str(b.folder), "--seed", str(seed), *extra], "h")
            scores[seed] = accuracy(out)
            print(f"seed {seed}: held-out accuracy {scores[seed]:.4f}, {wall / 60:.1f} min wall")
    spread = (max(scores.values()) - min(scores.values())) * 100
    print(
        f"spread over seeds {args.seeds} on the same frozen set: {spread:.2f} points "
        f"(target <= {SPREAD_TARGET} point)"
    )
    print(f"end: {load()}")


if __name__ == "__main__":
    main(sys.argv[1:])
