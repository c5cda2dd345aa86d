"""Read a folder of labelled CAPTCHA images: the file stem is the label."""

from __future__ import annotations

from pathlib import Path

from captchaops.data.dataset import DataError, LabelledImages, SkipReport
from captchaops.model.preprocess import InvalidImage, decode

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".bmp")


def label_of(path: Path, separator: str | None = None) -> str:
    """The label a file name carries: its stem, or the part before `separator` when given."""
    stem = path.stem
    return stem.split(separator, 1)[0] if separator else stem


def read_folder(
    folder: Path, alphabet: str | None = None, separator: str | None = None
) -> LabelledImages:
    """Every usable image under `folder`; bad files are counted in `.skipped`, never raised."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder; pass a folder of images named <label>.png")
    skipped = SkipReport()
    images: list[bytes] = []
    labels: list[str] = []
    names: list[str] = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if path.name.startswith("."):
            continue
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            skipped.add("not an image file", rel)
            continue
        label = label_of(path, separator)
        if not label or any(ch.isspace() for ch in label):
            skipped.add("no usable label in the file name", rel)
            continue
        if alphabet is not None and any(ch not in alphabet for ch in label):
            skipped.add("label has characters outside the alphabet", rel)
            continue
        data = path.read_bytes()
        try:
            decode(data)
        except InvalidImage:
            skipped.add("unreadable image", rel)
            continue
        images.append(data)
        labels.append(label)
        names.append(rel)
    if not images:
        detail = f" (skipped: {skipped.summary()})" if skipped.total else ""
        raise DataError(
            f"no usable images in {folder}{detail}; add PNG, JPEG, GIF or BMP files named <label>.png"
        )
    return LabelledImages(images, labels, names, source=str(folder), skipped=skipped)
