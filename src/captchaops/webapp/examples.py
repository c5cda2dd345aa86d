"""Examples of the served scheme: held-out images from its frozen evaluation set, read over REST."""

from __future__ import annotations

import random
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from captchaops.data.frozen import (
    ARTIFACT,
    DIGEST_TAG,
    EVAL_EXPERIMENT,
    ArchiveRefused,
    ArchiveTooLarge,
    unpack,
)
from captchaops.webapp.tracking_client import ArtifactTooLarge, Tracking, TrackingError

MAX_SET_BYTES = 50 * 2**20
"""Largest frozen set the app downloads; a larger one is refused, not held in memory."""
KEEP_SETS = 2
"""How many frozen sets stay cached (one per scheme being shown, a spare for a replaced one)."""
_DIGEST = re.compile(r"[0-9A-Za-z_.-]{1,128}")


class SchemeError(Exception):
    """No held-out example can be shown; the message says why."""


@dataclass(frozen=True)
class Example:
    """An image of the served scheme with its true label, and where it came from."""

    image: bytes
    label: str
    held_out: bool
    model: str | None = None
    """The version whose scheme is shown, as `name vN`; None when nothing is served."""
    kind: str | None = None
    """The scheme's data kind ("folder" or "synthetic"); None when the tracking server cannot say."""
    note: str | None = None
    """Why the image is not what the served scheme calls for (generated instead of held out)."""

    @property
    def origin(self) -> str:
        """One line for the page: which scheme and model the image stands for."""
        if self.held_out:
            return (
                f"Held-out example of {self.model} ({self.kind} scheme), "
                "from its frozen evaluation set; never used in training."
            )
        if self.model is None:
            return "Generated CAPTCHA in the default alphabet: no served model version was found."
        if self.kind is None:
            return f"Generated CAPTCHA in the alphabet of {self.model} (scheme unknown)."
        return f"Generated CAPTCHA of {self.model} ({self.kind} scheme)."


@dataclass(frozen=True)
class HeldOut:
    """A frozen evaluation set kept in memory: only its images and labels."""

    digest: str
    items: tuple[tuple[bytes, str], ...]


class HeldOutSets:
    """Frozen evaluation sets by digest, downloaded once each; at most `keep` stay in memory."""

    def __init__(
        self, tracking: Tracking, max_bytes: int = MAX_SET_BYTES, keep: int = KEEP_SETS
    ) -> None:
        self.tracking = tracking
        self.max_bytes = max_bytes
        self.keep = keep
        self._sets: OrderedDict[str, HeldOut] = OrderedDict()
        self._refused: dict[str, str] = {}
        self._lock = threading.Lock()

    def example(self, model_name: str) -> tuple[bytes, str]:
        """A random held-out image of the registered model's frozen set, with its true label."""
        held = self.load(self.digest(model_name))
        return random.choice(held.items)

    def digest(self, model_name: str) -> str:
        """The digest of the frozen set a registered model is judged on (its `evalset_digest` tag)."""
        model = _call(
            self.tracking, "GET", "registered-models/get", params={"name": model_name}
        ).get("registered_model", {})
        tags = {t.get("key"): t.get("value") for t in model.get("tags", [])}
        digest = tags.get(DIGEST_TAG)
        if not digest:
            raise SchemeError(
                f"{model_name} has no frozen evaluation set yet; training on its folder makes one"
            )
        if not _DIGEST.fullmatch(digest):
            raise SchemeError(f"{model_name} names a frozen set with a malformed digest")
        return str(digest)

    def load(self, digest: str) -> HeldOut:
        """The frozen set with this digest, from memory or downloaded once (a set never changes)."""
        with self._lock:
            if digest in self._sets:
                self._sets.move_to_end(digest)
                return self._sets[digest]
            if digest in self._refused:
                raise SchemeError(self._refused[digest])
            try:
                held = self._download(digest)
            except _Refused as exc:
                self._refused[digest] = str(exc)
                raise
            self._sets[digest] = held
            while len(self._sets) > self.keep:
                self._sets.popitem(last=False)
            return held

    def _download(self, digest: str) -> HeldOut:
        experiment = _call(
            self.tracking,
            "GET",
            "experiments/get-by-name",
            params={"experiment_name": EVAL_EXPERIMENT},
        ).get("experiment", {})
        runs = (
            _call(
                self.tracking,
                "POST",
                "runs/search",
                json={
                    "experiment_ids": [experiment["experiment_id"]],
                    "filter": f"tags.{DIGEST_TAG} = '{digest}'",
                    "max_results": 1,
                },
            ).get("runs", [])
            if experiment.get("experiment_id")
            else []
        )
        if not runs:
            raise SchemeError(
                f"the frozen set {digest[:12]} is not stored in {EVAL_EXPERIMENT}; "
                "make a new one with `captchaops evalset --replace`"
            )
        try:
            data = self.tracking.get_artifact(runs[0]["info"]["run_id"], ARTIFACT, self.max_bytes)
        except ArtifactTooLarge as exc:
            raise _Refused(f"the frozen set {digest[:12]} is too large to show: {exc}") from exc
        except TrackingError as exc:
            raise SchemeError(str(exc)) from exc
        return _unpack(digest, data, self.max_bytes)


class _Refused(SchemeError):
    """A frozen set that can never be shown (too large, malformed): not downloaded again."""


def _call(tracking: Tracking, method: str, endpoint: str, **kwargs: Any) -> dict[str, Any]:
    try:
        return tracking.call(method, endpoint, **kwargs)
    except TrackingError as exc:
        raise SchemeError(str(exc)) from exc


def _unpack(digest: str, data: bytes, max_bytes: int) -> HeldOut:
    """Images and labels of a folder scheme's `evalset.zip` (format: captchaops.data.frozen)."""
    short = digest[:12]
    try:
        meta, images, labels = unpack(data, max_unpacked=max_bytes)
    except ArchiveTooLarge as exc:
        raise _Refused(f"the frozen set {short} is too large to show: {exc}") from exc
    except ArchiveRefused as exc:
        raise _Refused(f"the frozen set {short} is not a readable evalset.zip: {exc}") from exc
    if meta.get("kind") != "folder":
        raise _Refused(
            f"the frozen set {short} holds no held-out folder images "
            f"(its kind is {meta.get('kind')!r}); make one from the scheme's folder"
        )
    if not images:
        raise _Refused(f"the frozen set {short} is empty")
    return HeldOut(digest, tuple(zip(images, labels, strict=True)))
