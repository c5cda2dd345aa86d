"""What one connection may hold in a model server: a deadline for each request head and a cap on
connections per client address, added to uvicorn's h11 protocol (uvicorn has neither).

uvicorn's keep-alive timeout starts only after a response, so a client that opens a connection
and sends a head a byte at a time (or nothing) holds it for ever: 1,500 such heads were still
held after 90 s. Here each connection must deliver a complete head within `head_timeout`
seconds of opening (or of its previous response), and no address may hold more than
`per_client` connections at once; extra connections are closed as they open. Bodies have their
own deadline in `admission.read_body`.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any, ClassVar

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

HEAD_TIMEOUT_S = 10.0
MAX_CONNECTIONS_PER_CLIENT = 128
MAX_HEAD_BYTES = 16 * 1024
"""Largest request head (h11's incomplete-event limit): a scoring request needs under 1 KiB."""
MAX_CONNECTIONS = 1_024
"""uvicorn's `limit_concurrency`: past it requests get 503 instead of piling up."""


class GuardedH11(H11Protocol):
    """uvicorn's h11 protocol with a head deadline and a per-address connection cap."""

    head_timeout: ClassVar[float] = HEAD_TIMEOUT_S
    per_client: ClassVar[int] = MAX_CONNECTIONS_PER_CLIENT
    open_by_client: ClassVar[Counter[str]] = Counter()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._counted: str | None = None
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """Count the connection against its address (closing it when over the cap), and start
        the clock for its first head."""
        super().connection_made(transport)
        address = self.client[0] if self.client else ""
        if self.open_by_client[address] >= self.per_client:
            transport.abort()
            return
        self.open_by_client[address] += 1
        self._counted = address
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        """Stop the clock and uncount the connection."""
        self._disarm()
        if self._counted is not None:
            self.open_by_client[self._counted] -= 1
            if self.open_by_client[self._counted] <= 0:
                del self.open_by_client[self._counted]
            self._counted = None
        super().connection_lost(exc)

    def handle_events(self) -> None:
        """Stop the clock once a complete head has arrived."""
        super().handle_events()
        if self.conn.their_state is not h11.IDLE:
            self._disarm()

    def on_response_complete(self) -> None:
        """Start the clock for the next head on this connection."""
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._arm()

    def _arm(self) -> None:
        self._disarm()
        self._head_timer = self.loop.call_later(self.head_timeout, self._head_overdue)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_overdue(self) -> None:
        self._head_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.abort()


def guarded_protocol(head_timeout: float, per_client: int) -> type[GuardedH11]:
    """A GuardedH11 class with these limits (uvicorn takes a protocol class, not an instance)."""
    return type(
        "GuardedH11",
        (GuardedH11,),
        {"head_timeout": head_timeout, "per_client": per_client, "open_by_client": Counter()},
    )
