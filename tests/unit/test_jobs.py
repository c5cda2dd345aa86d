"""`--submit`: the job a command becomes (scaleout/jobs.py), checked without a cluster.

The job's entrypoint must parse as the real command on the job's own cluster and carry no
credential (a command line is visible in `ps` and `ray job list`); the caller's account or
login travels in the job's environment; addresses a job cannot use are refused in one line
before anything is sent. Submitting to a live head runs in
tests/integration/test_hosts_scaleout.py.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from pydantic import SecretStr
from typer.main import get_command
from typer.testing import CliRunner

from captchaops.cli import app
from captchaops.scaleout import ScaleoutError
from captchaops.scaleout.jobs import (
    Uploaded,
    check_private,
    dashboard_address,
    entrypoint,
    folder_size,
    job_env,
    packed,
    submit,
)
from captchaops.settings import Settings


def settings(tmp_path: Path, **values: object) -> Settings:
    return Settings(home=tmp_path / "home", **values)  # type: ignore[arg-type]


def test_the_entrypoint_parses_as_the_real_command_on_the_jobs_own_cluster() -> None:
    options = {"--data": ".", "--folds": 3, "--steps": None, "--include-feedback": False}
    line = entrypoint("cv", options | {"--gpus-per-trial": 0.5, "--preset": "folder"})
    args = shlex.split(line)
    assert args[:2] == ["captchaops", "cv"] and args[-2:] == ["--cluster", "auto"]
    group = get_command(app)
    _, cv, _ = group.resolve_command(group.make_context("captchaops", ["cv"]), ["cv"])  # type: ignore[attr-defined]
    params = cv.make_context("cv", args[2:]).params  # parses as the command does, runs nothing
    assert params["data"] == "." and params["folds"] == 3 and params["gpus"] == 0.5
    assert params["steps"] is None and params["cluster"] == "auto"
    uploaded = shlex.split(entrypoint("cv", {"--data": Uploaded("my captchas")}))
    assert uploaded[2:4] == ["--data", "$PWD/my captchas"]  # the shell expands it in the job
    train = entrypoint("train", {"--members": 2, "--include-feedback": True})
    assert shlex.split(train)[2:] == ["--members", "2", "--include-feedback", "--cluster", "auto"]


def test_the_callers_account_travels_in_the_environment_not_the_command_line(
    tmp_path: Path,
) -> None:
    mine = settings(
        tmp_path,
        tracking_uri="https://mlflow.example.org",
        tracking_username="ana",
        tracking_password=SecretStr("s3cret pass"),
        model_name="digits",
        staging_floor=0.0,
    )
    env = job_env(mine, "captchaops-cv-1")
    assert env["CAPTCHAOPS_TRACKING_URI"] == "https://mlflow.example.org"
    assert env["CAPTCHAOPS_TRACKING_USERNAME"] == "ana"
    assert env["CAPTCHAOPS_TRACKING_PASSWORD"] == "s3cret pass"
    assert env["CAPTCHAOPS_MODEL_NAME"] == "digits" and env["CAPTCHAOPS_STAGING_FLOOR"] == "0.0"
    assert "LOGNAME" not in env  # the account is who the runs are credited to
    assert env["CAPTCHAOPS_HOME"] == "/tmp/captchaops-jobs/captchaops-cv-1"
    assert env["RAY_JOB_STOP_SIGNAL"] == "SIGINT"  # `ray job stop` ends the runs KILLED
    assert "s3cret" not in entrypoint("cv", {"--data": "."})


def test_without_an_account_the_runs_are_credited_to_the_callers_login(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.mlflow/credentials
    monkeypatch.setenv("LOGNAME", "lin")
    env = job_env(settings(tmp_path, tracking_uri="http://10.0.0.5:5000"), "j")
    assert env["LOGNAME"] == env["USER"] == "lin"
    assert "CAPTCHAOPS_TRACKING_PASSWORD" not in env


@pytest.mark.parametrize("address", ["ray://10.0.0.1:10001", "10.0.0.1:8265", "http://", "auto"])
def test_a_submit_address_that_is_not_a_dashboard_is_refused(address: str) -> None:
    with pytest.raises(ScaleoutError, match="http://HEAD:8265"):
        dashboard_address(address)
    assert dashboard_address("https://ray.example.org/") == "https://ray.example.org"


def test_the_laptops_loopback_tracking_server_is_refused_before_submitting(
    tmp_path: Path,
) -> None:
    local = settings(tmp_path, tracking_uri="http://127.0.0.1:8000")
    with pytest.raises(ScaleoutError, match="loopback, which the cluster cannot reach"):
        submit("http://10.0.0.1:8265", "cv", {"--data": str(tmp_path)}, local)
    with pytest.raises(ScaleoutError, match="http\\(s\\) URL"):
        submit("http://10.0.0.1:8265", "cv", {}, settings(tmp_path, tracking_uri="file:///x"))


def test_a_folder_travels_as_one_folder_of_its_name(tmp_path: Path) -> None:
    folder = tmp_path / "caps"
    (folder / "sub").mkdir(parents=True)
    (folder / "ab12c.png").write_bytes(b"png")
    (folder / "sub" / "xy34z.png").write_bytes(b"png2")
    (tmp_path / "scratch").mkdir()
    with zipfile.ZipFile(packed(folder, tmp_path / "scratch")) as archive:
        assert sorted(archive.namelist()) == ["caps/ab12c.png", "caps/sub/xy34z.png"]
        assert archive.read("caps/sub/xy34z.png") == b"png2"


def test_a_link_in_the_folder_is_left_out(tmp_path: Path) -> None:
    """A downloaded data set may link to a file outside it (a home's .env): never uploaded."""
    folder = tmp_path / "caps"
    folder.mkdir()
    (folder / "ab12c.png").write_bytes(b"png")
    (tmp_path / "secret.env").write_text("CAPTCHAOPS_TRACKING_PASSWORD=x")
    (folder / "cd34e.png").symlink_to(tmp_path / "secret.env")
    (tmp_path / "scratch").mkdir()
    with zipfile.ZipFile(packed(folder, tmp_path / "scratch")) as archive:
        assert archive.namelist() == ["caps/ab12c.png"]


def test_a_password_goes_only_to_a_cluster_that_checks_a_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ray shows a job's environment on its dashboard: without token authentication anyone who
    can reach it would read the submitter's tracking password."""
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ray/auth_token
    with pytest.raises(ScaleoutError, match="RAY_AUTH_MODE=token"):
        check_private({"CAPTCHAOPS_TRACKING_PASSWORD": "s3cret"})
    check_private({"LOGNAME": "lin"})  # no password: nothing to show
    token = tmp_path / "token"
    token.write_text("t")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token))
    check_private({"CAPTCHAOPS_TRACKING_PASSWORD": "s3cret"})


