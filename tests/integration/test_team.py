"""Team mode for real: PostgreSQL backend, S3 artifacts (moto), basic-auth, roles, backup/restore."""

from __future__ import annotations

import base64
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import httpx
import mlflow
import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from pydantic import SecretStr

from tests.fixtures.stack import free_port, moto_s3_server, stop_process, wait_http

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

CLI = str(Path(sys.executable).parent / "captchaops")
PG_BIN = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]))
DB_PASSWORD = "team-test-db-password"
BUCKET = "breaking-captcha"
PUBLIC_HOST = "mlflow.team.example"


@dataclass
class Postgres:
    port: int
    bin: Path

    def uri(self, database: str) -> str:
        return f"postgresql+psycopg://mlflow:{DB_PASSWORD}@127.0.0.1:{self.port}/{database}"

    def run(self, tool: str, *args: str) -> subprocess.CompletedProcess[str]:
        """A PostgreSQL client tool over TCP as the `mlflow` role."""
        env = {**os.environ, "PGPASSWORD": DB_PASSWORD}
        cmd = [str(self.bin / tool), "-h", "127.0.0.1", "-p", str(self.port), "-U", "mlflow", *args]
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, f"{tool} failed: {result.stderr}"
        return result


def _as_postgres(cmd: list[str]) -> list[str]:
    """initdb and the server refuse to run as root: drop to the `postgres` user when root."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    """A private PostgreSQL cluster in a temporary directory on a free port."""
    if not PG_BIN:
        pytest.skip(
            "no PostgreSQL server binaries in /usr/lib/postgresql (apt-get install postgresql)"
        )
    pg_bin = Path(PG_BIN[-1])
    root = Path(tempfile.mkdtemp(prefix="captchaops-pg-"))
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    data, port = root / "data", free_port()
    pwfile = root / "pw"
    pwfile.write_text(DB_PASSWORD + "\n")
    if os.geteuid() == 0:
        shutil.chown(pwfile, "postgres", "postgres")
    subprocess.run(
        _as_postgres(
            [
                str(pg_bin / "initdb"),
                *("-D", str(data), "-U", "mlflow", "-E", "UTF8", f"--pwfile={pwfile}"),
                *("--auth-local=trust", "--auth-host=scram-sha-256"),
            ]
        ),
        check=True,
        capture_output=True,
    )
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
    start = [str(pg_bin / "pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-o", options]
    subprocess.run(_as_postgres([*start, "-w", "start"]), check=True, capture_output=True)
    pg = Postgres(port=port, bin=pg_bin)
    try:
        for database in ("mlflow", "mlflow_auth"):
            pg.run("createdb", database)
        yield pg
    finally:
        subprocess.run(
            _as_postgres([str(pg_bin / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"]),
            capture_output=True,
        )
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def moto() -> Iterator[str]:
    """moto's S3 server standing in for the bucket."""
    with moto_s3_server() as url:
        yield url


def s3_client(endpoint: str) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id="team-key",
        aws_secret_access_key="team-secret",
        region_name="us-east-1",
    )


def cli(env: dict[str, str], *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [CLI, *args], env=env, input=stdin, capture_output=True, text=True, timeout=180
    )
    assert "Traceback" not in result.stderr, result.stderr
    return result


