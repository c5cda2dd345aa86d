"""Corrections from visitors: one MLflow run per correction, image at `feedback/<label>_<uuid>.<ext>`,
stored once per image and label. Review items (webapp/review.py) are runs of the same experiment."""

from __future__ import annotations

import hashlib
import threading
import time
import uuid
from dataclasses import dataclass

from captchaops.data.corrections import DIGEST_TAG, FEEDBACK_PATH, KIND_TAG
from captchaops.model.preprocess import EXTENSIONS, MIME_TYPES
from captchaops.webapp.tracking_client import Tracking, TrackingError

KIND = "correction"
_STRIPES = 64


@dataclass(frozen=True)
class Saved:
    """Where a correction is stored; `duplicate` when it was stored before and nothing was added."""

    path: str
    duplicate: bool = False


def artifact_name(label: str, fmt: str) -> str:
    """The stored file name: the label, a random id, the sniffed format; never the upload's name."""
    return f"{label}_{uuid.uuid4().hex}.{EXTENSIONS[fmt]}"


def image_digest(image: bytes) -> str:
    """The SHA-256 of the image bytes, which identifies an image among the corrections."""
    return hashlib.sha256(image).hexdigest()


class Corrections:
    """The corrections in the tracking server: stored once per image and label, and counted."""

    def __init__(self, tracking: Tracking, experiment: str) -> None:
        self.tracking = tracking
        self.experiment = experiment
        self._experiment_id: str | None = None
        # One lock per stripe of digests: the same image is never checked and stored twice at once.
        self._locks = [threading.Lock() for _ in range(_STRIPES)]

    def save(
        self, image: bytes, fmt: str, label: str, *, model_version: str | None, source: str
    ) -> Saved:
        """Store one checked image with its corrected label through the artifact proxy, unless
        the same image is already stored with the same label."""
        digest = image_digest(image)
        with self._locks[int(digest[:8], 16) % _STRIPES]:
            experiment_id = self.experiment_id()
            existing = self._find(experiment_id, digest, label)
            if existing is not None:
                return Saved(existing, duplicate=True)
            path = f"{FEEDBACK_PATH}/{artifact_name(label, fmt)}"
            tags = {KIND_TAG: KIND, "label": label, "source": source, "artifact": path}
            tags[DIGEST_TAG] = digest
            if model_version:
                tags["model_version"] = model_version
            self.store_run(experiment_id, f"correction-{label}", tags, image, fmt)
            return Saved(path)

    def store_run(
        self, experiment_id: str, name: str, tags: dict[str, str], image: bytes, fmt: str
    ) -> str:
        """Create a run with `tags`, upload `image` to its `tags["artifact"]` and mark it
        FINISHED (FAILED when the upload fails); return the run's id."""
        try:
            run = self._create_run(experiment_id, name, tags)
        except TrackingError:
            self._experiment_id = None  # the experiment may have been deleted; look it up again
            raise
        try:
            self.tracking.put_artifact(
                run["artifact_uri"], tags["artifact"], image, MIME_TYPES[fmt]
            )
        except Exception:
            self._finish(run["run_id"], "FAILED")
            raise
        self._finish(run["run_id"], "FINISHED")
        return run["run_id"]

    def count(self) -> int:
        """How many corrections are stored (each finished correction run holds exactly one image)."""
        experiment = self.tracking.call(
            "GET", "experiments/get-by-name", params={"experiment_name": self.experiment}
        )
        if not experiment:
            return 0
        query = {
            "experiment_ids": [experiment["experiment"]["experiment_id"]],
            "filter": f"tags.`{KIND_TAG}` = '{KIND}' and attributes.status = 'FINISHED'",
            "max_results": 1000,
        }
        total = 0
        while True:
            page = self.tracking.call("POST", "runs/search", json=query)
            total += len(page.get("runs", []))
            if not page.get("next_page_token"):
                return total
            query["page_token"] = page["next_page_token"]

    def _find(self, experiment_id: str, digest: str, label: str) -> str | None:
        """The artifact of a finished correction of this image with this label, if any."""
        page = self.tracking.call(
            "POST",
            "runs/search",
            json={
                "experiment_ids": [experiment_id],
                "filter": f"tags.`{DIGEST_TAG}` = '{digest}' and attributes.status = 'FINISHED'",
                "max_results": 100,
            },
        )
        for run in page.get("runs", []):
            tags = {t["key"]: t["value"] for t in run.get("data", {}).get("tags", [])}
            if tags.get(KIND_TAG) == KIND and tags.get("label") == label and tags.get("artifact"):
                return str(tags["artifact"])
        return None

    def experiment_id(self) -> str:
        """The feedback experiment's id, created on first use and then remembered."""
        if self._experiment_id is None:
            self._experiment_id = self._find_or_create_experiment()
        return self._experiment_id

    def _find_or_create_experiment(self) -> str:
        found = self._get_experiment()
        if found:
            return found
        try:
            created = self.tracking.call(
                "POST", "experiments/create", json={"name": self.experiment}
            )
            return str(created["experiment_id"])
        except TrackingError:
            found = self._get_experiment()  # another process created it meanwhile
            if not found:
                raise
            return found

    def _get_experiment(self) -> str | None:
        found = self.tracking.call(
            "GET", "experiments/get-by-name", params={"experiment_name": self.experiment}
        )
        return str(found["experiment"]["experiment_id"]) if found else None

    def _create_run(self, experiment_id: str, name: str, tags: dict[str, str]) -> dict[str, str]:
        run: dict[str, str] = self.tracking.call(
            "POST",
            "runs/create",
            json={
                "experiment_id": experiment_id,
                "run_name": name,
                "start_time": _now_ms(),
                "tags": [{"key": k, "value": v} for k, v in tags.items()],
            },
        )["run"]["info"]
        return run

    def _finish(self, run_id: str, status: str) -> None:
        self.tracking.call(
            "POST", "runs/update", json={"run_id": run_id, "status": status, "end_time": _now_ms()}
        )


def _now_ms() -> int:
    return int(time.time() * 1000)
