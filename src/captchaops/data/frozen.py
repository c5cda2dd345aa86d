"""The frozen evaluation set's storage format, free of MLflow: names, digest and zip layout.

`captchaops.evaluation.evalset` stores and loads sets through MLflow; the web app, which must not import
MLflow, reads the same archives over REST. Both use this module.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from typing import Any

EVAL_EXPERIMENT = "text-captcha-evaluation"
DIGEST_TAG = "evalset_digest"
"""Registered-model tag naming the current frozen set; also tags the run that stores it."""
ARTIFACT = "evalset.zip"


class ArchiveTooLarge(ValueError):
    """An archive that would unpack to more bytes than the reader allows."""


def digest_of(images: list[bytes], labels: list[str]) -> str:
    """SHA-256 over every (image hash, label) pair, in order."""
    outer = hashlib.sha256()
    for image, label in zip(images, labels, strict=True):
        outer.update(hashlib.sha256(image).digest())
        outer.update(label.encode() + b"\0")
    return outer.hexdigest()


def pack(images: list[bytes], labels: list[str], meta: dict[str, object]) -> bytes:
    """`evalset.zip`: one file per image and `labels.json` (meta plus the items in order)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        items = []
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            name = f"images/{i:06d}.bin"
            archive.writestr(name, image)
            items.append({"file": name, "label": label})
        archive.writestr("labels.json", json.dumps({**meta, "items": items}))
    return buffer.getvalue()


def unpack(
    data: bytes, max_unpacked: int | None = None
) -> tuple[dict[str, Any], list[bytes], list[str]]:
    """(meta, images, labels) of an `evalset.zip`; ArchiveTooLarge past `max_unpacked` bytes."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        if max_unpacked is not None and (
            sum(info.file_size for info in archive.infolist()) > max_unpacked
        ):
            raise ArchiveTooLarge(f"unpacks to more than {max_unpacked} bytes")
        meta = json.loads(archive.read("labels.json"))
        images = [archive.read(item["file"]) for item in meta["items"]]
    labels = [str(item["label"]) for item in meta["items"]]
    return meta, images, labels
