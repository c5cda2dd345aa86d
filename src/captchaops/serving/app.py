"""The model server: a Starlette app answering the MLflow scoring protocol for one registry alias."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import socket
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any

import psutil
import uvicorn
from starlette.applications import Starlette
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from captchaops import service_auth
from captchaops.canary import slot as canary_slot  # a module: it may be importing serving now
from captchaops.serving import connections, invocations
from captchaops.serving.guard import Guard
from captchaops.serving.live_estimate import LiveQuality
from captchaops.serving.metrics import CONTENT_TYPE, ServingMetrics
from captchaops.serving.monitoring_runs import REST_TIMEOUT_S, Monitor
from captchaops.serving.watcher import AliasWatcher, ServedModel
from captchaops.serving.webhook import WebhookReceiver
from captchaops.settings import Settings, ensure_secret
from captchaops.tracking_rest import TrackingRest

log = logging.getLogger(__name__)


class ServeError(Exception):
    """The server cannot start; the message says how to fix it."""


def create_app(
    settings: Settings,
    alias: str,
    *,
    max_body_bytes: int = invocations.DEFAULT_MAX_BODY_BYTES,
    max_wait_s: float = invocations.DEFAULT_MAX_WAIT_S,
    deadline_s: float = invocations.DEFAULT_DEADLINE_S,
) -> Starlette:
    """A model server for `models:/<settings.model_name>@<alias>` with its own watcher and metrics."""
    if settings.auth:  # team mode: guarded endpoints need the serving token
        settings = ensure_secret(settings, "serving_token", 32)
    metrics = ServingMetrics(model=settings.model_name, alias=alias, replica=settings.replica_id)
    metrics.quality = LiveQuality(_version_tags(settings), metrics.registry)
    watcher = AliasWatcher.for_settings(settings, alias, metrics)
    canary = None
    if _follows_canary(settings, alias):
        canary = canary_slot.Canary.for_settings(settings, watcher, metrics)
    scoring = invocations.Invocations(
        settings,
        alias,
        watcher,
        metrics,
        max_body_bytes=max_body_bytes,
        max_wait_s=max_wait_s,
        deadline_s=deadline_s,
    )
    scoring.canary = canary
    receiver = WebhookReceiver.for_settings(settings, watcher, metrics)
    if canary is not None:
        receiver.also(canary.watcher)
    app = Starlette(
        routes=[
            Route("/invocations", scoring.handle, methods=["POST"]),
            Route("/ping", ping, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
            Route("/version", version, methods=["GET"]),
            Route("/metrics", prometheus, methods=["GET"]),
            Route("/reload", reload, methods=["POST"]),
            Route("/webhook", receiver.handle, methods=["POST"]),
        ],
        middleware=[
            Middleware(Guard, settings=settings, alias=alias),
            Middleware(ModelHeaders, watcher=watcher),
        ],
        exception_handlers={HTTPException: http_error},
        lifespan=_lifespan,
    )
    app.state.watcher = watcher
    app.state.receiver = receiver
    app.state.metrics = metrics
    app.state.invocations = scoring
    app.state.canary = canary
    app.state.model_name = settings.model_name
    app.state.alias = alias
    app.state.process = psutil.Process()
    app.state.monitor = None
    if settings.monitor_seconds > 0:
        rest = TrackingRest.for_settings(settings, timeout=REST_TIMEOUT_S)
        app.state.monitor = Monitor(
            rest,
            settings.model_name,
            alias,
            metrics,
            settings.monitor_seconds,
            replica=settings.replica_id,
        )
    return app


def _follows_canary(settings: Settings, alias: str) -> bool:
    """Only the production server routes to `@canary`, unless `CAPTCHAOPS_CANARY=false`."""
    return settings.canary and alias == "production"


def _version_tags(settings: Settings) -> Callable[[str], dict[str, str]]:
    """Reads a served version's registry tags (its calibration) over the REST client."""

    def tags(version: str) -> dict[str, str]:
        rest = TrackingRest.for_settings(settings, timeout=10.0)
        try:
            return rest.version_tags(settings.model_name, version)
        finally:
            rest.close()

    return tags


