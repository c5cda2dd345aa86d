"""Team-mode access checks: one line that names the fix, from what the tracking server says."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from captchaops.access import AccessError, Need, _level, check, denied, explain, refused_login
from captchaops.settings import Settings, load_settings


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.mlflow/credentials
    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(key, raising=False)
    return load_settings(home=tmp_path / "home", tracking_uri="http://127.0.0.1:9")


def test_a_refused_login_says_where_a_login_goes(settings: Settings) -> None:
    line = refused_login(settings, None)
    assert "needs a login (401)" in line and "\n" not in line
    assert "CAPTCHAOPS_TRACKING_USERNAME" in line and "~/.mlflow/credentials" in line
    assert str(settings.home_dir / ".env") in line
    assert "refused user 'rita' (401)" in refused_login(settings, "rita")


def test_a_denial_names_account_action_role_and_permission(settings: Settings) -> None:
    line = denied(settings, "rita", "train", [Need("registered_model", "text-captcha")])
    assert line.startswith("user 'rita' may not train text-captcha: that needs the editor role")
    assert "EDIT on registered model text-captcha" in line


def test_tracking_errors_become_the_fix(settings: Settings) -> None:
    four01 = "API request to endpoint /api/2.0/mlflow/registered-models/get failed with error code 401 != 200"
    assert "needs a login" in (explain(settings, four01) or "")
    four03 = "API request to endpoint /api/2.0/mlflow/runs/create failed with error code 403 != 200"
    assert "editor role" in (explain(settings, four03) or "")
    assert explain(settings, "RESOURCE_DOES_NOT_EXIST: version 401 of m") is None


def test_levels_come_from_grants_with_mlflow_default_read() -> None:
    grants = [
        {"resource_type": "registered_model", "resource_pattern": "m", "permission": "EDIT"},
        {"resource_type": "experiment", "resource_pattern": "*", "permission": "MANAGE"},
    ]
    assert _level(grants, "registered_model", "m") == 2
    assert _level(grants, "registered_model", "other") == 1  # default READ
    assert _level(grants, "experiment", "7") == 3


class _Server(BaseHTTPRequestHandler):
    answers: dict[str, tuple[int, object]] = {}

    def do_GET(self) -> None:
        status, body = self.answers.get(self.path.split("?")[0], (404, {}))
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[tuple[str, dict[str, tuple[int, object]]]]:
    answers: dict[str, tuple[int, object]] = {}
    handler = type("Handler", (_Server,), {"answers": answers})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", answers
    finally:
        httpd.shutdown()


def test_check_against_a_server(
    settings: Settings, server: tuple[str, dict[str, tuple[int, object]]]
) -> None:
    url, answers = server
    plain = settings.model_copy(update={"tracking_uri": url})
    check(plain, "train")  # no basic-auth (404): nothing to check
    answers["/api/3.0/mlflow/users/current/permissions"] = (401, {})
    with pytest.raises(AccessError, match="needs a login"):
        check(plain, "models")
    from pydantic import SecretStr

    rita = plain.model_copy(
        update={"tracking_username": "rita", "tracking_password": SecretStr("x" * 12)}
    )
    answers["/api/3.0/mlflow/users/current/permissions"] = (
        200,
        {"is_admin": False, "permissions": []},
    )
    answers["/api/2.0/mlflow/registered-models/get"] = (200, {"registered_model": {"name": "m"}})
    check(rita, "models")  # reading needs only the login
    with pytest.raises(AccessError, match="user 'rita' may not promote"):
        check(rita, "promote")
    answers["/api/3.0/mlflow/users/current/permissions"] = (200, {"is_admin": True})
    check(rita, "promote")
