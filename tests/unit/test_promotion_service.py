"""The promotion service's own checks, before any work reaches the registry: who may call (a
loopback peer locally, a Basic login in team mode), what a body may hold, and the signature that
tells a request the service recorded from one written around it."""

from __future__ import annotations

import base64
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from starlette.testclient import TestClient

from captchaops.registry.requests import Request, provenance_problem, signed_bytes
from captchaops.settings import load_settings
from captchaops.stack.promotions import create_app


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
    ],
)
def test_bodies_are_checked_before_anyone_is_asked(
    tmp_path: Path, body: bytes, status: int, error: str
) -> None:
    answer = client(tmp_path).post("/promote", content=body)
    assert (answer.status_code, answer.json()["error"]) == (status, error)
    assert set(answer.json()) == {"error", "detail"}


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
