"""The Flask app factory, its security settings, and `run` under waitress."""

from __future__ import annotations

import io
from typing import IO, Any

import waitress
from flask import Flask, Request, jsonify, render_template, request
from flask_wtf.csrf import CSRFError, CSRFProtect
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge, SecurityError

from captchaops import service_auth
from captchaops.settings import Settings, ensure_secret
from captchaops.webapp import accounts, api, approvals, review_page, views
from captchaops.webapp.service import Demo

EXTENSION = "captchaops"
SERVER_LIMITS: dict[str, Any] = {
    "threads": 8,
    "connection_limit": 1_000,
    "asyncore_use_poll": True,
    "channel_timeout": 30,
    "cleanup_interval": 5,
    "max_request_header_size": 16 * 1024,
    "backlog": 1_024,
}
"""Waitress reads each request whole in its event loop before a thread runs it, so a slow client
holds a socket, never a thread; with its default of 100 connections (and select()), 120 slow
connections left new visitors waiting. Idle connections close after 30 s."""
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; "
        "form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=()",
}


class InMemoryRequest(Request):
    """A request whose uploaded files stay in memory: nothing a visitor sends touches the disk."""

    def _get_file_stream(
        self,
        total_content_length: int | None,
        content_type: str | None,
        filename: str | None = None,
        content_length: int | None = None,
    ) -> IO[bytes]:
        return io.BytesIO()


def create_app(settings: Settings, timeout: float | None = None) -> Flask:
    """A configured web app; model servers slower than `timeout` (default: the setting) count as down."""
    if settings.auth:  # team mode: the review queue and the model servers need their tokens
        settings = ensure_secret(settings, "review_token", 32)
        settings = ensure_secret(settings, "serving_token", 32)
    settings = ensure_secret(settings, "app_secret_key")
    assert settings.app_secret_key is not None
    app = Flask(__name__)
    app.request_class = InMemoryRequest
    # Room for a base64 image in a form field; each image is then held to max_upload_bytes.
    body_limit = settings.max_upload_bytes * 2 + 64 * 1024
    app.config.update(
        SECRET_KEY=settings.app_secret_key.get_secret_value(),
        MAX_CONTENT_LENGTH=body_limit,
        MAX_FORM_MEMORY_SIZE=body_limit,
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_SECURE=settings.app_secure_cookies,  # behind TLS (Caddy in team deploys)
        WTF_CSRF_TIME_LIMIT=None,
        # Only the names the app is configured under (DNS rebinding): a foreign Host is a 400.
        TRUSTED_HOSTS=sorted(service_auth.allowed_hosts(settings)),
    )
    demo = Demo(settings, timeout)
    app.extensions[EXTENSION] = demo

    if settings.web_login:  # before CSRF: an anonymous request learns nothing else
        accounts.install(app, settings, demo.timeout)
    api_bp = api.make_blueprint(demo)
    csrf = CSRFProtect(app)
    csrf.exempt(api_bp)
    app.register_blueprint(views.make_blueprint(demo))
    app.register_blueprint(review_page.make_blueprint(demo))
    app.register_blueprint(approvals.make_blueprint(demo))
    app.register_blueprint(api_bp)

    @app.after_request
    def _secure(response: Any) -> Any:
        response.headers.update(SECURITY_HEADERS)
        response.headers.setdefault("Cache-Control", "no-store")
        return response

    @app.errorhandler(CSRFError)
    def _csrf(exc: CSRFError) -> Any:
        return _error(
            400, "csrf", "The form expired or came from another site; reload the page and retry."
        )

    @app.errorhandler(RequestEntityTooLarge)
    def _too_large(exc: RequestEntityTooLarge) -> Any:
        limit = settings.max_upload_bytes // 1024
        return _error(
            413, "too_large", f"The upload is too large; send an image of at most {limit} KiB."
        )

    @app.errorhandler(SecurityError)
    def _bad_host(exc: SecurityError) -> Any:  # no page: URLs cannot be built for a foreign host
        return jsonify(
            error="bad_host",
            detail="This app does not answer to that host name; use its configured name or "
            "127.0.0.1 (add names with CAPTCHAOPS_ALLOWED_HOSTS).",
        ), 400

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException) -> Any:
        return _error(
            exc.code or 500, exc.name.lower().replace(" ", "_"), exc.description or exc.name
        )

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Any:
        app.logger.exception("unexpected error")
        return _error(
            500, "internal", "Something went wrong on our side; retry, then check the app log."
        )

    def _error(status: int, error: str, detail: str) -> Any:
        """A JSON error for the API and health paths, the page with a message everywhere else."""
        if request.path.startswith("/api/") or request.path == "/healthz":
            return jsonify(error=error, detail=detail), status
        return render_template("index.html", error=detail, waiting=demo.waiting()), status

    return app


def run(settings: Settings, port: int | None = None, host: str | None = None) -> None:
    """Serve the web app with waitress (a production WSGI server) until interrupted."""
    waitress.serve(
        create_app(settings),
        host=host or settings.host,
        port=port or settings.app_port,
        ident="captchaops",
        max_request_body_size=settings.max_upload_bytes * 8,
        **SERVER_LIMITS,
    )
