"""Labelled image sets: deterministic splits by name and a content digest."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np


class DataError(ValueError):
    """A data source that cannot be used for training (the message says how to fix it)."""


@dataclass
class SkipReport:
    """Files left out of a dataset: counts per reason and a few example names."""

    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, reason: str, name: str) -> None:
        """Record one skipped file."""
        self.counts[reason] = self.counts.get(reason, 0) + 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < 3:
            shown.append(name)

    @property
    def total(self) -> int:
        """How many files were skipped."""
        return sum(self.counts.values())

    def summary(self) -> str:
        """One line: counts per reason with examples."""
        parts = [
            f"{n} {reason} (e.g. {', '.join(self.examples[reason])})"
            for reason, n in sorted(self.counts.items())
        ]
        return "; ".join(parts) if parts else "none"


@dataclass
class LabelledImages:
    """Image bytes with their labels and unique names, plus what was skipped on the way in."""

    images: list[bytes]
    labels: list[str]
    names: list[str]
    source: str
    skipped: SkipReport = field(default_factory=SkipReport)
    arrays: list[np.ndarray | None] | None = None  # network inputs computed while generating

    def __len__(self) -> int:
        return len(self.images)

    def digest(self) -> str:
        """sha256 over every (name, label, image bytes), independent of order."""
        items = sorted(
            f"{name}\0{label}\0{hashlib.sha256(image).hexdigest()}"
            for name, label, image in zip(self.names, self.labels, self.images, strict=True)
        )
        return hashlib.sha256("\n".join(items).encode()).hexdigest()

    def alphabet(self) -> str:
        """Every character used by the labels, sorted."""
        return "".join(sorted(set("".join(self.labels))))

    def subset(self, indices: list[int]) -> LabelledImages:
        """The images at `indices`, in that order, with the same source and skip report."""
        arrays = [self.arrays[i] for i in indices] if self.arrays is not None else None
        return LabelledImages(
            images=[self.images[i] for i in indices],
            labels=[self.labels[i] for i in indices],
            names=[self.names[i] for i in indices],
            source=self.source,
            skipped=self.skipped,
            arrays=arrays,
        )

    def extend(self, other: LabelledImages) -> None:
        """Append another set (names must stay unique)."""
        self.images += other.images
        self.labels += other.labels
        self.names += other.names
        if self.arrays is not None or other.arrays is not None:
            mine = self.arrays or [None] * (len(self.images) - len(other.images))
            self.arrays = mine + (other.arrays or [None] * len(other.images))
        self.source = f"{self.source} + {other.source}"
        for reason, n in other.skipped.counts.items():
            self.skipped.counts[reason] = self.skipped.counts.get(reason, 0) + n
            self.skipped.examples.setdefault(reason, []).extend(other.skipped.examples[reason])


def split_of(name: str, val_fraction: float, test_fraction: float) -> str:
    """'train', 'val' or 'test' for a file name; the same name always lands in the same split."""
    position = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") / 2**64
    if position < test_fraction:
        return "test"
    if position < test_fraction + val_fraction:
        return "val"
    return "train"


def split_indices(
    names: list[str], val_fraction: float, test_fraction: float
) -> dict[str, list[int]]:
    """Indices of the train/val/test splits, decided by hashing each name."""
    out: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for i, name in enumerate(names):
        out[split_of(name, val_fraction, test_fraction)].append(i)
    return out