def read_env_file(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


@pytest.fixture(scope="module")
def team(postgres: Postgres, moto: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """`captchaops up --core` in team mode: PostgreSQL + S3 + basic-auth, public host name set."""
    home = tmp_path_factory.mktemp("team") / "home"
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("CAPTCHAOPS_", "AWS_", "MLFLOW_"))
    }
    env.update(
        CAPTCHAOPS_HOME=str(home),
        CAPTCHAOPS_AUTH="true",
        CAPTCHAOPS_ALLOWED_HOSTS=PUBLIC_HOST,
        CAPTCHAOPS_BACKEND_STORE_URI=postgres.uri("mlflow"),
        CAPTCHAOPS_AUTH_DATABASE_URI=postgres.uri("mlflow_auth"),
        CAPTCHAOPS_S3_ENDPOINT_URL=moto,
        CAPTCHAOPS_S3_ACCESS_KEY="team-key",
        CAPTCHAOPS_S3_SECRET_KEY="team-secret",
        CAPTCHAOPS_S3_BUCKET=BUCKET,
        CAPTCHAOPS_TRACKING_PORT=str(free_port()),
        CAPTCHAOPS_PRODUCTION_PORT=str(free_port()),
        CAPTCHAOPS_STAGING_PORT=str(free_port()),
        CAPTCHAOPS_APP_PORT=str(free_port()),
        CAPTCHAOPS_STAGING_FLOOR="0",
    )
    up = cli(env, "up", "--core")
    assert up.returncode == 0, up.stdout + up.stderr
    uri = f"http://127.0.0.1:{env['CAPTCHAOPS_TRACKING_PORT']}"
    secrets = read_env_file(home / ".env")
    try:
        yield {"env": env, "uri": uri, "home": home, "secrets": secrets}
    finally:
        cli(env, "down")


