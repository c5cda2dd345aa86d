"""A CPU quota for a command: a machine at a fraction of its speed, made by the kernel.

"Half speed" measured beside a second CPU-bound process is not what a slower machine does
(the scheduler shares the cores fairly and the hog loses as much as the run). A cgroup `cpu`
quota is: the command and every process it starts get at most `cores` cores' worth of CPU
time per period, spread over all the cores (`cpu.max` of `100000 100000` is one core's
worth on a 2-core box). Benchmarks use it to run a row at half speed (bench_training);
tests use it to prove the quota bites.

Works as root with the `cpu` controller on cgroup v2 (`cpu.max`, usage from `cpu.stat`) or,
where systemd's hybrid layout binds it to v1, on v1 (`cpu.cfs_quota_us`, usage from
`cpuacct.usage`). `unavailable()` says in one line why not (not Linux, not root, no `cpu`
controller, not delegatable); callers skip with that reason.
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PERIOD_US = 100_000
MOUNTS = Path("/proc/self/mounts")


@dataclass
class Quota:
    """A cgroup with a CPU quota: `command` wraps argv so the process joins it before it runs."""

    cores: float
    version: int  # 1 or 2
    dirs: list[Path]  # v2: the cgroup; v1: the cgroup in the cpu (and the cpuacct) hierarchy
    usage_file: Path  # v2 cpu.stat (usage_usec); v1 cpuacct.usage (ns)
    procs: list[Path] = field(default_factory=list)  # cgroup.procs of each dir

    def command(self, argv: Sequence[str]) -> list[str]:
        """argv run inside the cgroup: a shell writes its pid to cgroup.procs, then execs argv
        (so nothing of the command, not even its imports, runs outside the quota)."""
        joins = " && ".join(f"echo $$ > '{p}'" for p in self.procs)
        return ["/bin/sh", "-c", f'{joins} && exec "$@"', "sh", *argv]

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        """Start argv inside the cgroup (`subprocess.Popen` keyword arguments pass through)."""
        return subprocess.Popen(self.command(argv), **kwargs)

    def run(self, argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[bytes]:
        """Run argv inside the cgroup to its end (`subprocess.run` keyword arguments pass through)."""
        return subprocess.run(self.command(argv), **kwargs)

    def usage_s(self) -> float:
        """CPU seconds used by everything in the cgroup so far."""
        text = self.usage_file.read_text()
        if self.version == 2:
            stat = dict(line.split() for line in text.splitlines() if line.strip())
            return int(stat["usage_usec"]) / 1e6
        return int(text.strip()) / 1e9

    def throttled(self) -> int:
        """Periods in which the quota stopped the cgroup (`nr_throttled`)."""
        stat = dict(line.split() for line in (self.dirs[0] / "cpu.stat").read_text().splitlines())
        return int(stat.get("nr_throttled", 0))

    def describe(self) -> str:
        """One line: the quota and where it is applied."""
        return (
            f"cgroup v{self.version} cpu quota of {self.cores:g} core(s) over "
            f"{os.cpu_count()} ({self.dirs[0]})"
        )


def _mounts() -> list[tuple[str, str, set[str]]]:
    """(mount point, type, options) of the cgroup file systems."""
    found = []
    for line in MOUNTS.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[2] in ("cgroup", "cgroup2"):
            found.append((parts[1], parts[2], set(parts[3].split(","))))
    return found


def _v2_root() -> Path | None:
    """The cgroup2 mount whose controllers include `cpu`, if any."""
    for point, kind, _ in _mounts():
        controllers = Path(point) / "cgroup.controllers"
        if kind == "cgroup2" and controllers.exists() and "cpu" in controllers.read_text().split():
            return Path(point)
    return None


def _v1_roots() -> tuple[Path, Path] | None:
    """The v1 hierarchies holding the `cpu` and the `cpuacct` controllers, if both are mounted."""
    cpu = next((Path(p) for p, kind, opts in _mounts() if kind == "cgroup" and "cpu" in opts), None)
    acct = next(
        (Path(p) for p, kind, opts in _mounts() if kind == "cgroup" and "cpuacct" in opts), None
    )
    return (cpu, acct) if cpu is not None and acct is not None else None


def unavailable() -> str | None:
    """Why a CPU quota cannot be applied here (one line), or None when it can."""
    if not MOUNTS.exists():
        return "CPU quotas need Linux cgroups (no /proc/self/mounts)"
    if os.geteuid() != 0:
        return "CPU quotas need root to create a cgroup (run as root, or in a root container)"
    root = _v2_root()
    if root is not None:
        if not os.access(root / "cgroup.subtree_control", os.W_OK):
            return f"the cgroup2 tree at {root} is read-only here (mount it rw)"
        return None
    v1 = _v1_roots()
    if v1 is None:
        return "no cgroup cpu controller is mounted (neither cgroup2 with cpu nor v1 cpu+cpuacct)"
    if not all(os.access(p, os.W_OK) for p in v1):
        return f"the cgroup v1 cpu hierarchy at {v1[0]} is read-only here"
    return None


@contextmanager
def cpu_quota(cores: float = 1.0, name: str = "half") -> Iterator[Quota]:
    """A fresh cgroup capped at `cores` cores' worth of CPU time (created as
    captchaops-<name>-<pid>-<id>, removed afterwards; processes left in it are killed).
    Raises RuntimeError with `unavailable()`'s reason where quotas cannot be applied."""
    reason = unavailable()
    if reason is not None:
        raise RuntimeError(reason)
    quota_us = max(1000, round(cores * PERIOD_US))
    leaf = f"captchaops-{name}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    root = _v2_root()
    made: list[Path] = []
    try:
        if root is not None:
            control = root / "cgroup.subtree_control"
            if "cpu" not in control.read_text().split():
                try:
                    control.write_text("+cpu")
                except OSError as exc:
                    raise RuntimeError(
                        f"the cpu controller cannot be delegated below {root} ({exc.strerror}); "
                        "no process may sit in a cgroup that delegates it"
                    ) from exc
            path = root / leaf
            path.mkdir()
            made.append(path)
            (path / "cpu.max").write_text(f"{quota_us} {PERIOD_US}")
            quota = Quota(cores, 2, [path], path / "cpu.stat", [path / "cgroup.procs"])
        else:
            v1 = _v1_roots()
            assert v1 is not None  # unavailable() checked
            cpu_root, acct_root = v1
            dirs = [cpu_root / leaf] + ([acct_root / leaf] if acct_root != cpu_root else [])
            for path in dirs:
                path.mkdir()
                made.append(path)
            (dirs[0] / "cpu.cfs_period_us").write_text(str(PERIOD_US))
            (dirs[0] / "cpu.cfs_quota_us").write_text(str(quota_us))
            usage = dirs[-1] / "cpuacct.usage"
            quota = Quota(cores, 1, dirs, usage, [d / "cgroup.procs" for d in dirs])
        yield quota
    finally:
        for path in reversed(made):
            _remove(path)


