"""The data set's shards and a worker's feed, without Ray or a server: the shard format, its
checks, and reading a data set from a worker's cache (filled here as a download would fill it)."""

from __future__ import annotations

import hashlib
import io
import os
import random
import tarfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from captchaops.data import standin
from captchaops.data.dataset import LabelledImages
from captchaops.model.crnn import Architecture
from captchaops.model.preprocess import preprocess
from captchaops.scaleout import feed, shipping
from captchaops.scaleout.feed import DataSet, capped, streams
from captchaops.scaleout.shipping import Manifest, ShardError, ShardRef, Shipped
from tests.fixtures.stack import Tracking

ARCH = Architecture(height=16, width=48)


@pytest.fixture(scope="module")
def images() -> LabelledImages:
    rng = random.Random("shards")
    labels = [f"{i:02d}".join("ab") for i in range(23)]
    data = [standin.render(label, rng, standin.Style(width=60, height=20))[0] for label in labels]
    return LabelledImages(data, labels, [f"{x}.png" for x in labels], "test")


def ship(data: LabelledImages, cache: Path, per_shard: int = 5) -> Shipped:
    """Write `data`'s shards and manifest into `cache` as the driver uploads and a worker
    downloads them."""
    refs = []
    for start in range(0, len(data), per_shard):
        raw = shipping.pack_shard(data.images[start : start + per_shard])
        ref = ShardRef(
            hashlib.sha256(raw).hexdigest(), len(data.images[start:][:per_shard]), len(raw)
        )
        (cache / f"{ref.sha256}.tar").write_bytes(raw)
        refs.append(ref)
    raw = Manifest(data.digest(), data.source, data.names, data.labels, refs).encode()
    digest = hashlib.sha256(raw).hexdigest()
    (cache / f"{digest}.json").write_bytes(raw)
    return Shipped("r" * 32, digest, len(refs))


def test_a_shard_is_the_same_bytes_for_the_same_images_and_reads_back(
    images: LabelledImages,
) -> None:
    raw = shipping.pack_shard(images.images[:4])
    assert raw == shipping.pack_shard(list(images.images[:4]))
    ref = ShardRef(hashlib.sha256(raw).hexdigest(), 4, len(raw))
    assert shipping.read_shard(io.BytesIO(raw), ref) == images.images[:4]


def test_shards_are_cut_by_count_and_by_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shipping, "SHARD_IMAGES", 3)
    monkeypatch.setattr(shipping, "SHARD_BYTES", 10)
    sizes = [1, 1, 1, 1, 9, 20, 1]
    ranges = shipping.shard_ranges([b"x" * n for n in sizes])
    assert ranges == [(0, 3), (3, 5), (5, 6), (6, 7)]


def test_a_changed_shard_is_refused_in_one_line_with_the_fix(images: LabelledImages) -> None:
    raw = shipping.pack_shard(images.images[:2])
    ref = ShardRef(hashlib.sha256(raw).hexdigest(), 2, len(raw))
    tampered = raw[:600] + bytes([raw[600] ^ 1]) + raw[601:]
    with pytest.raises(ShardError) as refused:
        shipping.read_shard(io.BytesIO(tampered), ref)
    line = str(refused.value)
    assert "\n" not in line and "does not match its sha256" in line
    assert "delete the run 'datasets'" in line


def test_a_shard_with_a_member_the_packer_never_writes_is_refused() -> None:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        link = tarfile.TarInfo("00000")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    raw = out.getvalue()
    with pytest.raises(ShardError, match="unexpected member"):
        shipping.read_shard(io.BytesIO(raw), ShardRef(hashlib.sha256(raw).hexdigest(), 1, len(raw)))


def test_a_manifest_that_is_not_one_this_version_wrote_is_refused() -> None:
    good = Manifest("d" * 64, "s", ["a.png"], ["a"], [ShardRef("e" * 64, 1, 10)])
    assert Manifest.decode(good.encode()) == good
    for bad in (
        b"[]",
        good.encode().replace(b'"schema":1', b'"schema":2'),
        good.encode().replace(b"e" * 64, b"../../etc/passwd"),
        Manifest("d" * 64, "s", ["a.png", "b.png"], ["a"], good.shards).encode(),
        good.encode().replace(b'"source"', b'"extra":1,"source"'),  # a key it does not know
        good.encode().replace(b",1,10]", b",true,10]"),  # a count that is not an int
        good.encode().replace(b",1,10]", b",1.0,10]"),
        good.encode().replace(b",1,10]", b",1,0]"),  # an empty shard
        good.encode().replace(b'["a.png"]', b"[7]"),  # a name that is not text
        good.encode().replace(b"d" * 64, b"D" * 64),  # a data set digest that is not one
    ):
        with pytest.raises(ShardError, match="not one this version reads"):
            Manifest.decode(bad)


