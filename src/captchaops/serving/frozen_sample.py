"""A bounded sample of a scheme's frozen evaluation set: the real images the trial and the
warm-up run beside white, black and noise ones, read over REST once per set.

A graph's cost or answer can hinge on a property only real CAPTCHAs have (their brightness, the
contrast of their strokes); synthetic probes alone miss it. The sample is the first images of
the set (a batch's worth, at most the largest batch), read from the registered model's
`evalset_digest` tag, the evaluation experiment's run that stores that set and its
`evalset.zip`, downloaded with bounded bytes (`MAX_SET_BYTES`) and unpacked only as far as the
sample (`captchaops.data.frozen.unpack`), at most `SAMPLE_BYTES` of it. A set never changes, so each sample is kept by the set's
digest, in memory and as one small 0600 file under the home
(`<home>/serving-cache/frozen-samples/`), with the set each scheme last named, so a restart
while the tracking server cannot be reached still tries with the same images.

A scheme without a frozen set, or one whose set cannot be read, has an empty sample: the trial
and the warm-up then run the synthetic images only, and the log says why. The sample's digest
(over its images' SHA-256s) is part of every trial verdict (`captchaops.serving.verdicts`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from captchaops.data.frozen import (
    ARTIFACT,
    DIGEST_TAG,
    EVAL_EXPERIMENT,
    MAX_SET_BYTES,
    ArchiveRefused,
    pack,
    unpack,
)
from captchaops.tracking_rest import API, TrackingError, TrackingRest

log = logging.getLogger(__name__)

_DIGEST = re.compile(r"[0-9a-f]{64}")
SAMPLES_DIR = "frozen-samples"
SAMPLE_BYTES = 16 * 2**20
"""Most bytes a sample may unpack to (its images and the set's labels.json): what the server holds."""
KEEP_SAMPLES = 8
"""Samples kept in memory and on disk, the oldest dropped first: a few schemes, a replaced set."""


@dataclass(frozen=True)
class FrozenSample:
    """Images of a scheme's frozen set the trial and warm-up run; empty with a `note` saying
    why when there are none."""

    images: tuple[bytes, ...] = ()
    evalset: str = ""
    """The digest of the frozen set the images come from ("" when there are none)."""
    note: str = ""

    @property
    def key(self) -> str:
        """What a verdict made with these images stands for: "none", or the images' digest."""
        if not self.images:
            return "none"
        outer = hashlib.sha256()
        for image in self.images:
            outer.update(hashlib.sha256(image).digest())
        return f"{outer.hexdigest()}x{len(self.images)}"


def samples_dir(home: Path) -> Path:
    """`<home>/serving-cache/frozen-samples`: shared by every model server of the home."""
    return home / "serving-cache" / SAMPLES_DIR


class FrozenSamples:
    """Samples of frozen sets by the set's digest, read once each; safe across threads."""

    def __init__(
        self,
        rest: TrackingRest,
        folder: Path | None,
        count: int,
        max_bytes: int = MAX_SET_BYTES,
        sample_bytes: int = SAMPLE_BYTES,
    ) -> None:
        self.rest = rest
        self.folder = folder
        self.count = max(1, count)
        self.max_bytes = max_bytes
        self.sample_bytes = sample_bytes
        self._kept: dict[str, FrozenSample] = {}
        self._lock = threading.Lock()

    def for_model(self, name: str) -> FrozenSample:
        """The sample of the frozen set registered model `name` is judged on; an empty one
        (with the reason, also logged) when it has none or it cannot be read."""
        with self._lock:
            sample = self._sample(name)
        if not sample.images:
            log.warning(
                "%s: the trial and warm-up run white, black and noise images only", sample.note
            )
        return sample

    def _sample(self, name: str) -> FrozenSample:
        try:
            _, tags = self.rest.registered_model(name)
        except TrackingError as exc:
            digest = self._last_named(name)
            if digest is None:
                return FrozenSample(note=f"the frozen set of {name} cannot be read ({exc})")
            return self._cached(digest) or FrozenSample(
                note=f"the frozen set {digest[:12]} of {name} cannot be read ({exc})"
            )
        digest = tags.get(DIGEST_TAG, "")
        if not digest:
            return FrozenSample(note=f"{name} has no frozen evaluation set")
        if not _DIGEST.fullmatch(digest):
            return FrozenSample(note=f"{name} names a frozen set with a malformed digest")
        self._name(name, digest)
        found = self._cached(digest)
        if found is not None:
            return found
        try:
            sample = self._download(digest)
        except (KeyError, TypeError, AttributeError) as exc:
            note = f"the tracking server's answer for the frozen set {digest[:12]} is malformed"
            return FrozenSample(note=f"{note} ({type(exc).__name__})")
        except (TrackingError, ArchiveRefused) as exc:
            note = f"the frozen set {digest[:12]} of {name} cannot be read ({exc})"
            return FrozenSample(note=note)
        self._keep(sample)
        return sample

    def _download(self, digest: str) -> FrozenSample:
        """The first `count` images of the stored set, the download and unpacking bounded."""
        experiment = self.rest.call(
            "GET",
            f"{API}/experiments/get-by-name",
            missing_ok=True,
            params={"experiment_name": EVAL_EXPERIMENT},
        ).get("experiment", {})
        runs = []
        if experiment.get("experiment_id"):
            runs = self.rest.call(
                "POST",
                f"{API}/runs/search",
                json={
                    "experiment_ids": [experiment["experiment_id"]],
                    "filter": f"tags.{DIGEST_TAG} = '{digest}'",
                    "max_results": 1,
                },
            ).get("runs", [])
        if not runs:
            raise TrackingError(f"it is not stored in {EVAL_EXPERIMENT}")
        data = self.rest.get_artifact(runs[0]["info"]["run_id"], ARTIFACT, self.max_bytes)
        _, images, _ = unpack(data, max_unpacked=self.sample_bytes, first=self.count)
        if not images:
            raise ArchiveRefused("it holds no images")
        return FrozenSample(tuple(images), digest)

    def _cached(self, digest: str) -> FrozenSample | None:
        """The sample of set `digest` kept in memory or on disk, if it holds `count` images or
        the whole set."""
        if digest in self._kept:
            return self._kept[digest]
        path = self._path(digest)
        if path is None:
            return None
        try:
            meta, images, _ = unpack(path.read_bytes(), first=self.count)
        except (OSError, ArchiveRefused):
            return None
        if meta.get("evalset") != digest or not images:
            return None
        if len(images) < self.count and not meta.get("whole"):
            return None  # kept for a smaller batch: read again
        sample = FrozenSample(tuple(images), digest)
        self._remember(sample)
        return sample

    def _remember(self, sample: FrozenSample) -> None:
        self._kept[sample.evalset] = sample
        while len(self._kept) > KEEP_SAMPLES:
            self._kept.pop(next(iter(self._kept)))

    def _keep(self, sample: FrozenSample) -> None:
        """Keep `sample` in memory and on disk (best effort)."""
        self._remember(sample)
        path = self._path(sample.evalset)
        if path is None:
            return
        images = list(sample.images)
        meta = {"evalset": sample.evalset, "whole": len(images) < self.count}
        self._write(path, pack(images, [""] * len(images), meta))
        with contextlib.suppress(OSError):
            files = sorted(path.parent.glob("*.zip"), key=lambda p: p.stat().st_mtime)
            for old in files[: max(0, len(files) - KEEP_SAMPLES)]:
                old.unlink(missing_ok=True)

    def _name(self, name: str, digest: str) -> None:
        """Record that `name` is judged on set `digest` (read back when the registry is away)."""
        if self.folder is not None and self._last_named(name) != digest:
            pointer = json.dumps({"evalset": digest}).encode()
            self._write(self.folder / f"model-{_safe(name)}.json", pointer)

    def _last_named(self, name: str) -> str | None:
        if self.folder is None:
            return None
        try:
            digest = json.loads((self.folder / f"model-{_safe(name)}.json").read_text())["evalset"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return digest if isinstance(digest, str) and _DIGEST.fullmatch(digest) else None

    def _path(self, digest: str) -> Path | None:
        return self.folder / f"{digest}.zip" if self.folder is not None else None

    @staticmethod
    def _write(path: Path, data: bytes) -> None:
        """Replace `path` with `data` atomically, 0600 in a 0700 folder (best effort)."""
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd, tmp = tempfile.mkstemp(prefix=".sample-", dir=path.parent)
        except OSError as exc:
            log.warning("cannot keep a frozen-set sample in %s: %s", path.parent, exc)
            return
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
            os.replace(tmp, path)
        except OSError as exc:
            log.warning("cannot keep a frozen-set sample in %s: %s", path.parent, exc)
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def _safe(name: str) -> str:
    """`name` as one safe path component."""
    return hashlib.sha256(name.encode()).hexdigest()[:32]
