"""The promotion service's own checks, before any work reaches the registry: who may call (a
loopback peer locally, a Basic login in team mode), what a body may hold, and the signature that
tells a request the service recorded from one written around it.

Team mode's account check (`access.require`) runs against a loopback HTTP server that plays back
recorded tracking-server answers: it fails closed on each answer it does not understand, where the
commands' pre-check (`access.check`) still lets them through."""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import SecretStr
from starlette.testclient import TestClient

from captchaops.access import AccessError, Unverified, check, require
from captchaops.registry.requests import Request, provenance_problem, signed_bytes
from captchaops.settings import Settings, load_settings, write_env
from captchaops.stack import control
from captchaops.stack.promotions import WORK_MEMORY_BYTES, Caller, LimitedWork, Refused, create_app
from captchaops.stack.services import build_services
from captchaops.stack.store import Store

JSON = {"content-type": "application/json"}


def client(tmp_path: Path, **settings: object) -> TestClient:
    """The service's app for settings in tmp_path (nothing listens at its tracking URI)."""
    values = {"home": tmp_path, "tracking_uri": "http://127.0.0.1:9", **settings}
    return TestClient(create_app(load_settings(**values)), base_url="http://127.0.0.1")


def test_local_mode_answers_loopback_peers_only(tmp_path: Path) -> None:
    answer = client(tmp_path).post("/promote", json={"version": "2", "reason": "x"})
    assert answer.status_code == 403  # the test client's peer is "testclient", not loopback
    assert answer.json() == {
        "error": "loopback only",
        "detail": "in local mode the promotion service answers this host only; use team mode "
        "(CAPTCHAOPS_AUTH=true) to reach it from elsewhere",
    }


@pytest.mark.parametrize(
    ("authorization", "detail"),
    [
        (None, "the promotion service needs a login"),
        ("Bearer abc", "the promotion service needs a login"),
        ("Basic !!!", "the login header is not Basic"),
        ("Basic " + base64.b64encode(b"nobody").decode(), "the login header names nobody"),
        ("Basic " + base64.b64encode(b"alice:").decode(), "the login header has no password"),
    ],
)
def test_team_mode_needs_a_basic_login(
    tmp_path: Path, authorization: str | None, detail: str
) -> None:
    headers = {"authorization": authorization} if authorization else {}
    answer = client(tmp_path, auth=True).post(
        "/approve", json={"request": "abcdef"}, headers=headers
    )
    assert answer.status_code == 401
    assert answer.json()["error"] == "login required" and answer.json()["detail"].startswith(detail)


def test_the_tracking_server_must_answer_who_logged_in(tmp_path: Path) -> None:
    login = base64.b64encode(b"ed:pw").decode()
    answer = client(tmp_path, auth=True).get(
        "/requests", headers={"authorization": f"Basic {login}"}
    )
    assert answer.status_code == 503
    assert answer.json() == {
        "error": "tracking server unreachable",
        "detail": "the promotion service cannot reach http://127.0.0.1:9",
    }


@pytest.mark.parametrize(
    ("body", "status", "error"),
    [
        (b"[1]", 400, "bad json"),
        (b"{", 400, "bad json"),
        (b'{"model": "../x"}', 400, "bad model"),
        (b'{"alias": "staging"}', 400, "bad alias"),
        (b'{"margin": "big", "auto": true}', 403, "loopback only"),
        (b"x" * (64 * 1024 + 1), 413, "too large"),
        (b"[" * 5000, 400, "bad json"),  # deeper than the parser recurses: no 500
    ],
)
def test_bodies_are_checked_before_anyone_is_asked(
    tmp_path: Path, body: bytes, status: int, error: str
) -> None:
    answer = client(tmp_path).post("/promote", content=body, headers=JSON)
    assert (answer.status_code, answer.json()["error"]) == (status, error)
    assert set(answer.json()) == {"error", "detail"}


