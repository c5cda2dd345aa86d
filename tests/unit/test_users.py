"""Team mode without a server: service specs, generated secrets, the auth config, user input checks."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from captchaops import team_accounts as users
from captchaops.settings import Settings, load_settings
from captchaops.stack.services import build_services
from captchaops.stack.store import Store

STORE = Store(kind="local", destination="/tmp/artifacts")


def team(tmp_path: Path, **overrides: object) -> Settings:
    values: dict[str, object] = {"home": tmp_path, "auth": True, "tracking_port": 5999}
    return load_settings(**(values | overrides))


def by_name(settings: Settings) -> dict:
    return {svc.name: svc for svc in build_services(settings, STORE)}


def test_experiment_names_match_their_owners() -> None:
    from captchaops.evaluation.evalset import EVAL_EXPERIMENT
    from captchaops.registry.audit import AUDIT_EXPERIMENT

    assert users.EVAL_EXPERIMENT == EVAL_EXPERIMENT
    assert users.AUDIT_EXPERIMENT == AUDIT_EXPERIMENT


def test_team_mode_turns_on_basic_auth_with_generated_secrets(tmp_path: Path) -> None:
    settings = team(
        tmp_path,
        allowed_hosts="mlflow.example.org",
        auth_database_uri="postgresql+psycopg://mlflow:p%40ss@db:5432/mlflow_auth",
    )
    services = by_name(settings)
    tracking = services["tracking"]
    command = tracking.command
    assert command[command.index("--app-name") + 1] == "basic-auth"
    hosts = command[command.index("--allowed-hosts") + 1].split(",")
    assert hosts[0] == "mlflow.example.org" and "127.0.0.1:*" in hosts and "localhost" in hosts
    env_file = tmp_path / ".env"
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    stored = dict(line.split("=", 1) for line in env_file.read_text().splitlines())
    assert tracking.env["MLFLOW_AUTH_ADMIN_PASSWORD"] == stored["CAPTCHAOPS_ADMIN_PASSWORD"]
    assert tracking.env["MLFLOW_FLASK_SERVER_SECRET_KEY"] == stored["CAPTCHAOPS_AUTH_SECRET_KEY"]
    ini = Path(tracking.env["MLFLOW_AUTH_CONFIG_PATH"])
    assert stat.S_IMODE(ini.stat().st_mode) == 0o600
    assert (
        "database_uri = postgresql+psycopg://mlflow:p%%40ss@db:5432/mlflow_auth" in ini.read_text()
    )
    for name in ("production", "staging", "app"):
        env = services[name].env
        assert (
            env["MLFLOW_TRACKING_USERNAME"]
            == env["CAPTCHAOPS_TRACKING_USERNAME"]
            == ("captchaops-service")
        )
        assert env["CAPTCHAOPS_TRACKING_PASSWORD"] == stored["CAPTCHAOPS_SERVICE_PASSWORD"]
    again = by_name(team(tmp_path))["tracking"]
    assert again.env["MLFLOW_AUTH_ADMIN_PASSWORD"] == stored["CAPTCHAOPS_ADMIN_PASSWORD"]


def test_without_team_mode_nothing_changes(tmp_path: Path) -> None:
    services = by_name(load_settings(home=tmp_path))
    assert "--app-name" not in services["tracking"].command
    assert "--allowed-hosts" not in services["tracking"].command
    assert "MLFLOW_TRACKING_USERNAME" not in services["production"].env
    assert not (tmp_path / ".env").exists()


def test_model_server_urls_can_point_at_containers(tmp_path: Path) -> None:
    settings = load_settings(home=tmp_path, production_url="http://production:8888/")
    assert settings.server_url("production") == "http://production:8888"
    assert settings.server_url("staging") == "http://127.0.0.1:8889"


@pytest.mark.parametrize(
    ("name", "role", "password", "message"),
    [
        ("ann", "owner", None, "unknown role 'owner'; choose one of: reader, editor, admin"),
        ("a b", "reader", None, "is not a valid user name"),
        ("ann", "reader", "short", "at least 12 characters"),
    ],
)
def test_bad_input_is_refused_before_any_request(
    tmp_path: Path, name: str, role: str, password: str | None, message: str
) -> None:
    settings = team(tmp_path, tracking_uri="http://127.0.0.1:9")
    with pytest.raises(users.UsersError, match=message):
        users.add_user(settings, name, role, password)


def test_no_admin_credentials_says_where_to_find_them(tmp_path: Path) -> None:
    settings = team(tmp_path, tracking_uri="http://127.0.0.1:9")
    with pytest.raises(users.UsersError, match="CAPTCHAOPS_TRACKING_USERNAME"):
        users.add_user(settings, "ann", "reader")


def test_unreachable_server_is_one_sentence(tmp_path: Path) -> None:
    settings = team(tmp_path, tracking_uri="http://127.0.0.1:9", admin_password="x" * 16)
    with pytest.raises(users.UsersError, match="cannot reach the tracking server"):
        users.add_user(settings, "ann", "reader")


def test_roles_grant_what_the_team_guide_says(tmp_path: Path) -> None:
    settings = load_settings(home=tmp_path)
    reader = {(kind, name): perm for kind, name, perm in users._grants(settings, "reader")}
    editor = {(kind, name): perm for kind, name, perm in users._grants(settings, "editor")}
    # visitors' uploads are the service's and admins' only (the server's default is READ)
    assert reader.pop(("experiment", "text-captcha-feedback")) == "DENY"
    assert set(reader.values()) == {"READ"}
    assert editor[("registered_model", "text-captcha")] == "EDIT"
    assert editor[("experiment", "text-captcha")] == "EDIT"
    assert editor[("experiment", users.AUDIT_EXPERIMENT)] == "EDIT"
    assert editor[("experiment", "text-captcha-feedback")] == "DENY"
    assert users._grants(settings, "admin") == []


def test_no_secret_is_an_argument_of_a_supervised_command(tmp_path: Path) -> None:
    settings = team(
        tmp_path,
        backend_store_uri="postgresql+psycopg://mlflow:db-secret-123@db:5432/mlflow",
        auth_database_uri="postgresql+psycopg://mlflow:db-secret-123@db:5432/mlflow_auth",
    )
    services = by_name(settings)
    secrets = [
        "db-secret-123",
        *(
            getattr(load_settings(home=tmp_path), name).get_secret_value()
            for name in ("admin_password", "service_password", "auth_secret_key", "serving_token")
        ),
    ]
    for svc in services.values():
        for secret in secrets:
            assert not any(secret in part for part in svc.command), (svc.name, secret)
    store_uri = services["tracking"].env["MLFLOW_BACKEND_STORE_URI"]
    assert store_uri == "postgresql+psycopg://mlflow:db-secret-123@db:5432/mlflow"
