"""Issue 39's multi-host test bed, in one place: replicas of one alias on hosts of their own,
HAProxy (the stack's own config, `stack/balancer.py`) on an "lb" host, load from a "client"
host and slow connections from a "slow" host, the tracking server on this machine reached
through a forwarder on the bridge. Used by tests/integration/test_replicas.py,
benchmarks/bench_replicas.py and benchmarks/bench_swap.py.

`bed(tracking_uri, replicas, work)` makes hosts r1..rR, lb, client and slow
(`harness/hosts.py`, root); each replica serves on port 8888 of its own address, the balancer on
port 8888 of the lb host's. With `loopback=True` (no test bed here) the same roles run on
loopback: replicas on 127.0.0.1 and the last on 127.0.0.2, free ports, clients in this
machine's namespace, the slow client from 127.0.0.2.

Every process started here (the forwarder, replicas, HAProxy, load generators, the slow
client) is a child of the calling process: `ip netns exec` execs its command, so the pid is the
command's and its parent the caller; the servers' own workers are its grandchildren. A cgroup
CPU quota on the caller therefore covers them all (a worker orphaned by a replica's SIGKILL
stays in the cgroup it was forked in). Everything is stopped and every namespace removed when
the block ends, by failure or Ctrl-C too (`hosts.host_net` kills what is left inside).

Restarts: no supervisord runs on the hosts. `Bed.kill(n)` SIGKILLs replica n, reaps it and
starts the same command again at once, as supervisord's autorestart does for `up --replicas`;
the new process's start-up counts in the time until it is back in rotation.

`python -m harness.replica_hosts hold URL COUNT [SOURCE]` opens COUNT slow connections to URL
(half stopping inside the head, half inside the body), prints how many stayed open as JSON and
holds them until its stdin closes.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from captchaops.stack import balancer
from captchaops.stack.memory import process_tree
from harness import hosts, slow
from harness.processes import VENV_BIN, free_port, stop_process, wait_http
from harness.replicas import start_load, wait_rotation

PORT = 8888
"""What replicas and the balancer listen on, on a host of their own."""
LOOPBACK_SLOW_SOURCE = "127.0.0.2"


@dataclass(frozen=True)
class Place:
    """Where a server listens: a host (None: this machine), its address and port."""

    host: hosts.Host | None
    address: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.address}:{self.port}"

    def command(self, args: Sequence[str]) -> list[str]:
        """`args` as a command line that runs at this place."""
        return self.host.command(args) if self.host is not None else list(args)


@dataclass
class Replica:
    """One `captchaops serve` process of the bed's alias."""

    place: Place
    proc: subprocess.Popen

    @property
    def url(self) -> str:
        return self.place.url

    @property
    def host(self) -> str:
        """The address it binds (`serve --host`)."""
        return self.place.address

    @property
    def port(self) -> int:
        return self.place.port


