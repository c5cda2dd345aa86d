"""harness.schedstat tells a thread that slept from one that ran: the stall benchmarks count
only the first."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from harness.schedstat import Blocked

# harness.schedstat reads (0, 0) where the kernel keeps no schedstat (another OS, a kernel
# without CONFIG_SCHED_INFO, some sandboxes); there every wall second counts as asleep
pytestmark = pytest.mark.skipif(
    not Path("/proc/thread-self/schedstat").is_file(),
    reason="no /proc/thread-self/schedstat on this machine (Linux with CONFIG_SCHED_INFO)",
)


def test_a_sleep_counts_as_asleep_and_a_busy_loop_does_not() -> None:
    timer = Blocked()
    timer.start()
    time.sleep(0.3)
    wall, asleep = timer.stop()
    assert wall >= 0.3 and asleep >= 0.25

    timer.start()
    end = time.monotonic() + 0.3
    while time.monotonic() < end:
        pass
    wall, asleep = timer.stop()
    assert wall >= 0.3 and asleep < 0.1
