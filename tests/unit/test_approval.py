"""Production approvals without a tracking server: which schemes need one, what fails production's
live check (so a rollback needs no second account), and how the trail's lines name both people."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from captchaops.decisions.approval import account_of, health_failure
from captchaops.registry.audit import Move
from captchaops.registry.requests import Request
from captchaops.settings import load_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("CAPTCHAOPS_"):
            monkeypatch.delenv(key)


@pytest.mark.parametrize(
    ("auth", "setting", "scheme", "required"),
    [
        (False, None, "text-captcha", False),  # local default: off
        (True, None, "text-captcha", True),  # team default: on
        (True, "", "text-captcha", False),  # team, turned off for every scheme
        (False, "*", "digits", True),
        (False, "true", "digits", True),
        (True, "false", "text-captcha", False),
        (True, "digits, letters", "letters", True),  # on for the named schemes only
        (True, "digits, letters", "text-captcha", False),
    ],
)
def test_approval_is_per_scheme_off_locally_and_on_in_team_mode(
    tmp_path: Path, auth: bool, setting: str | None, scheme: str, required: bool
) -> None:
    settings = load_settings(
        home=tmp_path, auth=auth, production_approval=setting, model_name=scheme
    )
    assert settings.approval_required is required


def test_the_setting_comes_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CAPTCHAOPS_PRODUCTION_APPROVAL", "digits")
    assert load_settings(home=tmp_path, model_name="digits").approval_required
    assert not load_settings(home=tmp_path, model_name="text-captcha", auth=True).approval_required


def test_the_account_is_the_login_where_there_is_one(tmp_path: Path) -> None:
    team = load_settings(home=tmp_path, tracking_username="alice")
    assert account_of(team, "alice (as ci-bot)") == "alice"
    assert account_of(load_settings(home=tmp_path), "bob") == "bob"


def _health(**fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model_loaded": True, "name": "text-captcha", "version": "4"}
    return body | fields


def _estimate(alert: str | None) -> dict[str, Any]:
    state = {"estimate": 0.4, "answers_seen": 200, "gate_accuracy": 0.9, "alert": alert}
    return {"4": state}


def test_a_serving_production_without_an_alert_passes_its_live_check() -> None:
    assert health_failure(200, _health()) is None
    assert health_failure(200, _health(live_estimate=_estimate(None))) is None
    # A refused reload keeps the old version serving: production itself still passes.
    assert health_failure(200, _health(status="degraded", last_reload_error="x")) is None


def test_an_alert_or_no_model_fails_the_live_check() -> None:
    alert = "estimated accuracy 40.0% over the last 200 predictions is 50.0 points below"
    assert health_failure(200, _health(live_estimate=_estimate(alert))) == f"v4: {alert}"
    empty = {"model_loaded": False, "reason": "no signed move"}
    assert health_failure(503, empty) == "it serves no model (no signed move)"
    assert health_failure(500, "oops") == "it serves no model (HTTP 500)"


def test_the_trail_names_the_requester_and_the_approver() -> None:
    move = Move("production", "3", "5", "ed", "better", "manual", "promoted", "t", "r1", 4, "al")
    assert " by ed, approved by al at t: better" in move.line()
    rejected = Move("production", "3", "5", "ed", "worse", "gate", "rejected", "t", "r2", 4, "al")
    assert " by ed, on approval by al at t" in rejected.line()
    alone = Move("production", "3", "5", "ed", "hotfix", "manual", "promoted", "t", "r3", 4)
    assert " by ed at t: hotfix" in alone.line()
    asked = Request(
        "0123456789abcdef", "m", "production", "3", "5", "gate", "ed", "ed", "gate: ok", "why",
        "t", False, {},
    )  # fmt: skip
    assert asked.short_id == "01234567"
    assert asked.line() == (
        "01234567 @production v3 -> v5 (gate) requested by ed at t: why [gate: ok]"
    )