@dataclass
class Bed:
    """The hosts (or loopback places) of one layout, and what runs on them."""

    later: contextlib.ExitStack
    work: Path
    tracking_uri: str
    """The tracking server as the replicas reach it (through the bridge's forwarder on hosts)."""
    places: list[Place]
    lb: Place
    client: hosts.Host | None
    slow: hosts.Host | None
    on_hosts: bool
    replicas: list[Replica] = field(default_factory=list)
    _commands: list[tuple[list[str], dict[str, str], Path]] = field(default_factory=list)
    _balancer_log: Path | None = None

    @property
    def layout(self) -> str:
        """ "hosts" or "loopback": what a record says ran."""
        return "hosts" if self.on_hosts else "loopback"

    @property
    def urls(self) -> list[str]:
        """Each replica's own URL."""
        return [place.url for place in self.places]

    def peers(self, n: int) -> list[str]:
        """Every replica's URL but replica n's (0-based)."""
        return [url for k, url in enumerate(self.urls) if k != n]

    def client_command(self, args: list[str]) -> list[str]:
        """`args` as a command line on the client host."""
        return self.client.command(args) if self.client is not None else list(args)

    def serve(
        self,
        alias: str,
        base: dict[str, str],
        env: Callable[[int], dict[str, str]],
        ready: str = "/ping",
    ) -> list[Replica]:
        """Start `captchaops serve --alias ALIAS --host ADDR --port PORT` at every place, side by
        side, with `base`, the bed's settings (home, tracking URI, the balancer as trusted proxy
        and allowed Host) and `env(n)`; back once each answers `ready` with 200."""
        for n, place in enumerate(self.places):
            home = self.work / f"replica-{n + 1}"
            home.mkdir(parents=True, exist_ok=True)
            full = {
                **base,
                "CAPTCHAOPS_HOME": str(home),
                "CAPTCHAOPS_TRACKING_URI": self.tracking_uri,
                "CAPTCHAOPS_TRUSTED_PROXIES": self.lb.address,
                "CAPTCHAOPS_ALLOWED_HOSTS": self.lb.address,
                **env(n),
            }
            cmd = [str(VENV_BIN / "captchaops"), "serve", "--alias", alias]
            cmd += ["--host", place.address, "--port", str(place.port)]
            self._commands.append((place.command(cmd), full, home / f"serve-{place.port}.log"))
        with ThreadPoolExecutor(len(self.places)) as pool:
            started = [pool.submit(self.start, n, ready) for n in range(len(self.places))]
        failed = [f.exception() for f in started if f.exception() is not None]
        if failed:
            raise RuntimeError(f"{len(failed)} replica(s) did not start: {failed[0]}")
        self.replicas = [future.result() for future in started]
        return self.replicas

    def start(self, n: int, ready: str | None = "/ping") -> Replica:
        """Start replica n (0-based) with the command `serve` gave it (output appended to its
        log); unless `ready` is None, wait until it answers GET `ready` with 200."""
        cmd, env, log = self._commands[n]
        with log.open("ab") as out:
            proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
        self.later.callback(_stop, proc)
        replica = Replica(self.places[n], proc)
        if ready is not None:
            wait_http(f"{replica.url}{ready}", timeout=120, proc=proc)
        if n < len(self.replicas):
            self.replicas[n] = replica
        return replica

    def kill(self, n: int) -> int:
        """SIGKILL replica n (no goodbye to the balancer), reap it and start it again at once,
        as a supervisor would; the killed pid. Its workers, orphaned, are stopped with the bed."""
        proc = self.replicas[n].proc
        orphans = process_tree(proc.pid)[1:]
        proc.kill()
        proc.wait(timeout=10)
        self.later.callback(_kill_all, orphans)
        self.start(n, ready=None)
        return proc.pid

    def kill_and_wait(self, n: int, body: bytes, timeout: float = 90) -> float:
        """Seconds from SIGKILLing replica n until, restarted, it answers through the balancer."""
        killed = time.monotonic()
        self.kill(n)
        wait_rotation(self.balancer_url, self.urls[n], body, lambda: True, timeout)
        return time.monotonic() - killed

    def wait_serving(self, timeout: float = 120) -> None:
        """Until every replica has loaded a version (/health answers 200)."""
        for url in self.urls:
            wait_http(f"{url}/health", timeout=timeout)

    @property
    def balancer_url(self) -> str:
        return self.lb.url

    def balancer(self, alias: str) -> str:
        """HAProxy with the stack's own config for `alias` on the lb place, over every replica,
        listening and past its first health check of them; its URL."""
        config = self.work / f"haproxy-{alias}.cfg"
        upstreams = [f"{place.address}:{place.port}" for place in self.places]
        config.write_text(
            balancer.config(alias, self.lb.address, self.lb.port, upstreams, self.lb.address)
        )
        self._balancer_log = self.work / f"haproxy-{alias}.log"
        with self._balancer_log.open("ab") as log:
            proc = subprocess.Popen(
                self.lb.command([balancer.haproxy_binary(), "-db", "-f", str(config)]),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.later.callback(_stop, proc)
        wait_http(f"{self.lb.url}/ping", timeout=30, proc=proc)
        time.sleep(balancer.HEALTH_INTERVAL_S + 0.5)  # a first check of every replica
        return self.lb.url

    def balancer_log(self, lines: int = 40) -> list[str]:
        """The last `lines` lines HAProxy logged (requests that failed or were retried)."""
        if self._balancer_log is None or not self._balancer_log.exists():
            return []
        return self._balancer_log.read_text(errors="replace").splitlines()[-lines:]

    def load(self, url: str, clients: int, seconds: float, body: Path) -> subprocess.Popen[str]:
        """`harness.replicas.start_load` on the client host (stopped with the bed if still
        running); read it with `load_result`."""
        proc = start_load(url, clients, seconds, body, where=self.client_command)
        self.later.callback(_stop, proc)
        return proc

    @contextlib.contextmanager
    def slow_connections(self, url: str, count: int) -> Iterator[int]:
        """`count` slow connections to `url` from the slow host (one client address of its
        own), held for the block; how many stayed open."""
        root = str(Path(__file__).resolve().parents[1])
        args = [sys.executable, "-m", "harness.replica_hosts", "hold", url, str(count)]
        if self.slow is None:
            args.append(LOOPBACK_SLOW_SOURCE)
        cmd = self.slow.command(args) if self.slow is not None else args
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join((root, os.environ.get("PYTHONPATH", ""))),
        }
        proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )
        self.later.callback(_stop, proc)
        assert proc.stdout is not None and proc.stdin is not None
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the slow client exited with {proc.wait(timeout=10)}")
        try:
            yield int(json.loads(line)["opened"])
        finally:
            proc.stdin.close()
            proc.wait(timeout=30)


