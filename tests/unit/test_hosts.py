"""harness/hosts.py: hosts made of network namespaces on one bridge, as the multi-host tests use
them. Skipped with the reason where namespaces cannot be made; CI (CAPTCHAOPS_REQUIRE_HOSTS=1)
fails instead of skipping."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from harness.hosts import HostNet, host_net, required, unavailable, wait_listening

ROOT = Path(__file__).resolve().parents[2]
SERVE = "import http.server as h, sys; h.HTTPServer((sys.argv[1], 8123), h.SimpleHTTPRequestHandler).serve_forever()"
GET = "import urllib.request as u, sys; print(u.urlopen(sys.argv[1], timeout=3).status)"


def require_hosts() -> None:
    """Skip (or, with CAPTCHAOPS_REQUIRE_HOSTS=1, fail) where namespaces cannot be made."""
    reason = unavailable()
    if reason is not None:
        if required():
            pytest.fail(f"CAPTCHAOPS_REQUIRE_HOSTS=1 but no hosts can be made: {reason}")
        pytest.skip(f"no multi-host test bed: {reason}")


@pytest.fixture(scope="module")
def net() -> Iterator[HostNet]:
    require_hosts()
    with host_net(["a", "b"]) as made:
        yield made


def _ip(*args: str) -> str:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=True).stdout


def test_each_host_has_its_own_address_and_its_own_loopback(net: HostNet) -> None:
    a, b = net["a"], net["b"]
    assert {a.address, b.address, net.gateway} <= {str(h) for h in net.subnet.hosts()}
    shown = a.run(["ip", "-br", "-4", "addr"]).stdout
    assert "127.0.0.1/8" in shown and f"{a.address}/24" in shown and b.address not in shown
    server = b.popen([sys.executable, "-c", SERVE, "127.0.0.1"], cwd=ROOT)
    exposed = b.popen([sys.executable, "-c", SERVE, b.address], cwd=ROOT)
    try:
        wait_listening(b, 8123, timeout=20, proc=exposed)
        # b's address answers from a and from this process (through the bridge) ...
        got = a.run([sys.executable, "-c", GET, f"http://{b.address}:8123/"], timeout=20)
        assert got.stdout.strip() == "200", got.stderr[-500:]
        # ... b's loopback only from b: a's 127.0.0.1 is a's own, where nothing listens.
        inside = b.run([sys.executable, "-c", GET, "http://127.0.0.1:8123/"], timeout=20)
        assert inside.stdout.strip() == "200", inside.stderr[-500:]
        across = a.run([sys.executable, "-c", GET, "http://127.0.0.1:8123/"], timeout=20)
        assert across.returncode != 0 and "Connection refused" in across.stderr
    finally:
        for proc in (server, exposed):
            proc.kill()
            proc.wait()


def test_leaving_the_block_removes_everything_and_stops_what_ran_inside() -> None:
    require_hosts()
    with pytest.raises(RuntimeError, match="a test failed"), host_net(["x"]) as made:
        sleeper = made["x"].popen(["sleep", "300"])
        names = (made.bridge, made["x"].netns)
        raise RuntimeError("a test failed")
    assert sleeper.wait(timeout=15) is not None
    assert not psutil.pid_exists(sleeper.pid) or psutil.Process(sleeper.pid).status() == "zombie"
    assert names[1] not in _ip("netns", "list")
    links = _ip("-o", "link", "show")
    assert names[0] not in links and f"cv{names[0][2:]}h" not in links


def test_the_reason_names_root_where_namespaces_cannot_be_made() -> None:
    require_hosts()  # as root: ask in a forked child that has become an account that is not
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover (the child)
        try:
            os.setgid(65534)
            os.setuid(65534)
            os.write(write, str(unavailable()).encode())
        finally:
            os._exit(0)
    os.close(write)
    os.waitpid(child, 0)
    with os.fdopen(read) as answer:
        reason = answer.read()
    assert "needs root (CAP_NET_ADMIN)" in reason
