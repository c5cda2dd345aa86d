"""A model server's answer reaches the balancer whole or not at all: killed between a response's
head and its body, the server has sent nothing, so the balancer may retry the request. The
server is a real uvicorn process with the model servers' protocol; plain uvicorn is the
control (it sends the head first, which a balancer passes on and cannot take back)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.processes import free_port

SERVER = r"""
import asyncio, sys
from pathlib import Path
import uvicorn
from captchaops.serving.connections import guarded_protocol

port, marker, guarded = int(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "guarded"

async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    body = b'{"predictions": [{"text": "abcde"}]}'
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    if scope["path"] == "/fail":  # the app fails after its head: uvicorn closes the connection
        raise RuntimeError("failed mid-answer")
    if scope["path"] == "/stall":  # head sent, body not yet: where a kill hurts
        marker.write_text("head sent")
        await asyncio.sleep(60)
    await send({"type": "http.response.body", "body": body})

http = guarded_protocol(10.0, 128) if guarded else "h11"
uvicorn.run(app, host="127.0.0.1", port=port, http=http, lifespan="off", log_level="critical")
"""


def _serve(tmp_path: Path, kind: str) -> tuple[subprocess.Popen[bytes], int, Path]:
    port, marker = free_port(), tmp_path / f"{kind}.marker"
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(port), str(marker), kind])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return server, port, marker
        except OSError:
            time.sleep(0.1)
    server.kill()
    raise AssertionError(f"the {kind} server did not listen on {port}")


def _ask(port: int, path: str) -> socket.socket:
    conn = socket.create_connection(("127.0.0.1", port), timeout=10)
    conn.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
    return conn


def _read_all(conn: socket.socket) -> bytes:
    chunks = []
    while chunk := conn.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.parametrize(
    ("kind", "reaches_the_client"), [("guarded", b""), ("h11", b"HTTP/1.1 200")]
)
def test_a_server_killed_between_head_and_body_sent_nothing(
    tmp_path: Path, kind: str, reaches_the_client: bytes
) -> None:
    server, port, marker = _serve(tmp_path, kind)
    try:
        whole = _ask(port, "/")  # an ordinary answer still arrives whole, twice on one connection
        whole.sendall(f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
        time.sleep(0.5)
        assert whole.recv(65536).count(b'{"predictions": [{"text": "abcde"}]}') == 2
        whole.close()
        conn = _ask(port, "/stall")
        deadline = time.monotonic() + 10
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), "the app never sent its head"
        time.sleep(0.3)  # whatever the server wrote has reached the socket by now
        os.kill(server.pid, signal.SIGKILL)
        server.wait(timeout=10)
        received = _read_all(conn)
    finally:
        server.kill()
        server.wait(timeout=10)
    assert received.startswith(reaches_the_client)
    assert b"abcde" not in received
    if not reaches_the_client:
        assert received == b""


@pytest.mark.parametrize(
    ("kind", "reaches_the_client"), [("guarded", b""), ("h11", b"HTTP/1.1 200")]
)
def test_an_app_that_fails_after_its_head_sends_nothing(
    tmp_path: Path, kind: str, reaches_the_client: bytes
) -> None:
    server, port, _ = _serve(tmp_path, kind)
    try:
        received = _read_all(_ask(port, "/fail"))
    finally:
        server.kill()
        server.wait(timeout=10)
    assert received.startswith(reaches_the_client)
    if not reaches_the_client:
        assert received == b""
