"""`app`: the web app in this process (supervisord starts it as `captchaops app`)."""

from __future__ import annotations

import typer

from captchaops.cli.base import app, fail
from captchaops.settings import load_settings
from captchaops.webapp.app import run as run_webapp


@app.command("app")
def webapp(
    port: int | None = typer.Option(None, "--port", help="default: the app_port setting (8080)"),
    host: str | None = typer.Option(None, "--host", help="default: the host setting (loopback)"),
) -> None:
    """Serve the demo web page and JSON API over the model servers (waitress, never debug)."""
    try:
        run_webapp(load_settings(), port, host)
    except OSError as exc:
        fail(f"cannot listen for the web app ({exc}); pick a free port with --port")