@pytest.mark.parametrize("margin", [b"NaN", b"Infinity", b"-Infinity", b"1" + b"0" * 400])
def test_a_gate_threshold_must_be_a_finite_number(tmp_path: Path, margin: bytes) -> None:
    """NaN compares false both ways, so a NaN margin would pass any candidate."""
    values: dict[str, object] = {"home": tmp_path, "tracking_uri": "http://127.0.0.1:9"}
    local = TestClient(
        create_app(load_settings(**values)),
        base_url="http://127.0.0.1",
        client=("127.0.0.1", 50000),
    )
    answer = local.post(
        "/promote", content=b'{"auto": true, "margin": ' + margin + b"}", headers=JSON
    )
    assert (answer.status_code, answer.json()["error"]) == (400, "bad margin")
    assert "finite" in answer.json()["detail"]


@pytest.mark.parametrize(
    ("headers", "body", "status", "error"),
    [
        ({"content-type": "application/x-www-form-urlencoded"}, b"reason=x", 415, "not json"),
        ({"content-type": "text/plain"}, b'{"version": "2"}', 415, "not json"),
        ({}, b'{"version": "2"}', 415, "not json"),
        (JSON | {"origin": "https://evil.example"}, b'{"version": "2"}', 403, "browser request"),
        (JSON | {"sec-fetch-site": "cross-site"}, b'{"version": "2"}', 403, "browser request"),
    ],
)
def test_a_page_in_a_browser_cannot_post_to_the_local_service(
    tmp_path: Path, headers: dict[str, str], body: bytes, status: int, error: str
) -> None:
    """Local mode answers loopback peers only, and a browser on the developer's machine is one:
    a form (no JSON type) or a script (Origin, Sec-Fetch-Site) from any page is refused before
    the body is read."""
    local = TestClient(
        create_app(load_settings(home=tmp_path, tracking_uri="http://127.0.0.1:9")),
        base_url="http://127.0.0.1",
        client=("127.0.0.1", 50000),
    )
    answer = local.post("/rollback", content=body, headers=headers)
    assert (answer.status_code, answer.json()["error"]) == (status, error)
    query = local.post("/rollback?reason=x", json={})
    assert (query.status_code, query.json()["error"]) == (400, "bad query")


def test_a_foreign_host_name_is_refused(tmp_path: Path) -> None:
    answer = client(tmp_path).post("/promote", json={}, headers={"host": "evil.example"})
    assert answer.status_code == 400 and answer.json()["error"] == "bad host"


REQUEST = Request(
    id="0123456789abcdef", model="text-captcha", alias="production", from_version="1",
    to_version="2", kind="manual", requester="ed", account="ed", verdict="ok", reason="fonts",
    at="2026-12-07T18:00:00+00:00", forced=False, thresholds={"forced": 0.0},
)  # fmt: skip


def test_only_the_services_signature_over_this_run_and_these_fields_verifies() -> None:
    key = Ed25519PrivateKey.generate()
    signed = replace(REQUEST, signature=base64.b64encode(key.sign(signed_bytes(REQUEST))).decode())
    assert provenance_problem(signed, key.public_key()) is None
    assert provenance_problem(REQUEST, key.public_key()) == (
        "request 01234567 was not recorded by the promotion service"
    )
    for changed in (
        {"id": "fedcba9876543210"},  # the signature copied onto another run
        {"to_version": "3"},
        {"account": "alice"},
        {"reason": "other"},
        {"forced": True},
        {"thresholds": {"forced": 1.0}},
    ):
        problem = provenance_problem(replace(signed, **changed), key.public_key())  # type: ignore[arg-type]
        assert problem is not None and "signature does not verify" in problem, changed
    other = Ed25519PrivateKey.generate().public_key()
    assert "signature does not verify" in (provenance_problem(signed, other) or "")
    assert "does not verify" in (
        provenance_problem(replace(signed, signature="not base64!"), key.public_key()) or ""
    )


PERMISSIONS = "/api/3.0/mlflow/users/current/permissions"
MODEL = "/api/2.0/mlflow/registered-models/get"
EXPERIMENT = "/api/2.0/mlflow/experiments/get-by-name"
CURRENT = "/api/2.0/mlflow/users/current"
Answers = dict[str, tuple[int, object]]


