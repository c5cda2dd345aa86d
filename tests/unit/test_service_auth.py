"""Host checks and the serving token: foreign Host headers are refused (DNS rebinding), guarded
model-server endpoints need the token in team mode, and only trusted requests are marked so."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from pydantic import SecretStr
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from captchaops import service_auth
from captchaops.serving.guard import Guard
from captchaops.settings import Settings, load_settings

TOKEN = "s3cret-token"
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # starlette's TestClient


def settings_for(tmp_path: Path, **overrides: object) -> Settings:
    return load_settings(home=tmp_path, **overrides)


@pytest.mark.parametrize(
    ("host", "ok"),
    [
        ("127.0.0.1:8888", True),
        ("localhost", True),
        ("LOCALHOST:1", True),
        ("[::1]:8888", True),
        ("staging:8889", True),  # named by a configured URL
        ("models.example.com", True),  # CAPTCHAOPS_ALLOWED_HOSTS
        ("a.team.example.org", True),  # a subdomain entry
        ("attacker.example", False),
        ("127.0.0.1.attacker.example", False),
        ("", False),
        (None, False),
        ("user@127.0.0.1", False),
    ],
)
def test_only_configured_and_loopback_hosts_are_allowed(
    tmp_path: Path, host: str | None, ok: bool
) -> None:
    settings = settings_for(
        tmp_path,
        staging_url="http://staging:8889",
        allowed_hosts="models.example.com, .team.example.org",
    )
    assert service_auth.host_allowed(host, service_auth.allowed_hosts(settings)) is ok


def test_the_token_or_the_service_account_is_accepted(tmp_path: Path) -> None:
    settings = settings_for(
        tmp_path, serving_token=SecretStr(TOKEN), service_password=SecretStr("pw")
    )
    basic = base64.b64encode(f"{settings.service_username}:pw".encode()).decode()
    assert service_auth.token_accepted(f"Bearer {TOKEN}", settings)
    assert service_auth.token_accepted(f"Basic {basic}", settings)
    for wrong in (None, "", "Bearer nope", f"Bearer {TOKEN}x", "Basic !!", "Token " + TOKEN):
        assert not service_auth.token_accepted(wrong, settings)
    assert service_auth.bearer_headers(settings) == {"Authorization": f"Bearer {TOKEN}"}


def tiny_app(settings: Settings, alias: str) -> TestClient:
    """A Starlette app behind the Guard whose endpoints say whether the request was trusted."""

    async def echo(request: Request) -> JSONResponse:
        return JSONResponse({"trusted": request.scope["state"]["trusted"]})

    app = Starlette(
        routes=[
            Route(path, echo, methods=["GET", "POST"])
            for path in ("/invocations", "/reload", "/metrics", "/ping")
        ]
    )
    return TestClient(Guard(app, settings, alias), base_url="http://127.0.0.1:8888")


def test_a_foreign_host_gets_a_400_with_a_json_reason(tmp_path: Path) -> None:
    client = tiny_app(settings_for(tmp_path), "production")
    answer = client.get("/ping", headers={"Host": "attacker.example"})
    assert answer.status_code == 400
    assert answer.json()["error"] == "bad_host"
    assert client.get("/ping").status_code == 200


@pytest.mark.parametrize(
    ("alias", "production_needs_token", "guarded"),
    [
        ("production", False, {"/reload", "/metrics"}),
        ("production", True, {"/reload", "/metrics", "/invocations"}),
        ("staging", False, {"/reload", "/metrics", "/invocations"}),
    ],
)
def test_team_mode_guards_reload_metrics_and_non_production_scoring(
    tmp_path: Path, alias: str, production_needs_token: bool, guarded: set[str]
) -> None:
    settings = settings_for(
        tmp_path,
        auth=True,
        serving_token=SecretStr(TOKEN),
        production_needs_token=production_needs_token,
    )
    client = tiny_app(settings, alias)
    for path in ("/invocations", "/reload", "/metrics", "/ping"):
        anonymous = client.post(path)
        if path in guarded:
            assert anonymous.status_code == 401, path
            assert anonymous.json()["error"] == "unauthorized"
            assert anonymous.headers["WWW-Authenticate"].startswith("Bearer")
        else:
            assert anonymous.json() == {"trusted": False}, path
        with_token = client.post(path, headers={"Authorization": f"Bearer {TOKEN}"})
        assert with_token.json() == {"trusted": True}, path


def test_locally_every_request_is_trusted_and_nothing_needs_a_token(tmp_path: Path) -> None:
    client = tiny_app(settings_for(tmp_path), "staging")
    for path in ("/invocations", "/reload", "/metrics"):
        assert client.post(path).json() == {"trusted": True}


def test_counting_all_traffic_is_a_setting(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, auth=True, serving_token=SecretStr(TOKEN), live_traffic="all")
    assert tiny_app(settings, "production").post("/invocations").json() == {"trusted": True}


def test_the_web_app_refuses_a_foreign_host_on_pages_and_api(tmp_path: Path) -> None:
    from captchaops.webapp.app import create_app
    from tests.unit.test_bounded_json import free_port

    settings = settings_for(
        tmp_path,
        tracking_uri=f"http://127.0.0.1:{free_port()}",
        production_port=free_port(),
        staging_port=free_port(),
    )
    client = create_app(settings).test_client()
    for path in ("/", "/api/health", "/healthz", "/review"):
        answer = client.get(path, headers={"Host": "rebound.example:8080"})
        assert answer.status_code == 400, path
        assert answer.json["error"] == "bad_host", path
    assert client.get("/healthz", headers={"Host": "127.0.0.1:8080"}).status_code == 200