def use_account(monkeypatch: pytest.MonkeyPatch, uri: str, user: str, password: str) -> None:
    """Make MLflow clients in this process talk to the team server as this user."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)


def snapshot(uri: str, s3_endpoint: str, model_name: str) -> dict:
    """Everything a restore must bring back: runs, versions, aliases, artifacts."""
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiments = client.search_experiments()
    runs = client.search_runs([e.experiment_id for e in experiments], max_results=1000)
    versions = client.search_model_versions(f"name='{model_name}'")
    objects = s3_client(s3_endpoint).list_objects_v2(Bucket=BUCKET).get("Contents", [])
    return {
        "experiments": sorted((e.experiment_id, e.name) for e in experiments),
        "runs": sorted(
            (
                r.info.run_id,
                r.info.status,
                tuple(sorted(r.data.params.items())),
                tuple(sorted(r.data.metrics.items())),
            )
            for r in runs
        ),
        "versions": sorted((v.version, v.run_id, v.source) for v in versions),
        "aliases": dict(client.get_registered_model(model_name).aliases),
        "objects": sorted((o["Key"], o["Size"], o["ETag"]) for o in objects),
    }


@pytest.mark.timeout(1200)  # a busy shared machine (load ~11): 861 s with the CLI refusals
def test_team_mode_end_to_end(
    team: dict,
    postgres: Postgres,
    moto: str,
    isolated_mlflow: None,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    from captchaops.data.synthetic import generate
    from captchaops.decisions.promotion import promote
    from captchaops.settings import load_settings
    from captchaops.stack.services import build_services
    from captchaops.stack.store import choose_store
    from captchaops.team_accounts import UsersError, add_user
    from captchaops.training.run import train
    from harness.training import tiny_config

    env, uri, home = team["env"], team["uri"], team["home"]
    secrets = team["secrets"]
    api = f"{uri}/api/2.0/mlflow/experiments/search"
    admin = ("admin", secrets["CAPTCHAOPS_ADMIN_PASSWORD"])

    # Basic-auth and host checks on the real server.
    assert httpx.get(api, params={"max_results": 5}).status_code == 401
    assert (
        httpx.get(api, params={"max_results": 5}, auth=("admin", "wrong-password-1")).status_code
        == 401
    )
    assert httpx.get(api, params={"max_results": 5}, auth=admin).status_code == 200
    public = httpx.get(api, params={"max_results": 5}, auth=admin, headers={"Host": PUBLIC_HOST})
    assert public.status_code == 200
    foreign = httpx.get(
        api, params={"max_results": 5}, auth=admin, headers={"Host": "evil.example"}
    )
    assert foreign.status_code == 403
    assert (home / "run" / "basic_auth.ini").stat().st_mode & 0o777 == 0o600
    assert (home / ".env").stat().st_mode & 0o777 == 0o600

    # Accounts: a generated password printed once, one from stdin, the service account.
    reader = cli(env, "users", "add", "rita", "--role", "reader")
    assert reader.returncode == 0, reader.stderr
    reader_password = reader.stdout.split("password (shown once):")[1].strip()
    editor_password = "editor-password-from-stdin"
    editor = cli(
        env,
        "users",
        "add",
        "ed",
        "--role",
        "editor",
        "--password-stdin",
        stdin=editor_password + "\n",
    )
    assert editor.returncode == 0, editor.stderr
    assert "shown once" not in editor.stdout and "EDIT registered model" in editor.stdout
    again = cli(env, "users", "add", "ed", "--role", "reader")
    assert again.returncode == 1 and "already exists" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1
    service = cli(env, "users", "service")
    assert service.returncode == 0, service.stderr
    as_admin = load_settings(home=home, tracking_uri=uri)
    boss = add_user(as_admin, "boss", "admin")
    assert boss.password and len(boss.password) >= 12
    who = httpx.get(f"{uri}/api/2.0/mlflow/users/get", params={"username": "boss"}, auth=admin)
    assert who.json()["user"]["is_admin"] is True
    as_reader = as_admin.model_copy(
        update={"tracking_username": "rita", "tracking_password": SecretStr(reader_password)}
    )
    with pytest.raises(UsersError, match="not an admin"):
        add_user(as_reader, "eve", "reader")

    # Errors name the fix in one line, before any work: no login, a wrong password, a reader's
    # train (50,000 images it never generates: no run is started).
    nobody = {**env, "HOME": str(tmp_path / "nobody")}  # no ~/.mlflow/credentials either
    anonymous = cli(nobody, "models")
    assert anonymous.returncode == 1 and len(anonymous.stderr.strip().splitlines()) == 1
    assert "needs a login (401)" in anonymous.stderr
    assert "CAPTCHAOPS_TRACKING_USERNAME" in anonymous.stderr
    assert "~/.mlflow/credentials" in anonymous.stderr
    as_rita = {
        **nobody,
        "CAPTCHAOPS_TRACKING_USERNAME": "rita",
        "CAPTCHAOPS_TRACKING_PASSWORD": reader_password,
    }
    wrong = cli({**as_rita, "CAPTCHAOPS_TRACKING_PASSWORD": "not-her-password"}, "models")
    assert wrong.returncode == 1 and "refused user 'rita' (401)" in wrong.stderr
    refused = cli(as_rita, "train", "--synthetic", "50000")
    assert refused.returncode == 1 and len(refused.stderr.strip().splitlines()) == 1
    assert "user 'rita' may not train text-captcha" in refused.stderr
    assert "editor role" in refused.stderr and "EDIT on registered model" in refused.stderr
    experiment = httpx.get(
        f"{uri}/api/2.0/mlflow/experiments/get-by-name",
        params={"experiment_name": "text-captcha"},
        auth=admin,
    ).json()["experiment"]["experiment_id"]
    runs = httpx.post(
        f"{uri}/api/2.0/mlflow/runs/search", json={"experiment_ids": [experiment]}, auth=admin
    )
    assert runs.status_code == 200 and runs.json().get("runs", []) == []

    # The editor trains (real tiny model), registers and promotes.
    use_account(monkeypatch, uri, "ed", editor_password)
    ed_settings = load_settings(
        home=tmp_path / "ed",
        tracking_uri=uri,
        tracking_username="ed",
        tracking_password=editor_password,
        staging_floor=0.0,
    )
    result = train(tiny_config(), ed_settings)
    assert result.version == "1"
    promote(ed_settings, version=result.version, reason="team test", actor="ed")
    not_hers = cli(as_rita, "promote", "--version", result.version, "--reason", "try")
    assert not_hers.returncode == 1 and len(not_hers.stderr.strip().splitlines()) == 1
    assert "user 'rita' may not promote text-captcha" in not_hers.stderr
    assert "editor role" in not_hers.stderr

    # The reader sees runs and versions but cannot move an alias.
    use_account(monkeypatch, uri, "rita", reader_password)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    run = client.get_run(result.run_id)
    assert run.data.metrics["test_seq_acc"] == result.metrics["test_seq_acc"]
    assert client.get_model_version_by_alias("text-captcha", "production").version == "1"
    with pytest.raises(MlflowException) as denied:
        client.set_registered_model_alias("text-captcha", "production", "1")
    assert denied.value.error_code == "PERMISSION_DENIED"
    denied_http = httpx.post(
        f"{uri}/api/2.0/mlflow/registered-models/alias",
        json={"name": "text-captcha", "alias": "staging", "version": "1"},
        auth=("rita", reader_password),
    )
    assert denied_http.status_code == 403
    assert client.create_experiment("rita/scratch")  # everyone may keep experiments of their own

    # The production model server logs in with the service account and loads @production.
    for key, value in env.items():
        if key.startswith("CAPTCHAOPS_"):
            monkeypatch.setenv(key, value)
    store, settings = choose_store(load_settings())
    spec = build_services(settings, store, ("production",))[0]
    assert spec.env["MLFLOW_TRACKING_USERNAME"] == "captchaops-service"
    proc = subprocess.Popen(
        spec.command,
        env={**env, **spec.env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_http(f"{spec.url}/ping", timeout=90, proc=proc)
        deadline = time.monotonic() + 60
        while httpx.get(f"{spec.url}/version", timeout=5).json().get("version") != "1":
            assert time.monotonic() < deadline and proc.poll() is None, "model not loaded"
            time.sleep(0.2)
        image = base64.b64encode(generate(1, seed=7)[0].image).decode()
        answer = httpx.post(
            f"{spec.url}/invocations",
            json={"dataframe_split": {"columns": ["image"], "data": [[image]]}},
            timeout=30,
        )
        assert answer.status_code == 200, answer.text
        assert answer.headers["X-Model-Version"] == "1"
    finally:
        stop_process(proc)

    # Backup, lose everything, restore: nothing is missing.
    use_account(monkeypatch, uri, *admin)
    before = snapshot(uri, moto, "text-captcha")
    assert before["aliases"] == {"production": "1", "staging": "1"}
    assert any(k.endswith("MLmodel") for k, _, _ in before["objects"])
    backup = tmp_path / "backup"
    (backup / "bucket").mkdir(parents=True)
    for database in ("mlflow", "mlflow_auth"):
        postgres.run("pg_dump", "-Fc", "-f", str(backup / f"{database}.dump"), database)
    s3 = s3_client(moto)
    for key, _, _ in before["objects"]:
        target = backup / "bucket" / key
        target.parent.mkdir(parents=True, exist_ok=True)
        s3.download_file(BUCKET, key, str(target))

    assert cli(env, "down").returncode == 0
    for database in ("mlflow", "mlflow_auth"):
        postgres.run("dropdb", database)
    for key, _, _ in before["objects"]:
        s3.delete_object(Bucket=BUCKET, Key=key)
    s3.delete_bucket(Bucket=BUCKET)

    s3.create_bucket(Bucket=BUCKET)
    for path in sorted((backup / "bucket").rglob("*")):
        if path.is_file():
            s3.upload_file(str(path), BUCKET, path.relative_to(backup / "bucket").as_posix())
    for database in ("mlflow", "mlflow_auth"):
        postgres.run("createdb", database)
        postgres.run("pg_restore", "-d", database, "--no-owner", str(backup / f"{database}.dump"))
    up = cli(env, "up", "--core")
    assert up.returncode == 0, up.stderr

    after = snapshot(uri, moto, "text-captcha")
    assert after == before
    assert (
        httpx.get(api, params={"max_results": 5}, auth=("ed", editor_password)).status_code == 200
    )
    assert httpx.get(api, params={"max_results": 5}).status_code == 401
    use_account(monkeypatch, uri, "captchaops-service", secrets["CAPTCHAOPS_SERVICE_PASSWORD"])
    model_dir = mlflow.artifacts.download_artifacts(
        "models:/text-captcha@production", dst_path=str(tmp_path / "restored")
    )
    assert (Path(model_dir) / "MLmodel").is_file()
