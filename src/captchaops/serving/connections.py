"""What one connection may hold in a model server: a deadline for each request head and a cap on
connections per client address, added to uvicorn's h11 protocol (uvicorn has neither).

uvicorn's keep-alive timeout starts only after a response, so a client that opens a connection
and sends a head a byte at a time (or nothing) holds it for ever: 1,500 such heads were still
held after 90 s. Here each connection must deliver a complete head within `head_timeout`
seconds of opening (or of its previous response), and no address may hold more than
`per_client` connections at once; extra connections are closed as they open. Bodies have their
own deadline in `admission.read_body`.

Behind a balancer every connection comes from the balancer, so a cap per address would throttle
everyone behind it as one client. A peer in `trusted` (the `trusted_proxies` setting) is exempt
from the connection cap; each of its requests stands for the client its X-Forwarded-For names
(`service_auth.forwarded_client`: the rightmost hop no trusted proxy added), which becomes the
request's `client`, and no such client may have more than `per_client` requests in at once:
more are answered 429. From any other peer X-Forwarded-For is ignored.

Each answer leaves in one write: uvicorn writes a response's head, its body and its end as
separate writes, so a server killed between them sends a head with no body, which a balancer
has already passed on and cannot retry (HAProxy logs `SD`; one request in about 13,000 of a
kill drill failed so). `WholeAnswers` holds what uvicorn writes while a response's body is under
way (up to `ANSWER_BUFFER_BYTES`) and hands it to the socket when the response ends, so an
answer of that size reaches the balancer whole or not at all, and an unanswered request is one
the balancer retries.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from typing import Any, ClassVar

import h11
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from captchaops.service_auth import Network, forwarded_client, is_trusted

HEAD_TIMEOUT_S = 10.0
MAX_CONNECTIONS_PER_CLIENT = 128
MAX_HEAD_BYTES = 16 * 1024
ANSWER_BUFFER_BYTES = 256 * 1024
"""Largest answer sent in one write; a longer body goes out as it is written."""
"""Largest request head (h11's incomplete-event limit): a scoring request needs under 1 KiB."""
MAX_CONNECTIONS = 1_024
"""uvicorn's `limit_concurrency`: past it requests get 503 instead of piling up."""


class GuardedH11(H11Protocol):
    """uvicorn's h11 protocol with a head deadline and a per-address connection cap."""

    head_timeout: ClassVar[float] = HEAD_TIMEOUT_S
    per_client: ClassVar[int] = MAX_CONNECTIONS_PER_CLIENT
    open_by_client: ClassVar[Counter[str]] = Counter()
    trusted: ClassVar[tuple[Network, ...]] = ()
    requests_by_client: ClassVar[Counter[str]] = Counter()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._counted: str | None = None
        self._head_timer: asyncio.TimerHandle | None = None
        if self.trusted:
            self.app = ForwardedClients(
                self.app, self.trusted, self.per_client, self.requests_by_client
            )

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """Count the connection against its address (closing it when over the cap; a trusted
        proxy is not capped), and start the clock for its first head."""
        super().connection_made(WholeAnswers(transport, self))
        address = self.client[0] if self.client else ""
        if is_trusted(address, self.trusted):
            self._arm()
            return
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


class WholeAnswers(asyncio.Transport):
    """The connection's transport, writing each response (head, body, end) in one write: what
    is written while the response's body is under way waits for its end, or for
    `ANSWER_BUFFER_BYTES`, then goes out at once. Everything else passes through."""

    def __init__(self, transport: asyncio.Transport, protocol: H11Protocol) -> None:
        super().__init__()
        self._transport = transport
        self._protocol = protocol
        self._held: list[bytes] = []
        self._size = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._held.append(bytes(data))
        self._size += len(data)
        under_way = self._protocol.conn.our_state is h11.SEND_BODY
        if not under_way or self._size >= ANSWER_BUFFER_BYTES:
            self._flush()

    def writelines(self, list_of_data: Any) -> None:
        for data in list_of_data:
            self.write(data)

    def _flush(self) -> None:
        if self._held:
            data = b"".join(self._held)
            self._held, self._size = [], 0
            self._transport.write(data)

    def close(self) -> None:
        if self._protocol.conn.our_state is h11.SEND_BODY:  # closed mid-answer (the app failed
            self.abort()  # after its head): send nothing, so a balancer may retry the request
            return
        self._flush()
        self._transport.close()

    def abort(self) -> None:
        self._held, self._size = [], 0
        self._transport.abort()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)

    def pause_reading(self) -> None:
        self._transport.pause_reading()

    def resume_reading(self) -> None:
        self._transport.resume_reading()

    def is_reading(self) -> bool:
        return self._transport.is_reading()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._transport.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._transport.get_protocol()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + self._size

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._transport.get_write_buffer_limits()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._transport.set_write_buffer_limits(high, low)

    def can_write_eof(self) -> bool:
        return self._transport.can_write_eof()

    def write_eof(self) -> None:
        self._flush()
        self._transport.write_eof()


class ForwardedClients:
    """ASGI middleware for requests from trusted proxies: the forwarded client becomes the
    request's `client`, and a client with `per_client` requests in gets 429."""

    def __init__(
        self, app: ASGIApp, trusted: tuple[Network, ...], per_client: int, counts: Counter[str]
    ) -> None:
        self.app, self.trusted, self.per_client, self.counts = app, trusted, per_client, counts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        peer = scope.get("client")
        if scope["type"] != "http" or not peer or not is_trusted(peer[0], self.trusted):
            await self.app(scope, receive, send)
            return
        hops = Headers(scope=scope).getlist("x-forwarded-for")
        client = forwarded_client(peer[0], hops, self.trusted)
        if self.counts[client] >= self.per_client:
            await _too_many(send, client, self.per_client)
            return
        self.counts[client] += 1
        scope["client"] = (client, 0)
        try:
            await self.app(scope, receive, send)
        finally:
            self.counts[client] -= 1
            if self.counts[client] <= 0:
                del self.counts[client]


async def _too_many(send: Send, client: str, cap: int) -> None:
    body = json.dumps(
        {
            "error": "too_many_requests",
            "detail": f"the client {client} has {cap} requests in already; wait for their "
            "answers before sending more",
        }
    ).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"retry-after", b"1"),
    ]
    await send({"type": "http.response.start", "status": 429, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def guarded_protocol(
    head_timeout: float, per_client: int, trusted: tuple[Network, ...] = ()
) -> type[GuardedH11]:
    """A GuardedH11 class with these limits (uvicorn takes a protocol class, not an instance);
    `trusted`: the proxies whose X-Forwarded-For is believed."""
    return type(
        "GuardedH11",
        (GuardedH11,),
        {
            "head_timeout": head_timeout,
            "per_client": per_client,
            "open_by_client": Counter(),
            "trusted": trusted,
            "requests_by_client": Counter(),
        },
    )
