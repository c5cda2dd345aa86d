"""The data set travels to workers through the tracking server as content-addressed shards.

The driver cuts the labelled images into shards (a plain tar of at most `SHARD_IMAGES` images
or `SHARD_BYTES` bytes, members named 00000, 00001, ..., fixed metadata, so the same images
make the same bytes) and writes a manifest (the shards' sha256 and image counts, every image's
name and label, the data set's digest) named by its own sha256. Both go to one run per
experiment, `datasets` (tag `captchaops.kind=dataset-store`), through the artifact proxy:
`shards/<sha256>.tar`, `manifests/<sha256>.json`. A shard or manifest already there (same name,
same size) is not uploaded again, so a second command on the same folder uploads nothing.

A worker is handed only the store run and the manifest's digest; it trusts bytes because their
sha256 is the one it was handed (the manifest) or the one the manifest names (a shard), never
because of where they came from, and it never writes a path it read from the data. Plain files
(JSON and tar), no pickle.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from captchaops import mlflow_scope
from captchaops.data.dataset import LabelledImages
from captchaops.scaleout import ScaleoutError

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

SHARD_IMAGES = 1000
SHARD_BYTES = 32 * 2**20
MAX_IMAGE_BYTES = 16 * 2**20  # one member of a shard (a PNG far beyond any CAPTCHA)
MAX_MANIFEST_BYTES = 512 * 2**20
STORE_NAME = "datasets"
STORE_KIND = "dataset-store"
SHARDS, MANIFESTS = "shards", "manifests"
SCHEMA = 1
HEX64 = re.compile(r"[0-9a-f]{64}")


class ShardError(ScaleoutError):
    """Bytes from the artifact store are not the ones the driver uploaded (or not a shard)."""


@dataclass(frozen=True)
class ShardRef:
    """One shard: its sha256, how many images it holds and its size in bytes."""

    sha256: str
    images: int
    size: int


@dataclass(frozen=True)
class Manifest:
    """What a data set is made of: its shards, in order, and every image's name and label."""

    dataset_sha256: str
    source: str
    names: list[str]
    labels: list[str]
    shards: list[ShardRef]

    def encode(self) -> bytes:
        """The manifest's canonical bytes (its sha256 is its name)."""
        body = {
            "schema": SCHEMA,
            "dataset_sha256": self.dataset_sha256,
            "source": self.source,
            "names": self.names,
            "labels": self.labels,
            "shards": [[s.sha256, s.images, s.size] for s in self.shards],
        }
        return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes) -> Manifest:
        """A manifest from its bytes, every field checked: exactly the keys `encode` writes, of
        exactly its types (a count is an int, not a bool, a float or a string); anything else
        is refused."""
        refused = ShardError("the data set's manifest is not one this version reads")
        try:
            body = json.loads(raw)
        except ValueError:
            raise refused from None
        keys = {"schema", "dataset_sha256", "source", "names", "labels", "shards"}
        if not isinstance(body, dict) or set(body) != keys or body["schema"] != SCHEMA:
            raise refused
        texts = (body["dataset_sha256"], body["source"])
        lists = (body["names"], body["labels"], body["shards"])
        if not all(isinstance(t, str) for t in texts) or not all(
            isinstance(x, list) for x in lists
        ):
            raise refused
        if not all(isinstance(x, str) for x in [*body["names"], *body["labels"]]):
            raise refused
        shards = []
        for ref in body["shards"]:
            if not (
                isinstance(ref, list)
                and len(ref) == 3
                and isinstance(ref[0], str)
                and HEX64.fullmatch(ref[0])
                and all(type(n) is int for n in ref[1:])
                and 0 < ref[1] <= SHARD_IMAGES
                and ref[2] > 0
            ):
                raise refused
            shards.append(ShardRef(ref[0], ref[1], ref[2]))
        total = sum(s.images for s in shards)
        if not HEX64.fullmatch(body["dataset_sha256"]) or not (
            len(body["names"]) == len(body["labels"]) == total
        ):
            raise refused
        return cls(body["dataset_sha256"], body["source"], body["names"], body["labels"], shards)

    def starts(self) -> list[int]:
        """The index of each shard's first image."""
        out, at = [], 0
        for shard in self.shards:
            out.append(at)
            at += shard.images
        return out


@dataclass(frozen=True)
class Shipped:
    """Where workers find a data set: the store run and the manifest's sha256 (all a Job
    carries), and what the driver uploaded to put it there."""

    run_id: str
    manifest: str
    shards: int = 0
    uploaded: int = 0


def shard_ranges(images: list[bytes]) -> list[tuple[int, int]]:
    """Consecutive [start, stop) ranges of at most SHARD_IMAGES images or SHARD_BYTES bytes
    (an image larger than that is a shard of its own)."""
    ranges, start, size = [], 0, 0
    for i, image in enumerate(images):
        if i > start and (i - start >= SHARD_IMAGES or size + len(image) > SHARD_BYTES):
            ranges.append((start, i))
            start, size = i, 0
        size += len(image)
    if images:
        ranges.append((start, len(images)))
    return ranges


