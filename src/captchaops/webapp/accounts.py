"""Who may use the web app when `web_login` is on (team mode): whoever has an account on the
tracking server, presented as HTTP basic auth. The app keeps no users of its own: it asks the
tracking server whether the pair is good, remembers a good pair for `app_login_cache_seconds`,
and counts failures per client and account like the correction limits (429 past the limit).
`/healthz` stays open; the review queue's bearer token still opens the review paths for
model servers and scripts."""

from __future__ import annotations

import hashlib
import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

import httpx
from flask import Flask, Response, jsonify, request

from captchaops.settings import Settings
from captchaops.webapp import reviewers
from captchaops.webapp.limits import MINUTE, Throttled, client_address

REALM = 'Basic realm="captchaops", charset="UTF-8"'
OPEN_PATHS = frozenset({"/healthz"})
REVIEW_PATHS = ("/api/review", "/review")
MAX_FIELD = 256
"""Longer user names or passwords are refused without asking the tracking server."""
CACHED_LOGINS = 1024
FAILING_CLIENTS = 10_000


class LoginUnavailable(Exception):
    """The tracking server could not say whether a login is good."""


def check_with_tracking(settings: Settings, username: str, password: str, timeout: float) -> bool:
    """Whether the tracking server's basic-auth accepts this pair: reading one's own account
    (`users/get`) is the cheapest call every account may make; 401 means no."""
    url = f"{settings.effective_tracking_uri.rstrip('/')}/api/2.0/mlflow/users/get"
    try:
        resp = httpx.get(
            url, params={"username": username}, auth=(username, password), timeout=timeout
        )
    except httpx.HTTPError as exc:
        raise LoginUnavailable("the tracking server did not answer") from exc
    if resp.status_code == 200:
        return True
    if resp.status_code == 401:
        return False
    if resp.status_code == 404:
        raise LoginUnavailable("the tracking server has no accounts (it runs without basic-auth)")
    raise LoginUnavailable(f"the tracking server answered HTTP {resp.status_code}")


Checker = Callable[[str, str], bool]


class Gate:
    """Admits requests with a good tracking-server login; remembers good ones for a while and
    meters failures."""

    def __init__(
        self, settings: Settings, check: Checker, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.settings = settings
        self._check = check
        self._clock = clock
        self._lock = threading.Lock()
        self._good: OrderedDict[str, float] = OrderedDict()  # digest -> valid until
        self._failures: dict[str, deque[float]] = {}  # client|user -> failure times

    def admit(self, client: str, username: str, password: str) -> bool:
        """Whether the pair is good; raises Throttled over the failure limit and
        LoginUnavailable when the tracking server cannot tell."""
        digest = hashlib.sha256(f"{username}\0{password}".encode()).hexdigest()
        key = f"{client}|{username}"
        with self._lock:
            now = self._clock()
            if self._good.get(digest, 0.0) > now:
                return True
            self._refuse_if_over(key, now)
        good = (
            len(username) <= MAX_FIELD
            and len(password) <= MAX_FIELD
            and self._check(username, password)
        )
        with self._lock:
            now = self._clock()
            if good:
                self._remember(digest, now)
            else:
                self._failed(key, now)
        return good

    def _refuse_if_over(self, key: str, now: float) -> None:
        recent = self._failures.get(key)
        while recent and recent[0] <= now - MINUTE:
            recent.popleft()
        limit = self.settings.app_login_failures_per_minute
        if recent is not None and len(recent) >= limit:
            wait = recent[0] + MINUTE - now
            raise Throttled(
                "login_rate_limited",
                f"Too many failed logins: at most {limit} a minute for one account from one "
                f"client; retry in {math.ceil(wait)} s.",
                wait,
            )

    def _remember(self, digest: str, now: float) -> None:
        ttl = self.settings.app_login_cache_seconds
        if ttl <= 0:
            return
        self._good[digest] = now + ttl
        self._good.move_to_end(digest)
        while len(self._good) > CACHED_LOGINS:
            self._good.popitem(last=False)

    def _failed(self, key: str, now: float) -> None:
        if len(self._failures) >= FAILING_CLIENTS:
            self._failures = {k: q for k, q in self._failures.items() if q and q[-1] > now - MINUTE}
        self._failures.setdefault(key, deque()).append(now)


def install(app: Flask, settings: Settings, timeout: float) -> Gate:
    """Ask every request except `/healthz` for a tracking-server login (call before CSRF)."""
    gate = Gate(settings, lambda u, p: check_with_tracking(settings, u, p, timeout))

    @app.before_request
    def _login() -> Any:
        if request.path in OPEN_PATHS:
            return None
        if request.path.startswith(REVIEW_PATHS) and _has_review_token(settings):
            return None
        auth = request.authorization
        if auth is None or auth.type != "basic" or not auth.username:
            return _refused(401, "unauthorized", "Log in with your MLflow tracking server account.")
        try:
            good = gate.admit(client_address(request, settings), auth.username, auth.password or "")
        except Throttled as exc:
            return _refused(
                exc.status, exc.error, exc.detail, {"Retry-After": str(exc.retry_after)}
            )
        except LoginUnavailable as exc:
            return _refused(
                503,
                "login_unavailable",
                f"Logins cannot be checked now: {exc}; retry, or ask the operator to check "
                "the tracking server.",
            )
        if not good:
            return _refused(
                401,
                "unauthorized",
                "That user name and password are not an account on the MLflow tracking server.",
            )
        return None

    return gate


def _has_review_token(settings: Settings) -> bool:
    """Whether the request carries `Authorization: Bearer <review token>`."""
    header = request.headers.get("Authorization", "")
    return header.startswith("Bearer ") and reviewers.token_matches(
        settings, header[len("Bearer ") :]
    )


def _refused(
    status: int, error: str, detail: str, headers: dict[str, str] | None = None
) -> Response:
    """JSON for the API, a short page for browsers; both carry the basic-auth challenge on 401,
    so browsers show their login prompt."""
    if request.path.startswith("/api/"):
        resp = jsonify(error=error, detail=detail)
    else:
        resp = Response(
            f"<!doctype html><title>captchaops</title><p>{detail}</p>", mimetype="text/html"
        )
    resp.status_code = status
    resp.headers.update(headers or {})
    if status == 401:
        resp.headers["WWW-Authenticate"] = REALM
    return resp
