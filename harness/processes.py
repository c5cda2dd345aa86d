"""Real processes for tests and benchmarks: free ports, start and wait for health, stop, RSS."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

from captchaops.stack.memory import process_tree, rss_mb

VENV_BIN = Path(sys.executable).parent
"""The folder of this interpreter's executables (`captchaops`, `mlflow`, `moto_server`)."""


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_http(url: str, timeout: float = 60.0, proc: subprocess.Popen | None = None) -> float:
    """Block until GET url answers 200 and return the seconds it took; raise if `proc` exits
    first or the timeout passes."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process for {url} exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return time.monotonic() - started
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{url} not healthy after {timeout:.0f}s")


def start_http_process(
    cmd: list[str],
    health_url: str,
    *,
    env: dict[str, str] | None = None,
    log: Path | None = None,
    timeout: float = 90.0,
) -> subprocess.Popen:
    """Start `cmd` (output appended to `log`, else dropped) and wait until `health_url`
    answers 200; a process that never gets healthy is stopped before the error is raised."""
    out = log.open("ab") if log is not None else subprocess.DEVNULL
    try:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    finally:
        if log is not None:
            out.close()  # type: ignore[union-attr]
    try:
        wait_http(health_url, timeout=timeout, proc=proc)
    except BaseException:
        stop_process(proc)
        raise
    return proc


def stop_process(proc: subprocess.Popen) -> None:
    """Terminate a process (killing it if it does not stop in time) and any child it leaves."""
    children = process_tree(proc.pid)[1:]
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)
    for child in children:
        with suppress(psutil.Error):
            child.kill()
    psutil.wait_procs(children, timeout=5)


@contextmanager
def http_service(
    cmd: list[str],
    health_url: str,
    *,
    env: dict[str, str] | None = None,
    log: Path | None = None,
    timeout: float = 90.0,
) -> Iterator[subprocess.Popen]:
    """`start_http_process` for the duration of a `with` block, stopped after it."""
    proc = start_http_process(cmd, health_url, env=env, log=log, timeout=timeout)
    try:
        yield proc
    finally:
        stop_process(proc)


@dataclass
class Tracking:
    """A running tracking server: its URI, its home folder and its process."""

    uri: str
    home: Path
    proc: subprocess.Popen


def start_tracking_server(
    home: Path,
    port: int | None = None,
    env: dict[str, str] | None = None,
    *,
    host: str = "127.0.0.1",
    inside: Sequence[str] = (),
) -> Tracking:
    """Start a real `mlflow server` as the stack runs it (sqlite, artifacts proxied from a
    local folder, one worker) in `home`, bound to `host`, and wait for its health. `inside`
    prefixes the command (a `harness.hosts.Host.command` prefix runs it on that host)."""
    port = port or free_port()
    uri = f"http://{host}:{port}"
    cmd = [
        *inside, sys.executable, "-m", "captchaops.stack.tracking",
        "--backend-store-uri", f"sqlite:///{home / 'mlflow.db'}",
        "--artifacts-destination", str(home / "artifacts"),
        "--host", host, "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    proc = start_http_process(cmd, f"{uri}/health", env=env, log=home / "mlflow.log")
    return Tracking(uri=uri, home=home, proc=proc)


@contextmanager
def tracking_server(home: Path, env: dict[str, str] | None = None) -> Iterator[Tracking]:
    """`start_tracking_server` for the duration of a `with` block, stopped after it."""
    server = start_tracking_server(home, env=env)
    try:
        yield server
    finally:
        stop_process(server.proc)


class RssSampler:
    """Samples named RSS figures (MB) on entry, every `every` seconds in a thread, and on exit;
    keeps each one's peak and the peak of their sum."""

    def __init__(self, sample: Callable[[], dict[str, float]], every: float = 1.0) -> None:
        self.sample = sample
        self.every = every
        self.peak: dict[str, float] = {}
        self.peak_total = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @classmethod
    def of_pid(cls, pid: int, every: float = 0.1) -> RssSampler:
        """A sampler of one process tree (its peak is `peak_total`)."""
        return cls(lambda: {str(pid): rss_mb(pid)}, every)

    def __enter__(self) -> RssSampler:
        self._take()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._take()

    def _take(self) -> None:
        rows = self.sample()
        for name, mb in rows.items():
            self.peak[name] = max(self.peak.get(name, 0.0), mb)
        self.peak_total = max(self.peak_total, sum(rows.values()))

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self._take()
