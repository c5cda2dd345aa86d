"""The one Settings object: every default, read from `CAPTCHAOPS_*` variables and `<home>/.env`."""

from __future__ import annotations

import os
import re
import secrets
import tempfile
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "CAPTCHAOPS_"
SECRET_FIELDS = (
    "s3_secret_key",
    "tracking_password",
    "app_secret_key",
    "admin_password",
    "auth_secret_key",
    "service_password",
    "promotions_password",
    "serving_token",
    "webhook_secret",
    "webhook_encryption_key",
    "review_token",
)
# A URL's user information: a user without '/', then a password that may hold one (database
# URLs allow it), up to the '@'.
_USERINFO = re.compile(r"(://)[^/@\s:]*(?::[^@\s]*)?@")


class Settings(BaseSettings):
    """Effective configuration of a captchaops installation."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="ignore", env_file_encoding="utf-8", populate_by_name=True
    )

    home: Path = Field(Path("captchaops-data"), description="state directory")
    host: str = Field("127.0.0.1", description="interface every local service binds to")

    tracking_port: int = 8000
    tracking_uri: str | None = Field(
        None,
        description="use an existing tracking server instead of starting one",
        # MLflow's own variable works too, as for any MLflow client; ours wins when both are set
        validation_alias=AliasChoices(f"{ENV_PREFIX}TRACKING_URI", "MLFLOW_TRACKING_URI"),
    )
    tracking_username: str | None = None
    tracking_password: SecretStr | None = None
    tracking_workers: int = 1
    backend_store_uri: str | None = Field(
        None, description="defaults to sqlite:///<home>/mlflow.db"
    )

    store: Literal["auto", "minio", "s3", "local"] = Field(
        "auto", description="artifact store: MinIO if installed, else S3 if configured, else local"
    )
    s3_endpoint_url: str | None = None
    s3_bucket: str = "breaking-captcha"
    s3_prefix: str = "mlflow"
    s3_access_key: str | None = None
    s3_secret_key: SecretStr | None = None
    s3_region: str = "us-east-1"
    minio_port: int = 9000
    minio_console_port: int = 9001

    production_port: int = 8888
    staging_port: int = 8889
    production_url: str | None = Field(
        None, description="reach the production server here (in containers: http://production:8888)"
    )
    staging_url: str | None = Field(None, description="reach the staging server here instead")
    shadow_url: str | None = Field(
        None,
        description="a model server that gets a copy of each answered request, to compare "
        "(empty: none); `up` points production's at staging unless this is set",
    )
    shadow_queue: int = Field(
        64, ge=1, description="copies waiting for the shadow server; more are dropped and counted"
    )
    shadow_per_second: float = Field(
        10.0, gt=0, description="most requests a second copied to the shadow; the rest are skipped"
    )
    shadow_timeout_seconds: float = Field(
        5.0, gt=0, description="a copy the shadow server has not answered by then is an error"
    )
    monitor_seconds: float = Field(
        30.0,
        ge=0,
        description="how often model servers log each served version's monitoring run to "
        "MLflow (and once at shutdown); 0: never",
    )
    gate_min_shadow: int = Field(
        200, ge=1, description="shadow comparisons `promote --auto` needs to use shadow agreement"
    )
    gate_min_agreement: float = Field(
        0.9,
        ge=0,
        le=1,
        description="`promote --auto` rejects a candidate that agrees with production less than "
        "this on shadow traffic, unless it wins on the frozen set",
    )
    gate_live_points: float = Field(
        5.0,
        ge=0,
        description="`promote --auto` rejects a candidate whose live estimate is more than this "
        "many points below production's over the same period",
    )
    production_approval: str | None = Field(
        None,
        description="schemes whose @production moves wait for a second account's approval "
        "(`captchaops approve`): comma-separated names, * for all, empty for none; unset: "
        "all in team mode, none locally",
    )
    promotions_port: int = Field(
        8890, description="port of the promotion service (`captchaops promotions serve`)"
    )
    promotions_url: str | None = Field(
        None,
        description="send promote, approve, rollback and requests to the promotion service here "
        "(it alone holds the promotion key); empty: run them in this process with the local key",
    )
    app_port: int = 8080
    app_secret_key: SecretStr | None = None

    auth: bool = Field(False, description="team mode: MLflow basic-auth on the tracking server")
    allowed_hosts: str | None = Field(
        None,
        description="extra Host names the tracking server, model servers and web app answer to "
        "(comma-separated; '.example.com' allows subdomains, '*' any)",
    )
    admin_username: str = "admin"
    admin_password: SecretStr | None = None
    auth_database_uri: str | None = Field(
        None, description="user store of basic-auth; defaults to sqlite:///<home>/basic_auth.db"
    )
    auth_secret_key: SecretStr | None = None
    service_username: str = Field(
        "captchaops-service", description="account the model servers and the app use in team mode"
    )
    service_password: SecretStr | None = None
    promotions_username: str = Field(
        "captchaops-promotions",
        description="account the promotion service uses in team mode (MANAGE on the scheme's registered model, EDIT on its experiments, not admin)",
    )
    promotions_password: SecretStr | None = None
    serving_token: SecretStr | None = Field(
        None,
        description="bearer token model servers require in team mode for /reload, /metrics and "
        "staging's /invocations (generated by `up` into <home>/.env)",
    )
    production_needs_token: bool = Field(
        False, description="team mode: production's /invocations also requires the token"
    )
    live_traffic: Literal["trusted", "all"] = Field(
        "trusted",
        description="which answers feed the live estimate, shadow comparisons and the canary "
        "breaker: trusted (with the token in team mode; all locally) or all",
    )

    experiment_name: str = "text-captcha"
    feedback_experiment: str = Field(
        "text-captcha-feedback",
        description="experiment of the web app's corrections and review items, read by training",
    )
    model_name: str = "text-captcha"
    poll_seconds: float = Field(2.0, gt=0, description="how often model servers check their alias")
    webhooks: bool = Field(
        True, description="`up` registers MLflow alias webhooks so model servers swap at once"
    )
    webhook_poll_seconds: float = Field(
        30.0, gt=0, description="how often model servers check their alias while webhooks arrive"
    )
    webhook_secret: SecretStr | None = Field(
        None, description="HMAC secret of the alias webhooks (generated by `up`)"
    )
    webhook_encryption_key: SecretStr | None = Field(
        None, description="Fernet key the tracking server stores webhook secrets with (generated)"
    )
    canary: bool = Field(
        True, description="the production model server sends a share of its traffic to @canary"
    )
    canary_min_answers: int = Field(
        100, ge=1, description="canary answers before its breaker judges the canary"
    )
    canary_drop_points: float = Field(
        10.0,
        gt=0,
        le=100,
        description="the breaker trips when the canary's live estimate is this many points below "
        "its gate accuracy or production's estimate",
    )
    canary_p99_ratio: float = Field(
        2.0,
        gt=0,
        description="the breaker trips when the canary's p99 exceeds production's times this",
    )
    canary_p99_slack_ms: float = Field(
        50.0, ge=0, description="...plus this many milliseconds (timer noise on small models)"
    )
    staging_floor: float = Field(
        0.5, ge=0, le=1, description="test sequence accuracy a new version needs for @staging"
    )
    model_timeout_seconds: float = Field(
        3.0, gt=0, description="the web app counts a model server slower than this as down"
    )
    tracking_public_url: str | None = Field(
        None, description="tracking server address for links shown in browsers"
    )
    max_upload_bytes: int = 1024 * 1024
    feedback_per_minute: int = Field(
        10, ge=1, description="corrections the web app takes from one client in any 60 s"
    )
    feedback_per_day: int = Field(
        200, ge=1, description="corrections the web app takes from one client per UTC day"
    )
    feedback_total_per_day: int = Field(
        5000, ge=1, description="corrections the web app takes from all clients per UTC day"
    )
    feedback_count_seconds: float = Field(
        10.0, ge=0, description="how long the web app reuses its count of waiting corrections"
    )
    review_below_confidence: float = Field(
        0.6,
        ge=0,
        le=1,
        description="the web app offers predictions less confident than this for review",
    )
    review_per_hour: int = Field(
        60, ge=0, description="review items the web app stores in any hour (0: no review queue)"
    )
    review_max_pending: int = Field(
        500, ge=0, description="unlabelled review items kept at most; more are dropped"
    )
    review_url: str | None = Field(
        None,
        description="the web app whose review queue a model server offers its low-confidence "
        "answers to (empty: none); `up` points production's at the app",
    )
    review_queue_size: int = Field(
        32, ge=1, description="review items waiting in memory to be stored; more are dropped"
    )
    app_login: bool | None = Field(
        None,
        description="web app visitors log in with a tracking-server account (unset: on in team mode)",
    )
    app_login_cache_seconds: float = Field(
        60.0, ge=0, le=3600, description="how long the web app trusts a login it checked"
    )
    app_login_failures_per_minute: int = Field(
        10, ge=1, description="failed web app logins from one client for one account in any 60 s"
    )
    review_token: SecretStr | None = Field(
        None,
        description="bearer token for the review queue (generated in team mode); unset: loopback only",
    )
    review_login_seconds: float = Field(
        8 * 3600.0,
        gt=0,
        description="how long the review page trusts a visitor who presented the review token",
    )
    app_secure_cookies: bool = Field(
        False,
        description="the web app's session cookie is Secure (sent over HTTPS only): set it "
        "when the app is served behind TLS (the team deployment behind Caddy does)",
    )
    tracking_login_failures_per_minute: int = Field(
        20,
        ge=1,
        description="failed logins the team tracking server takes from one client in any 60 s",
    )
    max_batch_images: int = 64
    max_image_pixels: int = Field(
        1_000_000,
        gt=0,
        le=1_000_000,
        description="model servers refuse images whose header declares more pixels, undecoded",
    )
    decode_workers: int = Field(
        2, ge=1, le=16, description="worker processes that decode a model server's images"
    )
    decode_cpu_seconds: float = Field(
        0.5, gt=0, le=10, description="CPU time decoding one image may take; beyond it: 422"
    )
    decode_memory_bytes: int = Field(
        256 * 1024 * 1024,
        ge=32 * 1024 * 1024,
        description="memory a decoding worker may map beyond its own code; beyond it: 413",
    )
    head_timeout_seconds: float = Field(
        10.0, gt=0, description="model servers close a connection whose request head is slower"
    )
    body_timeout_seconds: float = Field(
        10.0, gt=0, description="model servers answer 408 to a request body slower than this"
    )
    max_connections_per_client: int = Field(
        128, ge=1, description="connections one client address may hold to a model server at once"
    )
    version_cpu_seconds: int = Field(
        30,
        ge=1,
        le=600,
        description="CPU seconds a version's trial and a model server's warm-up may spend on it",
    )
    trial_memory_mib: int = Field(
        1024, ge=256, description="address space (MiB) of the child process that tries a version"
    )
    serving_memory_mib: int = Field(
        4096,
        ge=0,
        description="address space (MiB) a model server may map (RLIMIT_AS); 0: no limit",
    )
    replica_id: str | None = Field(
        None,
        description="this model server's name in its monitoring runs and metrics, one per "
        "replica of an alias (default: <hostname>-<port>, the same across restarts)",
    )
    trusted_proxies: str | None = Field(
        None,
        description="balancers (comma-separated addresses or CIDRs) whose X-Forwarded-For the "
        "model servers and the web app believe for per-client limits (empty: none)",
    )
    webhook_peers: str | None = Field(
        None,
        description="URLs of the other replicas of this server's alias (a name may resolve to "
        "several addresses); an alias webhook delivered here is relayed to each",
    )
    signing_key_dir: Path | None = Field(
        None,
        description="folder of the promotion key pair that signs alias moves (private key "
        "0600, never in MLflow); default <home>/promotion-keys",
    )
    signing_public_key: Path | None = Field(
        None,
        description="public key model servers check alias moves against; default the key "
        "folder's moves.pub",
    )

    @property
    def home_dir(self) -> Path:
        """The absolute state directory."""
        return self.home.expanduser().resolve()

    @property
    def effective_signing_key_dir(self) -> Path:
        """The folder holding the promotion key pair."""
        return (self.signing_key_dir or self.home_dir / "promotion-keys").expanduser().resolve()

    @property
    def effective_signing_public_key(self) -> Path:
        """The public key a model server trusts alias moves by."""
        return self.signing_public_key or self.effective_signing_key_dir / "moves.pub"

    @property
    def approval_required(self) -> bool:
        """Whether this scheme's @production moves wait for a second account's approval."""
        if self.production_approval is None:
            return self.auth
        named = {part.strip() for part in self.production_approval.split(",")} - {""}
        if named & {"*", "all", "true"}:
            return True
        return self.model_name in named

    @property
    def web_login(self) -> bool:
        """Whether the web app asks visitors for a tracking-server account."""
        return self.auth if self.app_login is None else self.app_login

    @property
    def env_file(self) -> Path:
        """Where generated secrets and local overrides live."""
        return self.home_dir / ".env"

    @property
    def effective_tracking_uri(self) -> str:
        """The tracking server every client talks to."""
        return self.tracking_uri or f"http://{client_host_for(self.host)}:{self.tracking_port}"

    @property
    def public_tracking_url(self) -> str:
        """The tracking server as a browser reaches it (for links)."""
        return (self.tracking_public_url or self.effective_tracking_uri).rstrip("/")

    @property
    def effective_backend_store_uri(self) -> str:
        """Where the tracking server keeps metadata."""
        return self.backend_store_uri or f"sqlite:///{self.home_dir / 'mlflow.db'}"

    @property
    def effective_auth_database_uri(self) -> str:
        """Where basic-auth keeps users and permissions (team mode)."""
        return self.auth_database_uri or f"sqlite:///{self.home_dir / 'basic_auth.db'}"

    def server_url(self, alias: str) -> str:
        """URL of the model server for an alias."""
        override = self.production_url if alias == "production" else self.staging_url
        if override:
            return override.rstrip("/")
        port = self.production_port if alias == "production" else self.staging_port
        return f"http://{client_host_for(self.host)}:{port}"

    @property
    def app_url(self) -> str:
        """URL of the web app."""
        return f"http://{client_host_for(self.host)}:{self.app_port}"

    def masked(self) -> dict[str, str]:
        """Every effective value as text, secrets masked."""
        out: dict[str, str] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if name in SECRET_FIELDS:
                out[name] = "********" if value else "(unset)"
            else:
                out[name] = "(unset)" if value is None else mask_credentials(str(value))
        out["effective_tracking_uri"] = mask_credentials(self.effective_tracking_uri)
        out["effective_backend_store_uri"] = mask_credentials(self.effective_backend_store_uri)
        return out

    def mlflow_env(self) -> dict[str, str]:
        """Environment a client process needs to reach the tracking server."""
        env = {"MLFLOW_TRACKING_URI": self.effective_tracking_uri}
        if self.tracking_username and self.tracking_password:
            env["MLFLOW_TRACKING_USERNAME"] = self.tracking_username
            env["MLFLOW_TRACKING_PASSWORD"] = self.tracking_password.get_secret_value()
        return env


def client_host_for(bind_host: str) -> str:
    return "127.0.0.1" if bind_host in ("0.0.0.0", "::", "") else bind_host


def mask_credentials(text: str) -> str:
    """`text` (a URL, or a message quoting URLs) with every URL's `user:password@` masked."""
    return _USERINFO.sub(r"\1********@", text)