def pack_shard(images: list[bytes]) -> bytes:
    """A tar of `images` as members 00000, 00001, ...; the same images give the same bytes."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for i, image in enumerate(images):
            info = tarfile.TarInfo(f"{i:05d}")
            info.size, info.mtime, info.mode = len(image), 0, 0o444
            tar.addfile(info, io.BytesIO(image))
    return out.getvalue()


def read_shard(file: BinaryIO, ref: ShardRef) -> list[bytes]:
    """The images of the shard `ref` from an open file, after its sha256 matched `ref`'s;
    every member must be the regular file the packer wrote, in order."""
    digest = hashlib.file_digest(file, "sha256").hexdigest()  # type: ignore[arg-type]
    if digest != ref.sha256:
        raise mismatch(f"shard {ref.sha256[:12]}", digest)
    file.seek(0)
    images = []
    with tarfile.open(fileobj=file, mode="r:") as tar:
        for i, member in enumerate(tar):
            if member.name != f"{i:05d}" or not member.isreg() or member.size > MAX_IMAGE_BYTES:
                raise ShardError(f"shard {ref.sha256[:12]} holds an unexpected member")
            extracted = tar.extractfile(member)
            assert extracted is not None  # a regular member always has a file
            images.append(extracted.read())
    if len(images) != ref.images:
        raise ShardError(f"shard {ref.sha256[:12]} holds {len(images)} images, not {ref.images}")
    return images


def mismatch(what: str, digest: str) -> ShardError:
    """The one-line error for bytes whose sha256 is not the one they are named by."""
    return ShardError(
        f"{what} from the artifact store does not match its sha256 (it holds {digest[:12]}); "
        f"delete the run '{STORE_NAME}' in MLflow and run the command again to upload the data "
        "afresh"
    )


def store_run(client: MlflowClient, experiment_id: str) -> str:
    """The experiment's run that holds data set shards (made the first time). Drivers that
    start together may each make one: all of them then use the oldest, and the others go."""

    def oldest() -> str | None:
        found = client.search_runs(
            [experiment_id],
            filter_string=f"tags.`captchaops.kind` = '{STORE_KIND}'",
            order_by=["attributes.start_time ASC"],
            max_results=1,
        )
        return str(found[0].info.run_id) if found else None

    existing = oldest()
    if existing is not None:
        return existing
    run = client.create_run(
        experiment_id, run_name=STORE_NAME, tags={"captchaops.kind": STORE_KIND}
    )
    mine = str(run.info.run_id)
    mlflow_scope.finish_run(client, mine)
    chosen = oldest() or mine
    if chosen != mine:
        client.delete_run(mine)
    return chosen


def upload(
    client: MlflowClient, experiment_id: str, data: LabelledImages, parent_run_id: str
) -> Shipped:
    """Put `data` in the experiment's store as shards and a manifest, uploading only what is not
    there yet; the parent run records the manifest and the shards uploaded."""
    run_id = store_run(client, experiment_id)
    have = {
        Path(f.path).name: f.file_size
        for folder in (SHARDS, MANIFESTS)
        for f in client.list_artifacts(run_id, folder)
    }
    shards, uploaded = [], 0
    with tempfile.TemporaryDirectory() as tmp:
        for start, stop in shard_ranges(data.images):
            raw = pack_shard(data.images[start:stop])
            ref = ShardRef(hashlib.sha256(raw).hexdigest(), stop - start, len(raw))
            shards.append(ref)
            uploaded += _put(client, run_id, SHARDS, f"{ref.sha256}.tar", raw, have, Path(tmp))
        manifest = Manifest(data.digest(), data.source, data.names, data.labels, shards)
        raw = manifest.encode()
        digest = hashlib.sha256(raw).hexdigest()
        _put(client, run_id, MANIFESTS, f"{digest}.json", raw, have, Path(tmp))
    shipped = Shipped(run_id, digest, len(shards), uploaded)
    client.set_tag(parent_run_id, "captchaops.dataset", f"{run_id}/{MANIFESTS}/{digest}.json")
    client.log_metric(parent_run_id, "dataset_shards", len(shards))
    client.log_metric(parent_run_id, "dataset_shards_uploaded", uploaded)
    return shipped


def _put(
    client: MlflowClient,
    run_id: str,
    folder: str,
    name: str,
    raw: bytes,
    have: dict[str, Any],
    tmp: Path,
) -> int:
    """Upload `raw` as `folder/name` unless the store has it (same size); 1 if uploaded."""
    if have.get(name) == len(raw):
        return 0
    path = tmp / name
    path.write_bytes(raw)
    client.log_artifact(run_id, str(path), folder)
    path.unlink()
    have[name] = len(raw)
    return 1
