"""`POST /webhook`: MLflow's alias webhooks, verified, make the model server check its alias now.

MLflow signs each delivery as Standard Webhooks do (`mlflow/webhooks/delivery.py`):
`X-MLflow-Signature: v1,<base64 HMAC-SHA256 of "<delivery id>.<timestamp>.<body>">` with the
webhook's secret, `X-MLflow-Timestamp` in Unix seconds and `X-MLflow-Delivery-Id`. A delivery
without a valid signature, or older (or newer) than `TOLERANCE_S`, gets 401 and changes nothing.
A verified one for this server's model and alias only wakes the poller: the version is re-read
from the registry through the REST client and loaded with every check, never taken from the
payload. A delivery for the alias this server pre-loads (@staging, for the production server)
counts as its own: the server checks both aliases at once and starts the pre-load. Deliveries
for other models or aliases are answered 200 (so MLflow does not retry) and ignored.

An MLflow webhook names one URL, so behind a balancer one replica gets each delivery. A
replica with `webhook_peers` (URLs of its alias's replicas; a name that resolves to several
addresses, such as a Compose service or a headless Kubernetes Service, stands for each of them)
relays every accepted delivery, as signed, to each peer address, marked `X-Captchaops-Relayed`
so that it goes no further; the peers verify it like any delivery, and one that got it already
answers `duplicate`. A relay that fails is logged and counted: that replica catches up at its
next poll.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import socket
import time
from collections import OrderedDict
from typing import Any
from urllib.parse import urlsplit

import httpx
from prometheus_client import Counter
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from captchaops.serving.metrics import ServingMetrics
from captchaops.serving.watcher import AliasWatcher
from captchaops.settings import Settings

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-MLflow-Signature"
TIMESTAMP_HEADER = "X-MLflow-Timestamp"
DELIVERY_ID_HEADER = "X-MLflow-Delivery-Id"
SIGNATURE_VERSION = "v1"
TOLERANCE_S = 300
"""How far a delivery's timestamp may be from this server's clock (Standard Webhooks' 5 min)."""
MAX_BODY_BYTES = 64 * 1024
SEEN_IDS = 1024
"""Delivery ids remembered to answer a replay of a verified delivery without acting on it."""
ALIAS_ENTITY = "model_version_alias"
RELAYED_HEADER = "X-Captchaops-Relayed"
"""Marks a delivery one replica passed on to the others: it is not passed on again."""
RELAY_TIMEOUT_S = 2.0


def sign(secret: str, delivery_id: str, timestamp: str, body: bytes) -> str:
    """The `X-MLflow-Signature` value MLflow sends for these headers and body."""
    content = f"{delivery_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret.encode(), content, hashlib.sha256).digest()
    return f"{SIGNATURE_VERSION},{base64.b64encode(digest).decode()}"


def verify(
    secret: str, headers: dict[str, str], body: bytes, now: float | None = None
) -> str | None:
    """None when the delivery is signed with `secret` within TOLERANCE_S, else why it is not."""
    delivery_id = headers.get(DELIVERY_ID_HEADER.lower(), "")
    timestamp = headers.get(TIMESTAMP_HEADER.lower(), "")
    signatures = headers.get(SIGNATURE_HEADER.lower(), "")
    if not (delivery_id and timestamp and signatures):
        return f"missing {SIGNATURE_HEADER}, {TIMESTAMP_HEADER} or {DELIVERY_ID_HEADER}"
    try:
        sent = int(timestamp)
    except ValueError:
        return f"{TIMESTAMP_HEADER} is not Unix seconds"
    if abs((time.time() if now is None else now) - sent) > TOLERANCE_S:
        return f"{TIMESTAMP_HEADER} is more than {TOLERANCE_S} s from this server's clock"
    expected = sign(secret, delivery_id, timestamp, body).encode()
    # Standard Webhooks allows several space-separated signatures (during a secret rotation).
    if any(hmac.compare_digest(expected, given.encode()) for given in signatures.split()):
        return None
    return "the signature does not match this server's webhook secret"


class WebhookReceiver:
    """Checks deliveries for one model server and tells its watcher about the verified ones."""

    def __init__(
        self,
        secret: str | None,
        watcher: AliasWatcher,
        metrics: ServingMetrics,
        peers: tuple[str, ...] = (),
    ):
        self.secret = secret
        self.watcher = watcher
        self.peers = peers
        self.relays = Counter(
            "captchaops_webhook_relays",
            "Deliveries passed on to the alias's other replicas, by result (sent, error).",
            ["result"],
            registry=metrics.registry,
        )
        for result in ("sent", "error"):
            self.relays.labels(result)
        self._relaying: set[asyncio.Task[None]] = set()
        self._http: httpx.AsyncClient | None = None
        """The relay's client, made on the first relay and kept: a new one per delivery built
        an SSL context on the event loop (tens of ms on a busy host) and connected afresh."""
        self.deliveries = Counter(
            "captchaops_webhook_deliveries",
            "Webhook deliveries, by outcome (accepted, ignored, duplicate, refused).",
            ["outcome"],
            registry=metrics.registry,
        )
        for outcome in ("accepted", "ignored", "duplicate", "refused"):
            self.deliveries.labels(outcome)
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._others: list[AliasWatcher] = []

    def also(self, watcher: AliasWatcher) -> None:
        """Wake `watcher` too on deliveries for its alias (the production server's canary)."""
        self._others.append(watcher)

    @classmethod
    def for_settings(
        cls, settings: Settings, watcher: AliasWatcher, metrics: ServingMetrics
    ) -> WebhookReceiver:
        """A receiver with the home's webhook secret (none when webhooks are switched off).

        It also names the server in `metrics` (model, alias, replica id), the replica its
        monitoring runs report under: this is where the server's settings meet its metrics."""
        metrics.identify(settings.model_name, watcher.alias, settings.replica_id)
        secret = settings.webhook_secret if settings.webhooks else None
        peers = tuple(u.strip() for u in (settings.webhook_peers or "").split(",") if u.strip())
        return cls(secret.get_secret_value() if secret else None, watcher, metrics, peers)

    async def handle(self, request: Request) -> Response:
        """Verify a delivery; on this server's alias, check the registry now."""
        if not self.secret:
            return _answer(
                404, "webhooks_off", "this server has no webhook secret (CAPTCHAOPS_WEBHOOK_SECRET)"
            )
        body = await _read_capped(request)
        if body is None:
            return _answer(413, "too_large", f"a webhook body is at most {MAX_BODY_BYTES} bytes")
        reason = verify(self.secret, dict(request.headers), body)
        if reason is not None:
            self.deliveries.labels("refused").inc()
            log.warning("refused a webhook from %s: %s", _client(request), reason)
            return _answer(401, "bad_signature", reason)
        self.watcher.webhook_delivered()
        delivery_id = request.headers[DELIVERY_ID_HEADER]
        if delivery_id in self._seen:
            self.deliveries.labels("duplicate").inc()
            return JSONResponse({"status": "duplicate"})
        self._remember(delivery_id)
        try:
            event = json.loads(body)
        except ValueError:
            return _answer(400, "bad_json", "the webhook body is not JSON")
        watcher = self._ours(event)
        if watcher is None:
            self.deliveries.labels("ignored").inc()
            return JSONResponse({"status": "ignored", "reason": "not this server's model alias"})
        self.deliveries.labels("accepted").inc()
        if self.peers and RELAYED_HEADER not in request.headers:
            task = asyncio.create_task(self._relay(body, request.headers))
            self._relaying.add(task)
            task.add_done_callback(self._relaying.discard)
        watcher.poll_soon("webhook")
        return JSONResponse({"status": "checking"}, status_code=202)

    async def _relay(self, body: bytes, received: Any) -> None:
        """Send the delivery, as signed, to every peer address at once."""
        headers = {
            name: received[name]
            for name in (SIGNATURE_HEADER, TIMESTAMP_HEADER, DELIVERY_ID_HEADER)
        }
        headers |= {"Content-Type": "application/json", RELAYED_HEADER: "1"}
        targets = await asyncio.to_thread(peer_urls, self.peers)
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=RELAY_TIMEOUT_S)
        http = self._http

        async def one(url: str) -> None:
            try:
                answer = await http.post(f"{url}/webhook", content=body, headers=headers)
                why = "" if answer.status_code in (200, 202) else f"HTTP {answer.status_code}"
            except httpx.HTTPError as exc:
                why = type(exc).__name__
            self.relays.labels("error" if why else "sent").inc()
            if why:
                log.warning("relaying a webhook to %s failed (%s)", url, why)

        await asyncio.gather(*(one(url) for url in targets))

    async def close(self) -> None:
        """Close the relay's connections (at shutdown)."""
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    def _ours(self, event: Any) -> AliasWatcher | None:
        """The watcher of the model alias the event is about; None when it is not ours."""
        if not isinstance(event, dict) or event.get("entity") != ALIAS_ENTITY:
            return None
        data = event.get("data")
        if not isinstance(data, dict) or data.get("name") != self.watcher.name:
            return None
        watchers = [self.watcher, *self._others]
        found = next((w for w in watchers if data.get("alias") == w.alias), None)
        if found is None and data.get("alias") == self.watcher.preload_alias:
            return self.watcher  # a move there is what it pre-loads: check both aliases now
        return found

    def _remember(self, delivery_id: str) -> None:
        self._seen[delivery_id] = None
        while len(self._seen) > SEEN_IDS:
            self._seen.popitem(last=False)


def peer_urls(peers: tuple[str, ...]) -> list[str]:
    """Each peer URL once per address its host resolves to (`http://10.0.0.7:8888`); a name
    that does not resolve is left out (logged)."""
    urls: list[str] = []
    for peer in peers:
        parts = urlsplit(peer)
        if not parts.hostname:
            continue
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            found = socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            log.warning("webhook peer %s does not resolve (%s)", parts.hostname, exc)
            continue
        for address in dict.fromkeys(str(info[4][0]) for info in found):
            host = f"[{address}]" if ":" in address else address
            urls.append(f"{parts.scheme or 'http'}://{host}:{port}")
    return list(dict.fromkeys(urls))


async def _read_capped(request: Request) -> bytes | None:
    """The body, or None when it is (or says it is) larger than MAX_BODY_BYTES."""
    try:
        if int(request.headers.get("content-length") or 0) > MAX_BODY_BYTES:
            return None
    except ValueError:
        return None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _answer(status: int, error: str, detail: str) -> Response:
    """The JSON body every model-server refusal carries (as `invocations.error_response`)."""
    return JSONResponse({"error": error, "detail": detail}, status_code=status)


def _client(request: Request) -> str:
    return request.client.host if request.client else "unknown"
