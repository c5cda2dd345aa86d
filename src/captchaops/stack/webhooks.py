"""MLflow alias webhooks for the model servers: the tracking server's settings, registration
by `up` (idempotent), a test delivery, and what `status` says about swaps.

One webhook per served alias, named `captchaops-<model>-<alias>`, subscribed to
`model_version_alias.created` and `.deleted` and pointing at that server's `POST /webhook`.
MLflow delivers every alias event to it; the server ignores those of other models and aliases.
Registration failing (a file store, an older or remote server that refuses http or private
addresses) is not an error: the model servers keep polling, and `up` says why.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
from pydantic import SecretStr

from captchaops.settings import ENV_PREFIX, Settings, ensure_secret, write_env
from captchaops.tracking_rest import API, TrackingError, TrackingRest, credentials

WEBHOOKS = f"{API}/webhooks"
EVENTS = [
    {"entity": "MODEL_VERSION_ALIAS", "action": "CREATED"},
    {"entity": "MODEL_VERSION_ALIAS", "action": "DELETED"},
]
SERVED_ALIASES = ("production", "staging")
TEST_TIMEOUT_S = 45.0
"""MLflow retries a failed test delivery three times with backoff before it answers."""


@dataclass(frozen=True)
class Registration:
    """What `up` did for one alias: `ok` once a signed test delivery reached its server."""

    alias: str
    url: str
    ok: bool
    detail: str


def ensure_secrets(settings: Settings) -> Settings:
    """The HMAC secret and the tracking server's Fernet key, generated once into `<home>/.env`."""
    settings = ensure_secret(settings, "webhook_secret")
    if settings.webhook_encryption_key:
        return settings
    key = base64.urlsafe_b64encode(os.urandom(32)).decode()  # the format Fernet.generate_key has
    write_env(settings.env_file, {f"{ENV_PREFIX}WEBHOOK_ENCRYPTION_KEY": key})
    return settings.model_copy(update={"webhook_encryption_key": SecretStr(key)})


def tracking_env(settings: Settings) -> dict[str, str]:
    """What the tracking server we start needs to deliver webhooks to the local model servers.

    MLflow only delivers to https URLs of public addresses unless told otherwise, and encrypts
    stored secrets with a key it generates per process unless given one, which a restart or a
    second worker could not read. MLflow caches the list of webhooks per event for 60 s by
    default, so a webhook registered by `up` would miss moves for up to a minute after any earlier
    alias event; alias moves are rare, so the list is read from the database at each one.
    """
    key = settings.webhook_encryption_key
    if not settings.webhooks or key is None:
        return {}
    return {
        "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https",
        "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
        "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": key.get_secret_value(),
        "MLFLOW_WEBHOOK_CACHE_TTL": "0",
        "MLFLOW_WEBHOOK_REQUEST_TIMEOUT": "10",
    }


def admin_rest(settings: Settings) -> TrackingRest:
    """A client allowed to manage webhooks: the admin in team mode, else the configured account."""
    auth = credentials(settings)
    if settings.auth and settings.admin_password:
        auth = (settings.admin_username, settings.admin_password.get_secret_value())
    return TrackingRest(settings.effective_tracking_uri, auth, timeout=15.0)


def webhook_name(settings: Settings, alias: str) -> str:
    """The name `up` gives the webhook of one served alias."""
    return f"captchaops-{settings.model_name}-{alias}"


def register(settings: Settings, aliases: tuple[str, ...]) -> list[Registration]:
    """Create or update the webhook of each alias's server, then send it a signed test
    delivery; never raises (a failure is a Registration with ok False and the reason)."""
    aliases = tuple(a for a in aliases if a in SERVED_ALIASES)
    if not aliases:
        return []
    rest = admin_rest(settings)
    try:
        if not settings.webhooks:
            _disable_ours(rest, settings, aliases)
            return [
                Registration(a, settings.server_url(a), False, "webhooks switched off")
                for a in aliases
            ]
        if settings.webhook_secret is None:
            raise TrackingError("no webhook secret; run ensure_secrets() first")
        existing = _list(rest)
        return [_register_one(rest, settings, alias, existing) for alias in aliases]
    except TrackingError as exc:
        return [Registration(a, settings.server_url(a), False, _why(exc)) for a in aliases]
    finally:
        rest.close()


