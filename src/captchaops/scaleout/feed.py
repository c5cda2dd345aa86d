"""A worker's side of the data set: shards fetched on demand into a bounded disk cache, verified
by sha256 on every read, and turned into network inputs a shard at a time.

Nothing here holds the whole data set: a fold's arrays are filled shard by shard (only the
images it uses are decoded), held-out images are scored in chunks, and when a fold's training
arrays would be larger than `STREAM_ABOVE_BYTES` its training images reach `fit` as a stream
(`training.loop.Stream`, the path fresh synthetic images take): windows of a few shards,
decoded, shuffled and cut into batches, in a seeded order, pass after pass. The cache is a 0700
folder of this user's, `<tmp>/captchaops-shards-<uid>`, shared by the workers of one machine,
holding at most `CACHE_BYTES` (least recently used shards go first).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Generator, Iterator, Sequence
from pathlib import Path

import mlflow.artifacts
import numpy as np

from captchaops.model.crnn import Architecture
from captchaops.model.ctc import encode_labels
from captchaops.model.preprocess import preprocess
from captchaops.scaleout.shipping import (
    HEX64,
    MANIFESTS,
    MAX_MANIFEST_BYTES,
    SHARDS,
    Manifest,
    ShardError,
    Shipped,
    mismatch,
    read_shard,
)

CACHE_BYTES = 2 * 2**30
STREAM_ABOVE_BYTES = 256 * 2**20  # training arrays larger than this are streamed
WINDOW_IMAGES = 4096  # training images decoded and shuffled together when streaming
VAL_CAP = 2000  # at most this many validation images when a fold streams (they stay in memory)
PARTIAL = "partial-"
"""The prefix of a download in progress in the cache: a worker killed during one leaves it."""
PARTIAL_STALE_S = 3600.0
"""A partial download older than this is left over by a worker that died; removed by the next."""


def input_bytes(n: int, arch: Architecture) -> int:
    """The bytes `n` network inputs take as float32 arrays."""
    return n * arch.height * arch.width * 4


def streams(n_train: int, arch: Architecture, stream_above: int) -> bool:
    """Whether `n_train` training images reach `fit` as a stream rather than as arrays."""
    return input_bytes(n_train, arch) > stream_above


def capped(val: Sequence[int]) -> tuple[int, ...]:
    """At most VAL_CAP of a streamed fold's validation images, evenly spread over them."""
    if len(val) <= VAL_CAP:
        return tuple(val)
    step = len(val) / VAL_CAP
    return tuple(val[int(i * step)] for i in range(VAL_CAP))


def cache_dir() -> Path:
    """This user's shard cache (made 0700; refused if it is not a folder of this user's)."""
    path = Path(tempfile.gettempdir()) / f"captchaops-shards-{os.getuid()}"
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700)
    info = path.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise ShardError(f"{path} is not a private folder of this user's; remove it")
    return path


