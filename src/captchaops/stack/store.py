"""The artifact store behind the tracking server's proxy: MinIO, external S3, or a local folder."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from typing import Literal

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError

from captchaops.settings import ENV_PREFIX, Settings, ensure_secret, mask_credentials, write_env

MINIO_HINT = (
    "install the `minio` server binary on PATH (https://min.io/docs/minio/linux/index.html) "
    "or set CAPTCHAOPS_S3_ENDPOINT_URL to use S3"
)


class StoreError(Exception):
    """The object store is unreachable or refuses our credentials."""


@dataclass(frozen=True)
class Store:
    """Where artifacts end up and what the tracking server needs to reach them."""

    kind: Literal["minio", "s3", "local"]
    destination: str
    endpoint_url: str | None = None
    env: dict[str, str] = field(default_factory=dict)

    def describe(self, settings: Settings) -> str:
        """One line saying which store was chosen and why."""
        if self.kind == "minio":
            return (
                f"store: MinIO at {mask_credentials(self.endpoint_url or '')} (console http://{settings.host}:"
                f"{settings.minio_console_port}), bucket {settings.s3_bucket}"
            )
        if self.kind == "s3":
            return f"store: S3 endpoint {mask_credentials(self.endpoint_url or '')}, bucket {settings.s3_bucket}"
        return f"store: local folder {self.destination} (no `minio` on PATH; S3: docs/stack.md)"


def choose_store(settings: Settings) -> tuple[Store, Settings]:
    """Pick the store for these settings, generating MinIO credentials on first use."""
    kind = settings.store
    if kind == "auto":
        if settings.s3_endpoint_url:
            kind = "s3"
        elif shutil.which("minio"):
            kind = "minio"
        else:
            kind = "local"
    if kind == "local":
        folder = settings.home_dir / "artifacts"
        return Store(kind="local", destination=str(folder)), settings
    if kind == "minio":
        if not shutil.which("minio"):
            raise StoreError(
                f"CAPTCHAOPS_STORE=minio but no `minio` binary is on PATH; {MINIO_HINT}"
            )
        if not settings.s3_access_key:
            write_env(settings.env_file, {f"{ENV_PREFIX}S3_ACCESS_KEY": "captchaops-admin"})
            settings = settings.model_copy(update={"s3_access_key": "captchaops-admin"})
        settings = ensure_secret(settings, "s3_secret_key")
        endpoint = f"http://{settings.host}:{settings.minio_port}"
    else:
        if not settings.s3_endpoint_url:
            raise StoreError("CAPTCHAOPS_STORE=s3 needs CAPTCHAOPS_S3_ENDPOINT_URL")
        endpoint = settings.s3_endpoint_url
    env = {"MLFLOW_S3_ENDPOINT_URL": endpoint, "AWS_DEFAULT_REGION": settings.s3_region}
    if settings.s3_access_key and settings.s3_secret_key:
        env["AWS_ACCESS_KEY_ID"] = settings.s3_access_key
        env["AWS_SECRET_ACCESS_KEY"] = settings.s3_secret_key.get_secret_value()
    destination = f"s3://{settings.s3_bucket}/{settings.s3_prefix.strip('/')}".rstrip("/")
    return Store(kind=kind, destination=destination, endpoint_url=endpoint, env=env), settings


def ensure_bucket(store: Store, settings: Settings) -> bool:
    """Create the bucket if it is missing; return True when it was created."""
    if store.kind == "local":
        return False
    client = boto3.client(
        "s3",
        endpoint_url=store.endpoint_url,
        aws_access_key_id=store.env.get("AWS_ACCESS_KEY_ID"),
        aws_secret_access_key=store.env.get("AWS_SECRET_ACCESS_KEY"),
        region_name=settings.s3_region,
        config=Config(connect_timeout=5, read_timeout=10, retries={"max_attempts": 2}),
    )
    bucket = settings.s3_bucket
    try:
        client.head_bucket(Bucket=bucket)
        return False
    except EndpointConnectionError as exc:
        raise StoreError(
            f"cannot reach the S3 endpoint {store.endpoint_url}; check CAPTCHAOPS_S3_ENDPOINT_URL"
        ) from exc
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code not in ("404", "NoSuchBucket", "NotFound"):
            raise StoreError(
                f"S3 at {store.endpoint_url} refused access to bucket {bucket!r} ({code}); "
                "check CAPTCHAOPS_S3_ACCESS_KEY and CAPTCHAOPS_S3_SECRET_KEY"
            ) from exc
    except BotoCoreError as exc:
        raise StoreError(f"S3 at {store.endpoint_url} failed: {exc}") from exc
    try:
        client.create_bucket(Bucket=bucket)
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        raise StoreError(
            f"could not create bucket {bucket!r} at {store.endpoint_url} ({code}); "
            "check the credentials or create it once by hand"
        ) from exc
    return True
