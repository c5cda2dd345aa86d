"""The registry against a basic-auth tracking server: credentials from the settings only,
and a reader can neither take, hold nor block the promotion lock."""

from __future__ import annotations

import os
from collections.abc import Iterator

import httpx
import pytest
from mlflow.exceptions import MlflowException
from pydantic import SecretStr

from captchaops import mlflow_scope
from captchaops.live import monitoring
from captchaops.registry.aliases import move_alias, resolve_alias
from captchaops.registry.audit import AUDIT_EXPERIMENT, history
from captchaops.registry.errors import RegistryError
from captchaops.registry.lock import promotion_lock
from captchaops.settings import Settings, load_settings
from captchaops.team_accounts import UsersError, add_user, ensure_service_account
from tests.fixtures.stack import basic_auth_tracking

pytestmark = pytest.mark.slow
ADMIN_PASSWORD = "admin-password-for-tests"
EDITOR_PASSWORD = "editor-password-for-tests"
SERVICE_PASSWORD = "service-password-for-tests"
MODEL = "text-captcha"


@pytest.fixture(scope="module")
def team(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Settings]]:
    """A basic-auth tracking server with an editor and a reader; settings for admin, ed, rita."""
    home = tmp_path_factory.mktemp("team-registry")
    with basic_auth_tracking(home, ADMIN_PASSWORD) as admin:
        uri = admin.tracking_uri
        add_user(admin, "ed", "editor", EDITOR_PASSWORD)
        reader = add_user(admin, "rita", "reader")
        assert reader.password

        def account(user: str, password: str) -> Settings:
            return load_settings(
                home=home, tracking_uri=uri, tracking_username=user, tracking_password=password
            )

        yield {
            "admin": account("admin", ADMIN_PASSWORD),
            "ed": account("ed", EDITOR_PASSWORD),
            "rita": account("rita", reader.password),
        }


