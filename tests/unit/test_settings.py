"""Settings: defaults from the architecture table, env and .env precedence, secrets."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from captchaops.settings import (
    Settings,
    ensure_secret,
    load_settings,
    mask_credentials,
    write_env,
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("CAPTCHAOPS_") or key == "MLFLOW_TRACKING_URI":
            monkeypatch.delenv(key)


def test_defaults_match_the_architecture_table(tmp_path: Path) -> None:
    s = Settings(home=tmp_path)
    assert s.effective_tracking_uri == "http://127.0.0.1:8000"
    assert s.effective_backend_store_uri == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert (s.minio_port, s.minio_console_port, s.s3_bucket) == (9000, 9001, "breaking-captcha")
    assert s.server_url("production") == "http://127.0.0.1:8888"
    assert s.server_url("staging") == "http://127.0.0.1:8889"
    assert s.app_url == "http://127.0.0.1:8080"
    assert s.experiment_name == s.model_name == "text-captcha"
    assert s.host == "127.0.0.1"
    assert Settings().home == Path("captchaops-data")


def test_environment_overrides_dotenv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_env(
        tmp_path / ".env", {"CAPTCHAOPS_TRACKING_PORT": "8100", "CAPTCHAOPS_APP_PORT": "8181"}
    )
    monkeypatch.setenv("CAPTCHAOPS_HOME", str(tmp_path))
    monkeypatch.setenv("CAPTCHAOPS_APP_PORT", "8282")
    s = load_settings()
    assert s.tracking_port == 8100
    assert s.app_port == 8282


def test_mlflow_tracking_uri_is_honoured_and_ours_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CAPTCHAOPS_HOME", str(tmp_path))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert load_settings().effective_tracking_uri == "http://mlflow.example:5000"
    monkeypatch.setenv("CAPTCHAOPS_TRACKING_URI", "http://ours.example:5000")
    assert load_settings().tracking_uri == "http://ours.example:5000"
    assert load_settings(tracking_uri="http://given.example").tracking_uri == "http://given.example"
    assert Settings(tracking_uri="http://given.example").tracking_uri == "http://given.example"


def test_bad_value_names_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAPTCHAOPS_TRACKING_PORT", "eight-thousand")
    with pytest.raises(ValueError, match="tracking_port"):
        load_settings()


def test_generated_secret_is_stored_private_and_reused(tmp_path: Path) -> None:
    s = ensure_secret(Settings(home=tmp_path), "app_secret_key")
    assert s.app_secret_key is not None and len(s.app_secret_key.get_secret_value()) >= 24
    env_file = tmp_path / ".env"
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    again = ensure_secret(load_settings(home=tmp_path), "app_secret_key")
    assert again.app_secret_key == s.app_secret_key


def test_masked_hides_secrets_and_database_passwords(tmp_path: Path) -> None:
    s = Settings(
        home=tmp_path,
        s3_secret_key="hunter2",  # type: ignore[arg-type]
        backend_store_uri="postgresql://mlflow:pw@db:5432/mlflow",
    )
    shown = s.masked()
    assert "hunter2" not in str(shown)
    assert "pw@" not in str(shown)
    remote = Settings(home=tmp_path, tracking_uri="https://ci:s3cret@mlflow.example.org")
    assert "s3cret" not in str(remote.masked())
    assert remote.masked()["effective_tracking_uri"] == "https://********@mlflow.example.org"
    assert shown["s3_secret_key"] == "********"


def test_mask_credentials_masks_every_url_in_a_message_and_nothing_else() -> None:
    message = "POST http://ci:s3cret@h:5000/api failed; db postgresql://u:pa/ss@db/x"
    assert mask_credentials(message) == (
        "POST http://********@h:5000/api failed; db postgresql://********@db/x"
    )
    assert mask_credentials("http://h/files/a@b and user@example.org") == (
        "http://h/files/a@b and user@example.org"
    )
