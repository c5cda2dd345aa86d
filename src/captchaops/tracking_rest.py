"""The MLflow tracking server's REST API over httpx: hard timeouts, basic auth, no MLflow import.

The model servers, the web app and `captchaops users` talk to the tracking server through this
module. MlflowClient retries a dead server for minutes and importing MLflow costs a server
about 100 MB (MLflow and pandas), so these callers use the few REST calls they need directly.
Messages never name the server's address: it may carry credentials and visitors see some of them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import quote, urlparse

import httpx

from captchaops.settings import Settings

API = "/api/2.0/mlflow"
ARTIFACTS = "/api/2.0/mlflow-artifacts/artifacts"
MISSING = "RESOURCE_DOES_NOT_EXIST"
MAX_DOWNLOAD_BYTES = 256 * 2**20
MAX_DOWNLOAD_FILES = 1000


class TrackingError(RuntimeError):
    """The tracking server did not answer as expected; `status` and `error_code` say how."""

    def __init__(self, message: str, *, status: int | None = None, error_code: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.error_code = error_code


class TrackingUnreachable(TrackingError):
    """No answer at all: refused, reset, or slower than the timeout."""


class ArtifactTooLarge(TrackingError):
    """An artifact is larger than the caller is willing to hold."""


@dataclass(frozen=True)
class VersionRef:
    """Where a registry alias points."""

    name: str
    version: str
    run_id: str


def credentials(settings: Settings) -> tuple[str, str] | None:
    """The basic-auth account clients use in team mode, or None."""
    if settings.tracking_username and settings.tracking_password:
        return settings.tracking_username, settings.tracking_password.get_secret_value()
    return None


class TrackingRest:
    """A tracking server's REST API: JSON calls, the registry lookups, proxied artifacts."""

    def __init__(self, uri: str, auth: tuple[str, str] | None = None, timeout: float = 10.0):
        self.uri = uri.rstrip("/")
        self.timeout = timeout
        self.username = auth[0] if auth else None
        self._http = httpx.Client(auth=auth, timeout=timeout)

    @classmethod
    def for_settings(cls, settings: Settings, timeout: float = 10.0) -> TrackingRest:
        """The client for the configured tracking server and account."""
        return cls(settings.effective_tracking_uri, credentials(settings), timeout)

    def close(self) -> None:
        """Close pooled connections."""
        self._http.close()

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One HTTP request to `path` on the server; TrackingUnreachable when nothing answers."""
        try:
            return self._http.request(method, self.uri + path, **kwargs)
        except httpx.HTTPError as exc:
            raise TrackingUnreachable(
                f"the tracking server did not answer ({type(exc).__name__})"
            ) from exc

    def call(
        self, method: str, path: str, *, missing_ok: bool = False, **kwargs: Any
    ) -> dict[str, Any]:
        """One JSON call to `path` (e.g. /api/2.0/mlflow/runs/get); `{}` for a missing resource
        when missing_ok is set, TrackingError for any other answer than 200."""
        resp = self.request(method, path, **kwargs)
        if resp.status_code == 200:
            try:
                body: Any = resp.json() if resp.text.strip() else {}
            except ValueError as exc:
                raise TrackingError(f"{path} answered 200 without JSON", status=200) from exc
            return body if isinstance(body, dict) else {}
        code = _error_code(resp)
        if missing_ok and code == MISSING:
            return {}
        raise TrackingError(
            f"{path} answered HTTP {resp.status_code}"
            + (f" {code}" if code else "")
            + f": {' '.join(resp.text.split())[:200]}",
            status=resp.status_code,
            error_code=code,
        )

    def alias_version(self, name: str, alias: str) -> VersionRef | None:
        """The version `models:/name@alias` points to; None when the alias or model does not exist."""
        try:
            found = self.call(
                "GET", f"{API}/registered-models/alias", params={"name": name, "alias": alias}
            )
        except TrackingError as exc:
            # MLflow answers INVALID_PARAMETER_VALUE for a missing alias, RESOURCE_DOES_NOT_EXIST
            # for a missing registered model.
            if exc.error_code in (MISSING, "INVALID_PARAMETER_VALUE"):
                return None
            raise
        mv = found.get("model_version") or {}
        if "version" not in mv:
            raise TrackingError(f"the registry's answer for {name}@{alias} names no version")
        return VersionRef(name, str(mv["version"]), str(mv.get("run_id") or ""))

    def registered_model(self, name: str) -> tuple[dict[str, str], dict[str, str]]:
        """A registered model's aliases ({alias: version}) and tags; both empty if it is missing."""
        found = self.call(
            "GET", f"{API}/registered-models/get", missing_ok=True, params={"name": name}
        )
        model = found.get("registered_model") or {}
        aliases = {
            str(a.get("alias")): str(a.get("version"))
            for a in model.get("aliases") or []
            if isinstance(a, dict)
        }
        tags = model.get("tags") or []
        return aliases, {
            str(t.get("key")): str(t.get("value", "")) for t in tags if isinstance(t, dict)
        }

    def version_ref(self, name: str, version: str) -> VersionRef:
        """A registered version as an alias answer would name it (with its run id)."""
        found = self.call(
            "GET", f"{API}/model-versions/get", params={"name": name, "version": version}
        )
        return VersionRef(
            name, version, str((found.get("model_version") or {}).get("run_id") or "")
        )

    def version_tags(self, name: str, version: str) -> dict[str, str]:
        """A registered version's tags."""
        found = self.call(
            "GET", f"{API}/model-versions/get", params={"name": name, "version": version}
        )
        tags = (found.get("model_version") or {}).get("tags") or []
        return {str(t.get("key")): str(t.get("value", "")) for t in tags if isinstance(t, dict)}

    def download_uri(self, name: str, version: str) -> str:
        """The artifact URI of a registered version's files."""
        found = self.call(
            "GET",
            f"{API}/model-versions/get-download-uri",
            params={"name": name, "version": version},
        )
        uri = found.get("artifact_uri")
        if not isinstance(uri, str) or not uri:
            raise TrackingError(f"the registry names no files for {name} version {version}")
        return uri

    def download_artifacts(
        self,
        artifact_uri: str,
        dest: Path,
        *,
        deadline: float | None = None,
        max_bytes: int = MAX_DOWNLOAD_BYTES,
    ) -> Path:
        """Copy the tree under `artifact_uri` into the folder `dest`; the local folder holding it.

        `mlflow-artifacts:/` URIs go through the tracking server's artifact proxy, within
        `deadline` (a time.monotonic() value) and max_bytes; other schemes (s3://, a local path)
        need the artifact store's own client, so MLflow is imported for them.
        """
        if artifact_uri.startswith("runs:/"):
            artifact_uri = self.run_artifact_uri(artifact_uri)
        parsed = urlparse(artifact_uri)
        dest.mkdir(parents=True, exist_ok=True)
        if parsed.scheme != "mlflow-artifacts" or parsed.netloc:
            return _download_with_mlflow(artifact_uri, dest, self.uri)
        root = parsed.path.strip("/")
        files = self._list_tree(root, deadline)
        if len(files) > MAX_DOWNLOAD_FILES:
            raise ArtifactTooLarge(f"{artifact_uri} holds over {MAX_DOWNLOAD_FILES} files")
        budget = max_bytes
        for relative in files:
            target = (dest / relative).resolve()
            if not target.is_relative_to(dest.resolve()):
                raise TrackingError(f"the artifact path {relative!r} leaves its folder")
            target.parent.mkdir(parents=True, exist_ok=True)
            budget -= self._fetch(f"{root}/{relative}", target, budget, deadline)
        return dest

    def download_files(
        self,
        artifact_uri: str,
        dest: Path,
        relatives: list[str],
        *,
        deadline: float | None = None,
        max_bytes: int = MAX_DOWNLOAD_BYTES,
    ) -> None:
        """Copy the named files below a proxied (`mlflow-artifacts:/`) `artifact_uri` into
        `dest`, one request each, without listing the tree; TrackingError for other schemes, a
        missing file or a path that leaves its folder."""
        parsed = urlparse(artifact_uri)
        if parsed.scheme != "mlflow-artifacts" or parsed.netloc:
            raise TrackingError(f"{parsed.scheme or 'this'} artifact URIs are not proxied")
        root = parsed.path.strip("/")
        budget = max_bytes
        for relative in relatives:
            parts = PurePosixPath(relative).parts
            target = (dest / relative).resolve()
            if not relative or relative.startswith("/") or ".." in parts:
                raise TrackingError(f"the artifact path {relative!r} leaves its folder")
            if not target.is_relative_to(dest.resolve()):
                raise TrackingError(f"the artifact path {relative!r} leaves its folder")
            target.parent.mkdir(parents=True, exist_ok=True)
            budget -= self._fetch(f"{root}/{relative}", target, budget, deadline)

    def run_artifact_uri(self, runs_uri: str) -> str:
        """`runs:/<run_id>/<path>` as the artifact store's URI of that path."""
        run_id, _, path = runs_uri.removeprefix("runs:/").strip("/").partition("/")
        found = self.call("GET", f"{API}/runs/get", params={"run_id": run_id})
        root = str((found.get("run") or {}).get("info", {}).get("artifact_uri") or "")
        if not root:
            raise TrackingError(f"the tracking server knows no artifacts of run {run_id}")
        return f"{root.rstrip('/')}/{path}" if path else root

    def put_artifact(self, artifact_uri: str, path: str, data: bytes, mime: str) -> None:
        """Upload bytes into a run's artifacts (`mlflow-artifacts:/` URIs only)."""
        parsed = urlparse(artifact_uri)
        if parsed.scheme != "mlflow-artifacts":
            raise TrackingError(f"{parsed.scheme or 'this'} artifact URIs are not proxied")
        url = f"{ARTIFACTS}/{_quoted(parsed.path.strip('/'))}/{_quoted(path)}"
        resp = self.request(
            "PUT",
            url,
            content=data,
            headers={"Content-Type": mime},
            timeout=max(self.timeout, 30.0),
        )
        if resp.status_code != 200:
            raise TrackingError(
                f"the artifact upload answered HTTP {resp.status_code}", status=resp.status_code
            )

    def get_artifact(self, run_id: str, path: str, max_bytes: int) -> bytes:
        """One run artifact in memory (`GET /get-artifact`); ArtifactTooLarge past max_bytes."""
        chunks: list[bytes] = []
        self._stream(
            "/get-artifact",
            chunks.append,
            max_bytes,
            params={"path": path, "run_uuid": run_id},
            what=f"the artifact {path} of run {run_id}",
        )
        return b"".join(chunks)

    def _list_tree(self, root: str, deadline: float | None) -> list[str]:
        """Every file below `root`, relative to it, depth first."""
        found: list[str] = []
        pending = [""]
        while pending:
            folder = pending.pop()
            listing = self.call(
                "GET",
                ARTIFACTS,
                params={"path": f"{root}/{folder}".rstrip("/")},
                timeout=_remaining(deadline, self.timeout),
            )
            for entry in listing.get("files", []):
                name = str(entry.get("path", ""))
                parts = PurePosixPath(name).parts
                if not name or name.startswith("/") or ".." in parts:
                    raise TrackingError(f"the artifact listing holds an unsafe path {name!r}")
                relative = f"{folder}/{name}" if folder else name
                (pending if entry.get("is_dir") else found).append(relative)
            if len(found) > MAX_DOWNLOAD_FILES:
                break
        return found

    def _fetch(self, path: str, target: Path, max_bytes: int, deadline: float | None) -> int:
        """Stream one proxied artifact to `target`; the number of bytes written."""
        size = 0
        with target.open("wb") as out:

            def write(chunk: bytes) -> None:
                nonlocal size
                size += len(chunk)
                out.write(chunk)
                _check_deadline(deadline, path)

            self._stream(f"{ARTIFACTS}/{_quoted(path)}", write, max_bytes, deadline, what=path)
        return size

    def _stream(
        self,
        path: str,
        sink: Callable[[bytes], object],
        max_bytes: int,
        deadline: float | None = None,
        *,
        what: str,
        params: dict[str, str] | None = None,
    ) -> None:
        too_large = ArtifactTooLarge(f"{what} is larger than {max_bytes / 2**20:g} MiB")
        size = 0
        timeout = _remaining(deadline, max(self.timeout, 30.0))
        try:
            with self._http.stream("GET", self.uri + path, params=params, timeout=timeout) as resp:
                if resp.status_code != 200:
                    raise TrackingError(
                        f"{what} answered HTTP {resp.status_code}", status=resp.status_code
                    )
                if int(resp.headers.get("Content-Length") or 0) > max_bytes:
                    raise too_large
                for chunk in resp.iter_bytes():
                    size += len(chunk)
                    if size > max_bytes:
                        raise too_large
                    sink(chunk)
        except httpx.HTTPError as exc:
            raise TrackingUnreachable(
                f"the tracking server did not send {what} ({type(exc).__name__})"
            ) from exc


def _error_code(resp: httpx.Response) -> str:
    try:
        body = resp.json()
    except ValueError:
        return ""
    return str(body.get("error_code") or "") if isinstance(body, dict) else ""


def _quoted(path: str) -> str:
    return quote(path, safe="/")


def _remaining(deadline: float | None, cap: float) -> float:
    if deadline is None:
        return cap
    left = deadline - time.monotonic()
    if left <= 0:
        raise TrackingUnreachable("the download ran past its deadline")
    return min(cap, left)


def _check_deadline(deadline: float | None, what: str) -> None:
    if deadline is not None and time.monotonic() > deadline:
        raise TrackingUnreachable(f"the download of {what} ran past its deadline")


def _download_with_mlflow(artifact_uri: str, dest: Path, tracking_uri: str) -> Path:
    """Artifacts the tracking server does not proxy, through the artifact store's client."""
    import mlflow.artifacts  # here, not at the top: model servers and the web app import this module and stay MLflow-free

    local = mlflow.artifacts.download_artifacts(
        artifact_uri=artifact_uri, dst_path=str(dest), tracking_uri=tracking_uri
    )
    return Path(local)