def load_settings(**overrides: object) -> Settings:
    """Read settings from the environment and `<home>/.env` (environment wins)."""
    home = Path(
        str(overrides.get("home") or os.environ.get(f"{ENV_PREFIX}HOME", "captchaops-data"))
    )
    env_file = home.expanduser() / ".env"
    return Settings(_env_file=env_file if env_file.is_file() else None, **overrides)  # type: ignore[call-arg, arg-type]


def ensure_secret(settings: Settings, field: str, nbytes: int = 24) -> Settings:
    """Generate a secret on first use and store it 0600 in `<home>/.env`; return updated settings."""
    if getattr(settings, field):
        return settings
    value = secrets.token_urlsafe(nbytes)
    write_env(settings.env_file, {f"{ENV_PREFIX}{field.upper()}": value})
    return settings.model_copy(update={field: SecretStr(value)})


def write_env(path: Path, values: dict[str, str]) -> None:
    """Add or replace keys in a dotenv file, keeping it private (0600) and never half-written."""
    for key, value in values.items():
        refuse_control_characters(key, value)
    lines: list[str] = []
    if path.exists():
        lines = [
            line
            for line in path.read_text().splitlines()
            if line.split("=", 1)[0].strip() not in values
        ]
    lines += [f"{key}={value}" for key, value in values.items()]
    write_private(path, "\n".join(lines) + "\n")


def refuse_control_characters(name: str, value: str) -> None:
    """A setting that would add lines to .env or supervisord.conf is refused with its name."""
    if any(ord(ch) < 32 and ch != "\t" for ch in value) or "\x7f" in value:
        raise ValueError(
            f"{name} contains a line break or another control character; "
            "settings are single-line values (check the variable or .env entry)"
        )


def write_private(path: Path, text: str) -> None:
    """Write a 0600 file atomically: a crash leaves the old content or the new, never neither."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
