"""The stack points production's shadow at staging, and staging's at nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from captchaops.settings import load_settings
from captchaops.stack.services import build_services
from captchaops.stack.store import Store

STORE = Store(kind="local", destination="/tmp/artifacts")


def shadow_urls(tmp_path: Path, **overrides: object) -> dict[str, str | None]:
    settings = load_settings(home=tmp_path, staging_port=7101, **overrides)
    return {
        svc.name: svc.env.get("CAPTCHAOPS_SHADOW_URL")
        for svc in build_services(settings, STORE, ("production", "staging", "app"))
    }


def test_production_copies_to_the_local_staging_server_by_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CAPTCHAOPS_SHADOW_URL", raising=False)
    urls = shadow_urls(tmp_path)
    assert urls == {"production": "http://127.0.0.1:7101", "staging": "", "app": None}


def test_a_set_shadow_url_wins_and_an_empty_one_turns_shadowing_off(tmp_path: Path) -> None:
    assert shadow_urls(tmp_path, shadow_url="http://elsewhere:1")["production"] == (
        "http://elsewhere:1"
    )
    assert shadow_urls(tmp_path, shadow_url="") == {"production": "", "staging": "", "app": None}


def test_production_offers_low_confidence_answers_to_the_app_and_staging_does_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CAPTCHAOPS_REVIEW_URL", raising=False)
    settings = load_settings(home=tmp_path, app_port=7180)
    urls = {
        svc.name: svc.env.get("CAPTCHAOPS_REVIEW_URL")
        for svc in build_services(settings, STORE, ("production", "staging", "app"))
    }
    assert urls == {"production": "http://127.0.0.1:7180", "staging": "", "app": None}