def _register_one(
    rest: TrackingRest, settings: Settings, alias: str, existing: list[dict[str, Any]]
) -> Registration:
    url = settings.server_url(alias) + "/webhook"
    assert settings.webhook_secret is not None
    body = {
        "name": webhook_name(settings, alias),
        "url": url,
        "events": EVENTS,
        "secret": settings.webhook_secret.get_secret_value(),
        "status": "ACTIVE",
        "description": f"captchaops: {settings.model_name}@{alias} swaps at once",
    }
    try:
        ours = [w for w in existing if w.get("name") == body["name"]]
        for extra in ours[1:]:  # left by an interrupted `up`: one webhook per alias is enough
            rest.call("DELETE", f"{WEBHOOKS}/{extra['webhook_id']}")
        if ours:
            found = rest.call("PATCH", f"{WEBHOOKS}/{ours[0]['webhook_id']}", json=body)
        else:
            found = rest.call("POST", WEBHOOKS, json=body)
        webhook_id = str((found.get("webhook") or {}).get("webhook_id") or "")
        if not webhook_id:
            return Registration(alias, url, False, "the tracking server named no webhook id")
        return _test(rest, alias, url, webhook_id, "updated" if ours else "created")
    except TrackingError as exc:
        return Registration(alias, url, False, _why(exc))


def _test(rest: TrackingRest, alias: str, url: str, webhook_id: str, done: str) -> Registration:
    """Ask MLflow to send the example alias event; the server verifies it and ignores it."""
    answer = rest.call(
        "POST",
        f"{WEBHOOKS}/{webhook_id}/test",
        json={"event": EVENTS[0]},
        timeout=TEST_TIMEOUT_S,
    )
    result = answer.get("result") or {}
    if result.get("success"):
        return Registration(alias, url, True, f"{done}, test delivery verified")
    status = result.get("response_status")
    detail = " ".join(str(result.get("response_body") or result.get("error_message")).split())
    if status in (401, 404):
        detail = "the server does not know the webhook secret; restart it (captchaops down; up)"
    return Registration(
        alias, url, False, f"{done}, but the test delivery failed: HTTP {status} {detail[:200]}"
    )


def _list(rest: TrackingRest) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    token = ""
    for _ in range(50):  # at most 5000 webhooks; more means something else is going on
        params: dict[str, Any] = {"max_results": 100, **({"page_token": token} if token else {})}
        page = rest.call("GET", WEBHOOKS, params=params)
        found += [w for w in page.get("webhooks", []) if isinstance(w, dict)]
        token = str(page.get("next_page_token") or "")
        if not token:
            break
    return found


def _disable_ours(rest: TrackingRest, settings: Settings, aliases: tuple[str, ...]) -> None:
    names = {webhook_name(settings, a) for a in aliases}
    for webhook in _list(rest):
        if webhook.get("name") in names and webhook.get("status") == "ACTIVE":
            rest.call("PATCH", f"{WEBHOOKS}/{webhook['webhook_id']}", json={"status": "DISABLED"})


def _why(exc: TrackingError) -> str:
    if exc.status == 404:
        return "this tracking server has no webhook API (an MLflow without webhooks)"
    if exc.status in (401, 403):
        return "the tracking server allows only its admin to manage webhooks"
    return str(exc)


def swap_lines(settings: Settings, aliases: tuple[str, ...] = SERVED_ALIASES) -> dict[str, str]:
    """For `status`: how each model server swaps, from its `/health`."""
    out: dict[str, str] = {}
    for alias in aliases:
        try:
            health = httpx.get(settings.server_url(alias) + "/health", timeout=2.0).json()
        except (httpx.HTTPError, ValueError):
            out[alias] = "not answering"
            continue
        out[alias] = describe_swaps(health)
    return out


def describe_swaps(health: dict[str, Any]) -> str:
    """ "webhooks (last delivery 12 s ago)" or "polling every 2 s" from a server's `/health`."""
    mode = health.get("swap_mode")
    if mode == "webhooks":
        age = health.get("last_webhook_age_s")
        return "webhooks" + (f" (last delivery {float(age):.0f} s ago)" if age is not None else "")
    if mode == "polling":
        return f"polling every {float(health.get('poll_seconds') or 0):g} s"
    return "polling (this server does not report its swap mode)"


def report(
    registrations: list[Registration], settings: Settings, say: Callable[[str], None]
) -> None:
    """One line per alias for `up`."""
    for reg in registrations:
        if reg.ok:
            say(f"webhook    {reg.alias:<10} {reg.url} ({reg.detail})")
        else:
            say(
                f"webhook    {reg.alias:<10} unavailable: {reg.detail}; it keeps polling every "
                f"{settings.poll_seconds:g} s"
            )