class _Recorded(BaseHTTPRequestHandler):
    """Answers each path with its recorded status and body (JSON, or bytes as they are)."""

    answers: Answers = {}

    def do_GET(self) -> None:
        status, body = self.answers.get(self.path.split("?")[0], (404, {"error_code": "NONE"}))
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def recorded() -> Iterator[tuple[str, Answers]]:
    """A loopback tracking server stand-in: (its URL, the answers it plays back)."""
    answers: Answers = {}
    httpd = ThreadingHTTPServer(
        ("127.0.0.1", 0), type("Handler", (_Recorded,), {"answers": answers})
    )
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", answers
    finally:
        httpd.shutdown()
        httpd.server_close()


def grant(kind: str, pattern: str, permission: str) -> dict[str, str]:
    return {"resource_type": kind, "resource_pattern": pattern, "permission": permission}


EDITOR = {
    PERMISSIONS: (200, {"is_admin": False, "permissions": [
        grant("registered_model", "text-captcha", "EDIT"), grant("experiment", "7", "EDIT"),
    ]}),
    MODEL: (200, {"registered_model": {"name": "text-captcha"}}),
    EXPERIMENT: (200, {"experiment": {"experiment_id": "7"}}),
    CURRENT: (200, {"user": {"username": "ed"}}),
}  # fmt: skip
MISSING = (404, {"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "no such model"})


@pytest.fixture
def ed(
    recorded: tuple[str, Answers], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Settings]:
    """Editor ed's settings against the recorded server, which starts with ed's real answers."""
    monkeypatch.setenv("HOME", str(tmp_path))
    url, answers = recorded
    answers.clear()
    answers.update(EDITOR)
    yield load_settings(
        home=tmp_path, tracking_uri=url, tracking_username="ed",
        tracking_password=SecretStr("ed-password"),
    )  # fmt: skip
    answers.clear()


def test_an_editors_explicit_grants_allow_and_an_admin_needs_none(
    ed: Settings, recorded: tuple[str, Answers]
) -> None:
    for action in ("promote", "rollback", "approve", "models"):
        require(ed, action)
    recorded[1][PERMISSIONS] = (200, {"is_admin": True, "permissions": []})
    require(ed, "promote")


@pytest.mark.parametrize(
    ("changed", "fails_open"),
    [
        ({PERMISSIONS: (404, {})}, True),  # no basic-auth
        ({PERMISSIONS: (500, {"error_code": "INTERNAL_ERROR"})}, True),
        ({PERMISSIONS: (200, b"<html>a proxy page</html>")}, True),
        ({PERMISSIONS: (200, {"permissions": []})}, False),  # no is_admin
        ({PERMISSIONS: (200, {"is_admin": "yes", "permissions": []})}, False),
        ({PERMISSIONS: (200, {"is_admin": False, "permissions": "all"})}, False),
        ({PERMISSIONS: (200, {"is_admin": False, "permissions": ["EDIT"]})}, False),
        ({MODEL: (404, {"error_code": "ENDPOINT_NOT_FOUND"})}, True),
        ({MODEL: (502, b"bad gateway")}, True),
        ({EXPERIMENT: (200, {"experiment": {}})}, True),
    ],
)
def test_an_answer_it_does_not_understand_refuses(
    ed: Settings, recorded: tuple[str, Answers], changed: Answers, fails_open: bool
) -> None:
    recorded[1].update(changed)
    with pytest.raises(Unverified, match=r"does not show what 'ed' may do .*; run it with basic"):
        require(ed, "promote")
    if fails_open:  # the commands' pre-check is unchanged: the command's own call decides
        check(ed, "promote")


def test_an_unreachable_tracking_server_refuses(ed: Settings) -> None:
    dead = ed.model_copy(update={"tracking_uri": "http://127.0.0.1:9"})
    with pytest.raises(Unverified, match=r"\(ConnectError\)"):
        require(dead, "promote")
    check(dead, "promote")


@pytest.mark.parametrize(
    ("grants", "action"),
    [
        ([grant("registered_model", "text-captcha", "READ")], "promote"),
        ([], "models"),  # the server's default READ is no grant
        ([grant("registered_model", "*", "EDIT"), grant("registered_model", "text-captcha", "DENY")],
         "approve"),
        ([grant("registered_model", "text-captcha", "EDIT"), grant("experiment", "7", "READ")],
         "rollback"),
        ([grant("registered_model", "text-captcha", "SUPERUSER")], "promote"),
    ],
)  # fmt: skip
def test_only_an_explicit_grant_at_the_level_allows(
    ed: Settings, recorded: tuple[str, Answers], grants: list[dict[str, str]], action: str
) -> None:
    recorded[1][PERMISSIONS] = (200, {"is_admin": False, "permissions": grants})
    with pytest.raises(AccessError, match=f"user 'ed' may not {action} text-captcha"):
        require(ed, action)


def test_the_registered_model_must_exist(ed: Settings, recorded: tuple[str, Answers]) -> None:
    recorded[1][MODEL] = MISSING
    with pytest.raises(AccessError, match="there is no registered model 'text-captcha'"):
        require(ed, "promote")
    check(ed, "promote")  # the pre-check: whoever makes it may use it
    recorded[1][MODEL] = (403, {"error_code": "PERMISSION_DENIED"})
    with pytest.raises(AccessError, match="user 'ed' may not promote"):
        require(ed, "promote")


def test_an_audit_experiment_not_made_yet_leaves_the_models_grant_to_decide(
    ed: Settings, recorded: tuple[str, Answers]
) -> None:
    recorded[1][EXPERIMENT] = MISSING
    require(ed, "promote")
    recorded[1][PERMISSIONS] = (200, {"is_admin": False, "permissions": []})
    with pytest.raises(AccessError, match="user 'ed' may not promote"):
        require(ed, "promote")


def team_client(settings: Settings) -> TestClient:
    service = settings.model_copy(
        update={"auth": True, "tracking_username": "admin", "tracking_password": None}
    )
    return TestClient(create_app(service), base_url="http://127.0.0.1")


ED = {"authorization": "Basic " + base64.b64encode(b"ed:ed-password").decode()}


def test_the_service_answers_503_when_it_cannot_tell_what_a_caller_may_do(
    ed: Settings, recorded: tuple[str, Answers]
) -> None:
    recorded[1][PERMISSIONS] = (404, {})
    answer = team_client(ed).post("/promote", json={"version": "2", "reason": "x"}, headers=ED)
    assert answer.status_code == 503, answer.text
    assert answer.json()["error"] == "no account check"
    assert "\n" not in answer.json()["detail"]
    recorded[1][PERMISSIONS] = EDITOR[PERMISSIONS]
    recorded[1][MODEL] = MISSING
    answer = team_client(ed).get("/requests", headers=ED)
    assert answer.status_code == 403 and "no registered model" in answer.json()["detail"]


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "error"),
    [
        ("POST", "/promote", {"version": "2", "reason": "x", "approver": "me"}, 400, "unknown field"),
        ("POST", "/promote", {"version": "2", "reason": "x", "force": "yes"}, 400, "bad force"),
        ("POST", "/promote", {"auto": 1}, 400, "bad auto"),
        ("POST", "/rollback", {"version": "2"}, 400, "unknown field"),
        ("POST", "/approve", {"request": "abc", "force": True}, 400, "unknown field"),
        ("POST", "/promote?model=x", {"model": "y"}, 400, "bad query"),
        ("GET", "/requests?model=text-captcha&status=all", None, 400, "unknown field"),
        ("GET", "/requests?model=a&model=b", None, 400, "bad query"),
        ("POST", "/adopted", {}, 404, "no such action"),
        ("POST", "/canary", {"percent": 10.5}, 400, "bad percent"),
        ("POST", "/canary/end", {"tripped": "yes"}, 400, "bad tripped"),
        ("POST", "/stage", {"version": "2", "accuracy": 1.0}, 400, "unknown field"),
        ("POST", "/stage", {}, 400, "no version"),
        ("POST", "/evalset", {"run": "abc", "digest": "0" * 64}, 400, "unknown field"),
        ("POST", "/adopt", {}, 403, "forbidden"),  # ed edits; adopting needs an admin
        ("GET", "/promote", None, 405, "no such action"),
    ],
)  # fmt: skip
def test_what_the_service_does_not_know_is_refused(
    ed: Settings, method: str, path: str, body: object, status: int, error: str
) -> None:
    answer = team_client(ed).request(method, path, json=body, headers=ED)
    assert (answer.status_code, answer.json()["error"]) == (status, error), answer.text
    assert set(answer.json()) == {"error", "detail"}


