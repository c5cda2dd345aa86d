"""The local stack as a user runs it: `captchaops up/down/status/logs` as real processes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import boto3
import httpx
import pytest
from mlflow import MlflowClient

from tests.fixtures.stack import free_port, moto_s3_server, wait_http

CLI = str(Path(sys.executable).parent / "captchaops")


def stack_env(home: Path, **extra: str) -> dict[str, str]:
    """An environment for a private stack: its own home and free ports, no S3 credentials."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("CAPTCHAOPS_", "AWS_", "MLFLOW_"))
    }
    env.update(
        CAPTCHAOPS_HOME=str(home),
        CAPTCHAOPS_TRACKING_PORT=str(free_port()),
        CAPTCHAOPS_PRODUCTION_PORT=str(free_port()),
        CAPTCHAOPS_STAGING_PORT=str(free_port()),
        CAPTCHAOPS_APP_PORT=str(free_port()),
        **extra,
    )
    return env


def cli(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run the captchaops CLI like a user does."""
    return subprocess.run([CLI, *args], env=env, capture_output=True, text=True, timeout=timeout)


def tracking_pid(home: Path) -> int:
    """The pid supervisord reports for the tracking server."""
    from captchaops.settings import Settings
    from captchaops.stack import supervisor

    info = supervisor.process_info(Settings(home=home))
    return int(info["tracking"]["pid"])


@pytest.fixture()
def core_stack(tmp_path: Path) -> Iterator[dict[str, str]]:
    """Tracking server + local store in a temporary home, stopped afterwards."""
    env = stack_env(tmp_path / "home")
    result = cli(env, "up", "--core")
    assert result.returncode == 0, result.stdout + result.stderr
    try:
        yield env
    finally:
        cli(env, "down")


def tracking_uri(env: dict[str, str]) -> str:
    return f"http://127.0.0.1:{env['CAPTCHAOPS_TRACKING_PORT']}"


def log_sample_run(uri: str, tmp_path: Path) -> str:
    """Log params, a metric history and an artifact through the proxy; return the run id."""
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = client.create_experiment(f"stack-{time.time_ns()}")
    run = client.create_run(exp)
    client.log_param(run.info.run_id, "lr", "0.01")
    for step, value in enumerate((0.9, 0.5, 0.2)):
        client.log_metric(run.info.run_id, "loss", value, step=step)
    artifact = tmp_path / "note.txt"
    artifact.write_text("hello artifacts")
    client.log_artifact(run.info.run_id, str(artifact))
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def assert_run_intact(uri: str, run_id: str, tmp_path: Path) -> None:
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    run = client.get_run(run_id)
    assert run.data.params["lr"] == "0.01"
    assert [m.value for m in client.get_metric_history(run_id, "loss")] == [0.9, 0.5, 0.2]
    dest = tmp_path / f"dl-{time.time_ns()}"
    dest.mkdir()
    path = client.download_artifacts(run_id, "note.txt", str(dest))
    assert Path(path).read_text() == "hello artifacts"


def test_up_logs_through_proxy_and_status(core_stack: dict[str, str], tmp_path: Path) -> None:
    uri = tracking_uri(core_stack)
    run_id = log_sample_run(uri, tmp_path)
    assert_run_intact(uri, run_id, tmp_path)
    home = Path(core_stack["CAPTCHAOPS_HOME"])
    stored = list((home / "artifacts").rglob("note.txt"))
    assert stored, "artifact should land in the local store behind the proxy"
    status = cli(core_stack, "status")
    assert status.returncode == 0
    assert "tracking" in status.stdout and "RUNNING" in status.stdout
    assert uri in status.stdout
    logs = cli(core_stack, "logs", "tracking")
    assert logs.returncode == 0 and "Uvicorn running" in logs.stdout


def test_up_twice_starts_nothing_new(core_stack: dict[str, str]) -> None:
    home = Path(core_stack["CAPTCHAOPS_HOME"])
    pid = tracking_pid(home)
    again = cli(core_stack, "up", "--core")
    assert again.returncode == 0
    assert "already running" in again.stdout
    assert tracking_pid(home) == pid


def test_kill_9_tracking_server_comes_back_with_data(
    core_stack: dict[str, str], tmp_path: Path
) -> None:
    uri = tracking_uri(core_stack)
    run_id = log_sample_run(uri, tmp_path)
    home = Path(core_stack["CAPTCHAOPS_HOME"])
    old = tracking_pid(home)
    os.kill(old, signal.SIGKILL)
    wait_http(f"{uri}/health", timeout=30)
    assert tracking_pid(home) != old
    assert_run_intact(uri, run_id, tmp_path)


def test_down_then_up_keeps_everything(core_stack: dict[str, str], tmp_path: Path) -> None:
    uri = tracking_uri(core_stack)
    run_id = log_sample_run(uri, tmp_path)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model("kept-model")
    assert cli(core_stack, "down").returncode == 0
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{uri}/health", timeout=2)
    assert cli(core_stack, "up", "--core").returncode == 0
    assert_run_intact(uri, run_id, tmp_path)
    assert client.get_registered_model("kept-model").name == "kept-model"


def test_port_taken_by_foreign_process(tmp_path: Path) -> None:
    env = stack_env(tmp_path / "home")
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", int(env["CAPTCHAOPS_TRACKING_PORT"])))
        squatter.listen()
        result = cli(env, "up", "--core")
    assert result.returncode == 1
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1
    assert env["CAPTCHAOPS_TRACKING_PORT"] in message and "CAPTCHAOPS_TRACKING_PORT" in message
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "home" / "run" / "supervisord.pid").exists()


def test_stale_pid_and_socket_files_are_ignored(tmp_path: Path) -> None:
    env = stack_env(tmp_path / "home")
    run = tmp_path / "home" / "run"
    run.mkdir(parents=True)
    (run / "supervisord.pid").write_text("999999\n")
    (run / "supervisor.sock").write_text("")
    try:
        result = cli(env, "up", "--core")
        assert result.returncode == 0, result.stderr
        assert httpx.get(f"{tracking_uri(env)}/health", timeout=5).status_code == 200
    finally:
        cli(env, "down")


@pytest.fixture()
def moto_s3() -> Iterator[str]:
    """moto's S3 server standing in for MinIO."""
    with moto_s3_server() as url:
        yield url


def test_s3_store_creates_bucket_and_client_needs_no_credentials(
    moto_s3: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = stack_env(
        tmp_path / "home",
        CAPTCHAOPS_S3_ENDPOINT_URL=moto_s3,
        CAPTCHAOPS_S3_ACCESS_KEY="testing-key",
        CAPTCHAOPS_S3_SECRET_KEY="testing-secret",
        CAPTCHAOPS_S3_BUCKET="breaking-captcha",
    )
    s3 = boto3.client(
        "s3",
        endpoint_url=moto_s3,
        aws_access_key_id="testing-key",
        aws_secret_access_key="testing-secret",
        region_name="us-east-1",
    )
    assert "breaking-captcha" not in [b["Name"] for b in s3.list_buckets()["Buckets"]]
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_S3_ENDPOINT_URL"):
        monkeypatch.delenv(key, raising=False)
    try:
        result = cli(env, "up", "--core")
        assert result.returncode == 0, result.stderr
        assert "S3 endpoint" in result.stdout and "created bucket" in result.stdout
        run_id = log_sample_run(tracking_uri(env), tmp_path)
        assert_run_intact(tracking_uri(env), run_id, tmp_path)
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket="breaking-captcha")["Contents"]]
        assert any(
            k.startswith("mlflow/") and k.endswith(f"{run_id}/artifacts/note.txt") for k in keys
        )
    finally:
        cli(env, "down")


def test_unreachable_s3_endpoint_is_one_clear_error(tmp_path: Path) -> None:
    env = stack_env(
        tmp_path / "home",
        CAPTCHAOPS_S3_ENDPOINT_URL=f"http://127.0.0.1:{free_port()}",
        CAPTCHAOPS_S3_ACCESS_KEY="k",
        CAPTCHAOPS_S3_SECRET_KEY="s",
    )
    result = cli(env, "up", "--core")
    assert result.returncode == 1
    assert "cannot reach the S3 endpoint" in result.stderr
    assert "CAPTCHAOPS_S3_ENDPOINT_URL" in result.stderr
    assert "Traceback" not in result.stderr
