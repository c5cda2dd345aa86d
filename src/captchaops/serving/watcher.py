"""The model an alias points to, kept current by a background thread that polls the registry."""

from __future__ import annotations

import gc
import io
import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from PIL import Image

from captchaops.model.version import load_registered
from captchaops.serving.metrics import ServingMetrics

log = logging.getLogger(__name__)

MISSING_CODES = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")


class ImageModel(Protocol):
    """What a server needs from a loaded CaptchaModel."""

    meta: dict[str, Any]

    def predict_images(self, images: list[bytes]) -> list[dict[str, Any]]:
        """Text and confidence for each image."""
        ...


@dataclass(frozen=True)
class ServedModel:
    """A loaded, warmed-up registered model version."""

    name: str
    alias: str
    version: str
    run_id: str
    loaded_at: str
    load_seconds: float
    model: ImageModel = field(repr=False)

    def describe(self) -> dict[str, Any]:
        """What `/version` answers."""
        return {
            "name": self.name,
            "alias": self.alias,
            "version": self.version,
            "run_id": self.run_id,
            "loaded_at": self.loaded_at,
            "load_seconds": round(self.load_seconds, 3),
            "alphabet": self.model.meta.get("alphabet"),
            "height": self.model.meta.get("height"),
            "width": self.model.meta.get("width"),
        }


def load_version(tracking_uri: str, name: str, version: str) -> ImageModel:
    """Download a registered version, check it, load it and prove it predicts (raises on failure).

    Only the ONNX network and meta.json are read, after the checks in
    `captchaops.model.version`; nothing the version carries is unpickled or imported.
    """
    model: ImageModel = load_registered(tracking_uri, name, version)
    warm_up(model)
    return model


def warm_up(model: ImageModel) -> None:
    """Run one prediction on a blank image of the model's input size; raise if it misbehaves."""
    size = (int(model.meta["width"]), int(model.meta["height"]))
    buffer = io.BytesIO()
    Image.new("L", size, 255).save(buffer, format="PNG")
    result = model.predict_images([buffer.getvalue()])
    if (
        len(result) != 1
        or not isinstance(result[0].get("text"), str)
        or not 0.0 <= float(result[0].get("confidence", -1.0)) <= 1.0
    ):
        raise RuntimeError(f"warm-up prediction returned {result!r}, not one text and confidence")


class AliasWatcher:
    """Holds the served model and swaps in whatever version `models:/<name>@<alias>` points to."""

    def __init__(
        self,
        tracking_uri: str,
        name: str,
        alias: str,
        poll_seconds: float,
        metrics: ServingMetrics,
        retry_failed_seconds: float = 60.0,
    ) -> None:
        self.tracking_uri = tracking_uri
        self.name = name
        self.alias = alias
        self.poll_seconds = poll_seconds
        self.retry_failed_seconds = retry_failed_seconds
        self.metrics = metrics
        self.current: ServedModel | None = None
        self.target_version: str | None = None
        self.last_poll_at: str | None = None
        self.last_poll_error: str | None = None
        self.last_reload_error: str | None = None
        self.failed_version: str | None = None
        self._failed_at = 0.0
        self._client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start polling in a daemon thread (the first poll happens at once)."""
        mlflow.set_tracking_uri(self.tracking_uri)
        mlflow.set_registry_uri(self.tracking_uri)
        self._thread = threading.Thread(target=self._loop, name=f"watch-{self.alias}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop polling; a load in progress is abandoned with the thread."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def poll_soon(self) -> None:
        """Check the alias now instead of at the next tick."""
        self._wake.set()

    def poll_once(self) -> None:
        """Ask the registry where the alias points and load that version if it is new."""
        try:
            found = self._client.get_model_version_by_alias(self.name, self.alias)
        except MlflowException as exc:
            if exc.error_code in MISSING_CODES:
                self._polled(None)
                self.target_version = None
                return
            self._poll_failed(exc)
            return
        except Exception as exc:
            self._poll_failed(exc)
            return
        self._polled(None)
        version = str(found.version)
        self.target_version = version
        if self.current is not None and self.current.version == version:
            self._clear_failure()
            return
        if version == self.failed_version and (
            time.monotonic() - self._failed_at < self.retry_failed_seconds
        ):
            return
        self._load(version, found.run_id or "")

    def health(self) -> dict[str, Any]:
        """What `/health` answers (besides process facts)."""
        served = self.current
        if served is None:
            status = "no_model"
        elif self.last_reload_error or self.last_poll_error:
            status = "degraded"
        else:
            status = "ok"
        return {
            "status": status,
            "model_loaded": served is not None,
            "name": self.name,
            "alias": self.alias,
            "version": served.version if served else None,
            "alias_version": self.target_version,
            "loaded_at": served.loaded_at if served else None,
            "last_poll_at": self.last_poll_at,
            "last_poll_error": self.last_poll_error,
            "last_reload_error": self.last_reload_error,
            "failed_version": self.failed_version,
        }

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.poll_once()
            self._wake.wait(self.poll_seconds)
            self._wake.clear()

    def _load(self, version: str, run_id: str) -> None:
        log.info("loading %s version %s for alias %s", self.name, version, self.alias)
        started = time.monotonic()
        try:
            model = load_version(self.tracking_uri, self.name, version)
        except Exception as exc:
            self.failed_version = version
            self._failed_at = time.monotonic()
            self.last_reload_error = f"version {version}: {type(exc).__name__}: {_one_line(exc)}"
            self.metrics.reloads.labels("failure").inc()
            self.metrics.reload_failing.set(1)
            log.error("keeping %s: %s", self._serving_text(), self.last_reload_error)
            return
        if self._stop.is_set():
            return
        self.current = ServedModel(
            name=self.name,
            alias=self.alias,
            version=version,
            run_id=run_id,
            loaded_at=_now(),
            load_seconds=time.monotonic() - started,
            model=model,
        )
        gc.freeze()
        self._clear_failure()
        self.metrics.reloads.labels("success").inc()
        self.metrics.model_version.set(_as_number(version))
        log.info("now serving %s version %s", self.name, version)

    def _polled(self, error: str | None) -> None:
        if error is None and self.last_poll_error is not None:
            log.info("tracking server reachable again")
        self.last_poll_at = _now()
        self.last_poll_error = error

    def _poll_failed(self, exc: Exception) -> None:
        message = f"{type(exc).__name__}: {_one_line(exc)}"
        if message != self.last_poll_error:
            log.warning(
                "cannot check alias %s (still %s): %s", self.alias, self._serving_text(), message
            )
        self.metrics.poll_errors.inc()
        self._polled(message)

    def _clear_failure(self) -> None:
        self.failed_version = None
        self.last_reload_error = None
        self.metrics.reload_failing.set(0)

    def _serving_text(self) -> str:
        return f"serving version {self.current.version}" if self.current else "serving nothing"


def _one_line(exc: Exception, limit: int = 500) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _as_number(version: str) -> float:
    try:
        return float(version)
    except ValueError:
        return 0.0
