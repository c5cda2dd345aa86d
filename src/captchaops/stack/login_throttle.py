"""A failed-login limit in front of the team tracking server, which MLflow's basic-auth lacks.

MLflow answers every guessed password with a 401 as fast as it can check it. This ASGI
middleware wraps the basic-auth app (`captchaops.stack.tracking` serves it instead of
`mlflow.server.auth:create_app`) and counts 401 answers to requests that carried credentials,
per client address and account, like the web app's login gate: past
`tracking_login_failures_per_minute` in any 60 s, that client's requests for that account answer
429 with `Retry-After` without reaching MLflow, even with the right password; other accounts and
other clients are not affected. Counts live in each server worker's memory (uvicorn
`--workers N` gives a guesser at most N times the limit) and a restart resets them.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from captchaops.settings import load_settings

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

MINUTE = 60.0
FAILING_CLIENTS = 10_000
"""Most (client, account) pairs remembered; quiet ones are dropped first when it is reached."""


def account_of(authorization: bytes) -> str | None:
    """The user name of a Basic `Authorization` header, '' for another scheme, None when absent."""
    scheme, _, value = authorization.decode("latin-1").strip().partition(" ")
    if scheme.lower() != "basic":
        return ""
    try:
        return base64.b64decode(value.strip(), validate=True).decode().partition(":")[0][:256]
    except (binascii.Error, ValueError, UnicodeDecodeError):
        return ""


class LoginThrottle:
    """Refuses a client's logins for an account after too many failed ones in a minute."""

    def __init__(
        self, app: App, per_minute: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.app = app
        self.per_minute = per_minute
        self._clock = clock
        self._lock = threading.Lock()
        self._failures: dict[str, deque[float]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        header = dict(scope.get("headers") or []).get(b"authorization")
        if scope["type"] != "http" or header is None:
            await self.app(scope, receive, send)
            return
        client = (scope.get("client") or ("unknown", 0))[0]
        key = f"{client}|{account_of(header)}"
        wait = self.wait(key)
        if wait > 0:
            await _too_many(send, self.per_minute, wait)
            return
        status = 0

        async def watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        await self.app(scope, receive, watch)
        if status == 401:
            self.failed(key)

    def wait(self, key: str) -> float:
        """Seconds until `key` may try again (0 when it may now)."""
        with self._lock:
            recent = self._failures.get(key)
            now = self._clock()
            while recent and recent[0] <= now - MINUTE:
                recent.popleft()
            if recent is None or len(recent) < self.per_minute:
                return 0.0
            return recent[0] + MINUTE - now

    def failed(self, key: str) -> None:
        """Count one failed login for `key`."""
        with self._lock:
            now = self._clock()
            if len(self._failures) >= FAILING_CLIENTS:
                self._failures = {
                    k: q for k, q in self._failures.items() if q and q[-1] > now - MINUTE
                }
            self._failures.setdefault(key, deque()).append(now)


async def _too_many(send: Send, per_minute: int, wait: float) -> None:
    retry = max(1, math.ceil(wait))
    body = json.dumps(
        {
            "error_code": "RESOURCE_EXHAUSTED",
            "message": f"Too many failed logins: at most {per_minute} a minute for one account "
            f"from one client; retry in {retry} s.",
        }
    ).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"retry-after", str(retry).encode()),
    ]
    await send({"type": "http.response.start", "status": 429, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def create_app() -> Any:
    """MLflow's basic-auth app behind the failed-login limit (a uvicorn `--factory`)."""
    # here, not at the top: MLflow's server (3.4 s) loads only in the tracking server, not where
    # the limiter alone runs (its tests)
    from mlflow.server.auth import create_app as basic_auth

    return LoginThrottle(basic_auth(), load_settings().tracking_login_failures_per_minute)
