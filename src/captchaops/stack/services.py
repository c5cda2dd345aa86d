"""What the local stack runs: one spec per service, in start order."""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from captchaops.settings import Settings
from captchaops.stack.store import Store

CORE = ("store", "tracking")
ALL = ("store", "tracking", "production", "staging", "app")


@dataclass(frozen=True)
class Service:
    """A supervised process: its command, environment, port and health check."""

    name: str
    command: list[str]
    port: int
    port_setting: str
    health_url: str
    url: str
    env: dict[str, str] = field(default_factory=dict)
    start_timeout: float = 90.0
    memory_hint_mb: int = 0


def _bin(name: str) -> str:
    """An executable of this environment (the venv's), falling back to PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else (shutil.which(name) or name)


def build_services(settings: Settings, store: Store, names: tuple[str, ...] = ALL) -> list[Service]:
    """The services to supervise for these settings, in start order."""
    host = settings.host
    client_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    home = settings.home_dir
    common = {"CAPTCHAOPS_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    specs: list[Service] = []
    if "store" in names and store.kind == "minio":
        assert store.endpoint_url and settings.s3_secret_key
        specs.append(
            Service(
                name="store",
                command=[
                    _bin("minio"),
                    "server",
                    str(home / "minio"),
                    "--address",
                    f"{host}:{settings.minio_port}",
                    "--console-address",
                    f"{host}:{settings.minio_console_port}",
                ],
                port=settings.minio_port,
                port_setting="CAPTCHAOPS_MINIO_PORT",
                health_url=f"{store.endpoint_url}/minio/health/live",
                url=store.endpoint_url,
                env={
                    "MINIO_ROOT_USER": settings.s3_access_key or "",
                    "MINIO_ROOT_PASSWORD": settings.s3_secret_key.get_secret_value(),
                },
                memory_hint_mb=150,
            )
        )
    if "tracking" in names and not settings.tracking_uri:
        url = f"http://{client_host}:{settings.tracking_port}"
        specs.append(
            Service(
                name="tracking",
                command=[
                    sys.executable,
                    "-m",
                    "captchaops.stack.tracking",
                    "--backend-store-uri",
                    settings.effective_backend_store_uri,
                    "--artifacts-destination",
                    store.destination,
                    "--host",
                    host,
                    "--port",
                    str(settings.tracking_port),
                    "--workers",
                    str(settings.tracking_workers),
                ],
                port=settings.tracking_port,
                port_setting="CAPTCHAOPS_TRACKING_PORT",
                health_url=f"{url}/health",
                url=url,
                env={**common, **store.env},
                memory_hint_mb=300,
            )
        )
    for alias, port, setting in (
        ("production", settings.production_port, "CAPTCHAOPS_PRODUCTION_PORT"),
        ("staging", settings.staging_port, "CAPTCHAOPS_STAGING_PORT"),
    ):
        if alias in names:
            url = f"http://{client_host}:{port}"
            specs.append(
                Service(
                    name=alias,
                    command=[_bin("captchaops"), "serve", "--alias", alias, "--port", str(port)],
                    port=port,
                    port_setting=setting,
                    health_url=f"{url}/ping",
                    url=url,
                    env={**common, **settings.mlflow_env()},
                    memory_hint_mb=250,
                )
            )
    if "app" in names:
        url = f"http://{client_host}:{settings.app_port}"
        specs.append(
            Service(
                name="app",
                command=[_bin("captchaops"), "app", "--port", str(settings.app_port)],
                port=settings.app_port,
                port_setting="CAPTCHAOPS_APP_PORT",
                health_url=f"{url}/healthz",
                url=url,
                env={**common, **settings.mlflow_env()},
                memory_hint_mb=150,
            )
        )
    return specs
