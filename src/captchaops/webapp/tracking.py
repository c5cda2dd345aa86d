"""A few MLflow REST calls with a hard timeout (MlflowClient retries a dead server for minutes)."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlparse

import httpx

from captchaops.settings import Settings

_ARTIFACTS = "/api/2.0/mlflow-artifacts/artifacts"


class TrackingError(RuntimeError):
    """The tracking server did not answer as expected; the message says what to do."""


class ArtifactTooLarge(TrackingError):
    """An artifact is larger than the caller is willing to hold in memory."""


class Tracking:
    """The tracking server as the web app uses it: JSON calls and proxied artifact uploads."""

    def __init__(self, settings: Settings, timeout: float) -> None:
        self.settings = settings
        self.uri = settings.effective_tracking_uri.rstrip("/")
        self.timeout = timeout
        auth: tuple[str, str] | None = None
        if settings.tracking_username and settings.tracking_password:
            auth = (settings.tracking_username, settings.tracking_password.get_secret_value())
        self._http = httpx.Client(auth=auth, timeout=timeout)

    def call(self, method: str, endpoint: str, **kwargs: Any) -> dict[str, Any]:
        """One call to `/api/2.0/mlflow/<endpoint>`; a missing resource answers `{}`."""
        try:
            resp = self._http.request(method, f"{self.uri}/api/2.0/mlflow/{endpoint}", **kwargs)
        except httpx.HTTPError as exc:
            raise TrackingError(self.unreachable()) from exc
        if resp.status_code == 404 or (
            resp.status_code == 400 and "RESOURCE_DOES_NOT_EXIST" in resp.text
        ):
            return {}
        if resp.status_code != 200:
            raise TrackingError(
                f"The tracking server answered HTTP {resp.status_code} to {endpoint}; "
                "check its log and retry."
            )
        body: dict[str, Any] = resp.json()
        return body

    def put_artifact(self, artifact_uri: str, path: str, data: bytes, mime: str) -> None:
        """Upload bytes from memory into a run's artifacts through the tracking server's proxy."""
        parsed = urlparse(artifact_uri)
        if parsed.scheme != "mlflow-artifacts":
            raise TrackingError(
                "The tracking server does not proxy artifacts; start it with "
                "--artifacts-destination (captchaops up does)."
            )
        base = f"{self.uri}{_ARTIFACTS}{parsed.path}"
        try:
            resp = self._http.put(
                f"{base.rstrip('/')}/{path}",
                content=data,
                headers={"Content-Type": mime},
                timeout=max(self.timeout, 30.0),
            )
        except httpx.HTTPError as exc:
            raise TrackingError(self.unreachable()) from exc
        if resp.status_code != 200:
            raise TrackingError(
                f"The tracking server refused the upload (HTTP {resp.status_code}); "
                "check its artifact store and retry."
            )

    def get_artifact(self, run_id: str, path: str, max_bytes: int) -> bytes:
        """Download one run artifact into memory through the tracking server (`GET /get-artifact`)."""
        too_large = ArtifactTooLarge(
            f"the artifact {path} of run {run_id} is larger than {max_bytes / 2**20:g} MiB"
        )
        chunks: list[bytes] = []
        size = 0
        try:
            with self._http.stream(
                "GET",
                f"{self.uri}/get-artifact",
                params={"path": path, "run_uuid": run_id},
                timeout=max(self.timeout, 30.0),
            ) as resp:
                if resp.status_code != 200:
                    raise TrackingError(
                        f"The tracking server answered HTTP {resp.status_code} for the artifact "
                        f"{path} of run {run_id}; check that the run still has it."
                    )
                if int(resp.headers.get("Content-Length") or 0) > max_bytes:
                    raise too_large
                for chunk in resp.iter_bytes():
                    size += len(chunk)
                    if size > max_bytes:
                        raise too_large
                    chunks.append(chunk)
        except httpx.HTTPError as exc:
            raise TrackingError(self.unreachable()) from exc
        return b"".join(chunks)

    def unreachable(self) -> str:
        """The one-line message for a tracking server that does not answer.

        Visitors see it, so it never names the server's address (which may carry credentials).
        """
        return "The tracking server is not reachable; start it with `captchaops up` and retry."
