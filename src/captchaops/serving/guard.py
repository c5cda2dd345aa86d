"""A model server's front door: the Host header must name this server (DNS rebinding), and in
team mode `/reload`, `/metrics` and a non-production alias's `/invocations` need the serving
token; every request is marked trusted or not, for what the live estimate may count.

Starlette's TrustedHostMiddleware answers a plain-text 400; ours answers with the JSON reason
every refusal carries, and does the token check in the same pass.
"""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from captchaops import service_auth
from captchaops.serving.invocations import error_response
from captchaops.settings import Settings

GUARDED_PATHS = frozenset({"/reload", "/metrics"})


class Guard:
    """Refuses foreign Host headers (400) and, in team mode, guarded paths without the token
    (401); sets `scope["state"]["trusted"]`."""

    def __init__(self, app: ASGIApp, settings: Settings, alias: str) -> None:
        self.app = app
        self.settings = settings
        self.allowed = service_auth.allowed_hosts(settings)
        self.team = settings.auth
        scoring_guarded = alias != "production" or settings.production_needs_token
        self.guarded = GUARDED_PATHS | ({"/invocations"} if scoring_guarded else set())
        self.count_all = settings.live_traffic == "all"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        host = headers.get("host")
        if not service_auth.host_allowed(host, self.allowed):
            shown = (host or "none")[:100]
            response = error_response(
                400,
                "bad_host",
                f"this server does not answer to the host {shown!r}; use its configured "
                "name or 127.0.0.1 (add names with CAPTCHAOPS_ALLOWED_HOSTS)",
            )
            await response(scope, receive, send)
            return
        authorized = self.team and service_auth.token_accepted(
            headers.get("authorization"), self.settings
        )
        if self.team and scope["path"] in self.guarded and not authorized:
            response = error_response(
                401,
                "unauthorized",
                f"{scope['path']} needs the serving token; send 'Authorization: Bearer <token>' "
                "(CAPTCHAOPS_SERVING_TOKEN in the stack's home)",
                headers={"WWW-Authenticate": 'Bearer realm="captchaops"'},
            )
            await response(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        state["trusted"] = self.count_all or not self.team or authorized
        await self.app(scope, receive, send)
