"""How long a thread slept, as the kernel counts it: what tells a blocked thread (a stall: a
finaliser waiting on a lock or a join) from one that only waited for a core on a busy box.

`/proc/thread-self/schedstat` holds the thread's nanoseconds on a CPU and nanoseconds runnable
but waiting for one; wall time less both is time asleep. The benchmarks that count stalls
(`bench_training`, `bench_stall`) time their garbage collections and waits with it."""

from __future__ import annotations

import time
from pathlib import Path


def thread_times() -> tuple[float, float]:
    """This thread's (CPU seconds, run-queue wait seconds); (0, 0) where there is no schedstat."""
    try:
        cpu_ns, wait_ns, _ = Path("/proc/thread-self/schedstat").read_text().split()
    except (OSError, ValueError):
        return 0.0, 0.0
    return int(cpu_ns) / 1e9, int(wait_ns) / 1e9


class Blocked:
    """Wall time, and the part of it this thread slept, between `start()` and `stop()` (both
    called on the same thread)."""

    def __init__(self) -> None:
        self._wall = 0.0
        self._times = (0.0, 0.0)

    def start(self) -> None:
        self._wall, self._times = time.monotonic(), thread_times()

    def stop(self) -> tuple[float, float]:
        """(wall seconds, seconds asleep) since `start()`."""
        wall = time.monotonic() - self._wall
        cpu, waited = thread_times()
        return wall, max(0.0, wall - (cpu - self._times[0]) - (waited - self._times[1]))
