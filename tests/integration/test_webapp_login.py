"""The web app in team mode asks for a tracking-server account: a real basic-auth MLflow server
(the fixture of test_registry_team: admin, editor `ed`, reader `rita`) checks every login;
good ones pass, bad or missing ones get 401 with the basic-auth challenge, repeated failures
get 429, /healthz stays open, and the review token still opens the review paths."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from flask import Flask
from flask.testing import FlaskClient
from pydantic import SecretStr

from captchaops.settings import Settings
from captchaops.webapp.app import create_app
from tests.fixtures.stack import Tracking, free_port
from tests.integration.test_registry_team import EDITOR_PASSWORD, team

__all__ = ["team"]  # the module's own basic-auth tracking server, reused from test_registry_team

pytestmark = pytest.mark.slow
FAILURES = 3


def team_app(base: Settings, **overrides: object) -> Flask:
    """The web app in team mode, logged in to the tracking server as `base`'s account, with no
    model server behind it."""
    closed = f"http://127.0.0.1:{free_port()}"
    values: dict[str, object] = {
        "auth": True,
        "production_url": closed,
        "staging_url": closed,
        "app_login_failures_per_minute": FAILURES,
    }
    return create_app(base.model_copy(update=values | overrides), timeout=2.0)


@pytest.fixture(scope="module")
def client(team: dict[str, Settings]) -> Iterator[FlaskClient]:
    """A test client of one team-mode app (its failure counts persist through the module)."""
    with team_app(team["admin"]).test_client() as test_client:
        yield test_client


def rita(team: dict[str, Settings]) -> tuple[str, str]:
    """The reader's user name and password."""
    password = team["rita"].tracking_password
    assert password is not None
    return "rita", password.get_secret_value()


def test_a_tracking_account_opens_the_page_and_the_api(
    client: FlaskClient, team: dict[str, Settings]
) -> None:
    page = client.get("/", auth=rita(team))
    assert page.status_code == 200, page.text
    assert "WWW-Authenticate" not in page.headers
    api = client.get("/api/review", auth=("ed", EDITOR_PASSWORD))
    assert api.status_code == 200, api.text
    assert "pending" in (api.json or {})


def test_no_or_bad_credentials_get_the_basic_auth_challenge(
    client: FlaskClient, team: dict[str, Settings]
) -> None:
    for path in ("/", "/api/feedback", "/review"):
        anonymous = client.get(path)
        assert anonymous.status_code == 401, path
        assert anonymous.headers["WWW-Authenticate"].startswith('Basic realm="captchaops"')
    api = client.post("/api/predict", data=b"x", content_type="application/octet-stream")
    assert api.status_code == 401 and (api.json or {})["error"] == "unauthorized"
    assert "MLflow" in api.json["detail"]
    wrong = client.get("/api/feedback", auth=("ed", "not-the-password"))
    assert wrong.status_code == 401 and wrong.json["error"] == "unauthorized"
    assert wrong.headers["WWW-Authenticate"].startswith("Basic ")
    nobody = client.get("/", auth=("nobody", "whatever-password"))
    assert nobody.status_code == 401 and "<p>" in nobody.text
    assert client.get("/", headers={"Authorization": "Basic %%%"}).status_code == 401


def test_health_stays_open(client: FlaskClient) -> None:
    health = client.get("/healthz")
    assert health.status_code == 200 and health.json == {"status": "ok"}


def test_repeated_failures_are_throttled_per_account(team: dict[str, Settings]) -> None:
    app = team_app(team["admin"])
    with app.test_client() as fresh:
        for _ in range(FAILURES):
            assert fresh.get("/api/review", auth=("ed", "guess")).status_code == 401
        throttled = fresh.get("/api/review", auth=("ed", "guess"))
        assert throttled.status_code == 429, throttled.text
        assert throttled.json["error"] == "login_rate_limited"
        assert int(throttled.headers["Retry-After"]) >= 1
        # Even the right password waits now: the attacker cannot tell which guess was good.
        assert fresh.get("/api/review", auth=("ed", EDITOR_PASSWORD)).status_code == 429
        assert fresh.get("/api/review", auth=rita(team)).status_code == 200


def test_a_good_login_is_remembered_and_a_bad_one_is_not(team: dict[str, Settings]) -> None:
    app = team_app(team["admin"], app_login_failures_per_minute=100)
    with app.test_client() as fresh:
        assert fresh.get("/api/review", auth=rita(team)).status_code == 200
        assert fresh.get("/api/review", auth=("rita", "a-wrong-one")).status_code == 401
        assert fresh.get("/api/review", auth=rita(team)).status_code == 200


def test_the_review_token_still_opens_the_review_api(team: dict[str, Settings]) -> None:
    token = "review-token-for-login-tests-0123456789"
    app = team_app(team["admin"], review_token=SecretStr(token))
    with app.test_client() as fresh:
        bearer = {"Authorization": f"Bearer {token}"}
        offered = fresh.post("/api/review", json={"text": "A"}, headers=bearer)
        assert offered.status_code == 400 and offered.json["error"] == "empty"
        assert fresh.get("/api/feedback", headers=bearer).status_code == 401
        wrong = {"Authorization": "Bearer not-the-token"}
        assert fresh.post("/api/review", json={}, headers=wrong).status_code == 401


def test_a_tracking_server_without_accounts_fails_closed(
    tracking_server: Tracking, tmp_path_factory: pytest.TempPathFactory
) -> None:
    base = Settings(home=tmp_path_factory.mktemp("no-auth"), tracking_uri=tracking_server.uri)
    app = team_app(base, auth=False, app_login=True)
    with app.test_client() as fresh:
        refused = fresh.get("/api/review", auth=("anyone", "anything-at-all"))
        assert refused.status_code == 503 and refused.json["error"] == "login_unavailable"
        assert "without basic-auth" in refused.json["detail"]


def test_local_mode_asks_nobody(
    tracking_server: Tracking, tmp_path_factory: pytest.TempPathFactory
) -> None:
    base = Settings(home=tmp_path_factory.mktemp("local"), tracking_uri=tracking_server.uri)
    assert not base.web_login and base.model_copy(update={"auth": True}).web_login
    app = team_app(base, auth=False)
    with app.test_client() as fresh:
        assert fresh.get("/api/review").status_code == 200