class DataSet:
    """A shipped data set as a worker reads it: the manifest, then shards on demand."""

    def __init__(self, tracking_uri: str, shipped: Shipped, cache: Path | None = None) -> None:
        self.tracking_uri, self.shipped = tracking_uri, shipped
        self.cache = cache or cache_dir()
        self.cache_bytes = CACHE_BYTES
        self.fetched = 0  # shards downloaded (not found in the cache)
        if not HEX64.fullmatch(shipped.manifest):
            raise ShardError("the data set's manifest is not named by a sha256")
        raw = self._file(MANIFESTS, shipped.manifest, ".json").read_bytes()
        digest = hashlib.sha256(raw).hexdigest()
        if digest != shipped.manifest:
            raise mismatch(f"the data set's manifest {shipped.manifest[:12]}", digest)
        self.manifest = Manifest.decode(raw)
        self.labels = self.manifest.labels
        starts = self.manifest.starts()
        self._shard_of = np.repeat(np.arange(len(starts)), [s.images for s in self.manifest.shards])
        self._starts = starts

    def __len__(self) -> int:
        return len(self.labels)

    def images(self, shard: int) -> list[bytes]:
        """The images of shard number `shard`, verified."""
        ref = self.manifest.shards[shard]
        cached = self.cache / f"{ref.sha256}.tar"
        try:
            file = self._file(SHARDS, ref.sha256, ".tar").open("rb")
        except FileNotFoundError:  # another worker evicted it just now: fetch it again
            file = self._file(SHARDS, ref.sha256, ".tar").open("rb")
        with file:  # one open file: an eviction from now on cannot cut it short
            try:
                return read_shard(file, ref)
            except ShardError:  # changed on this disk since it was checked: fetch it again
                cached.unlink(missing_ok=True)
        with self._file(SHARDS, ref.sha256, ".tar").open("rb") as file:
            return read_shard(file, ref)

    def by_shard(self, idx: Sequence[int]) -> Iterator[tuple[list[bytes], list[int], list[int]]]:
        """For each shard holding some of `idx`, in shard order: its images, the positions in
        `idx` and the images' offsets in the shard."""
        order = np.argsort(self._shard_of[np.asarray(idx, dtype=np.int64)], kind="stable")
        groups: dict[int, tuple[list[int], list[int]]] = {}
        for pos in order.tolist():
            i = idx[pos]
            shard = int(self._shard_of[i])
            positions, offsets = groups.setdefault(shard, ([], []))
            positions.append(pos)
            offsets.append(i - self._starts[shard])
        for shard, (positions, offsets) in groups.items():
            yield self.images(shard), positions, offsets

    def arrays(self, idx: Sequence[int], arch: Architecture) -> np.ndarray:
        """The network's input for the images at `idx`, filled a shard at a time."""
        out = np.empty((len(idx), arch.height, arch.width, 1), dtype=np.float32)
        for images, positions, offsets in self.by_shard(idx):
            for pos, off in zip(positions, offsets, strict=True):
                out[pos] = preprocess(images[off], arch.height, arch.width)
        return out

    def chunks(
        self, idx: Sequence[int], arch: Architecture, size: int = 2048
    ) -> Iterator[tuple[list[int], np.ndarray]]:
        """The network's input for `idx` in chunks of about `size`: (positions in idx, x)."""
        positions: list[int] = []
        rows: list[np.ndarray] = []
        for images, where, offsets in self.by_shard(idx):
            for pos, off in zip(where, offsets, strict=True):
                positions.append(pos)
                rows.append(preprocess(images[off], arch.height, arch.width))
            if len(rows) >= size:
                yield positions, np.stack(rows)
                positions, rows = [], []
        if rows:
            yield positions, np.stack(rows)

    def batches(
        self,
        idx: Sequence[int],
        arch: Architecture,
        alphabet: str,
        max_length: int,
        batch: int,
        seed: int,
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Endless (x, y) training batches over `idx`: each pass visits the shards in a seeded
        order, a window of about WINDOW_IMAGES images at a time, shuffled within the window;
        the images left over at a window's end start the next one."""
        rng = np.random.default_rng((seed, 38))
        groups: dict[int, list[int]] = {}
        for i in idx:
            shard = int(self._shard_of[i])
            groups.setdefault(shard, []).append(i - self._starts[shard])
        shards = sorted(groups)
        if not shards:
            return
        carry_x = np.empty((0, arch.height, arch.width, 1), dtype=np.float32)
        carry_y = np.empty((0, max_length), dtype=np.int32)
        while True:
            window: list[np.ndarray] = [carry_x]
            labels: list[np.ndarray] = [carry_y]
            held = len(carry_x)
            for shard in rng.permutation(shards).tolist():
                images = self.images(shard)
                offsets = groups[shard]
                window.append(
                    np.stack([preprocess(images[o], arch.height, arch.width) for o in offsets])
                )
                start = self._starts[shard]
                labels.append(
                    encode_labels([self.labels[start + o] for o in offsets], alphabet, max_length)
                )
                held += len(offsets)
                if held >= WINDOW_IMAGES:
                    carry_x, carry_y = yield from _cut(window, labels, batch, rng)
                    window, labels, held = [carry_x], [carry_y], len(carry_x)
            carry_x, carry_y = yield from _cut(window, labels, batch, rng)

    def _file(self, folder: str, digest: str, suffix: str) -> Path:
        """`folder/<digest><suffix>` of the store run, from the cache or downloaded into it
        (kept only when its sha256 is `digest`: a sha256 the worker was handed or read in a
        verified manifest, never a path)."""
        path = self.cache / f"{digest}{suffix}"
        if path.exists():
            os.utime(path)  # recently used: evicted last
            return path
        with tempfile.TemporaryDirectory(dir=self.cache, prefix=PARTIAL) as tmp:
            local = Path(
                mlflow.artifacts.download_artifacts(
                    run_id=self.shipped.run_id,
                    artifact_path=f"{folder}/{path.name}",
                    dst_path=tmp,
                    tracking_uri=self.tracking_uri,
                )
            )
            if folder == MANIFESTS and local.stat().st_size > MAX_MANIFEST_BYTES:
                raise ShardError("the data set's manifest is larger than any this version reads")
            with local.open("rb") as file:
                got = hashlib.file_digest(file, "sha256").hexdigest()  # type: ignore[arg-type]
            if got != digest:
                what = "the data set's manifest" if folder == MANIFESTS else "shard"
                raise mismatch(f"{what} {digest[:12]}", got)
            os.replace(local, path)
        self.fetched += 1
        self._evict(keep=path)
        return path

    def _evict(self, keep: Path) -> None:
        """Remove the least recently used files until the cache is within its budget."""
        files = []
        for entry in os.scandir(self.cache):
            if entry.name.startswith(PARTIAL) and entry.is_dir(follow_symlinks=False):
                age = time.time() - entry.stat(follow_symlinks=False).st_mtime
                if age > PARTIAL_STALE_S:  # a killed worker's; a live download is younger
                    shutil.rmtree(entry.path, ignore_errors=True)
                continue
            if entry.is_file(follow_symlinks=False):
                info = entry.stat(follow_symlinks=False)
                files.append((info.st_mtime, info.st_size, Path(entry.path)))
        total = sum(size for _, size, _ in files)
        for _, size, path in sorted(files):
            if total <= self.cache_bytes:
                break
            if path != keep:
                path.unlink(missing_ok=True)
                total -= size


def _cut(
    window: list[np.ndarray], labels: list[np.ndarray], batch: int, rng: np.random.Generator
) -> Generator[tuple[np.ndarray, np.ndarray], None, tuple[np.ndarray, np.ndarray]]:
    """Shuffle a window and yield its whole batches; returns what is left over. The window's
    parts are let go once joined, so a window is held once while its batches are drawn, not
    twice (4,096 images at 32 x 128 are 64 MiB)."""
    x, y = np.concatenate(window), np.concatenate(labels)
    window.clear()
    labels.clear()
    order = rng.permutation(len(x))
    whole = len(x) // batch * batch
    for at in range(0, whole, batch):
        rows = order[at : at + batch]
        yield x[rows], y[rows]
    rest = order[whole:]
    return x[rest], y[rest]


def steps_per_epoch(n_train: int, batch: int) -> int:
    """Optimiser steps in one pass over `n_train` images (as `fit` counts them for arrays)."""
    return max(1, math.ceil(n_train / batch))