def cores_allowed() -> float:
    """The cores' worth of CPU time this process may use: its cgroup's quota where one is set
    (`cpu.max`, or v1 `cpu.cfs_quota_us` over `cpu.cfs_period_us`), else the core count."""
    cores = float(os.cpu_count() or 1)
    with suppress(OSError, ValueError):
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            rel = path.lstrip("/")
            if controllers == "" and (root := _v2_root()) is not None:
                quota, period = (root / rel / "cpu.max").read_text().split()
                if quota != "max":
                    cores = min(cores, int(quota) / int(period))
            elif "cpu" in controllers.split(","):
                v1 = _v1_roots()
                if v1 is not None:
                    quota_us = int((v1[0] / rel / "cpu.cfs_quota_us").read_text())
                    period_us = int((v1[0] / rel / "cpu.cfs_period_us").read_text())
                    if quota_us > 0:
                        cores = min(cores, quota_us / period_us)
    return cores


def _remove(path: Path) -> None:
    """Remove a cgroup, killing what is left in it first (a cgroup with processes cannot go)."""
    procs = path / "cgroup.procs"
    for _ in range(50):
        pids = [int(p) for p in procs.read_text().split()] if procs.exists() else []
        if not pids:
            break
        for pid in pids:
            with suppress(ProcessLookupError):
                os.kill(pid, 9)
        time.sleep(0.1)
    with suppress(OSError):  # a process that would not die keeps it; names are unique
        path.rmdir()
