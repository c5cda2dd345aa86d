"""Who may reach our services: the Host names they serve (against DNS rebinding) and the token
that guarded model-server endpoints need in team mode. Shared by the model servers and the app.

A page in the operator's browser can reach loopback services through a name that its attacker
re-points at 127.0.0.1; the request then carries the attacker's name as its Host. Every service
answers only the names it is configured under, plus loopback names.
"""

from __future__ import annotations

import base64
import hmac
import re
from urllib.parse import urlsplit

from captchaops.settings import Settings, client_host_for

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
_HOST = re.compile(r"(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")
"""A Host header: a name or an address (IPv6 in brackets) and an optional port, nothing else."""


def allowed_hosts(settings: Settings) -> frozenset[str]:
    """Host names (no ports) our services answer to: loopback, the bind address, the names of
    configured URLs and `CAPTCHAOPS_ALLOWED_HOSTS`."""
    names = {*LOOPBACK_NAMES, client_host_for(settings.host)}
    names.update(h.strip() for h in (settings.allowed_hosts or "").split(",") if h.strip())
    urls = (
        settings.production_url,
        settings.staging_url,
        settings.shadow_url,
        settings.review_url,
    )
    names.update(urlsplit(url).hostname or "" for url in urls if url)
    names.discard("")
    return frozenset(name.lower() for name in names)


def host_allowed(host_header: str | None, allowed: frozenset[str]) -> bool:
    """Whether a Host header (name or address, with or without a port) names an allowed host;
    an entry starting with '.' allows its subdomains, '*' allows any."""
    if "*" in allowed:
        return True
    if not host_header or not _HOST.fullmatch(host_header.strip()):
        return False
    name = urlsplit(f"//{host_header.strip()}").hostname
    if name is None:
        return False
    return name in allowed or any(
        entry.startswith(".") and (name.endswith(entry) or name == entry[1:]) for entry in allowed
    )


def token_accepted(authorization: str | None, settings: Settings) -> bool:
    """Whether an Authorization header carries the serving token (Bearer) or the service
    account's credentials (Basic)."""
    if not authorization:
        return False
    scheme, _, value = authorization.strip().partition(" ")
    value = value.strip()
    if scheme.lower() == "bearer" and settings.serving_token is not None:
        return hmac.compare_digest(
            value.encode(), settings.serving_token.get_secret_value().encode()
        )
    if scheme.lower() == "basic" and settings.service_password is not None:
        try:
            user, _, password = base64.b64decode(value, validate=True).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return False
        expected = settings.service_password.get_secret_value()
        return hmac.compare_digest(user.encode(), settings.service_username.encode()) & (
            hmac.compare_digest(password.encode(), expected.encode())
        )
    return False


def bearer_headers(settings: Settings) -> dict[str, str]:
    """The header our own clients (web app, shadow copies) send to model servers."""
    token = settings.serving_token
    return {"Authorization": f"Bearer {token.get_secret_value()}"} if token else {}
