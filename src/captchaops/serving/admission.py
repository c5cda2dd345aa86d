"""What a model server lets in at once: requests, body bytes, time; and noticing a client has gone.

A body is read, within its own deadline, before its request takes one of the request slots: a
client sending slowly holds a connection and (past 64 KiB) body bytes, never a slot.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import anyio
from starlette.requests import Request
from starlette.types import Receive

from captchaops.serving.protocol import ProtocolError, too_large

SMALL_BODY_BYTES = 64 * 1024
"""Bodies up to this size (a few CAPTCHAs) are parsed on the event loop and not charged to the
byte budget, so large requests can never crowd small ones out."""


class Busy(Exception):
    """The server holds as many requests or body bytes as it may; the client should retry."""


class Ticket:
    """One admitted request's share of the byte budget, returned when the request ends."""

    def __init__(self, admission: Admission) -> None:
        self._admission = admission
        self.charged = 0

    def charge(self, size: int) -> None:
        """Hold `size` body bytes in total for this request (small bodies are free)."""
        wanted = size if size > SMALL_BODY_BYTES else 0
        if wanted > self.charged:
            self._admission.take(wanted - self.charged)
            self.charged = wanted


class Admission:
    """Caps the requests being served at once and the large-body bytes they hold."""

    def __init__(self, max_requests: int, max_bytes: int) -> None:
        self.max_requests = max_requests
        self.max_bytes = max_bytes
        self.requests = 0
        self.held_bytes = 0

    def take(self, size: int) -> None:
        """Hold `size` more bytes, or raise Busy when the budget is spent."""
        if self.held_bytes + size > self.max_bytes:
            raise Busy(f"{self.held_bytes:,} bytes of request bodies are already held")
        self.held_bytes += size

    @contextlib.contextmanager
    def holding(self) -> Iterator[Ticket]:
        """A ticket for one request's body bytes (no request slot), returned when the block ends."""
        ticket = Ticket(self)
        try:
            yield ticket
        finally:
            self.held_bytes -= ticket.charged

    @contextlib.contextmanager
    def request(self) -> Iterator[Ticket]:
        """Admit one request for the block, or raise Busy when too many are in."""
        if self.requests >= self.max_requests:
            raise Busy(f"{self.requests} requests are already being served")
        self.requests += 1
        ticket = Ticket(self)
        try:
            yield ticket
        finally:
            self.requests -= 1
            self.held_bytes -= ticket.charged


async def read_body(
    request: Request, limit: int, ticket: Ticket, timeout_s: float | None = None
) -> bytes:
    """The request body, refused (413) past `limit` bytes and charged to `ticket` as it arrives;
    a body that has not all arrived within `timeout_s` seconds is refused with 408."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit():
        if int(declared) > limit:
            raise too_large(limit)
        ticket.charge(int(declared))
    chunks = []
    size = 0
    try:
        with anyio.fail_after(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise too_large(limit)
                ticket.charge(size)
                chunks.append(chunk)
    except TimeoutError as exc:
        raise ProtocolError(
            408,
            "body_timeout",
            f"the body did not arrive within {timeout_s:g} s; send it at once",
        ) from exc
    return b"".join(chunks)


async def disconnected(receive: Receive) -> None:
    """Return once the client has closed the connection (call after the body has been read)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
