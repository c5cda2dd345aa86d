"""Call-path benchmark: stops and climb-backs of `captchaops train` and `promote --auto`.

Usage:
  python -m benchmarks call_path                  # via `make bench`
  python -m benchmarks.bench_call_path [--src DIR]

Starts a private tracking server in a temporary home, then runs, in this process and under
`harness.calltrace` (sys.setprofile), three commands through the CLI's own entry point:
`train --data` on 200 stand-in images (the folder path: frozen set held out, ~1 min),
`train --synthetic 300` (the generated path) and `promote --auto` (the gate, on a 200-image
frozen set made beforehand, untraced). For each it prints the files it passed through
(stops), the calls between files and the climb-backs: calls from file B into a file A that is
already lower on the call stack. Target: 0 climb-backs for each command.

`--src DIR` traces another copy of the package (e.g. main's `src/`, to compare before/after):
it is put first on sys.path before captchaops is imported.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

TARGET_CLIMBS = 0
TRAIN_FLAGS = ["--epochs", "1", "--steps", "20", "--max-minutes", "1", "--batch-size", "32"]


def _cli(argv: list[str]) -> int:
    """Run the captchaops CLI in this process; its exit status."""
    from captchaops.cli import main as cli_main

    sys.argv = ["captchaops", *argv]
    try:
        cli_main()
    except SystemExit as exc:
        return int(exc.code or 0) if not isinstance(exc.code, str) else 1
    return 0


def main(argv: list[str] | None = None) -> None:
    """Trace the three commands on a private tracking server; print stops and climb-backs."""
    parser = argparse.ArgumentParser(prog="bench_call_path")
    parser.add_argument("--src", type=Path, help="trace the captchaops package under DIR")
    parser.add_argument("--show", type=int, default=12, help="climb-backs listed per command")
    args = parser.parse_args(argv or [])
    if args.src is not None:
        sys.path.insert(0, str(args.src.resolve()))
    from mlflow import MlflowClient

    import captchaops
    from harness.calltrace import CallTrace
    from harness.processes import tracking_server

    package = Path(captchaops.__file__).parent
    print(f"tracing {package}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        (home / "stack").mkdir()
        with tracking_server(home / "stack") as server:
            os.environ.update(
                CAPTCHAOPS_HOME=str(home / "stack"),
                CAPTCHAOPS_TRACKING_URI=server.uri,
                CAPTCHAOPS_STAGING_FLOOR="0",
            )
            assert _cli(["sample-data", str(home / "images"), "--count", "200"]) == 0
            commands = [
                ("train --data", ["train", "--data", str(home / "images"), *TRAIN_FLAGS]),
                ("train --synthetic", ["train", "--synthetic", "300", *TRAIN_FLAGS]),
                ("promote --auto", ["promote", "--auto", "--model-name", "captcha-cp"]),
            ]
            # the gate's subject: a synthetic scheme with a small frozen set, made untraced
            os.environ["CAPTCHAOPS_MODEL_NAME"] = "captcha-cp"
            assert _cli(["evalset", "--size", "200"]) == 0
            assert _cli(["train", "--synthetic", "300", *TRAIN_FLAGS]) == 0
            del os.environ["CAPTCHAOPS_MODEL_NAME"]
            for label, command in commands:
                if label == "train --synthetic":
                    os.environ["CAPTCHAOPS_MODEL_NAME"] = "captcha-syn"
                trace = CallTrace(package, watch=(MlflowClient.__init__.__code__,))
                began = time.monotonic()
                with trace.running():
                    status = _cli(command)
                seconds = time.monotonic() - began
                os.environ.pop("CAPTCHAOPS_MODEL_NAME", None)
                rows.append((label, status, seconds, trace.summary(), trace.watched))
    print()
    print(
        f"{'command':<18} {'exit':>4} {'s':>5} {'stops':>5} {'crossings':>9} {'climbs':>6} {'clients':>7}"
    )
    for label, status, seconds, summary, clients in rows:
        print(
            f"{label:<18} {status:>4} {seconds:>5.0f} {summary.stops:>5} "
            f"{len(summary.crossings):>9} {len(summary.climbs):>6} {sum(clients.values()):>7}"
        )
    for label, *_, summary, clients in rows:
        for line in summary.lines()[: args.show]:
            print(f"  {label}: climb-back {line}")
        for (file, function), n in sorted(clients.items()):
            print(f"  {label}: MlflowClient made in {file}:{function} ({n}x)")
    worst = max(len(row[3].climbs) for row in rows)
    verdict = "meets" if worst <= TARGET_CLIMBS else "MISSES"
    print(
        f"climb-backs (distinct caller -> callee): at most {worst} (target {TARGET_CLIMBS}: {verdict})"
    )
    print("stops: distinct source files; crossings: distinct caller -> callee function pairs;")
    print("clients: MlflowClient objects made directly by captchaops code")


if __name__ == "__main__":
    main(sys.argv[1:])
