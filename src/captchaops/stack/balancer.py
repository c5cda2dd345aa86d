"""The balancer `up --replicas N` puts in front of an alias's replicas: HAProxy, configured here.

A packaged, well-kept balancer (Debian `haproxy`), not one of our own. One HAProxy process per
served alias listens on the alias's port (the URL the web app, webhooks, shadow copies and
`status` already use) and spreads requests over the replicas, which listen on loopback only:

- `/ping` is answered by HAProxy itself (the balancer is alive); everything else goes to a
  replica, the one with the fewest connections.
- a replica is in rotation for `/invocations` while its `/health` answers 200 (checked every
  second), i.e. once it has loaded a version, so a restarted replica takes traffic only when it
  can answer it; a connection it refuses takes it out at once. Every other request (`/webhook`,
  `/health`, `/version`, `/metrics`, `/reload`), and `/invocations` while no replica has a
  version, goes to any replica that answers `/ping`: it answers for itself (`no_model` before
  its first version), and an alias webhook reaches the replicas before any serves.
- a request is read whole (head and body, up to `BUFFER_BYTES`) before a replica is chosen,
  within `HEAD_TIMEOUT_S`, so a slow client holds an HAProxy connection, not a replica's; and a
  request a replica did not answer (refused, or closed with no answer: it died under it) is
  sent once more to another. Why not Caddy, which the compose file runs: Caddy 2.6 (Debian's)
  retries a POST only when the connection failed before the body went out, and re-sends an
  empty body otherwise (caddyserver/caddy#7360, fixed in a later release), so every request in
  flight on a killed replica failed; HAProxy keeps a copy of the buffered request to retry.
- X-Forwarded-For is replaced by the address HAProxy was reached from (it trusts no incoming
  one), and the replicas trust loopback as a proxy, so their per-client limits see the client.
- its own errors (no replica answers, a request too slow) are JSON `{"error", "detail"}`; each
  request that failed or was retried is logged (to stderr: the supervisor's log of the alias).
"""

from __future__ import annotations

import shutil

REPLICA_HOST = "127.0.0.1"
"""Replicas bind loopback whatever the stack's host: only the balancer is meant to reach them."""
REPLICA_PORT_STEP = 100
"""Replica k (1..N) of an alias listens on the alias's port + k x this step."""
MAX_REPLICAS = 8
HEALTH_INTERVAL_S = 1
HEAD_TIMEOUT_S = 10
"""The model servers' own default head deadline (serving.connections.HEAD_TIMEOUT_S)."""
BUFFER_BYTES = 256 * 1024
"""A request up to this size (head and body) is read whole before it goes to a replica, and can
be retried on another; a larger one is streamed (the servers read it with their deadlines)."""
SERVER_TIMEOUT_S = 120
"""How long a replica may take to answer (the servers drop what waited 30 s themselves)."""
MAX_CONNECTIONS = 4096
JSON_ERRORS = {
    408: ("request_timeout", f"send the request within {HEAD_TIMEOUT_S} s"),
    502: ("no_replica", "no replica could answer; retry shortly"),
    503: ("no_replica", "no replica is in rotation (none has loaded a version yet?); retry"),
    504: ("replica_timeout", "the replica did not answer in time; retry"),
}


class BalancerMissing(Exception):
    """HAProxy is not installed; the message says how to install it."""


def haproxy_binary() -> str:
    """The `haproxy` executable on PATH; BalancerMissing with the fix when there is none."""
    found = shutil.which("haproxy")
    if found is None:
        raise BalancerMissing(
            "up --replicas needs HAProxy as the balancer and no haproxy is on PATH: "
            "apt-get install haproxy (it goes to /usr/sbin), or run up without --replicas"
        )
    return found


def replica_port(alias_port: int, index: int) -> int:
    """The port of replica `index` (1-based) of the alias served on `alias_port`."""
    return alias_port + REPLICA_PORT_STEP * index


def config(name: str, bind: str, port: int, upstreams: list[str], check_host: str) -> str:
    """The haproxy.cfg of one alias's balancer `name`: listen on bind:port (every interface for
    0.0.0.0), balance over `upstreams` (host:port), whose health checks name `check_host` (the
    balancer's own address: requests keep the Host their client sent, which replicas allow)."""
    # every IPv4 interface for 0.0.0.0; both families for :: (HAProxy's ":port" is IPv4 only)
    listen = "" if bind in ("", "0.0.0.0") else bind
    errors = [
        f"    http-error status {status} content-type application/json "
        f'string \'{{"error": "{code}", "detail": "{detail}"}}\''
        for status, (code, detail) in JSON_ERRORS.items()
    ]
    servers = [f"    server {name}-{k} {address}" for k, address in enumerate(upstreams, start=1)]
    lines = [
        "global",
        f"    maxconn {MAX_CONNECTIONS}",
        f"    tune.bufsize {BUFFER_BYTES}",
        "    hard-stop-after 5s",
        "    log stderr format raw local0",
        "",
        "defaults",
        "    mode http",
        "    log global",
        "    option httplog",
        "    option dontlog-normal",
        "    timeout connect 2s",
        f"    timeout http-request {HEAD_TIMEOUT_S}s",
        "    timeout client 60s",
        f"    timeout server {SERVER_TIMEOUT_S}s",
        "    timeout queue 10s",
        "    option http-buffer-request",
        "    retries 1",
        "    option redispatch 1",
        "    retry-on conn-failure empty-response junk-response",
        *errors,
        "",
        f"frontend {name}",
        f"    bind {listen}:{port}" + (" v4v6" if bind == "::" else ""),
        '    http-request return status 200 content-type text/plain string "pong" '
        "if { path /ping }",
        "    http-request del-header X-Forwarded-For",
        "    option forwardfor",
        f"    use_backend {name}-ready if {{ path /invocations }} {{ nbsrv({name}-ready) gt 0 }}",
        f"    default_backend {name}-live",
        "",
        *_backend(f"{name}-ready", "/health", check_host, servers),
        *_backend(f"{name}-live", "/ping", check_host, servers),
    ]
    return "\n".join(lines)


def _backend(name: str, check: str, check_host: str, servers: list[str]) -> list[str]:
    """A backend of every replica, each in it while GET `check` answers 200."""
    return [
        f"backend {name}",
        "    balance leastconn",
        "    option httpchk",
        f"    http-check send meth GET uri {check} ver HTTP/1.1 hdr Host {check_host}",
        "    http-check expect status 200",
        f"    default-server check inter {HEALTH_INTERVAL_S}s fall 2 rise 1 "
        "observe layer4 error-limit 1 on-error mark-down",
        *servers,
        "",
    ]
