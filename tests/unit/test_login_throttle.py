"""The tracking server's failed-login limit, in front of a tiny basic-auth app (the real server's
side is in tests/integration/test_team_secrets.py)."""

from __future__ import annotations

import base64

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from captchaops.stack.login_throttle import LoginThrottle, account_of


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


async def whoami(request: Request) -> JSONResponse:
    """401 unless ed / right-password, like MLflow's basic-auth."""
    if request.headers.get("authorization") != basic("ed", "right-password")["Authorization"]:
        return JSONResponse({"error_code": "UNAUTHENTICATED"}, status_code=401)
    return JSONResponse({"user": "ed"})


def client(clock: Clock, per_minute: int = 3) -> TestClient:
    app = Starlette(routes=[Route("/whoami", whoami)])
    return TestClient(LoginThrottle(app, per_minute, clock))


def test_failed_logins_past_the_limit_answer_429_until_a_minute_passes() -> None:
    clock = Clock()
    http = client(clock)
    for _ in range(3):
        assert http.get("/whoami", headers=basic("ed", "guess")).status_code == 401
    refused = http.get("/whoami", headers=basic("ed", "right-password"))
    assert refused.status_code == 429
    assert refused.json()["error_code"] == "RESOURCE_EXHAUSTED"
    assert "at most 3 a minute" in refused.json()["message"]
    assert refused.headers["Retry-After"] == "60"
    assert http.get("/whoami", headers=basic("ana", "guess")).status_code == 401  # other account
    assert http.get("/whoami").status_code == 401  # a challenge, not a guess: passed on
    clock.now += 61
    assert http.get("/whoami", headers=basic("ed", "right-password")).status_code == 200


def test_good_logins_and_requests_without_credentials_are_never_counted() -> None:
    clock = Clock()
    http = client(clock, per_minute=1)
    for _ in range(5):
        assert http.get("/whoami", headers=basic("ed", "right-password")).status_code == 200
        assert http.get("/whoami").status_code == 401
    assert http.get("/whoami", headers=basic("ed", "guess")).status_code == 401
    assert http.get("/whoami", headers=basic("ed", "guess")).status_code == 429


def test_the_account_is_read_from_basic_auth_only() -> None:
    assert account_of(basic("ed", "pw:with:colons")["Authorization"].encode()) == "ed"
    assert account_of(b"Bearer token") == ""
    assert account_of(b"Basic !!!") == ""
