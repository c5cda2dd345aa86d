"""The web app's browser-facing guards: no cross-site posts to the API, session cookies that stay
on this site (Secure behind TLS), and a review login that expires."""

from __future__ import annotations

import io
import time
from pathlib import Path

import pytest
from flask.testing import FlaskClient
from pydantic import SecretStr

from captchaops.settings import Settings, load_settings
from captchaops.webapp import reviewers
from captchaops.webapp.app import create_app
from tests.unit.test_bounded_json import free_port

PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 64


def settings_for(tmp_path: Path, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "home": tmp_path,
        "tracking_uri": f"http://127.0.0.1:{free_port()}",
        "production_port": free_port(),
        "staging_port": free_port(),
    }
    return load_settings(**(values | overrides))


@pytest.fixture()
def client(tmp_path: Path) -> FlaskClient:
    return create_app(settings_for(tmp_path), timeout=0.5).test_client()


def form_post(client: FlaskClient, headers: dict[str, str]) -> tuple[int, dict]:
    answer = client.post(
        "/api/predict",
        data={"image": (io.BytesIO(PNG), "x.png")},
        content_type="multipart/form-data",
        headers=headers,
    )
    return answer.status_code, answer.json or {}


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "https://evil.example"},
        {"Origin": "null"},
        {"Origin": "http://localhost.evil.example"},
        {"Sec-Fetch-Site": "cross-site", "Origin": "https://evil.example"},
        {"Sec-Fetch-Site": "same-site", "Origin": "http://other.localhost"},
        {"Sec-Fetch-Site": "cross-site"},
    ],
)
def test_a_cross_site_form_post_to_the_api_is_refused(
    client: FlaskClient, headers: dict[str, str]
) -> None:
    status, body = form_post(client, headers)
    assert status == 403 and body["error"] == "cross_site"
    assert "another site" in body["detail"]
    answer = client.post("/api/feedback", json={"image": "", "label": "x"}, headers=headers)
    assert answer.status_code == 403 and answer.json["error"] == "cross_site"


@pytest.mark.parametrize(
    "headers",
    [
        {},  # a script: curl -F image=@x.png
        {"Origin": "http://localhost"},
        {"Sec-Fetch-Site": "same-origin", "Origin": "http://localhost"},
        {"Sec-Fetch-Site": "none"},
    ],
)
def test_scripts_and_the_apps_own_pages_still_post(
    client: FlaskClient, headers: dict[str, str]
) -> None:
    status, body = form_post(client, headers)
    assert status != 403 and body.get("error") != "cross_site", body


@pytest.mark.parametrize("secure", [False, True])
def test_the_session_cookie_is_httponly_lax_and_secure_when_set(
    tmp_path: Path, secure: bool
) -> None:
    app = create_app(settings_for(tmp_path, app_secure_cookies=secure), timeout=0.5)
    cookie = app.test_client().get("/").headers.get("Set-Cookie", "")
    assert cookie.startswith("session=")
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie
    assert ("; Secure" in cookie) is secure


def test_the_reviewer_marker_expires_and_follows_the_token() -> None:
    settings = Settings(review_token=SecretStr("t" * 32), review_login_seconds=3600)
    now = time.time()
    issued = reviewers.marker(settings, now)
    assert reviewers.marker_valid(settings, issued, now + 3599)
    assert not reviewers.marker_valid(settings, issued, now + 3601)
    assert not reviewers.marker_valid(settings, reviewers.marker(settings, now + 600), now)
    renewed = settings.model_copy(update={"review_token": SecretStr("u" * 32)})
    assert not reviewers.marker_valid(renewed, issued, now + 1)
    at, _, digest = issued.partition(".")
    assert not reviewers.marker_valid(settings, f"{int(at) + 3000}.{digest}", now + 3599)
    assert not reviewers.marker_valid(settings, "", now)
    assert not reviewers.marker_valid(settings, "x.y", now)
