"""`serve`: one model server in this process.

MLflow-free, and apart from the other commands: supervisord starts every model server replica
as `captchaops serve`, so each module imported here is memory in each replica.
"""

from __future__ import annotations

import typer

from captchaops import service_auth
from captchaops.cli.base import MODEL_NAME_OPTION, app, fail, settings_for
from captchaops.live.monitoring import default_replica_id
from captchaops.serving import ServeError
from captchaops.serving import run as serve_alias
from captchaops.settings import Settings


@app.command()
def serve(
    alias: str = typer.Option("production", "--alias", help="registry alias to serve"),
    port: int | None = typer.Option(None, "--port", help="default: the alias's port setting"),
    host: str | None = typer.Option(None, "--host", help="default: the host setting (loopback)"),
    model_name: str | None = MODEL_NAME_OPTION,
) -> None:
    """Serve models:/<model_name>@<alias> over HTTP, swapping in new versions as the alias moves."""
    settings = settings_for(model_name)
    default_port = settings.staging_port if alias == "staging" else settings.production_port
    port = port or default_port
    try:
        serve_alias(replica_settings(settings, port, host), alias, port, host)
    except (ServeError, ValueError) as exc:
        fail(str(exc))


def replica_settings(settings: Settings, port: int, host: str | None) -> Settings:
    """The settings one `serve` process runs with: it answers Host names of the address it was
    asked to bind (`--host`), and it has a replica id (default: <hostname>-<port>, with the
    address between them when `--host` names one)."""
    service_auth.trusted_networks(settings)  # a bad CIDR stops the server before it starts
    extra = sorted(service_auth.bind_names(host)) if host else []
    hosts = ",".join(h for h in (settings.allowed_hosts, *extra) if h)
    return settings.model_copy(
        update={
            "allowed_hosts": hosts or None,
            "replica_id": settings.replica_id or default_replica_id(port, host),
        }
    )
