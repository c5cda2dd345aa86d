"""Files under the home that hold secrets: private, atomic, and never extended by a setting."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from captchaops.settings import load_settings, write_env
from captchaops.stack.services import Service
from captchaops.stack.supervisor import render_config


def test_env_rewrites_are_atomic_and_private(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = tmp_path / ".env"
    write_env(env, {"CAPTCHAOPS_ADMIN_PASSWORD": "first"})
    assert stat.S_IMODE(env.stat().st_mode) == 0o600

    def crash(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        write_env(env, {"CAPTCHAOPS_WEBAPP_SECRET_KEY": "second"})
    assert env.read_text() == "CAPTCHAOPS_ADMIN_PASSWORD=first\n"  # the old secrets survive
    assert [p.name for p in tmp_path.iterdir()] == [".env"]  # no temporary file left behind


def test_a_line_break_cannot_add_keys_to_env(tmp_path: Path) -> None:
    env = tmp_path / ".env"
    with pytest.raises(ValueError, match="CAPTCHAOPS_S3_ACCESS_KEY contains a line break"):
        write_env(env, {"CAPTCHAOPS_S3_ACCESS_KEY": "key\nCAPTCHAOPS_HOST=0.0.0.0"})
    assert not env.exists()


def test_a_line_break_cannot_add_a_section_to_supervisord_conf(tmp_path: Path) -> None:
    settings = load_settings(home=tmp_path)
    evil = Service(
        name="webapp",
        command=["captchaops", "webapp"],
        port=1,
        port_setting="webapp_port",
        health_url="http://127.0.0.1:1/health",
        url="http://127.0.0.1:1",
        env={"CAPTCHAOPS_TITLE": 'x"\n[program:evil]\ncommand=/bin/sh -c "touch /tmp/owned"'},
    )
    with pytest.raises(ValueError, match="line break"):
        render_config(settings, [evil])
    fine = Service(**{**evil.__dict__, "env": {"CAPTCHAOPS_TITLE": 'quote " and % and \\'}})
    text = render_config(settings, [fine])
    assert text.count("[program:") == 1
    assert 'CAPTCHAOPS_TITLE="quote \\" and %% and \\\\"' in text
