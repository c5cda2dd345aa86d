"""Run every benchmark module (or those named) and print each one's report.

Usage: python -m benchmarks [NAME ...] [--OPTION ...]   e.g. `python -m benchmarks stack serving`

Options (arguments starting with `-`, and the values after them) go to each named module's
`main(argv)`, e.g. `python -m benchmarks tune --overhead --quick`.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
import time
from pathlib import Path


def main(argv: list[str]) -> int:
    """Run bench_<name>.main() for each selected module; non-zero if one raised."""
    here = Path(__file__).parent
    names = sorted(m.name for m in pkgutil.iter_modules([str(here)]) if m.name.startswith("bench_"))
    first = next((i for i, a in enumerate(argv) if a.startswith("-")), len(argv))
    argv, options = argv[:first], argv[first:]
    wanted = [n for n in names if not argv or n.removeprefix("bench_") in argv]
    failed = []
    for name in wanted:
        print(f"\n=== {name} ===", flush=True)
        started = time.monotonic()
        try:
            module = importlib.import_module(f"benchmarks.{name}")
            if options:
                module.main(options)
            else:
                module.main()
        except Exception as exc:
            print(f"{name} failed: {exc!r}")
            failed.append(name)
        print(f"({name} took {time.monotonic() - started:.0f}s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
