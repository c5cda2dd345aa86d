"""What the local stack runs: one spec per service, in start order."""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from captchaops.service_auth import bind_names
from captchaops.settings import Settings, client_host_for, ensure_secret, write_private
from captchaops.stack import balancer
from captchaops.stack.store import Store
from captchaops.stack.webhooks import tracking_env

CORE = ("store", "tracking")
VERDICTS = Path("serving-cache") / "verdicts"
"""Where a model server keeps its trial verdicts, under its home (serving.verdicts)."""
ALL = ("store", "tracking", "production", "staging", "app", "promotions")
"""`promotions` runs in team mode only: locally the key and its callers share one account, so a
service holding the key would keep it from nobody."""


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
    files: dict[Path, str] = field(default_factory=dict)
    """Files written (0600) before the service first starts: a balancer's config."""
    folders: tuple[Path, ...] = ()
    """Folders made (0700) before it first starts, then `links` (link -> target)."""
    links: dict[Path, Path] = field(default_factory=dict)


def _bin(name: str) -> str:
    """An executable of this environment (the venv's), falling back to PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else (shutil.which(name) or name)


def team_secrets(settings: Settings) -> Settings:
    """Generate the team-mode secrets on first use: admin and service passwords, session key,
    the model servers' token."""
    secrets = ("admin_password", "service_password", "promotions_password")
    for name in (*secrets, "auth_secret_key", "serving_token"):
        settings = ensure_secret(settings, name)
    return settings


def write_auth_config(settings: Settings) -> Path:
    """Write the basic-auth config the tracking server reads in team mode (0600: it names the DB)."""
    path = settings.home_dir / "run" / "basic_auth.ini"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join(
        [
            "[mlflow]",
            "default_permission = READ",
            "database_uri = " + settings.effective_auth_database_uri.replace("%", "%%"),
            f"admin_username = {settings.admin_username}",
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth",
            "",
        ]
    )
    write_private(path, text)
    return path


def allowed_hosts(settings: Settings) -> str:
    """The tracking server's --allowed-hosts: the public names plus loopback for local clients."""
    names = [h.strip() for h in (settings.allowed_hosts or "").split(",") if h.strip()]
    local = ["localhost", "127.0.0.1", client_host_for(settings.host)]
    return ",".join(dict.fromkeys([*names, *local, *(f"{h}:*" for h in local)]))


def service_env(settings: Settings) -> dict[str, str]:
    """How model servers and the app reach the tracking server (their own account in team mode)."""
    if not settings.auth:
        return settings.mlflow_env()
    assert settings.service_password, "call team_secrets() first"
    password = settings.service_password.get_secret_value()
    return {
        "MLFLOW_TRACKING_URI": settings.effective_tracking_uri,
        "MLFLOW_TRACKING_USERNAME": settings.service_username,
        "MLFLOW_TRACKING_PASSWORD": password,
        "CAPTCHAOPS_TRACKING_USERNAME": settings.service_username,
        "CAPTCHAOPS_TRACKING_PASSWORD": password,
    }


def promotions_env(settings: Settings) -> dict[str, str]:
    """The promotion service's tracking account: its own (`team_accounts.ensure_promotions_account`:
    MANAGE on the scheme's model, EDIT on the experiments it writes, never admin), its generated
    password in the environment, never on the command line, where `ps` would show it."""
    assert settings.promotions_password, "call team_secrets() first"
    password = settings.promotions_password.get_secret_value()
    return {
        "CAPTCHAOPS_AUTH": "true",
        "CAPTCHAOPS_PROMOTIONS_PORT": str(settings.promotions_port),
        "MLFLOW_TRACKING_URI": settings.effective_tracking_uri,
        "MLFLOW_TRACKING_USERNAME": settings.promotions_username,
        "MLFLOW_TRACKING_PASSWORD": password,
        "CAPTCHAOPS_TRACKING_USERNAME": settings.promotions_username,
        "CAPTCHAOPS_TRACKING_PASSWORD": password,
    }


