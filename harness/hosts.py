"""Hosts made of network namespaces on one Linux bridge: each its own address, its own loopback.

A test that needs several machines (a tracking server, a Ray head, workers, a laptop) makes a
`HostNet`: one bridge in this machine's namespace and one namespace per host, joined to the
bridge by a veth pair, each host with an address in a private /24 of 10.231.0.0/16 that no
route here uses. A host's 127.0.0.1 is its own, so nothing can cross hosts through loopback.
The bridge holds the subnet's .254, so the test process itself reaches every host (and
nothing else: the hosts have no default route). Names carry the creating process's id, so
concurrent runs never collide, and a run killed before its cleanup is swept by the next one.

Needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN) and iproute2; `unavailable()` says why not.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

PREFIX = "cops"  # a test bed`s tag is <pid>x<n>: namespaces cops<tag>-<i>, bridge cb<tag>, veths cv<tag>h<i>
RANGE = ipaddress.IPv4Network("10.231.0.0/16")
REQUIRE_ENV = "CAPTCHAOPS_REQUIRE_HOSTS"  # "1": a test bed that cannot be made is a failure


@dataclass(frozen=True)
class Host:
    """One host: a network namespace with its own address on the bridge."""

    name: str  # the host's name in the test ("tracking", "head", ...)
    netns: str  # its network namespace
    address: str  # its address on the bridge

    def command(self, args: Sequence[str]) -> list[str]:
        """`args` as a command line that runs inside this host."""
        return ["ip", "netns", "exec", self.netns, *args]

    def run(self, args: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        """Run `args` inside this host to completion (text output captured unless redirected)."""
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        return subprocess.run(self.command(args), check=False, **kwargs)

    def popen(self, args: Sequence[str], **kwargs: Any) -> subprocess.Popen:
        """Start `args` inside this host (`ip netns exec` execs it: the pid is the command's)."""
        return subprocess.Popen(self.command(args), **kwargs)


@dataclass
class HostNet:
    """A bridge and the hosts on it."""

    bridge: str
    subnet: ipaddress.IPv4Network
    gateway: str  # the bridge's own address: how this process reaches the hosts
    hosts: dict[str, Host] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]


def unavailable() -> str | None:
    """Why hosts cannot be made on this machine (None when they can)."""
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed (apt-get install iproute2)"
    if os.name != "posix" or not Path("/proc/self/ns/net").exists():
        return "this system has no network namespaces"
    if os.geteuid() != 0:
        return "making network namespaces needs root (CAP_NET_ADMIN); run the tests as root"
    probe = f"{PREFIX}{os.getpid()}-probe"
    made = _ip("netns", "add", probe)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip() or made.returncode}"
    _ip("netns", "del", probe)
    return None


def required() -> bool:
    """Whether a missing test bed must fail rather than skip (CI sets CAPTCHAOPS_REQUIRE_HOSTS=1)."""
    return os.environ.get(REQUIRE_ENV, "") == "1"


@contextmanager
def host_net(names: Sequence[str]) -> Iterator[HostNet]:
    """Hosts named `names` on one new bridge, each with its loopback up; all removed after the
    block (the processes still running inside them are killed first), even if it fails."""
    if len(set(names)) != len(names) or not 1 <= len(names) <= 99:
        raise ValueError(f"give 1 to 99 distinct host names, not {list(names)}")
    sweep_stale()
    global _made
    _made = (_made + 1) % 100
    tag = f"{os.getpid()}x{_made}"
    subnet = free_subnet()
    addresses = list(subnet.hosts())
    net = HostNet(f"cb{tag}", subnet, str(addresses[-1]))
    try:
        _must("link", "add", net.bridge, "type", "bridge")
        _must("addr", "add", f"{net.gateway}/{subnet.prefixlen}", "dev", net.bridge)
        _must("link", "set", net.bridge, "up")
        for i, name in enumerate(names):
            host = Host(name, f"{PREFIX}{tag}-{i}", str(addresses[i]))
            outside, inside = f"cv{tag}h{i}", f"cv{tag}p{i}"
            _must("netns", "add", host.netns)
            net.hosts[name] = host
            _must("link", "add", outside, "type", "veth", "peer", "name", inside)
            _must("link", "set", inside, "netns", host.netns)
            _must("link", "set", outside, "master", net.bridge, "up")
            _must("-n", host.netns, "link", "set", inside, "name", "eth0")
            _must(
                "-n", host.netns, "addr", "add", f"{host.address}/{subnet.prefixlen}", "dev", "eth0"
            )
            _must("-n", host.netns, "link", "set", "eth0", "up")
            _must("-n", host.netns, "link", "set", "lo", "up")
        yield net
    finally:
        remove(tag)


