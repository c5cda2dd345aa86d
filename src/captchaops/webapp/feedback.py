"""Corrections from visitors: one MLflow run per correction, image at `feedback/<label>_<uuid>.<ext>`."""

from __future__ import annotations

import time
import uuid

from captchaops.data.feedback import FEEDBACK_EXPERIMENT, FEEDBACK_PATH
from captchaops.webapp.tracking import Tracking, TrackingError

KIND_TAG = "captchaops.kind"
KIND = "correction"
_EXTENSIONS = {"PNG": "png", "JPEG": "jpg", "GIF": "gif", "BMP": "bmp"}
_MIME = {"PNG": "image/png", "JPEG": "image/jpeg", "GIF": "image/gif", "BMP": "image/bmp"}


def artifact_name(label: str, fmt: str) -> str:
    """The stored file name: the label, a random id, the sniffed format; never the upload's name."""
    return f"{label}_{uuid.uuid4().hex}.{_EXTENSIONS[fmt]}"


def save_correction(
    tracking: Tracking,
    image: bytes,
    fmt: str,
    label: str,
    *,
    model_version: str | None,
    source: str,
) -> str:
    """Store one checked image with its corrected label through the artifact proxy; return its path."""
    path = f"{FEEDBACK_PATH}/{artifact_name(label, fmt)}"
    tags = {KIND_TAG: KIND, "label": label, "source": source, "artifact": path}
    if model_version:
        tags["model_version"] = model_version
    run = tracking.call(
        "POST",
        "runs/create",
        json={
            "experiment_id": _experiment_id(tracking),
            "run_name": f"correction-{label}",
            "start_time": _now_ms(),
            "tags": [{"key": k, "value": v} for k, v in tags.items()],
        },
    )["run"]["info"]
    try:
        tracking.put_artifact(run["artifact_uri"], path, image, _MIME[fmt])
    except Exception:
        _finish(tracking, run["run_id"], "FAILED")
        raise
    _finish(tracking, run["run_id"], "FINISHED")
    return path


def count_waiting(tracking: Tracking) -> int:
    """How many stored corrections exist (each finished correction run holds exactly one image)."""
    experiment = tracking.call(
        "GET", "experiments/get-by-name", params={"experiment_name": FEEDBACK_EXPERIMENT}
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
        page = tracking.call("POST", "runs/search", json=query)
        total += len(page.get("runs", []))
        if not page.get("next_page_token"):
            return total
        query["page_token"] = page["next_page_token"]


def _experiment_id(tracking: Tracking) -> str:
    found = tracking.call(
        "GET", "experiments/get-by-name", params={"experiment_name": FEEDBACK_EXPERIMENT}
    )
    if found:
        return str(found["experiment"]["experiment_id"])
    try:
        return str(
            tracking.call("POST", "experiments/create", json={"name": FEEDBACK_EXPERIMENT})[
                "experiment_id"
            ]
        )
    except TrackingError:
        found = tracking.call(
            "GET", "experiments/get-by-name", params={"experiment_name": FEEDBACK_EXPERIMENT}
        )
        if not found:
            raise
        return str(found["experiment"]["experiment_id"])


def _finish(tracking: Tracking, run_id: str, status: str) -> None:
    tracking.call(
        "POST", "runs/update", json={"run_id": run_id, "status": status, "end_time": _now_ms()}
    )


def _now_ms() -> int:
    return int(time.time() * 1000)
