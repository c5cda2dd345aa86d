"""The approvals page: each scheme's production requests waiting for a second account, and the
button that approves one through the promotion service (issue 37).

The app holds no promotion key and decides nothing: it asks the service (`promotions_url`) for
each scheme's pending requests and sends an approval to it with the visitor's own tracking-server
login (HTTP Basic, team mode), so the service checks who approves: a reader, or the account that
asked, gets the service's refusal, shown as text. Without accounts (local mode) the page lists
requests and points at `captchaops approve`, since it cannot say who approves.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import httpx
from flask import Blueprint, flash, redirect, render_template, request, url_for

from captchaops.scheme_names import model_name_problem
from captchaops.settings import Settings
from captchaops.stack.promotions_wire import exchange
from captchaops.webapp.service import Demo
from captchaops.webapp.tracking_client import TrackingError

LIST_TIMEOUT_S = 15.0
APPROVE_TIMEOUT_S = 300.0
"""An approval of a gate request scores both versions on the frozen set again before it moves."""
MAX_SCHEMES = 50
"""Schemes the page asks about (the configured one first, then by name)."""
MAX_ID = 64


class ServiceRefused(Exception):
    """The service did not do what was asked: the HTTP status to answer with and one line."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail


@dataclass
class Scheme:
    """One scheme as the page shows it: its pending requests, or why they cannot be listed."""

    name: str
    requests: list[dict[str, str]] = field(default_factory=list)
    error: str | None = None


class Service:
    """The promotion service as the page calls it, with the visitor's login."""

    def __init__(self, settings: Settings) -> None:
        self.url = (settings.promotions_url or "").rstrip("/")
        self.auth = settings.auth

    def pending(self, model: str, login: tuple[str, str] | None) -> list[dict[str, str]]:
        """The pending requests of `model`, oldest first."""
        answer = self._ask("GET", "/requests", {"model": model}, login, LIST_TIMEOUT_S)
        found = answer.get("requests")
        if not isinstance(found, list):
            raise ServiceRefused(502, self._odd())
        return [
            {k: str(v) for k, v in item.items() if isinstance(v, str | int)}
            for item in found
            if isinstance(item, dict)
        ]

    def approve(self, model: str, request_id: str, login: tuple[str, str] | None) -> str:
        """Approve request `request_id` of `model`; the service's one line about the move."""
        body = {"model": model, "request": request_id}
        answer = self._ask("POST", "/approve", body, login, APPROVE_TIMEOUT_S)
        line = answer.get("line")
        if not isinstance(line, str):
            raise ServiceRefused(502, self._odd())
        return line

    def _ask(
        self,
        method: str,
        path: str,
        fields: dict[str, str],
        login: tuple[str, str] | None,
        timeout: float,
    ) -> dict[str, Any]:
        try:
            code, found = exchange(self.url, method, path, fields, login, timeout)
        except httpx.HTTPError as exc:
            raise ServiceRefused(
                503,
                f"The promotion service does not answer ({type(exc).__name__}); start it with "
                "`captchaops promotions serve` or check CAPTCHAOPS_PROMOTIONS_URL.",
            ) from exc
        if found is None:
            raise ServiceRefused(502, self._odd())
        if code >= 400:
            detail = found.get("detail") or found.get("error") or f"HTTP {code}"
            lines = str(detail).splitlines()
            raise ServiceRefused(code if code < 500 else 503, lines[0] if lines else f"HTTP {code}")
        return found

    @staticmethod
    def _odd() -> str:
        return (
            "The promotion service gave an answer the app does not understand; check that "
            "CAPTCHAOPS_PROMOTIONS_URL names the promotion service."
        )


def make_blueprint(demo: Demo) -> Blueprint:
    """The approvals page's routes."""
    bp = Blueprint("approvals", __name__)
    settings = demo.settings

    @bp.get("/approvals")
    def pending() -> Any:
        """Every scheme's pending production requests, with an approve button in team mode."""
        return _listing(200)

    @bp.post("/approvals/approve")
    def approve() -> Any:
        """Approve one request with the visitor's login; the service's refusal as text."""
        model = request.form.get("model", "")
        request_id = request.form.get("request", "")
        if not settings.promotions_url:
            return _listing(409)
        if not settings.auth:
            return _listing(
                403,
                error="Approving here needs team mode (each approver's own tracking-server "
                f"login); run `captchaops approve {request_id[:MAX_ID]} --model-name "
                f"{model[:MAX_ID]}` instead.",
            )
        problem = model_name_problem(model)
        if problem or not request_id or len(request_id) > MAX_ID:
            return _listing(400, error=problem or "Choose a request to approve from the list.")
        try:
            line = Service(settings).approve(model, request_id, _login())
        except ServiceRefused as exc:
            return _listing(exc.status, error=exc.detail)
        flash(f"Approved {request_id}: {line}")
        return redirect(url_for("approvals.pending"), code=303)

    def _listing(status: int, error: str | None = None) -> tuple[str, int]:
        if not settings.promotions_url:
            return render_template("approvals.html", configured=False, error=error), status
        service = Service(settings)
        login = _login()
        schemes = [Scheme(name) for name in _scheme_names(demo)]
        for scheme in schemes:
            try:
                scheme.requests = service.pending(scheme.name, login)
            except ServiceRefused as exc:
                scheme.error = exc.detail
        return render_template(
            "approvals.html",
            configured=True,
            schemes=schemes,
            can_approve=settings.auth,
            user=login[0] if login else None,
            error=error,
        ), status

    return bp


def _login() -> tuple[str, str] | None:
    """The visitor's tracking-server login (team mode's Basic header), passed on as it came."""
    auth = request.authorization
    if auth is None or auth.type != "basic" or not auth.username:
        return None
    return auth.username, auth.password or ""


def _scheme_names(demo: Demo) -> list[str]:
    """The schemes to list: the app's own first, then the registered models the tracking server
    names (only the app's own when it cannot say)."""
    own = demo.settings.model_name
    try:
        found = demo.tracking.call(
            "GET", "registered-models/search", params={"max_results": MAX_SCHEMES}
        )
    except TrackingError:
        return [own]
    names = {
        str(m.get("name"))
        for m in found.get("registered_models") or []
        if isinstance(m, dict) and isinstance(m.get("name"), str)
    }
    others = sorted(n for n in names - {own} if model_name_problem(n) is None)
    return [own, *others][:MAX_SCHEMES]