@contextlib.contextmanager
def bed(tracking_uri: str, replicas: int, work: Path, *, loopback: bool = False) -> Iterator[Bed]:
    """The layout for `replicas` replicas (hosts r1.., lb, client, slow; on loopback with
    `loopback`), the tracking server at `tracking_uri` on this machine reachable from it; every
    process and namespace removed after the block."""
    work.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as later:  # undone in reverse: processes, forwarder, hosts
        if loopback:
            addresses = ["127.0.0.1"] * (replicas - 1) + [
                "127.0.0.2" if replicas > 1 else "127.0.0.1"
            ]
            places = [Place(None, address, free_port()) for address in addresses]
            yield Bed(
                later, work, tracking_uri, places, Place(None, "127.0.0.1", free_port()),
                None, None, on_hosts=False,
            )  # fmt: skip
            return
        names = [f"r{n}" for n in range(1, replicas + 1)]
        net = later.enter_context(hosts.host_net([*names, "lb", "client", "slow"]))
        reachable = bridge_forwarder(later, net.gateway, tracking_uri)
        places = [Place(net[name], net[name].address, PORT) for name in names]
        lb = Place(net["lb"], net["lb"].address, PORT)
        yield Bed(later, work, reachable, places, lb, net["client"], net["slow"], on_hosts=True)


def bridge_forwarder(later: contextlib.ExitStack, gateway: str, tracking_uri: str) -> str:
    """A TCP forwarder on the bridge's address to the tracking server on this machine's
    loopback (the hosts reach nothing else), stopped with `later`; its URI."""
    port = free_port()
    target = tracking_uri.removeprefix("http://").rstrip("/")
    proc = subprocess.Popen(
        [sys.executable, "-c", hosts.FORWARD, gateway, str(port), target],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    later.callback(_stop, proc)
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "listening":
        raise RuntimeError(f"the forwarder to the tracking server ({target}) did not start")
    return f"http://{gateway}:{port}"


def layout_unavailable() -> str | None:
    """Why the hosts layout cannot run here (None when it can): no test bed, or no HAProxy."""
    why = hosts.unavailable()
    if why is None and shutil.which("haproxy") is None:
        return "no haproxy on PATH (apt-get install haproxy)"
    return why


def exit_on_sigterm() -> None:
    """Make SIGTERM unwind like Ctrl-C (SystemExit), so the bed's clean-up runs."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        stop_process(proc)


def _kill_all(procs: list[psutil.Process]) -> None:
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(procs, timeout=5)


def _hold(url: str, count: int, source: str | None) -> None:
    half = count // 2
    heads = slow.hold(url, half, b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Le", source)
    bodies = slow.hold(url, count - half, slow.head(url, "/invocations", 10_000) + b"{", source)
    opened = len(heads.sockets) + len(bodies.sockets)
    print(json.dumps({"opened": opened, "refused": heads.refused + bodies.refused}), flush=True)
    sys.stdin.read()
    heads.close()
    bodies.close()


if __name__ == "__main__":
    _, url, count, *source = sys.argv[1:]
    _hold(url, int(count), source[0] if source else None)