def test_a_worker_reads_arrays_and_chunks_a_shard_at_a_time(
    images: LabelledImages, tmp_path: Path
) -> None:
    data = DataSet("http://unused:1", ship(images, tmp_path), cache=tmp_path)
    assert len(data) == len(images) and data.labels == images.labels
    idx = [17, 2, 9, 3, 22]
    want = np.stack([preprocess(images.images[i], ARCH.height, ARCH.width) for i in idx])
    assert np.array_equal(data.arrays(idx, ARCH), want)
    rows = {}
    for positions, x in data.chunks(idx, ARCH, size=2):
        rows |= dict(zip(positions, x, strict=True))
    assert np.array_equal(np.stack([rows[p] for p in range(len(idx))]), want)
    assert data.fetched == 0  # everything came from the cache


def test_a_killed_workers_partial_download_is_removed(
    images: LabelledImages, tmp_path: Path
) -> None:
    """A worker killed mid-download (ray job stop, the OOM killer) leaves a partial folder the
    cache's budget does not count; the next worker's eviction removes it once it is stale."""
    data = DataSet("http://unused:1", ship(images, tmp_path), cache=tmp_path)
    stale, live = tmp_path / f"{feed.PARTIAL}old", tmp_path / f"{feed.PARTIAL}new"
    for folder in (stale, live):
        folder.mkdir()
        (folder / "shard.tar").write_bytes(b"x" * 1000)
    old = time.time() - feed.PARTIAL_STALE_S - 60
    os.utime(stale, (old, old))
    data._evict(keep=tmp_path / "none")
    assert not stale.exists() and live.exists()


def test_streamed_batches_visit_every_training_image_once_a_pass(
    images: LabelledImages, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(feed, "WINDOW_IMAGES", 6)
    data = DataSet("http://unused:1", ship(images, tmp_path), cache=tmp_path)
    train = list(range(1, 21))  # 20 images, 4 shards, batches of 4: a pass is 5 batches
    alphabet = "0123456789ab"
    stream = data.batches(train, ARCH, alphabet, 4, batch=4, seed=3)
    first = [next(stream) for _ in range(5)]
    seen = Counter(
        "".join(alphabet[c] for c in row if c >= 0) for _, y in first for row in y.tolist()
    )
    assert seen == Counter(images.labels[i] for i in train)
    assert all(x.shape == (4, ARCH.height, ARCH.width, 1) for x, _ in first)
    again = data.batches(train, ARCH, alphabet, 4, batch=4, seed=3)
    assert all(np.array_equal(next(again)[1], y) for _, y in first)  # seeded


def test_a_changed_manifest_in_the_cache_is_refused(images: LabelledImages, tmp_path: Path) -> None:
    shipped = ship(images, tmp_path)
    path = tmp_path / f"{shipped.manifest}.json"
    path.write_bytes(path.read_bytes().replace(b"ab", b"ba", 1))
    with pytest.raises(ShardError, match="does not match its sha256"):
        DataSet("http://unused:1", shipped, cache=tmp_path)


def test_large_folds_stream_and_validate_on_a_capped_spread_sample() -> None:
    arch = Architecture(height=32, width=88)
    assert not streams(1000, arch, feed.STREAM_ABOVE_BYTES)
    assert streams(30_000, arch, feed.STREAM_ABOVE_BYTES)
    val = tuple(range(0, 30_000, 3))
    sample = capped(val)
    assert len(sample) == feed.VAL_CAP and sample[0] == 0 and sample[-1] > 29_000
    assert capped(val[:10]) == val[:10]


def test_a_worker_fetches_verified_shards_and_fetches_again_one_changed_in_its_cache(
    images: LabelledImages, tracking_server: Tracking, tmp_path: Path
) -> None:
    """Through a real tracking server: the driver's upload, a second upload that sends nothing,
    a worker's first read (downloaded), and a cached shard changed on the worker's disk (read
    again from the store instead of failing the run)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_server.uri)
    experiment = client.create_experiment(f"shards-{tmp_path.name}")
    parent = client.create_run(experiment).info.run_id
    shipped = shipping.upload(client, experiment, images, parent)
    assert (shipped.shards, shipped.uploaded) == (1, 1)
    assert shipping.upload(client, experiment, images, parent).uploaded == 0
    cache = tmp_path / "cache"
    cache.mkdir()
    data = DataSet(tracking_server.uri, shipped, cache=cache)
    assert data.images(0) == images.images and data.fetched == 2  # the manifest and the shard
    [cached] = cache.glob("*.tar")
    cached.write_bytes(cached.read_bytes()[:-1] + b"\x01")
    assert data.images(0) == images.images and data.fetched == 3
