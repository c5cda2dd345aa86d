"""No secret of the team stack where another local account, a log reader or a reader of runs
can see it: `captchaops up` in team mode (PostgreSQL, S3, basic-auth, both model servers, the
promotion service, the app), then every generated secret is looked for in its processes'
command lines, its log files and every MLflow parameter and tag."""

from __future__ import annotations

import base64
import os
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from mlflow import MlflowClient

from captchaops.data.synthetic import generate
from tests.fixtures.stack import free_port
from tests.integration.test_team import (  # noqa: F401 (module fixtures)
    BUCKET,
    DB_PASSWORD,
    Postgres,
    cli,
    moto,
    postgres,
    read_env_file,
)

pytestmark = [pytest.mark.slow, pytest.mark.postgres]
S3_SECRET = "team-secret-for-the-scan"
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|_KEY$")


@pytest.fixture(scope="module")
def stack(
    postgres: Postgres,  # noqa: F811
    moto: str,  # noqa: F811
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict]:
    """The whole team stack, started the way an operator starts it."""
    home = tmp_path_factory.mktemp("team-secrets") / "home"
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("CAPTCHAOPS_", "AWS_", "MLFLOW_"))
    }
    env.update(
        CAPTCHAOPS_HOME=str(home),
        CAPTCHAOPS_AUTH="true",
        CAPTCHAOPS_BACKEND_STORE_URI=postgres.uri("mlflow"),
        CAPTCHAOPS_AUTH_DATABASE_URI=postgres.uri("mlflow_auth"),
        CAPTCHAOPS_S3_ENDPOINT_URL=moto,
        CAPTCHAOPS_S3_ACCESS_KEY="team-key",
        CAPTCHAOPS_S3_SECRET_KEY=S3_SECRET,
        CAPTCHAOPS_S3_BUCKET=BUCKET,
        CAPTCHAOPS_TRACKING_PORT=str(free_port()),
        CAPTCHAOPS_PRODUCTION_PORT=str(free_port()),
        CAPTCHAOPS_STAGING_PORT=str(free_port()),
        CAPTCHAOPS_APP_PORT=str(free_port()),
        CAPTCHAOPS_PROMOTIONS_PORT=str(free_port()),
    )
    up = cli(env, "up")
    assert up.returncode == 0, up.stdout + up.stderr
    port = env["CAPTCHAOPS_PROMOTIONS_PORT"]
    assert f"promotions  healthy  http://127.0.0.1:{port}" in up.stdout, up.stdout
    try:
        yield {"env": env, "home": home, "secrets": read_env_file(home / ".env")}
    finally:
        cli(env, "down")


def descendants(root: int) -> list[int]:
    """`root` and every process below it."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, pending = [], [root]
    while pending:
        pid = pending.pop()
        found.append(pid)
        pending += children.get(pid, [])
    return found


@pytest.mark.timeout(900)
def test_no_secret_in_command_lines_logs_or_runs(stack: dict) -> None:
    env, home = stack["env"], stack["home"]
    secrets = {k: v for k, v in stack["secrets"].items() if SECRET_NAME.search(k) and len(v) >= 8}
    assert {"CAPTCHAOPS_ADMIN_PASSWORD", "CAPTCHAOPS_SERVICE_PASSWORD"} <= set(secrets)
    secrets |= {"database password": DB_PASSWORD, "S3 secret key": S3_SECRET}
    uri = f"http://127.0.0.1:{env['CAPTCHAOPS_TRACKING_PORT']}"
    admin = ("admin", secrets["CAPTCHAOPS_ADMIN_PASSWORD"])

    # Traffic that logs: wrong and right logins at the app and the tracking server, a prediction.
    app = f"http://127.0.0.1:{env['CAPTCHAOPS_APP_PORT']}"
    assert httpx.get(f"{app}/", auth=("admin", "wrong-password-1"), timeout=30).status_code == 401
    image = base64.b64encode(generate(1, seed=3)[0].image).decode()
    answer = httpx.post(f"{app}/api/predict", json={"image": image}, auth=admin, timeout=30)
    assert answer.status_code == 503, answer.text  # no version served yet
    assert httpx.get(f"{uri}/api/2.0/mlflow/users/get", auth=("x", "y")).status_code == 401
    reader = cli(env, "users", "add", "rita", "--role", "reader")
    assert reader.returncode == 0, reader.stderr

    pid = int((home / "run" / "supervisord.pid").read_text())
    pids = descendants(pid)
    lines: dict[object, bytes] = {
        p: Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ") for p in pids
    }
    assert len(lines) >= 6, lines  # supervisord, tracking, production, staging, promotions, app
    conf = (home / "run" / "supervisord.conf").read_text().splitlines()
    commands = {
        f"supervised {i}": c.encode() for i, c in enumerate(conf) if c.startswith("command=")
    }
    assert len(commands) == 5, commands  # what every restart runs, not only what runs now
    lines |= commands
    logs = {path: path.read_bytes() for path in home.rglob("*.log") if path.is_file()}
    assert logs, "the stack wrote no log files"

    client = MlflowClient(tracking_uri=f"http://admin:{admin[1]}@127.0.0.1:{uri.rsplit(':', 1)[1]}")
    experiments = client.search_experiments()
    runs = client.search_runs([e.experiment_id for e in experiments], max_results=1000)
    recorded = [
        *(f"{k}={v}" for e in experiments for k, v in e.tags.items()),
        *(f"{k}={v}" for r in runs for k, v in {**r.data.params, **r.data.tags}.items()),
        *(f"{k}={v}" for m in client.search_registered_models() for k, v in m.tags.items()),
    ]
    for name, secret in secrets.items():
        needle = secret.encode()
        for p, line in lines.items():
            assert needle not in line, f"{name} on the command line of {p}"
        for path, text in logs.items():
            assert needle not in text, f"{name} in {path.relative_to(home)}"
        assert not [r for r in recorded if secret in r], f"{name} in an MLflow param or tag"
    for private in (home / ".env", home / "run" / "supervisord.conf"):
        assert private.stat().st_mode & 0o077 == 0, private