def test_adopt_asks_the_tracking_server_whether_the_caller_is_an_admin(
    ed: Settings, recorded: tuple[str, Answers]
) -> None:
    answer = team_client(ed).post("/adopt", json={}, headers=ED)
    assert answer.status_code == 403, answer.text
    assert answer.json()["detail"] == (
        "user 'ed' may not adopt text-captcha's aliases: signing what the aliases hold now "
        "needs an admin account"
    )
    recorded[1][PERMISSIONS] = (200, {"permissions": EDITOR[PERMISSIONS][1]["permissions"]})  # type: ignore[index]
    unsure = team_client(ed).post("/adopt", json={}, headers=ED)
    assert (unsure.status_code, unsure.json()["error"]) == (503, "no account check"), unsure.text


def test_only_an_admin_replaces_the_frozen_set(ed: Settings) -> None:
    """An editor who could replace the set the gate judges on could pick one their candidate
    wins on; making the first set stays an editor's."""
    answer = team_client(ed).post("/evalset", json={"run": "abc", "replace": True}, headers=ED)
    assert answer.status_code == 403, answer.text
    assert "may not replace text-captcha's frozen evaluation set" in answer.json()["detail"]


def test_team_mode_up_supervises_the_service_with_its_own_login_in_its_environment(
    tmp_path: Path,
) -> None:
    store = Store(kind="local", destination=str(tmp_path / "artifacts"))
    team = load_settings(home=tmp_path, auth=True, tracking_port=5999, promotions_port=5998)
    spec = {svc.name: svc for svc in build_services(team, store)}["promotions"]
    stored = dict(line.split("=", 1) for line in (tmp_path / ".env").read_text().splitlines())
    password = stored["CAPTCHAOPS_PROMOTIONS_PASSWORD"]  # generated, 0600, not the admin's
    assert password != stored["CAPTCHAOPS_ADMIN_PASSWORD"] and len(password) >= 24
    assert (tmp_path / ".env").stat().st_mode & 0o777 == 0o600
    assert spec.command[1:] == ["promotions", "serve", "--port", "5998"]
    assert (spec.url, spec.health_url) == ("http://127.0.0.1:5998", "http://127.0.0.1:5998/health")
    assert spec.env["CAPTCHAOPS_AUTH"] == "true" and spec.env["CAPTCHAOPS_HOME"] == str(tmp_path)
    assert (
        spec.env["CAPTCHAOPS_TRACKING_USERNAME"]
        == spec.env["MLFLOW_TRACKING_USERNAME"]
        == ("captchaops-promotions")
    )
    assert spec.env["CAPTCHAOPS_TRACKING_PASSWORD"] == password
    assert not any(password in part for part in spec.command)
    local = build_services(load_settings(home=tmp_path / "local"), store)
    assert "promotions" not in {svc.name for svc in local}


