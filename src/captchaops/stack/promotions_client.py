"""The commands' side of the promotion service: one HTTP call, its answer or one line why not.

With CAPTCHAOPS_PROMOTIONS_URL set, `promote`, `approve`, `rollback` and `requests` send their work
here instead of running it with a local key. The caller's tracking-server login (team mode)
travels as HTTP Basic; the service asks the tracking server who that is.
"""

from __future__ import annotations

from typing import Any

import httpx

from captchaops.access import login
from captchaops.registry.names import default_actor
from captchaops.settings import Settings

TIMEOUT_S = 300.0
"""A promotion scores both versions on the frozen set before it moves: allow for that."""


class ServiceError(Exception):
    """The service did not do the work; the message is the one line a command prints."""


def ask(
    settings: Settings,
    method: str,
    path: str,
    body: dict[str, Any] | None = None,
    *,
    actor: str | None = None,
) -> dict[str, Any]:
    """Send one piece of work to the promotion service for the settings' scheme; its answer."""
    base = (settings.promotions_url or "").rstrip("/")
    # Team mode: the service names the account the tracking server vouches for, and `actor`
    # only beside it when one was given (--actor); locally, the name is the audit trail's.
    given = actor if settings.auth else actor or default_actor()
    payload = {"model": settings.model_name, "actor": given, **(body or {})}
    try:
        answer = httpx.request(
            method,
            base + path,
            json=payload if method == "POST" else None,
            params={"model": settings.model_name} if method == "GET" else None,
            auth=login(settings),
            timeout=TIMEOUT_S,
        )
    except httpx.HTTPError as exc:
        raise ServiceError(
            f"the promotion service at {base} does not answer ({type(exc).__name__}); start it "
            "with `captchaops promotions serve`, or check CAPTCHAOPS_PROMOTIONS_URL"
        ) from exc
    try:
        found = answer.json()
    except ValueError:
        found = None
    if not isinstance(found, dict):
        raise ServiceError(
            f"the promotion service at {base} answered HTTP {answer.status_code} without JSON; "
            "check CAPTCHAOPS_PROMOTIONS_URL names the promotion service"
        )
    if answer.status_code >= 400:
        detail = str(found.get("detail") or found.get("error") or f"HTTP {answer.status_code}")
        raise ServiceError(detail.splitlines()[0] if detail else detail)
    return found
