"""The review queue in the tracking server: unlabelled low-confidence inputs, one run each in the
feedback experiment beside the corrections (tag `captchaops.kind=review`, image under `review/`,
where training never looks), later labelled (stored again as a correction) or discarded."""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from typing import Any

from captchaops.data.corrections import DIGEST_TAG, KIND_TAG, REVIEW_KIND
from captchaops.model.preprocess import EXTENSIONS, InvalidImage, sniff_format
from captchaops.webapp.correction_runs import Corrections, Saved

REVIEW_PATH = "review"
STATE_TAG = "review_state"
PENDING, LABELLED, DISCARDED = "pending", "labelled", "discarded"
_RUN_ID = re.compile(r"[0-9a-f]{32}")
_PAGE = 1000


class ReviewGone(LookupError):
    """The review item does not exist, is not a review item, or was labelled or discarded."""


@dataclass(frozen=True)
class Sample:
    """One input offered for review, in memory until the sampler's thread stores it."""

    image: bytes
    fmt: str
    digest: str
    text: str
    confidence: float
    model: str | None
    source: str


@dataclass(frozen=True)
class Item:
    """A stored review item, as the review page lists it."""

    run_id: str
    artifact: str
    text: str
    confidence: float | None
    model: str | None
    source: str


class ReviewStore:
    """Review items as runs of the feedback experiment, through the app's tracking client."""

    def __init__(self, corrections: Corrections) -> None:
        self.corrections = corrections
        self.tracking = corrections.tracking

    def seen(self, digest: str) -> bool:
        """Whether any finished run of the feedback experiment (a review item in any state, or a
        correction) holds an image with this SHA-256."""
        page = self._search(f"tags.`{DIGEST_TAG}` = '{digest}'", 1)
        return bool(page.get("runs"))

    def store(self, sample: Sample) -> str:
        """Store one unlabelled sample as a pending review item; return its run id."""
        path = f"{REVIEW_PATH}/{uuid.uuid4().hex}.{EXTENSIONS[sample.fmt]}"
        tags = {
            KIND_TAG: REVIEW_KIND,
            STATE_TAG: PENDING,
            DIGEST_TAG: sample.digest,
            "artifact": path,
            "text": sample.text,
            "confidence": f"{sample.confidence:.6f}",
            "source": sample.source,
        }
        if sample.model:
            tags["model_version"] = sample.model
        experiment_id = self.corrections.experiment_id()
        return self.corrections.store_run(experiment_id, "review", tags, sample.image, sample.fmt)

    def count_pending(self, at_most: int) -> int:
        """How many items wait for a label, counted up to `at_most` (one call per 1000)."""
        query = self._query(_PENDING, min(max(at_most, 1), _PAGE))
        total = 0
        while True:
            page = self.tracking.call("POST", "runs/search", json=query)
            total += len(page.get("runs", []))
            if total >= at_most or not page.get("next_page_token"):
                return min(total, at_most)
            query["page_token"] = page["next_page_token"]

    def pending(self, limit: int) -> list[Item]:
        """The oldest `limit` items waiting for a label."""
        query = self._query(_PENDING, limit)
        query["order_by"] = ["attributes.start_time ASC"]
        page = self.tracking.call("POST", "runs/search", json=query)
        return [_item(run) for run in page.get("runs", [])]

    def get(self, run_id: str) -> Item:
        """A pending item by its run id; ReviewGone for anything else (another experiment's run,
        a correction, an item labelled or discarded meanwhile)."""
        if not _RUN_ID.fullmatch(run_id):
            raise ReviewGone(run_id)
        found = self.tracking.call("GET", "runs/get", params={"run_id": run_id})
        run = found.get("run")
        if not run:
            raise ReviewGone(run_id)
        info = run.get("info", {})
        tags = _tags(run)
        if (
            info.get("experiment_id") != self.corrections.experiment_id()
            or info.get("status") != "FINISHED"
            or info.get("lifecycle_stage", "active") != "active"
            or tags.get(KIND_TAG) != REVIEW_KIND
            or tags.get(STATE_TAG) != PENDING
            or not tags.get("artifact", "").startswith(f"{REVIEW_PATH}/")
        ):
            raise ReviewGone(run_id)
        return _item(run)

    def image(self, item: Item, max_bytes: int) -> bytes:
        """The item's image bytes, fetched through the tracking server."""
        return self.tracking.get_artifact(item.run_id, item.artifact, max_bytes)

    def label(self, item: Item, image: bytes, label: str) -> Saved:
        """Store the item's image under a checked label as a correction, then mark it labelled."""
        try:
            fmt = sniff_format(image)
        except InvalidImage as exc:  # stored by this app after checking; only tampering gets here
            raise ReviewGone(item.run_id) from exc
        saved = self.corrections.save(image, fmt, label, model_version=item.model, source="review")
        tags = {STATE_TAG: LABELLED, "review_label": label, "correction": saved.path}
        self._set_tags(item.run_id, tags)
        return saved

    def discard(self, item: Item) -> None:
        """Mark an item nobody can read as discarded: it leaves the queue and its image is
        never offered again."""
        self._set_tags(item.run_id, {STATE_TAG: DISCARDED})

    def _set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        batch = [{"key": k, "value": v} for k, v in tags.items()]
        self.tracking.call("POST", "runs/log-batch", json={"run_id": run_id, "tags": batch})

    def _search(self, condition: str, limit: int) -> dict[str, Any]:
        return self.tracking.call("POST", "runs/search", json=self._query(condition, limit))

    def _query(self, condition: str, limit: int) -> dict[str, Any]:
        return {
            "experiment_ids": [self.corrections.experiment_id()],
            "filter": f"{condition} and attributes.status = 'FINISHED'",
            "max_results": limit,
        }


_PENDING = f"tags.`{KIND_TAG}` = '{REVIEW_KIND}' and tags.`{STATE_TAG}` = '{PENDING}'"


def _tags(run: dict[str, Any]) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run.get("data", {}).get("tags", [])}


def _item(run: dict[str, Any]) -> Item:
    tags = _tags(run)
    try:
        confidence: float | None = float(tags["confidence"])
    except (KeyError, ValueError):
        confidence = None
    return Item(
        run_id=run["info"]["run_id"],
        artifact=tags.get("artifact", ""),
        text=tags.get("text", ""),
        confidence=confidence,
        model=tags.get("model_version"),
        source=tags.get("source", ""),
    )
