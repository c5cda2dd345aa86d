"""Slow clients over raw sockets: unfinished heads, bodies that never finish, many connections
from one address (another loopback address, 127.0.0.N, stands for another client)."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit


@dataclass
class Held:
    """Connections a slow client holds open."""

    sockets: list[socket.socket]
    refused: int = 0
    """Connections that could not be opened or were closed by the server at once."""

    def still_open(self) -> int:
        """How many of the held connections the server has not closed."""
        return sum(not closed(s) for s in self.sockets)

    def close(self) -> None:
        for s in self.sockets:
            with contextlib.suppress(OSError):
                s.close()


def address(url: str) -> tuple[str, int]:
    """(host, port) of an http:// URL."""
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 80


def connect(url: str, source: str | None = None, timeout: float = 5.0) -> socket.socket:
    """A TCP connection to the server at `url`, from the local address `source` if given."""
    sock = socket.create_connection(
        address(url), timeout, source_address=(source, 0) if source else None
    )
    sock.settimeout(timeout)
    return sock


def closed(sock: socket.socket, wait: float = 0.0) -> bool:
    """Whether the server has closed `sock` (read EOF or reset) within `wait` seconds."""
    sock.settimeout(wait or 0.001)
    try:
        return sock.recv(65536, socket.MSG_PEEK) == b""
    except (TimeoutError, BlockingIOError):
        return False
    except OSError:
        return True


def head(url: str, path: str, content_length: int) -> bytes:
    """A JSON POST head for `path` declaring `content_length` body bytes."""
    host = urlsplit(url).netloc
    return (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {content_length}\r\n\r\n"
    ).encode()


def hold(
    url: str, count: int, first_bytes: bytes, source: str | None = None, settle: float = 0.3
) -> Held:
    """`count` connections from `source`, each having sent `first_bytes` and then nothing."""
    held = Held([])
    for _ in range(count):
        try:
            sock = connect(url, source)
            sock.sendall(first_bytes)
        except OSError:
            held.refused += 1
            continue
        held.sockets.append(sock)
    time.sleep(settle)
    still = [s for s in held.sockets if not closed(s)]
    held.refused += len(held.sockets) - len(still)
    for s in held.sockets:
        if s not in still:
            s.close()
    held.sockets = still
    return held


@contextlib.contextmanager
def holding(url: str, count: int, first_bytes: bytes, source: str | None = None) -> Iterator[Held]:
    """`hold` for the block; every connection is closed at its end."""
    held = hold(url, count, first_bytes, source)
    try:
        yield held
    finally:
        held.close()


def read_answer(sock: socket.socket, timeout: float) -> str:
    """What the server sends on `sock` within `timeout` seconds ('' when it just closes)."""
    sock.settimeout(timeout)
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except (TimeoutError, OSError):
        pass
    return b"".join(chunks).decode("latin-1")