def shadow_env(settings: Settings, alias: str) -> dict[str, str]:
    """Production copies its requests to staging (or to `shadow_url`) and offers low-confidence
    answers to the app's review queue (or `review_url`); staging does neither (it sees copies)."""
    if alias != "production":
        return {"CAPTCHAOPS_SHADOW_URL": "", "CAPTCHAOPS_REVIEW_URL": ""}
    url = settings.server_url("staging") if settings.shadow_url is None else settings.shadow_url
    review = settings.app_url if settings.review_url is None else settings.review_url
    return {"CAPTCHAOPS_SHADOW_URL": url, "CAPTCHAOPS_REVIEW_URL": review}


def build_services(
    settings: Settings, store: Store, names: tuple[str, ...] = ALL, replicas: int = 1
) -> list[Service]:
    """The services to supervise for these settings, in start order; with `replicas` > 1 each
    served alias is that many model servers behind a balancer (`replicated`)."""
    if settings.auth:
        settings = team_secrets(settings)
    host = settings.host
    client_host = client_host_for(host)
    home = settings.home_dir
    # Services see the settings `up` was called with, even when they came from code, not env.
    common = {
        "CAPTCHAOPS_HOME": str(home),
        "CAPTCHAOPS_HOST": host,
        "CAPTCHAOPS_TRACKING_URI": settings.effective_tracking_uri,
        "CAPTCHAOPS_PRODUCTION_PORT": str(settings.production_port),
        "CAPTCHAOPS_STAGING_PORT": str(settings.staging_port),
        "CAPTCHAOPS_APP_PORT": str(settings.app_port),
        "CAPTCHAOPS_MODEL_NAME": settings.model_name,
        "CAPTCHAOPS_EXPERIMENT_NAME": settings.experiment_name,
        "CAPTCHAOPS_POLL_SECONDS": str(settings.poll_seconds),
        # what moves the servers follow: those signed by this settings' promotion key
        "CAPTCHAOPS_SIGNING_PUBLIC_KEY": str(settings.effective_signing_public_key),
        "PYTHONUNBUFFERED": "1",
    }
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
            )
        )
    if "tracking" in names and not settings.tracking_uri:
        url = f"http://{client_host}:{settings.tracking_port}"
        team_args: list[str] = []
        team_env: dict[str, str] = {}
        if settings.allowed_hosts:
            team_args += ["--allowed-hosts", allowed_hosts(settings)]
        if settings.auth:
            assert settings.admin_password and settings.auth_secret_key
            team_args += ["--app-name", "basic-auth"]
            team_env = {
                "MLFLOW_AUTH_CONFIG_PATH": str(write_auth_config(settings)),
                "MLFLOW_AUTH_ADMIN_PASSWORD": settings.admin_password.get_secret_value(),
                "MLFLOW_FLASK_SERVER_SECRET_KEY": settings.auth_secret_key.get_secret_value(),
            }
        specs.append(
            Service(
                name="tracking",
                command=[
                    sys.executable,
                    "-m",
                    "captchaops.stack.tracking",
                    "--artifacts-destination",
                    store.destination,
                    "--host",
                    host,
                    "--port",
                    str(settings.tracking_port),
                    "--workers",
                    str(settings.tracking_workers),
                    *team_args,
                ],
                port=settings.tracking_port,
                port_setting="CAPTCHAOPS_TRACKING_PORT",
                health_url=f"{url}/health",
                url=url,
                env={
                    **common,
                    **store.env,
                    **team_env,
                    **tracking_env(settings),
                    # not an argument: it may hold the database password, and `ps` shows those
                    "MLFLOW_BACKEND_STORE_URI": settings.effective_backend_store_uri,
                },
            )
        )
    for alias, port, setting in (
        ("production", settings.production_port, "CAPTCHAOPS_PRODUCTION_PORT"),
        ("staging", settings.staging_port, "CAPTCHAOPS_STAGING_PORT"),
    ):
        if alias not in names:
            continue
        env = {**common, **service_env(settings), **shadow_env(settings, alias)}
        if replicas > 1:
            specs += replicated(settings, alias, port, setting, replicas, env)
            continue
        url = f"http://{client_host}:{port}"
        specs.append(
            Service(
                name=alias,
                command=[_bin("captchaops"), "serve", "--alias", alias, "--port", str(port)],
                port=port,
                port_setting=setting,
                health_url=f"{url}/ping",
                url=url,
                env=env,
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
                env={**common, **service_env(settings)},
            )
        )
    if "promotions" in names and settings.auth:
        url = f"http://{client_host}:{settings.promotions_port}"
        serve = [_bin("captchaops"), "promotions", "serve", "--port", str(settings.promotions_port)]
        specs.append(
            Service(
                name="promotions",
                command=serve,
                port=settings.promotions_port,
                port_setting="CAPTCHAOPS_PROMOTIONS_PORT",
                health_url=f"{url}/health",
                url=url,
                env={**common, **promotions_env(settings)},
            )
        )
    return specs


