"""Run every benchmark module (or those named) and print each one's report.

Usage: python -m benchmarks [NAME ...] [--record] [--load TEXT] [--half-speed] [--OPTION ...]
       python -m benchmarks report [--check]   docs/results.md from the records in bench-results/

e.g. `python -m benchmarks stack serving`. Options (arguments starting with `-`, and the values
after them) go to each named module's `main(argv)`, e.g. `python -m benchmarks tune --overhead
--quick`, except these two, which say what to do with the results (benchmarks/record.py):
`--record` writes a dated record to keep (bench-results/<name>-<date>.json) instead of
scratch output (bench-results/<name>.json); `--load TEXT` says what else ran ("idle",
"beside a CPU-bound process"); `--half-speed` runs the whole benchmark, and every process it
starts (servers, replicas, balancers, load generators), inside a cgroup cpu quota of half
the cores' worth (one core on a 2-core machine) spread over all of them: a slower machine made
by the kernel (`harness/cpu_quota.py`). Its records are named <name>-half-<date>.json and their machine says
"at half speed". (`training --speed half` is the training benchmark's own per-run option.)
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import sys
import time
from pathlib import Path

from benchmarks import record


def main(argv: list[str]) -> int:
    """Run bench_<name>.main() for each selected module; non-zero if one raised."""
    if argv[:1] == ["report"]:
        from benchmarks import report

        return report.main(argv[1:])
    rest = _take_record_options(argv)
    if record.HALF_SPEED and not os.environ.get(record.SPEED_ENV):
        return _at_half_speed(argv)
    argv = rest
    here = Path(__file__).parent
    names = sorted(m.name for m in pkgutil.iter_modules([str(here)]) if m.name.startswith("bench_"))
    first = next((i for i, a in enumerate(argv) if a.startswith("-")), len(argv))
    argv, options = argv[:first], argv[first:]
    wanted = [n for n in names if not argv or n.removeprefix("bench_") in argv]
    failed = []
    for name in wanted:
        print(f"\n=== {name} ===", flush=True)
        started = time.monotonic()
        environ = dict(os.environ)
        try:
            module = importlib.import_module(f"benchmarks.{name}")
            if options:
                module.main(options)
            else:
                module.main()
        except Exception as exc:
            print(f"{name} failed: {exc!r}")
            failed.append(name)
        finally:  # what one benchmark set (its promotion key folder) is not the next one's
            os.environ.clear()
            os.environ.update(environ)
        print(f"({name} took {time.monotonic() - started:.0f}s)")
    return 1 if failed else 0


def _at_half_speed(argv: list[str]) -> int:
    """Run `python -m benchmarks ARGV` again inside a quota of half the cores; its exit status.
    Everything the run starts is its descendant, so the quota covers it all."""
    from harness.cpu_quota import cpu_quota, unavailable

    reason = unavailable()
    if reason is not None:
        print(f"--half-speed: cannot apply a CPU quota here: {reason}")
        return 2
    with cpu_quota(HALF_SPEED_CORES, name="bench-half") as quota:
        env = os.environ | {record.SPEED_ENV: f"at half speed ({quota.describe()})"}
        began, used = time.monotonic(), quota.usage_s()
        done = quota.run([sys.executable, "-m", "benchmarks", *argv], env=env, check=False)
        cores = (quota.usage_s() - used) / max(time.monotonic() - began, 1e-9)
        print(
            f"(half speed: {quota.describe()}; {cores:.2f} cores used on average, "
            f"{quota.throttled()} periods throttled)"
        )
    return done.returncode


HALF_SPEED_CORES = max(len(os.sched_getaffinity(0)), 2) / 2
"""Half the cores this process may run on (one core's worth on the 2-core machines)."""


def _take_record_options(argv: list[str]) -> list[str]:
    """Apply and remove `--record`, `--load TEXT` and `--half-speed`, which are for the record
    writer."""
    rest = []
    words = iter(argv)
    for word in words:
        if word == "--half-speed":
            record.HALF_SPEED = True
        elif word == "--record":
            record.KEEP = True
        elif word == "--load":
            record.LOAD = next(words, None)
        elif word.startswith("--load="):
            record.LOAD = word.split("=", 1)[1]
        else:
            rest.append(word)
    return rest


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