@contextlib.asynccontextmanager
async def _lifespan(app: Starlette) -> AsyncIterator[None]:
    await app.state.invocations.start()
    app.state.watcher.start()
    if app.state.canary is not None:
        app.state.canary.start()
    monitor: Monitor | None = app.state.monitor
    if monitor is not None:
        monitor.start()
    try:
        yield
    finally:
        if app.state.canary is not None:
            app.state.canary.stop()
        app.state.watcher.stop()
        await app.state.receiver.close()
        await app.state.invocations.stop()
        if monitor is not None:
            await asyncio.to_thread(monitor.stop)  # the last points, and the runs finished


async def ping(request: Request) -> Response:
    """Liveness: the process answers."""
    return PlainTextResponse("pong\n")


async def health(request: Request) -> Response:
    """Readiness: 200 once a model is loaded, with what the watcher knows."""
    body: dict[str, Any] = request.app.state.watcher.health()
    body["tensorflow_loaded"] = "tensorflow" in sys.modules
    body["pid"] = os.getpid()
    body["rss_bytes"] = request.app.state.process.memory_info().rss
    quality = request.app.state.metrics.quality
    body["live_estimate"] = quality.snapshot() if quality is not None else {}
    canary = request.app.state.canary
    body["canary"] = canary.health() if canary is not None else None
    return JSONResponse(body, status_code=200 if body["model_loaded"] else 503)


async def version(request: Request) -> Response:
    """The served version, or 503 before one is loaded."""
    served: ServedModel | None = request.app.state.watcher.current
    if served is None:
        state = request.app.state
        return invocations.error_response(
            503,
            "no_model",
            f"no version of {state.model_name!r} has the alias {state.alias!r} yet",
        )
    return JSONResponse(served.describe())


async def reload(request: Request) -> Response:
    """Check the alias now instead of at the next poll."""
    request.app.state.watcher.poll_soon()
    return JSONResponse({"status": "polling"}, status_code=202)


async def prometheus(request: Request) -> Response:
    """The server's metrics in the Prometheus text format."""
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE)


async def http_error(request: Request, exc: Exception) -> Response:
    """404, 405 and other routing errors as JSON."""
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return invocations.error_response(
        exc.status_code, code, f"{request.method} {request.url.path}: {exc.detail}"
    )


class ModelHeaders:
    """Adds X-Model-Name, X-Model-Alias and X-Model-Version to every response that lacks them."""

    def __init__(self, app: ASGIApp, watcher: AliasWatcher) -> None:
        self.app = app
        self.watcher = watcher

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                served = self.watcher.current
                if "x-model-version" not in headers:
                    headers["X-Model-Version"] = served.version if served else "none"
                headers["X-Model-Name"] = self.watcher.name
                if "x-model-alias" not in headers:  # a canary's answer names its own alias
                    headers["X-Model-Alias"] = self.watcher.alias
            await send(message)

        await self.app(scope, receive, send_with_headers)


def run(settings: Settings, alias: str, port: int, host: str | None = None) -> None:
    """Serve `models:/<model_name>@<alias>` on host:port with one uvicorn worker until stopped."""
    bind = host or settings.host
    _check_port(bind, port)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    os.environ.update(settings.mlflow_env())
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    limit_memory(settings.serving_memory_mib)
    app = create_app(settings, alias)
    log.info("serving %s@%s on http://%s:%d", settings.model_name, alias, bind, port)
    uvicorn.run(
        app,
        host=bind,
        port=port,
        workers=1,
        access_log=False,
        log_level="info",
        timeout_graceful_shutdown=5,
        http=connections.guarded_protocol(
            settings.head_timeout_seconds,
            settings.max_connections_per_client,
            service_auth.trusted_networks(settings),
        ),
        proxy_headers=False,  # connections.ForwardedClients decides whom to believe
        timeout_keep_alive=5,
        h11_max_incomplete_event_size=connections.MAX_HEAD_BYTES,
        limit_concurrency=connections.MAX_CONNECTIONS,
    )


def limit_memory(mib: int) -> None:
    """Cap this process's address space (RLIMIT_AS) at `mib` MiB, 0 for none: an allocation
    beyond it fails (the request gets a JSON error) instead of taking the machine."""
    if mib <= 0:
        return
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = mib * 2**20 if hard == resource.RLIM_INFINITY else min(mib * 2**20, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    log.info("address space limited to %d MiB", limit // 2**20)


def _check_port(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise ServeError(
                f"cannot listen on {host}:{port} ({exc.strerror}); pick another port with --port"
            ) from exc