_made = 0  # test beds this process made (the second part of a tag)


def remove(tag: str) -> None:
    """Kill what runs in test bed `tag`'s namespaces, delete them, their veths and the bridge
    (each veth explicitly: the kernel deletes a namespace's links later, not at once)."""
    namespaces = re.findall(rf"^{PREFIX}{tag}-\d+\b", _ip("netns", "list").stdout, re.MULTILINE)
    for netns in namespaces:
        kill_inside(netns)
    for link in re.findall(rf"\bcv{tag}h\d+\b", _ip("-o", "link", "show").stdout):
        _ip("link", "del", link)
    for netns in namespaces:
        _ip("netns", "del", netns)
    _ip("link", "del", f"cb{tag}")


def kill_inside(netns: str, grace: float = 5.0) -> None:
    """Stop every process left inside `netns` (SIGTERM, then SIGKILL after `grace` seconds)."""
    pids = [int(p) for p in _ip("netns", "pids", netns).stdout.split() if p.isdigit()]
    procs = []
    for pid in pids:
        with suppress(psutil.Error):
            proc = psutil.Process(pid)
            proc.send_signal(signal.SIGTERM)
            procs.append(proc)
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for proc in alive:
        with suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=grace)


def sweep_stale() -> None:
    """Remove test beds left by runs that were killed before their cleanup (their pid is gone)."""
    names = _ip("netns", "list").stdout + _ip("-o", "link", "show").stdout
    tags = set(re.findall(rf"\b(?:{PREFIX}|cb|cv)((\d+)x\d+)", names))
    for tag, pid in tags:
        if not psutil.pid_exists(int(pid)):
            remove(tag)


def free_subnet() -> ipaddress.IPv4Network:
    """A /24 of 10.231.0.0/16 that no address or route on this machine overlaps (one per run,
    chosen from this process's id first)."""
    used = []
    for line in (
        _ip("-4", "route", "show", "table", "all").stdout + _ip("-4", "-o", "addr").stdout
    ).splitlines():
        for word in line.split():
            with suppress(ValueError):
                used.append(ipaddress.ip_network(word, strict=False))
    subnets: list[ipaddress.IPv4Network] = list(RANGE.subnets(new_prefix=24))
    start = os.getpid() % len(subnets)
    for subnet in subnets[start:] + subnets[:start]:
        if not any(subnet.overlaps(u) for u in used if u.prefixlen > 0):
            return subnet
    raise RuntimeError(f"every /24 of {RANGE} is in use on this machine")


def wait_listening(
    host: Host, port: int, timeout: float = 60.0, proc: subprocess.Popen | None = None
) -> float:
    """Block until something accepts TCP connections on `host`'s address and `port` (seen from
    this process, through the bridge); the seconds it took."""
    import socket

    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(
                f"the process for {host.address}:{port} exited with {proc.returncode}"
            )
        with socket.socket() as sock:
            sock.settimeout(1.0)
            if sock.connect_ex((host.address, port)) == 0:
                return time.monotonic() - started
        time.sleep(0.2)
    raise TimeoutError(
        f"nothing listens on {host.name} ({host.address}:{port}) after {timeout:.0f}s"
    )


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=False)


def _must(*args: str) -> None:
    done = _ip(*args)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


FORWARD = """
import asyncio, sys

async def pipe(reader, writer):
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    finally:
        writer.close()

async def handle(reader, writer):
    host, port = sys.argv[3].rsplit(":", 1)
    up_reader, up_writer = await asyncio.open_connection(host, int(port))
    await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer), return_exceptions=True)

async def main():
    server = await asyncio.start_server(handle, sys.argv[1], int(sys.argv[2]))
    print("listening", flush=True)
    await server.serve_forever()

asyncio.run(main())
"""


def forward(host: Host, listen: str, port: int, target: str) -> subprocess.Popen:
    """A TCP forwarder on `host` from `listen:port` to `target` (HOST:PORT), listening when this
    returns: how a test makes a service on another host answer on this host's loopback (what a
    laptop's `captchaops up` looks like to the laptop, at a fraction of its start-up)."""
    import sys

    proc = host.popen(
        [sys.executable, "-c", FORWARD, listen, str(port), target],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "listening":
        proc.kill()
        raise RuntimeError(f"the forwarder on {host.name} to {target} did not start")
    return proc