def test_compose_gives_the_private_key_to_the_promotion_service_alone() -> None:
    compose = Path(__file__).resolve().parents[2] / "deploy" / "compose.yaml"
    services = yaml.safe_load(compose.read_text())["services"]

    def mounted(name: str) -> set[str]:
        refs = services[name].get("secrets", [])
        return {ref if isinstance(ref, str) else ref["source"] for ref in refs}

    running = [name for name, svc in services.items() if not svc.get("profiles")]
    assert [name for name in running if "promotion_key" in mounted(name)] == ["promotions"]
    for server in ("production", "staging"):
        assert mounted(server) == {"service_password", "promotion_public_key"}
    promotions = services["promotions"]
    assert promotions["command"][1:3] == ["promotions", "serve"]
    assert promotions["environment"]["CAPTCHAOPS_AUTH"] == "true"
    # its own account (made by the one-shot `accounts` job), never the admin's
    assert "promotions_password" in mounted("promotions") | mounted("accounts")
    assert "mlflow_admin_password" not in mounted("promotions")
    env = promotions["environment"]
    assert env["CAPTCHAOPS_TRACKING_USERNAME"] == "captchaops-promotions"
    assert services["train"]["environment"]["CAPTCHAOPS_PROMOTIONS_URL"] == (
        "http://promotions:8890"
    )