def test_the_promotion_service_travels_with_the_job(tmp_path: Path) -> None:
    """A job that stages without the service would sign with a key of its own, which no server
    trusts."""
    with_service = settings(
        tmp_path, tracking_uri="http://10.0.0.5:5000", promotions_url="http://10.0.0.5:8890"
    )
    assert job_env(with_service, "j")["CAPTCHAOPS_PROMOTIONS_URL"] == "http://10.0.0.5:8890"
    without = job_env(settings(tmp_path, tracking_uri="http://10.0.0.5:5000"), "j")
    assert "CAPTCHAOPS_PROMOTIONS_URL" not in without


def test_a_folder_too_big_to_upload_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "a.png").write_bytes(b"x" * 2048)
    assert folder_size(tmp_path) == 2048
    monkeypatch.setattr("captchaops.scaleout.jobs.MAX_FOLDER_BYTES", 1024)
    with pytest.raises(ScaleoutError, match="put it on a volume the head mounts"):
        folder_size(tmp_path)
    with pytest.raises(ScaleoutError, match="is not a folder"):
        folder_size(tmp_path / "a.png")


def test_no_dashboard_at_the_address_is_one_line(tmp_path: Path) -> None:
    import socket

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    local = settings(tmp_path, tracking_uri="http://127.0.0.1:8000")
    with pytest.raises(ScaleoutError, match="cannot submit a job to the Ray dashboard") as err:
        submit(f"http://127.0.0.1:{port}", "tune", {"--synthetic": 10}, local)
    assert "\n" not in str(err.value)


def test_the_cli_refuses_a_ray_client_address_in_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app,
        ["cv", "--data", str(tmp_path), "--submit", "ray://10.0.0.1:10001"],
        env={"CAPTCHAOPS_HOME": str(tmp_path / "home")},
    )
    assert result.exit_code == 1
    lines = [x for x in result.output.splitlines() if x.strip()]
    assert len(lines) == 1 and "is not a Ray dashboard's address" in lines[0], result.output
    members = CliRunner().invoke(app, ["train", "--submit", "http://10.0.0.1:8265"])
    assert members.exit_code == 1 and "add --members K" in members.output


def test_model_servers_and_the_web_app_never_import_ray() -> None:
    script = (
        "import sys\n"
        "import captchaops.serving.app, captchaops.webapp, captchaops.cli\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'ray', 'opencensus', 'aiohttp_cors'}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True
    )
    assert done.stdout.strip() == "[]"
