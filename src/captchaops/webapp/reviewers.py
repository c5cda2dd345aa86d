"""Who may see and feed the review queue: it shows other people's uploads, so by default only
this machine (a loopback address); with `review_token` set (always in team mode) whoever presents
the token, as `Authorization: Bearer <token>` or once on the review page (kept in the signed
session cookie, for `review_login_seconds`)."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import time

from flask import Request
from flask.sessions import SessionMixin

from captchaops.settings import Settings
from captchaops.webapp.inputs import BadInput

SESSION_KEY = "reviewer"


def is_loopback(address: str | None) -> bool:
    """Whether a request's remote address is this machine."""
    try:
        return ipaddress.ip_address(address or "").is_loopback
    except ValueError:
        return False


def token_matches(settings: Settings, offered: str | None) -> bool:
    """Whether `offered` is the configured review token (compared in constant time)."""
    token = settings.review_token
    if token is None or not offered:
        return False
    return hmac.compare_digest(offered.encode(), token.get_secret_value().encode())


def marker(settings: Settings, issued: float | None = None) -> str:
    """What the session holds for a reviewer: when the token was presented, and a hash that
    changes when the token does (a new token signs everybody out)."""
    at = int(time.time() if issued is None else issued)
    token = settings.review_token
    secret = token.get_secret_value() if token else ""
    digest = hashlib.sha256(f"captchaops-reviewer:{at}:{secret}".encode()).hexdigest()
    return f"{at}.{digest}"


def marker_valid(settings: Settings, value: object, now: float | None = None) -> bool:
    """Whether a session's marker is this token's and younger than `review_login_seconds`."""
    at, _, _ = str(value).partition(".")
    if not at.isdigit():
        return False
    age = (time.time() if now is None else now) - int(at)
    if not -60 <= age < settings.review_login_seconds:  # a minute of clock skew, no more
        return False
    return hmac.compare_digest(str(value), marker(settings, int(at)))


def allowed(settings: Settings, request: Request, session: SessionMixin) -> bool:
    """Whether this request may see or feed the review queue."""
    if settings.review_token is None:
        return is_loopback(request.remote_addr)
    header = request.headers.get("Authorization", "")
    if header.startswith("Bearer ") and token_matches(settings, header[len("Bearer ") :]):
        return True
    return marker_valid(settings, session.get(SESSION_KEY, ""))


def require(settings: Settings, request: Request, session: SessionMixin) -> None:
    """Raise 403 unless the request may see or feed the review queue."""
    if allowed(settings, request, session):
        return
    if settings.review_token is None:
        detail = (
            "The review queue answers only on this machine (loopback); set review_token to "
            "reach it from elsewhere with Authorization: Bearer <token>."
        )
    else:
        detail = "The review queue needs the review token: send Authorization: Bearer <token>."
    raise BadInput(403, "forbidden", detail)
