"""Replicas behind the balancer `up --replicas N` starts, and what the drills do to them: a
closed-loop load from a process of its own, a replica killed under it, its return to rotation.

Used by tests/integration/test_up_replicas.py, tests/integration/test_replicas.py and the
benchmarks; the multi-host layout itself is harness/replica_hosts.py.

`python -m harness.replicas URL CLIENTS SECONDS BODY_FILE [SOURCE]` runs CLIENTS keep-alive
clients, each POSTing BODY_FILE to URL/invocations as soon as its last answer came, for SECONDS
(from the local address SOURCE if given), and prints what they saw as JSON (`LoadResult`).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from captchaops.settings import Settings, load_settings
from captchaops.stack import balancer, control, supervisor
from captchaops.stack.services import replica_name
from harness.processes import free_port


@dataclass
class LoadResult:
    """What the clients of one closed-loop run saw."""

    clients: int
    seconds: float
    ok: int
    failed: int
    statuses: dict[str, int]
    """Every answer by HTTP status ("error: <exception>" for a connection that failed)."""
    p50_ms: float
    p99_ms: float
    rps: float
    failures: list[tuple[float, str]]
    """Each failed request: seconds from the start, and its status."""


def generate(
    url: str, clients: int, seconds: float, body: bytes, source: str | None = None
) -> LoadResult:
    """`clients` keep-alive clients POSTing `body` to url/invocations, back to back, for `seconds`."""
    parts = urlsplit(url)
    latencies: list[float] = []
    statuses: Counter[str] = Counter()
    failures: list[tuple[float, str]] = []
    lock = threading.Lock()
    started = time.monotonic()
    deadline = started + seconds
    headers = {"Content-Type": "application/json"}

    def connection() -> http.client.HTTPConnection:
        address = (source, 0) if source else None
        return http.client.HTTPConnection(
            parts.hostname or "127.0.0.1", parts.port, timeout=30, source_address=address
        )

    def client() -> None:
        conn = connection()
        while time.monotonic() < deadline:
            sent = time.perf_counter()
            try:
                conn.request("POST", "/invocations", body=body, headers=headers)
                resp = conn.getresponse()
                payload = resp.read()
                ok = resp.status == 200 and payload.startswith(b'{"predictions"')
                status = str(resp.status)
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                conn = connection()
                ok, status = False, f"error: {type(exc).__name__}"
            with lock:
                statuses[status] += 1
                if ok:
                    latencies.append(time.perf_counter() - sent)
                else:
                    failures.append((round(time.monotonic() - started, 3), status))
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    latencies.sort()
    ok = len(latencies)
    return LoadResult(
        clients=clients,
        seconds=elapsed,
        ok=ok,
        failed=sum(statuses.values()) - ok,
        statuses=dict(statuses),
        p50_ms=_quantile(latencies, 0.50) * 1000,
        p99_ms=_quantile(latencies, 0.99) * 1000,
        rps=ok / elapsed,
        failures=sorted(failures)[:100],
    )


def _quantile(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def start_load(
    url: str,
    clients: int,
    seconds: float,
    body: Path,
    source: str | None = None,
    where: Callable[[list[str]], list[str]] = list,
) -> subprocess.Popen[str]:
    """`generate` in a process of its own (its clients do not share this process's GIL), its
    command line made by `where` (e.g. `hosts.Host.command`: on another host); read its result
    with `load_result`."""
    root = str(Path(__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path}
    args = [url, str(clients), str(seconds), str(body), *([source] if source else [])]
    return subprocess.Popen(
        where([sys.executable, "-m", "harness.replicas", *args]),
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )


def load_result(proc: subprocess.Popen[str], timeout: float = 120) -> LoadResult:
    """The result a `start_load` process prints."""
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"load generator exited {proc.returncode}"
    return LoadResult(**json.loads(out))


@dataclass
class Balanced:
    """An alias served by replicas behind the balancer, in a stack `control.up` started."""

    settings: Settings
    alias: str
    replicas: int

    @property
    def url(self) -> str:
        """The balancer: the alias's own URL."""
        return self.settings.server_url(self.alias)

    def name(self, index: int) -> str:
        """Replica `index`'s service name (1-based)."""
        return replica_name(self.alias, index)

    def pid(self, index: int) -> int:
        """The pid supervisord reports for replica `index` (0 while it is not running)."""
        info = supervisor.process_info(self.settings).get(self.name(index), {})
        return int(info.get("pid") or 0)

    def replica_url(self, index: int) -> str:
        """Replica `index`'s own URL (loopback, behind the balancer; the server itself when
        there is one replica)."""
        if self.replicas == 1:
            return self.url
        port = self.settings.production_port if self.alias == "production" else None
        port = port or self.settings.staging_port
        return f"http://{balancer.REPLICA_HOST}:{balancer.replica_port(port, index)}"

    def kill(self, index: int) -> int:
        """SIGKILL replica `index` (no goodbye to the balancer); its pid."""
        pid = self.pid(index)
        assert pid, f"{self.name(index)} is not running"
        os.kill(pid, signal.SIGKILL)
        return pid

    def answered(self, index: int) -> float:
        """/invocations answered 200 by replica `index` since its process started."""
        return answered(self.replica_url(index))

    def wait_serving(self, index: int, version: str | None = None, timeout: float = 90) -> None:
        """Until replica `index` reports `version` (any, if None) loaded: /health answers 200."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                health = httpx.get(f"{self.replica_url(index)}/health", timeout=5)
                if health.status_code == 200 and version in (None, health.json().get("version")):
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name(index)} never served v{version}")
            time.sleep(0.2)

    def wait_rotation(self, index: int, old_pid: int, body: bytes, timeout: float = 90) -> float:
        """Seconds until replica `index`, restarted by the supervisor (a pid other than
        `old_pid`), answers a request sent to the balancer."""

        def restarted() -> bool:
            pid = self.pid(index)
            return bool(pid) and pid != old_pid

        return wait_rotation(self.url, self.replica_url(index), body, restarted, timeout)


def answered(url: str) -> float:
    """/invocations answered 200 by the server at `url` since its process started."""
    text = httpx.get(f"{url}/metrics", timeout=5).text
    line = 'captchaops_requests_total{status="200"} '
    return sum(float(ln.split()[-1]) for ln in text.splitlines() if ln.startswith(line))


def wait_rotation(
    balancer_url: str,
    replica_url: str,
    body: bytes,
    restarted: Callable[[], bool],
    timeout: float = 90,
) -> float:
    """Seconds until the replica at `replica_url`, once `restarted()` says it was started again,
    has answered a request the balancer at `balancer_url` sent it (this sends them)."""
    started = time.monotonic()
    with httpx.Client(timeout=30) as http:
        while time.monotonic() - started < timeout:
            if restarted():
                try:
                    if answered(replica_url) > 0:
                        return time.monotonic() - started
                except httpx.HTTPError:
                    pass  # started, not yet listening
                answer = http.post(f"{balancer_url}/invocations", content=body, headers=JSON)
                assert answer.status_code == 200, answer.text
            time.sleep(0.05)
    raise TimeoutError(f"{replica_url} not back in rotation after {timeout:.0f}s")


JSON = {"Content-Type": "application/json"}
PREFIX = "CAPTCHAOPS_"


def port_free(port: int) -> bool:
    """Whether nothing listens on 127.0.0.1:port (and it can be bound)."""
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def alias_port(replicas: int) -> int:
    """A free port whose replica ports (`balancer.replica_port`) are free too."""
    while True:
        port = free_port()
        wanted = [balancer.replica_port(port, k) for k in range(1, replicas + 1)]
        if all(p < 65536 and port_free(p) for p in wanted):
            return port


def stack_settings(home: Path, tracking_uri: str, model: str, replicas: int) -> dict[str, str]:
    """The CAPTCHAOPS_* environment of a private stack serving `model`@production through
    `replicas` replicas on free ports, its tracking server elsewhere, no webhooks (the servers
    poll every 0.5 s), no shadow copies or review offers."""
    return {
        "CAPTCHAOPS_HOME": str(home),
        "CAPTCHAOPS_TRACKING_URI": tracking_uri,
        "CAPTCHAOPS_MODEL_NAME": model,
        "CAPTCHAOPS_PRODUCTION_PORT": str(alias_port(replicas)),
        "CAPTCHAOPS_STAGING_PORT": str(alias_port(replicas)),
        "CAPTCHAOPS_APP_PORT": str(free_port()),
        "CAPTCHAOPS_WEBHOOKS": "false",
        "CAPTCHAOPS_SHADOW_URL": "",
        "CAPTCHAOPS_REVIEW_URL": "",
        "CAPTCHAOPS_POLL_SECONDS": "0.5",
    }


@contextlib.contextmanager
def balanced_production(env: dict[str, str], replicas: int) -> Iterator[Balanced]:
    """`up` of @production alone as `replicas` replicas behind the balancer, in the stack `env`
    describes (`stack_settings`), for the block; `down` after it."""
    settings = load_settings(**{name[len(PREFIX) :].lower(): value for name, value in env.items()})
    try:
        control.up(settings, ("production",), say=lambda line: None, replicas=replicas)
        served = Balanced(settings, "production", replicas)
        for index in range(1, replicas + 1):
            served.wait_serving(index)
        time.sleep(balancer.HEALTH_INTERVAL_S + 0.5)  # the balancer's next check finds them
        yield served
    finally:
        control.down(settings)


def kill_drill(
    balanced: Balanced, body: Path, clients: int, seconds: float, kill_at: float, index: int = 1
) -> tuple[LoadResult, float]:
    """`clients` clients on the balancer for `seconds`; replica `index` SIGKILLed `kill_at`
    seconds in. What the clients saw, and seconds from the kill until the restarted replica
    answered through the balancer again."""

    def kill() -> float:
        old = balanced.kill(index)
        return balanced.wait_rotation(index, old, body.read_bytes(), timeout=90)

    return drill(balanced.url, body, clients, seconds, kill_at, kill)


def drill(
    url: str,
    body: Path,
    clients: int,
    seconds: float,
    kill_at: float,
    kill: Callable[[], float],
    where: Callable[[list[str]], list[str]] = list,
) -> tuple[LoadResult, float]:
    """`clients` clients (started by `where`) on the balancer at `url` for `seconds`; `kill_at`
    seconds in, `kill()` kills a replica and returns the seconds until it is back in rotation.
    What the clients saw, and those seconds."""
    load = start_load(url, clients, seconds, body, where=where)
    try:
        time.sleep(kill_at)
        back = kill()
    finally:
        result = load_result(load, timeout=seconds + 120)
    return result, back


if __name__ == "__main__":
    url, clients, seconds, body_file, *source = sys.argv[1:]
    found = generate(url, int(clients), float(seconds), Path(body_file).read_bytes(), *source)
    print(json.dumps(found.__dict__))