def test_credentials_come_from_the_settings_alone(
    team: dict[str, Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(key, raising=False)
    ed = mlflow_scope.client(team["ed"])
    version = ed.create_model_version(MODEL, "s3://nowhere/model").version

    move = move_alias(
        ed, MODEL, alias="staging", to_version=str(version), expect_from=None,
        reason="team test", actor="ed", kind="manual", check_from=False,
    )  # fmt: skip

    assert resolve_alias(team["rita"], "staging") == str(version)
    assert history(team["rita"], "staging")[-1].run_id == move.run_id
    assert not {k for k in os.environ if k.startswith("MLFLOW_TRACKING_")}
    with pytest.raises(RegistryError) as wrong:
        resolve_alias(team["rita"].model_copy(update={"tracking_password": None}), "x")
    assert "401" in str(wrong.value) or "not authenticated" in str(wrong.value)


def test_a_reader_can_neither_take_nor_block_the_lock(team: dict[str, Settings]) -> None:
    ed, rita = mlflow_scope.client(team["ed"]), mlflow_scope.client(team["rita"])
    with promotion_lock(ed, MODEL, "ed", timeout_s=5):
        pass  # the lock run exists now

    with pytest.raises(MlflowException) as denied, promotion_lock(rita, MODEL, "rita", 1):
        pass
    assert denied.value.error_code == "PERMISSION_DENIED"
    # What blocked every promotion before: a registered model named like the old lock row,
    # and a stray lock run in the promotions experiment.
    rita.create_registered_model(f"{MODEL}.promotion-lock")
    experiment = rita.get_experiment_by_name(AUDIT_EXPERIMENT)
    assert experiment is not None
    with pytest.raises(MlflowException) as stray:
        rita.create_run(experiment.experiment_id, tags={"kind": "promotion-lock", "lock_of": MODEL})
    assert stray.value.error_code == "PERMISSION_DENIED"

    held = promotion_lock(ed, MODEL, "ed", timeout_s=5)
    other = promotion_lock(ed, MODEL, "ed again", timeout_s=1)
    with held, pytest.raises(RegistryError, match="holds the lock"), other:
        pass
    version = ed.create_model_version(MODEL, "s3://nowhere/other").version
    with pytest.raises(MlflowException) as moved:
        move_alias(
            rita, MODEL, alias="staging", to_version=str(version), expect_from=None,
            reason="reader", actor="rita", kind="manual", check_from=False,
        )  # fmt: skip
    assert moved.value.error_code == "PERMISSION_DENIED"
    assert resolve_alias(team["ed"], "staging") != str(version)


def test_uploads_are_private_to_the_service_and_squatted_names_are_refused(
    team: dict[str, Settings],
) -> None:
    admin = team["admin"].model_copy(update={"service_password": SecretStr(SERVICE_PASSWORD)})
    ensure_service_account(admin)
    service = mlflow_scope.client(
        team["admin"].model_copy(
            update={
                "tracking_username": admin.service_username,
                "tracking_password": SecretStr(SERVICE_PASSWORD),
            }
        )
    )
    experiment = service.get_experiment_by_name(admin.feedback_experiment)
    assert experiment is not None
    run = service.create_run(experiment.experiment_id, tags={"captchaops.kind": "correction"})
    service.log_text(run.info.run_id, "a visitor's upload", "feedback/7KQ2_x.png")
    uri = admin.effective_tracking_uri
    proxied = f"{uri}/api/2.0/mlflow-artifacts/artifacts/{experiment.experiment_id}"
    for user in ("rita", "ed"):
        client = mlflow_scope.client(team[user])
        assert not client.search_runs([experiment.experiment_id]), user  # filtered out
        with pytest.raises(MlflowException) as listed:
            client.get_run(run.info.run_id)
        assert listed.value.error_code == "PERMISSION_DENIED", user
        auth = (user, team[user].tracking_password.get_secret_value())  # type: ignore[union-attr]
        fetched = httpx.get(
            f"{uri}/get-artifact",
            params={"run_uuid": run.info.run_id, "path": "feedback/7KQ2_x.png"},
            auth=auth,
        )
        assert fetched.status_code == 403, (user, fetched.status_code)
        assert httpx.get(proxied, auth=auth).status_code == 403, user
    admin_auth = ("admin", ADMIN_PASSWORD)
    assert (
        httpx.get(
            f"{uri}/get-artifact",
            params={"run_uuid": run.info.run_id, "path": "feedback/7KQ2_x.png"},
            auth=admin_auth,
        ).text
        == "a visitor's upload"
    )

    # A reader who makes a future scheme's monitoring experiment first holds MANAGE on it:
    # the service account is not pointed at it.
    squatted = "squatted-scheme"
    mlflow_scope.client(team["rita"]).create_experiment(monitoring.experiment_name(squatted))
    with pytest.raises(UsersError, match="experiment 'squatted-scheme-monitoring' was created"):
        ensure_service_account(admin.model_copy(update={"model_name": squatted}))
    # The same for a registered model a reader made; an editor who trains makes models, by design.
    mlflow_scope.client(team["rita"]).create_registered_model("rita-scheme")
    with pytest.raises(UsersError, match="model 'rita-scheme' was created by user 'rita'"):
        ensure_service_account(admin.model_copy(update={"model_name": "rita-scheme"}))
    mlflow_scope.client(team["ed"]).create_registered_model("ed-scheme")
    ensure_service_account(admin.model_copy(update={"model_name": "ed-scheme"}))


def test_the_tracking_server_throttles_failed_logins_per_client_and_account(
    team: dict[str, Settings],
) -> None:
    uri = team["admin"].effective_tracking_uri
    limit = team["admin"].tracking_login_failures_per_minute
    whoami = f"{uri}/api/2.0/mlflow/users/get"
    for _ in range(limit):
        guess = httpx.get(whoami, params={"username": "mallory"}, auth=("mallory", "guess-1234"))
        assert guess.status_code == 401
    refused = httpx.get(whoami, params={"username": "mallory"}, auth=("mallory", "guess-1234"))
    assert refused.status_code == 429 and int(refused.headers["Retry-After"]) > 0
    assert "Too many failed logins" in refused.json()["message"]
    rita = team["rita"].tracking_password.get_secret_value()  # type: ignore[union-attr]
    assert httpx.get(whoami, params={"username": "rita"}, auth=("rita", rita)).status_code == 200
