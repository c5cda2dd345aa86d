"""What Ray's dashboard costs a head: RSS and PSS of a `ray start --head` process tree with
the dashboard off (how a command's own Ray and the test clusters run) and on (a head that
takes `--submit`), each head alone in a network namespace of its own so that its fixed ports
meet no other Ray on the machine. Root only (harness/hosts.py). Not part of `make bench`:

    .venv/bin/python -m benchmarks.ray_head_memory [SECONDS_SETTLED]
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import suppress

import psutil

from harness.hosts import host_net, unavailable
from harness.processes import VENV_BIN, stop_process


def head_memory(dashboard: bool, settle: float) -> tuple[float, float, int]:
    """(RSS MiB, PSS MiB, processes) of a settled head without CPUs, dashboard on or off."""
    temp = tempfile.mkdtemp(prefix="rayhm", dir="/tmp")
    try:
        with host_net(["head"]) as net:
            host = net["head"]
            args = [str(VENV_BIN / "ray"), "start", "--head", "--block", "--num-cpus", "0"]
            args += ["--node-ip-address", host.address, "--temp-dir", temp]
            args += ["--include-dashboard", "true" if dashboard else "false"]
            args += ["--object-store-memory", str(100 * 2**20)]
            head = host.popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                time.sleep(settle)
                root = psutil.Process(head.pid)  # `ray start --block` itself, and its tree
                procs = [root, *root.children(recursive=True)]
                rss = pss = 0
                for proc in procs:
                    with suppress(psutil.Error):
                        info = proc.memory_full_info()
                        rss, pss = rss + info.rss, pss + info.pss
                return rss / 2**20, pss / 2**20, len(procs)
            finally:
                stop_process(head)
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def main(argv: list[str]) -> None:
    reason = unavailable()
    if reason is not None:
        sys.exit(f"cannot measure: {reason}")
    settle = float(argv[0]) if argv else 20.0
    for dashboard in (False, True):
        rss, pss, count = head_memory(dashboard, settle)
        state = "on " if dashboard else "off"
        print(f"dashboard {state}: {count} processes, RSS {rss:,.0f} MiB, PSS {pss:,.0f} MiB")


if __name__ == "__main__":
    main(sys.argv[1:])
