"""The model server: a Starlette app answering the MLflow scoring protocol for one registry alias."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import psutil
from starlette.applications import Starlette
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from captchaops.model.preprocess import InvalidImage
from captchaops.serving import protocol
from captchaops.serving.batching import MicroBatcher, NoModel, Overloaded
from captchaops.serving.metrics import CONTENT_TYPE, ServingMetrics
from captchaops.serving.watcher import AliasWatcher
from captchaops.settings import Settings

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
DEFAULT_MAX_WAIT_S = 0.002
MODEL_BATCH_IMAGES = 16
"""Images per model call: larger batches gain little speed and cost ~1 MB RSS per image."""
PENDING_BATCHES = 16


class ServeError(Exception):
    """The server cannot start; the message says how to fix it."""


def error_response(status: int, error: str, detail: str) -> JSONResponse:
    """The JSON body every refusal carries."""
    return JSONResponse({"error": error, "detail": detail}, status_code=status)


def create_app(
    settings: Settings,
    alias: str,
    *,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_wait_s: float = DEFAULT_MAX_WAIT_S,
) -> Starlette:
    """A model server for `models:/<settings.model_name>@<alias>` with its own watcher and metrics."""
    metrics = ServingMetrics()
    watcher = AliasWatcher.for_settings(settings, alias, metrics)
    batcher = MicroBatcher(
        current=lambda: watcher.current,
        max_images=min(MODEL_BATCH_IMAGES, settings.max_batch_images),
        max_wait_s=max_wait_s,
        max_pending_images=settings.max_batch_images * PENDING_BATCHES,
        observe_batch=metrics.batch_size.observe,
    )
    limits = protocol.Limits(
        max_body_bytes=max_body_bytes,
        max_image_bytes=settings.max_upload_bytes,
        max_images=settings.max_batch_images,
    )
    process = psutil.Process()

    async def invocations(request: Request) -> Response:
        started = time.perf_counter()
        response = await _answer(request)
        metrics.requests.labels(str(response.status_code)).inc()
        metrics.latency.observe(time.perf_counter() - started)
        return response

    async def _answer(request: Request) -> Response:
        try:
            with batcher.arriving():
                protocol.check_content_type(request.headers.get("content-type", ""))
                body = await _read_body(request, max_body_bytes)
                images = protocol.parse_body(body, limits)
            served, predictions = await batcher.predict(images)
        except protocol.ProtocolError as exc:
            return _refuse(exc.status, exc.error, exc.detail)
        except InvalidImage as exc:
            return _refuse(400, "invalid_image", str(exc))
        except NoModel:
            return _refuse(
                503,
                "no_model",
                f"no version of {settings.model_name!r} has the alias {alias!r} yet; "
                "promote a version to it and retry",
            )
        except Overloaded:
            return _refuse(503, "overloaded", "too many images are waiting; retry shortly")
        except ClientDisconnect:
            return _refuse(400, "client_disconnect", "the client went away mid-request")
        except Exception as exc:
            log.exception("prediction failed")
            return _refuse(500, "prediction_failed", f"{type(exc).__name__}: {exc}")
        metrics.images.inc(len(images))
        return Response(
            json.dumps({"predictions": predictions}),
            media_type=protocol.JSON_TYPE,
            headers={"X-Model-Version": served.version},
        )

    def _refuse(status: int, error: str, detail: str) -> JSONResponse:
        metrics.errors.labels(error).inc()
        return error_response(status, error, detail)

    async def ping(request: Request) -> Response:
        return PlainTextResponse("pong\n")

    async def health(request: Request) -> Response:
        body: dict[str, Any] = watcher.health()
        body["tensorflow_loaded"] = "tensorflow" in sys.modules
        body["pid"] = os.getpid()
        body["rss_bytes"] = process.memory_info().rss
        return JSONResponse(body, status_code=200 if body["model_loaded"] else 503)

    async def version(request: Request) -> Response:
        served = watcher.current
        if served is None:
            return error_response(
                503,
                "no_model",
                f"no version of {settings.model_name!r} has the alias {alias!r} yet",
            )
        return JSONResponse(served.describe())

    async def reload(request: Request) -> Response:
        watcher.poll_soon()
        return JSONResponse({"status": "polling"}, status_code=202)

    async def prometheus(request: Request) -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(
            exc.status_code, code, f"{request.method} {request.url.path}: {exc.detail}"
        )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await batcher.start()
        watcher.start()
        try:
            yield
        finally:
            watcher.stop()
            await batcher.stop()

    app = Starlette(
        routes=[
            Route("/invocations", invocations, methods=["POST"]),
            Route("/ping", ping, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
            Route("/version", version, methods=["GET"]),
            Route("/metrics", prometheus, methods=["GET"]),
            Route("/reload", reload, methods=["POST"]),
        ],
        middleware=[Middleware(ModelHeaders, watcher=watcher)],
        exception_handlers={HTTPException: http_error},
        lifespan=lifespan,
    )
    app.state.watcher = watcher
    app.state.metrics = metrics
    return app


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
                headers["X-Model-Alias"] = self.watcher.alias
            await send(message)

        await self.app(scope, receive, send_with_headers)


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise protocol.too_large(limit)
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise protocol.too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def run(settings: Settings, alias: str, port: int, host: str | None = None) -> None:
    """Serve `models:/<model_name>@<alias>` on host:port with one uvicorn worker until stopped."""
    import uvicorn

    bind = host or settings.host
    _check_port(bind, port)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    os.environ.update(settings.mlflow_env())
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
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
    )


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
