"""The audit trail names the authenticated account where there is one, whatever --actor says."""

from __future__ import annotations

from pathlib import Path

from pydantic import SecretStr

from captchaops.cli.base import audited_actor
from captchaops.settings import load_settings


def test_the_authenticated_account_is_the_actor(tmp_path: Path) -> None:
    team = load_settings(
        home=tmp_path, tracking_username="alice", tracking_password=SecretStr("pw")
    )
    assert audited_actor(team, None) == "alice"
    assert audited_actor(team, "alice") == "alice"
    assert audited_actor(team, "bob") == "alice (as bob)"


def test_without_an_account_the_option_or_the_login_name_stands(tmp_path: Path) -> None:
    local = load_settings(home=tmp_path, tracking_username=None)
    assert audited_actor(local, "ci-bot") == "ci-bot"
    assert audited_actor(local, None) is None  # the registry then uses the login name


def test_a_client_acts_as_the_account_it_authenticates_as() -> None:
    from mlflow import MlflowClient

    from captchaops.registry.names import client_actor, default_actor

    uri = "http://ed:secret@127.0.0.1:9"
    assert client_actor(MlflowClient(uri, registry_uri=uri)) == "ed"
    plain = "http://127.0.0.1:9"
    assert client_actor(MlflowClient(plain, registry_uri=plain)) == default_actor()
