"""`captchaops up` tells its model servers the promotion key of the settings it was called with."""

from __future__ import annotations

from pathlib import Path

from captchaops.settings import load_settings
from captchaops.stack.services import build_services
from captchaops.stack.store import Store


def test_servers_check_moves_with_the_public_key_of_the_settings_up_was_called_with(
    tmp_path: Path,
) -> None:
    settings = load_settings(home=tmp_path / "home", signing_key_dir=tmp_path / "keys")
    store = Store(kind="local", destination=str(tmp_path / "artifacts"))
    services = {s.name: s for s in build_services(settings, store, ("production", "staging"))}
    for name in ("production", "staging"):
        env = services[name].env
        assert env["CAPTCHAOPS_SIGNING_PUBLIC_KEY"] == str(tmp_path / "keys" / "moves.pub"), name
        assert "CAPTCHAOPS_SIGNING_KEY_DIR" not in env, name  # the public half only
