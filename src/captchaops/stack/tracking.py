"""Launch the real `mlflow server` as one supervised process.

`mlflow server` forks uvicorn and waits for it. Under a supervisor that shape leaks:
a `kill -9` of the parent leaves the uvicorn child holding the port, so the restarted
server cannot bind. This launcher runs mlflow's own CLI (same option parsing, same
database migrations, same environment for the app) but replaces the final fork+wait
with `exec`, so the supervised pid *is* the HTTP server. Job execution (huey consumers,
about 2 GB RSS with mlflow 3.17) is switched off: nothing in captchaops uses it. With
`--app-name basic-auth` the served app is MLflow's, wrapped in a failed-login limit
(`captchaops.stack.login_throttle`). Secrets never travel as arguments: the backend store's
URI (which may hold the database password) is read from `MLFLOW_BACKEND_STORE_URI`.
"""

from __future__ import annotations

import os
import sys
from typing import Any

BASIC_AUTH_APP = "mlflow.server.auth:create_app"
THROTTLED_APP = "captchaops.stack.login_throttle:create_app"


def _exec_instead(cmd: list[str], extra_env: dict[str, str] | None = None, **_: Any) -> None:
    """Replace this process with the server command mlflow built (basic-auth behind the limit)."""
    cmd = [THROTTLED_APP if part == BASIC_AUTH_APP else part for part in cmd]
    env = {**os.environ, **(extra_env or {})}
    os.execvpe(cmd[0], cmd, env)


def main(argv: list[str] | None = None) -> None:
    """Run `mlflow server ARGV` in this pid, without job runners."""
    os.environ["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    # here, not at the top: every stack command imports this module (stack.services) and runs
    # MLflow-free; MLflow's server and CLI add 3 s and ~200 MB
    import mlflow.server
    from mlflow.cli import cli

    if hasattr(mlflow.server, "_exec_cmd"):
        mlflow.server._exec_cmd = _exec_instead  # type: ignore[attr-defined]
    cli.main(["server", *(sys.argv[1:] if argv is None else argv)], prog_name="mlflow")


if __name__ == "__main__":
    main()