def replica_name(alias: str, index: int) -> str:
    """The service name of replica `index` (1-based) of an alias."""
    return f"{alias}-{index}"


def replica_links(settings: Settings, home: Path) -> dict[Path, Path]:
    """A replica's home: its own, since a server sweeps its alias's download folder
    (`<home>/serving-cache/<model>/<alias>`) of what it did not keep, so two servers of one
    alias in one home delete each other's downloads; the stack's secrets (`.env`) and trial
    verdicts (one trial per network for every replica) are links to the stack home's."""
    return {home / ".env": settings.env_file, home / VERDICTS: settings.home_dir / VERDICTS}


def replicated(
    settings: Settings, alias: str, port: int, setting: str, count: int, env: dict[str, str]
) -> list[Service]:
    """`count` model servers of `alias` on loopback (ports: `balancer.replica_port`), each
    relaying webhooks to the others and trusting the balancer's address as a proxy, then the
    balancer (HAProxy) on the alias's own host and port, under the alias's name."""
    host = balancer.REPLICA_HOST
    ports = [balancer.replica_port(port, k) for k in range(1, count + 1)]
    urls = [f"http://{host}:{p}" for p in ports]
    proxies = ",".join(p for p in (settings.trusted_proxies, host) if p)
    # requests keep the Host their client sent the balancer: a replica answers those names too
    names = ",".join(n for n in (settings.allowed_hosts, *sorted(bind_names(settings.host))) if n)
    specs = []
    for k, (replica_port, url) in enumerate(zip(ports, urls, strict=True), start=1):
        peers = ",".join(u for u in urls if u != url)
        serve = [_bin("captchaops"), "serve", "--alias", alias, "--port", str(replica_port)]
        name = replica_name(alias, k)
        home = settings.home_dir / "replicas" / name
        specs.append(
            Service(
                name=name,
                command=[*serve, "--host", host],
                port=replica_port,
                port_setting=setting,
                health_url=f"{url}/ping",
                url=url,
                env={
                    **env,
                    "CAPTCHAOPS_HOME": str(home),
                    "CAPTCHAOPS_WEBHOOK_PEERS": peers,
                    "CAPTCHAOPS_TRUSTED_PROXIES": proxies,
                    "CAPTCHAOPS_ALLOWED_HOSTS": names,
                },
                folders=(settings.home_dir / VERDICTS,),
                links=replica_links(settings, home),
            )
        )
    config = settings.home_dir / "run" / f"balancer-{alias}.cfg"
    upstreams = [u.removeprefix("http://") for u in urls]
    text = balancer.config(alias, settings.host, port, upstreams, client_host_for(settings.host))
    url = f"http://{client_host_for(settings.host)}:{port}"
    try:
        haproxy = balancer.haproxy_binary()
    except balancer.BalancerMissing:
        haproxy = "haproxy"  # `up` says how to install it before anything starts
    return [
        *specs,
        Service(
            name=alias,
            command=[haproxy, "-db", "-f", str(config)],
            port=port,
            port_setting=setting,
            health_url=f"{url}/ping",
            url=url,
            start_timeout=30.0,
            files={config: text},
        ),
    ]
