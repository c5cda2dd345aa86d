"""Who may reach our services: the Host names they serve (against DNS rebinding) and the token
that guarded model-server endpoints need in team mode. Shared by the model servers and the app.

A page in the operator's browser can reach loopback services through a name that its attacker
re-points at 127.0.0.1; the request then carries the attacker's name as its Host. Every service
answers only the names it is configured under, plus loopback names.

Behind a balancer every request comes from the balancer's address; per-client limits believe
the client address it forwards (X-Forwarded-For) only when the peer is one of the configured
`trusted_proxies`, and then only the rightmost address no trusted proxy added.
"""

from __future__ import annotations

import base64
import functools
import hmac
import ipaddress
import re
import socket
from collections.abc import Iterable
from urllib.parse import urlsplit

import psutil

from captchaops.settings import Settings, client_host_for

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
_HOST = re.compile(r"(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")
"""A Host header: a name or an address (IPv6 in brackets) and an optional port, nothing else."""
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


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


def bind_names(bind: str) -> frozenset[str]:
    """The names a server bound to `bind` is reached by: that address; for a wildcard (0.0.0.0,
    ::) every address of this host's interfaces and its hostname. An attacker's DNS name for
    these addresses still carries the attacker's name, so none of them opens DNS rebinding."""
    if bind not in ("0.0.0.0", "::", ""):
        return frozenset({bind.strip("[]").lower()})
    names = {socket.gethostname().lower()}
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family in (socket.AF_INET, socket.AF_INET6):
                names.add(address.address.split("%")[0].lower())
    return frozenset(names)


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


def trusted_networks(settings: Settings) -> tuple[Network, ...]:
    """The `trusted_proxies` setting as networks; ValueError naming the bad entry and the fix."""
    return parse_networks(settings.trusted_proxies or "")


@functools.lru_cache(maxsize=16)
def parse_networks(text: str) -> tuple[Network, ...]:
    """Comma-separated addresses or CIDRs as networks (read once per distinct text)."""
    networks = []
    for entry in (e.strip() for e in text.split(",")):
        if entry:
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                raise ValueError(
                    f"CAPTCHAOPS_TRUSTED_PROXIES holds {entry[:60]!r}, which is not an "
                    "address or CIDR; list balancers like 10.0.0.5,10.1.0.0/16"
                ) from None
    return tuple(networks)


def is_trusted(address: str, trusted: tuple[Network, ...]) -> bool:
    """Whether `address` lies in one of the trusted networks."""
    try:
        ip = ipaddress.ip_address(address.strip().strip("[]"))
    except ValueError:
        return False
    return any(ip in network for network in trusted)


def forwarded_client(peer: str, forwarded_for: Iterable[str], trusted: tuple[Network, ...]) -> str:
    """The client a request stands for: `peer` itself unless it is a trusted proxy; then the
    rightmost X-Forwarded-For hop that is not a trusted proxy (the leftmost hop when all are).
    `forwarded_for` holds the header's values in order; hops a client wrote itself stay left of
    the one the proxy appended, so they are never believed."""
    if not trusted or not is_trusted(peer, trusted):
        return peer
    hops = [hop.strip() for value in forwarded_for for hop in value.split(",") if hop.strip()]
    client = peer
    for hop in reversed(hops):
        try:
            ipaddress.ip_address(hop.strip("[]"))
        except ValueError:
            return client  # not an address: nothing left of it can be believed
        client = hop.strip("[]")
        if not is_trusted(client, trusted):
            return client
    return client
