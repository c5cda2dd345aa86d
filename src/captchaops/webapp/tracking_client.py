"""The tracking server as the web app uses it: the shared REST client, with visitor-safe errors."""

from __future__ import annotations

from typing import Any

from captchaops.settings import Settings
from captchaops.tracking_rest import (
    API,
    ArtifactTooLarge,
    TrackingError,
    TrackingRest,
    TrackingUnreachable,
)

__all__ = ["ArtifactTooLarge", "Tracking", "TrackingError"]


class Tracking:
    """JSON calls, proxied artifact uploads and downloads; every error is one sentence a visitor
    may read (it never names the server's address, which may carry credentials)."""

    def __init__(self, settings: Settings, timeout: float) -> None:
        self.settings = settings
        self.timeout = timeout
        self.rest = TrackingRest.for_settings(settings, timeout)

    def call(self, method: str, endpoint: str, **kwargs: Any) -> dict[str, Any]:
        """One call to `/api/2.0/mlflow/<endpoint>`; a missing resource answers `{}`."""
        try:
            return self.rest.call(method, f"{API}/{endpoint}", missing_ok=True, **kwargs)
        except TrackingUnreachable as exc:
            raise TrackingError(self.unreachable()) from exc
        except TrackingError as exc:
            if exc.status == 404:
                return {}
            raise TrackingError(
                f"The tracking server answered HTTP {exc.status} to {endpoint}; "
                "check its log and retry."
            ) from exc

    def put_artifact(self, artifact_uri: str, path: str, data: bytes, mime: str) -> None:
        """Upload bytes from memory into a run's artifacts through the tracking server's proxy."""
        if not artifact_uri.startswith("mlflow-artifacts:"):
            raise TrackingError(
                "The tracking server does not proxy artifacts; start it with "
                "--artifacts-destination (captchaops up does)."
            )
        try:
            self.rest.put_artifact(artifact_uri, path, data, mime)
        except TrackingUnreachable as exc:
            raise TrackingError(self.unreachable()) from exc
        except TrackingError as exc:
            raise TrackingError(
                f"The tracking server refused the upload (HTTP {exc.status}); "
                "check its artifact store and retry."
            ) from exc

    def get_artifact(self, run_id: str, path: str, max_bytes: int) -> bytes:
        """Download one run artifact into memory through the tracking server (`GET /get-artifact`)."""
        try:
            return self.rest.get_artifact(run_id, path, max_bytes)
        except ArtifactTooLarge:
            raise
        except TrackingUnreachable as exc:
            raise TrackingError(self.unreachable()) from exc
        except TrackingError as exc:
            raise TrackingError(
                f"The tracking server answered HTTP {exc.status} for the artifact "
                f"{path} of run {run_id}; check that the run still has it."
            ) from exc

    def unreachable(self) -> str:
        """The one-line message for a tracking server that does not answer.

        Visitors see it, so it never names the server's address (which may carry credentials).
        """
        return "The tracking server is not reachable; start it with `captchaops up` and retry."
