"""harness.schedstat tells a thread that slept from one that ran: the stall benchmarks count
only the first."""

from __future__ import annotations

import sys
import time

import pytest

from harness.schedstat import Blocked

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="schedstat is Linux's")


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