def test_up_names_the_running_service_in_the_home_and_down_takes_it_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Commands run with the stack's home find the service without CAPTCHAOPS_PROMOTIONS_URL;
    an explicit one wins, and `down` removes only the URL `up` wrote."""
    monkeypatch.delenv("CAPTCHAOPS_PROMOTIONS_URL", raising=False)
    team = load_settings(home=tmp_path, auth=True, promotions_port=5998)
    spec = {svc.name: svc for svc in build_services(team, Store(kind="local", destination="x"))}
    said: list[str] = []
    control._publish_promotions(team, [spec["promotions"], spec["app"]], said.append)
    assert load_settings(home=tmp_path).promotions_url == "http://127.0.0.1:5998"
    assert said == [f"promotions: commands with this home sign through http://127.0.0.1:5998 "
                    f"({tmp_path / '.env'})"]  # fmt: skip
    assert (tmp_path / ".env").stat().st_mode & 0o777 == 0o600
    monkeypatch.setenv("CAPTCHAOPS_PROMOTIONS_URL", "http://10.0.0.5:8890")
    assert load_settings(home=tmp_path).promotions_url == "http://10.0.0.5:8890"
    monkeypatch.delenv("CAPTCHAOPS_PROMOTIONS_URL")
    control._forget_promotions(team)
    assert load_settings(home=tmp_path).promotions_url is None
    assert "CAPTCHAOPS_ADMIN_PASSWORD=" in (tmp_path / ".env").read_text()  # the rest stays
    write_env(tmp_path / ".env", {"CAPTCHAOPS_PROMOTIONS_URL": "http://10.0.0.5:8890"})
    control._forget_promotions(team)  # a URL someone else wrote is not up's to take
    assert load_settings(home=tmp_path).promotions_url == "http://10.0.0.5:8890"


class _Answering(BaseHTTPRequestHandler):
    """A loopback stand-in at a wrong (or right) CAPTCHAOPS_PROMOTIONS_URL: every POST gets
    `answer` as JSON with HTTP 200."""

    answer: dict[str, object] = {}

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length") or 0))
        data = json.dumps(self.answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


ASKED = {"short_id": "3f9c21ab"}


@pytest.mark.parametrize(
    ("answer", "code", "said"),
    [
        ({"result": "promoted", "line": "@production v1 -> v2", "request": ASKED}, 0,
         "approved 3f9c21ab: @production v1 -> v2"),
        ({"result": "waiting", "line": "needs one more", "request": ASKED}, 0,
         "approval of 3f9c21ab recorded; it still waits: needs one more"),
        ({"result": "rejected", "line": "the gate refuses v2", "request": ASKED}, 3,
         "error: request 3f9c21ab not approved: the gate refuses v2"),
        ({"result": "refused", "line": "not yours", "request": ASKED}, 1,
         "error: request 3f9c21ab refused: not yours"),
        ({"result": "approved?", "line": "x"}, 1, "error: the promotion service at "),
        ({"status": "ok"}, 1, "error: the promotion service at "),  # e.g. another service's /health
    ],
)  # fmt: skip
def test_approve_through_the_service_says_what_happened_and_fails_closed(
    tmp_path: Path, answer: dict[str, object], code: int, said: str
) -> None:
    from typer.testing import CliRunner

    from captchaops.cli import app

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), type("H", (_Answering,), {"answer": answer}))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}"
        env = {"CAPTCHAOPS_HOME": str(tmp_path), "CAPTCHAOPS_PROMOTIONS_URL": url,
               "CAPTCHAOPS_AUTH": None, "CAPTCHAOPS_TRACKING_URI": "http://127.0.0.1:9"}  # fmt: skip
        done = CliRunner(env=env).invoke(app, ["approve", "3f9c21ab"])
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert done.exit_code == code, done.output
    lines = (done.stdout if code == 0 else done.stderr).strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(said), lines
    if said.endswith("service at "):  # an answer it does not know: an error, never a success
        assert "nothing is known to have moved" in lines[0], lines
    assert not (tmp_path / "keys").exists()


def test_the_services_work_runs_where_the_kernel_limits_it(tmp_path: Path) -> None:
    """A worker the kernel stops (here: an address space it cannot start in) is a JSON-able
    503 in one line, not a dead service, and the next action gets a fresh worker."""
    settings = load_settings(home=tmp_path, tracking_uri="http://127.0.0.1:9")
    caller = Caller(account="ed", actor="ed")
    starved = LimitedWork(memory_bytes=1)
    try:
        with pytest.raises(Refused) as stopped:
            starved.run("stage", settings, caller, {"version": "1"})
        assert stopped.value.status == 503 and stopped.value.error == "stopped"
        assert stopped.value.detail.startswith(
            "the promotion service's work on text-captcha ran past its limits (900 s of CPU, 0 MiB"
        )
        starved.memory_bytes = WORK_MEMORY_BYTES
        with pytest.raises(Refused) as refused:  # a worker again: the work itself answers
            starved.run("stage", settings, caller, {})
        assert (refused.value.status, refused.value.error) == (400, "no version")
    finally:
        starved.close()


def test_with_a_service_set_nothing_reaches_the_local_key(tmp_path: Path) -> None:
    """The last line of defence behind the commands' routing: any move that would still sign
    here (a scale-out run's staging, a path not routed yet) is refused in one line, and no key
    is made."""
    from captchaops.registry.aliases import signing_key_dir
    from captchaops.registry.errors import RegistryError

    local = load_settings(home=tmp_path, signing_key_dir=tmp_path / "keys")
    assert signing_key_dir(local) == (tmp_path / "keys").resolve()
    routed = local.model_copy(update={"promotions_url": "http://127.0.0.1:8890"})
    with pytest.raises(RegistryError) as refused:
        signing_key_dir(routed)
    assert str(refused.value) == (
        "this would sign with a local key, but the promotion service at http://127.0.0.1:8890 "
        "signs for this stack: send the work to it (the command does so itself), or unset "
        "CAPTCHAOPS_PROMOTIONS_URL"
    )
    assert not (tmp_path / "keys").exists()


def test_a_failure_the_action_does_not_name_is_one_line_not_a_500(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crafted frozen-set archive (no seed in its labels) raised KeyError in the worker, which
    reached the caller as a 500."""
    from captchaops.stack import promotions

    def broken(scheme: Settings, caller: Caller, body: dict[str, object]) -> object:
        raise KeyError("seed")

    monkeypatch.setitem(promotions.WORK, "rollback", broken)
    scheme = load_settings(home=tmp_path, tracking_uri="http://127.0.0.1:9")
    with pytest.raises(Refused) as refused:
        LimitedWork().run("rollback", scheme, Caller(account="ed", actor="ed"), {})
    assert (refused.value.status, refused.value.error) == (503, "failed")
    assert refused.value.detail == "rollback failed: KeyError: 'seed'"
