"""Trusted proxies: X-Forwarded-For is believed only from a configured balancer, and then only
its rightmost hop no trusted proxy added; the model server's per-client cap and the web app's
client address follow it. The model server's protocol runs in a real uvicorn on loopback."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import pytest
import uvicorn
from flask import Flask, request
from starlette.types import Receive, Scope, Send

from captchaops import service_auth
from captchaops.service_auth import bind_names, forwarded_client, parse_networks
from captchaops.serving.connections import guarded_protocol
from captchaops.settings import Settings
from captchaops.webapp.limits import client_address
from harness.processes import free_port

PROXY = parse_networks("10.0.0.5,10.1.0.0/16")


def test_a_peer_that_is_no_trusted_proxy_is_the_client_whatever_it_forwards() -> None:
    assert forwarded_client("198.51.100.9", ["1.2.3.4"], PROXY) == "198.51.100.9"
    assert forwarded_client("198.51.100.9", ["1.2.3.4"], ()) == "198.51.100.9"


def test_a_trusted_proxy_stands_for_the_rightmost_hop_it_did_not_add() -> None:
    # The client wrote "6.6.6.6" itself; the balancer appended the address it saw.
    assert forwarded_client("10.0.0.5", ["6.6.6.6, 203.0.113.7"], PROXY) == "203.0.113.7"
    # Two balancers: the inner one's address is trusted, so the hop before it counts.
    assert forwarded_client("10.0.0.5", ["203.0.113.7", "10.1.2.3"], PROXY) == "203.0.113.7"
    # Nothing forwarded, or only trusted hops: the leftmost trusted address.
    assert forwarded_client("10.0.0.5", [], PROXY) == "10.0.0.5"
    assert forwarded_client("10.0.0.5", ["10.1.0.9"], PROXY) == "10.1.0.9"
    # A hop that is not an address stops the walk: nothing left of it is believed.
    assert forwarded_client("10.0.0.5", ["1.2.3.4, junk"], PROXY) == "10.0.0.5"
    assert forwarded_client("10.0.0.5", ["[2001:db8::1]"], PROXY) == "2001:db8::1"


def test_a_bad_entry_is_named_with_the_fix() -> None:
    with pytest.raises(ValueError, match=r"'10\.0\.0\.300'.*like 10\.0\.0\.5"):
        service_auth.trusted_networks(Settings(trusted_proxies="10.0.0.300"))
    assert service_auth.trusted_networks(Settings()) == ()


def test_bind_names_are_the_address_or_every_address_of_a_wildcard() -> None:
    assert bind_names("10.9.8.7") == frozenset({"10.9.8.7"})
    wildcard = bind_names("0.0.0.0")
    assert {"127.0.0.1", socket.gethostname().lower()} <= wildcard
    assert "evil.example" not in wildcard


def test_the_web_app_counts_the_forwarded_client_only_behind_a_trusted_proxy() -> None:
    app = Flask(__name__)
    spoofed = {"X-Forwarded-For": "6.6.6.6, 203.0.113.7"}
    trusting = Settings(trusted_proxies="10.0.0.5")
    with app.test_request_context(headers=spoofed, environ_base={"REMOTE_ADDR": "10.0.0.5"}):
        assert client_address(request, trusting) == "203.0.113.7"
        assert client_address(request, Settings()) == "10.0.0.5"
    with app.test_request_context(headers=spoofed, environ_base={"REMOTE_ADDR": "198.51.100.9"}):
        assert client_address(request, trusting) == "198.51.100.9"


async def _echo(scope: Scope, receive: Receive, send: Send) -> None:
    """Answers the client address it was given, after 0.8 s on /slow."""
    if scope["type"] != "http":
        return
    if scope["path"] == "/slow":
        await asyncio.sleep(0.8)
    body = str(scope["client"][0]).encode()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body})


@contextmanager
def server(trusted: str, per_client: int = 2) -> Iterator[str]:
    """uvicorn on loopback with the model servers' protocol, trusting `trusted`."""
    port = free_port()
    config = uvicorn.Config(
        _echo,
        host="127.0.0.1",
        port=port,
        http=guarded_protocol(5.0, per_client, parse_networks(trusted)),
        proxy_headers=False,
        lifespan="off",
        log_level="warning",
    )
    running = uvicorn.Server(config)
    thread = threading.Thread(target=running.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not running.started:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        running.should_exit = True
        thread.join(10)


def _get(url: str, forwarded: str) -> httpx.Response:
    return httpx.get(url, headers={"X-Forwarded-For": forwarded}, timeout=10)


def test_the_model_server_ignores_forwarded_addresses_from_an_untrusted_peer() -> None:
    with server("") as url:
        assert _get(f"{url}/who", "203.0.113.7").text == "127.0.0.1"
    with server("10.0.0.5") as url:
        assert _get(f"{url}/who", "203.0.113.7").text == "127.0.0.1"


def test_behind_a_trusted_proxy_each_forwarded_client_has_its_own_cap() -> None:
    with server("127.0.0.1", per_client=2) as url:
        assert _get(f"{url}/who", "6.6.6.6, 203.0.113.7").text == "203.0.113.7"
        # Three slow requests of one client and one of another, all through the proxy's address.
        clients = ["203.0.113.7"] * 3 + ["203.0.113.8"]
        with ThreadPoolExecutor(len(clients)) as pool:
            answers = list(pool.map(lambda c: _get(f"{url}/slow", c), clients))
        statuses = sorted(a.status_code for a in answers[:3])
        assert statuses == [200, 200, 429]
        refused = next(a for a in answers if a.status_code == 429)
        assert refused.json()["error"] == "too_many_requests"
        assert (answers[3].status_code, answers[3].text) == (200, "203.0.113.8")
        # The proxy itself is not capped as one client: more connections than the cap are in.
        with ThreadPoolExecutor(4) as pool:
            spread = list(pool.map(lambda n: _get(f"{url}/slow", f"192.0.2.{n}"), range(4)))
        assert [a.status_code for a in spread] == [200] * 4
