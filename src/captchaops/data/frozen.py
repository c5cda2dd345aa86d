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


MAX_ITEMS = 100_000
"""Most images one set may hold; an archive listing more entries is refused unread."""
MAX_ENTRY_BYTES = 4 * 2**20
"""Most bytes one image of a set may unpack to (an upload is at most 1 MiB by default)."""
MAX_LABELS_BYTES = 32 * 2**20
"""Most bytes `labels.json` may unpack to."""
MAX_SET_BYTES = 128 * 2**20
"""Most bytes a whole set may download or unpack to, unless the reader allows less."""


class ArchiveRefused(ValueError):
    """An archive that is not a well-formed, bounded `evalset.zip`; the message says why in one line."""


class ArchiveTooLarge(ArchiveRefused):
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
    data: bytes,
    max_unpacked: int | None = None,
    *,
    max_items: int = MAX_ITEMS,
    first: int | None = None,
) -> tuple[dict[str, Any], list[bytes], list[str]]:
    """(meta, images, labels) of an `evalset.zip`, read with bounded bytes.

    Every entry is read through a counting limit, never trusting the sizes the archive declares;
    each `labels.json` item must name a distinct entry, and at most `max_items` of them. Raises
    ArchiveTooLarge past `max_unpacked` bytes in all (default MAX_SET_BYTES) or MAX_ENTRY_BYTES
    in one image, ArchiveRefused for anything else that is not a well-formed set. With `first`,
    only the first `first` items are read (the rest are still checked to be distinct names).
    """
    budget = MAX_SET_BYTES if max_unpacked is None else max_unpacked
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            if len(archive.infolist()) > max_items + 1:
                raise ArchiveRefused(f"it holds more than {max_items} images")
            raw = _read(archive, "labels.json", min(MAX_LABELS_BYTES, budget))
            budget -= len(raw)
            meta = json.loads(raw)
            items = meta.get("items") if isinstance(meta, dict) else None
            if not isinstance(items, list):
                raise ArchiveRefused("its labels.json holds no list of items")
            if len(items) > max_items:
                raise ArchiveRefused(f"it labels more than {max_items} images")
            names = [_item_name(item) for item in items]
            if len(set(names)) != len(names):
                raise ArchiveRefused("its labels.json names one image more than once")
            images = []
            for name in names[:first]:
                image = _read(archive, name, min(MAX_ENTRY_BYTES, budget))
                budget -= len(image)
                images.append(image)
    except (zipfile.BadZipFile, EOFError, OSError, RuntimeError, NotImplementedError) as exc:
        raise ArchiveRefused(f"it is not a readable zip archive ({type(exc).__name__})") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArchiveRefused("its labels.json is not JSON") from exc
    labels = [str(item["label"]) for item in items[: len(images)]]
    return meta, images, labels


def _item_name(item: object) -> str:
    if not isinstance(item, dict) or not isinstance(item.get("file"), str) or "label" not in item:
        raise ArchiveRefused("its labels.json has an item without a file name and a label")
    return str(item["file"])


def _read(archive: zipfile.ZipFile, name: str, limit: int) -> bytes:
    """One entry's bytes, decompressed at most `limit` + 1 bytes far, whatever its header says."""
    try:
        info = archive.getinfo(name)
    except KeyError:
        if name == "labels.json":
            raise ArchiveRefused("it holds no labels.json") from None
        raise ArchiveRefused(
            f"its labels.json names {name[:80]!r}, which it does not hold"
        ) from None
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise ArchiveRefused(f"{name[:80]} is compressed with a method sets never use")
    with archive.open(info) as entry:
        content = entry.read(limit + 1)
    if len(content) > limit:
        raise ArchiveTooLarge(f"{name[:80]} takes it past {limit / 2**20:g} MiB")
    return content
