"""The CPU quota harness: a busy command inside it gets no more than its quota, and where a
quota cannot be applied it says why in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.cpu_quota import cpu_quota, unavailable

REASON = unavailable()
ROOT = Path(__file__).resolve().parents[2]

# two threads of numpy matrix products (numpy releases the GIL) for `seconds`: two cores' worth
BUSY = """
import os, sys, threading, time
import numpy as np
def spin(stop):
    a = np.random.default_rng(0).random((200, 200))
    while time.monotonic() < stop:
        a = np.tanh(a @ a)
stop = time.monotonic() + float(sys.argv[1])
threads = [threading.Thread(target=spin, args=(stop,)) for _ in range(2)]
[t.start() for t in threads]
[t.join() for t in threads]
"""


@pytest.mark.skipif(REASON is not None, reason=REASON or "")
@pytest.mark.parametrize("cores", [1.0, 0.25])
def test_a_busy_two_thread_command_gets_no_more_than_its_quota(cores: float) -> None:
    """One core's worth over two is the benchmarks' half speed; a quarter of a core is below
    what two busy threads get on this machine even when other work shares it, so there the
    kernel must have stopped the cgroup (a quota that is only a number would not)."""
    env = {
        **os.environ,
        "OPENBLAS_NUM_THREADS": "1",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }
    with cpu_quota(cores, name="test") as quota:
        before, began = quota.usage_s(), time.monotonic()
        quota.run([sys.executable, "-c", BUSY, "3"], env=env, check=True, timeout=60)
        used, wall = quota.usage_s() - before, time.monotonic() - began
        throttled = quota.throttled()
        made = quota.dirs
    assert 0.1 < used / wall <= 1.1 * cores, f"{used:.2f} CPU s in {wall:.2f} s"
    if cores < 1:
        assert throttled > 0  # the kernel stopped the cgroup at the quota: it bit
    assert not any(path.exists() for path in made)  # the cgroup is removed afterwards


@pytest.mark.skipif(REASON is not None, reason=REASON or "")
def test_processes_left_in_the_cgroup_are_ended_with_it() -> None:
    with cpu_quota(0.5, name="test") as quota:
        left = quota.popen([sys.executable, "-c", "while True: pass"])
        time.sleep(0.3)
    assert left.wait(timeout=10) != 0


@pytest.mark.skipif(
    os.geteuid() != 0 or not Path("/usr/bin/python3").exists(),
    reason="needs root and a system python3 to run the check as another user",
)
def test_without_root_it_says_why_in_one_line() -> None:
    """The module needs only the standard library, so its source runs under the system Python
    as `nobody` (the project's venv and checkout need not be theirs to read)."""
    source = (ROOT / "harness" / "cpu_quota.py").read_text() + "\nprint(unavailable())\n"
    out = subprocess.run(
        ["/usr/bin/python3", "-"],
        input=source,
        user="nobody",
        cwd="/",
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith("CPU quotas need root")


def test_a_record_written_inside_the_half_speed_run_says_so(tmp_path: Path) -> None:
    """`python -m benchmarks --half-speed` marks its run through the environment: the record's
    name and machine say half speed, so a half-speed figure never passes for a full-speed one."""
    write = (
        "import sys; from pathlib import Path; from benchmarks import record; "
        "record.HALF_SPEED = True; "
        "record.RESULTS = Path(sys.argv[1]); record.save('probe', {'x': 1}, {'f': '1'})"
    )
    env = os.environ | {"CAPTCHAOPS_BENCH_SPEED": "at half speed (cgroup v2 cpu quota of 1 core)"}
    subprocess.run([sys.executable, "-c", write, str(tmp_path)], cwd=ROOT, env=env, check=True)
    env.pop("CAPTCHAOPS_BENCH_SPEED")
    subprocess.run([sys.executable, "-c", write, str(tmp_path)], cwd=ROOT, env=env, check=True)
    half = json.loads((tmp_path / "probe-half.json").read_text())
    full = json.loads((tmp_path / "probe.json").read_text())
    assert half["meta"]["machine"].endswith("at half speed (cgroup v2 cpu quota of 1 core)")
    assert "half" not in full["meta"]["machine"]


@pytest.mark.skipif(REASON is not None, reason=REASON or "")
def test_a_process_inside_a_quota_knows_its_cores_worth() -> None:
    """The serving benchmark's ceiling divides by the CPU a run may use, not the core count."""
    probe = [sys.executable, "-c", "from harness.cpu_quota import cores_allowed as c; print(c())"]
    outside = subprocess.run(probe, cwd=ROOT, capture_output=True, text=True, check=True)
    assert float(outside.stdout) == os.cpu_count()
    with cpu_quota(0.5, name="probe") as quota:
        inside = quota.run(probe, cwd=ROOT, capture_output=True, check=True)
    assert float(inside.stdout) == 0.5
