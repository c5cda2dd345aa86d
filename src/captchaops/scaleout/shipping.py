"""The data set travels to workers through the tracking server, never over the driver's disk.

The driver logs the labelled images once, as one zip named by their digest, as an artifact of
the parent run; a worker anywhere downloads it by run id and path through the server's
artifact proxy. Plain files in a zip (a JSON manifest and the image bytes), no pickle.
"""

from __future__ import annotations

import json
import tempfile
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

from captchaops.data.dataset import LabelledImages

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

FOLDER = "dataset"


def pack(data: LabelledImages, dest: Path) -> Path:
    """Write `data` to `<dest>/<digest>.zip` and return the file."""
    path = dest / f"{data.digest()}.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        manifest = {"source": data.source, "names": data.names, "labels": data.labels}
        archive.writestr("manifest.json", json.dumps(manifest))
        for i, image in enumerate(data.images):
            archive.writestr(f"images/{i:07d}", image)
    return path


def unpack(path: Path) -> LabelledImages:
    """The labelled images in a zip written by `pack`."""
    with zipfile.ZipFile(path) as archive:
        manifest = json.loads(archive.read("manifest.json"))
        images = [archive.read(f"images/{i:07d}") for i in range(len(manifest["names"]))]
    return LabelledImages(
        images=images, labels=manifest["labels"], names=manifest["names"], source=manifest["source"]
    )


def upload(client: MlflowClient, run_id: str, data: LabelledImages) -> str:
    """Log `data` as an artifact of `run_id`; returns its artifact path."""
    with tempfile.TemporaryDirectory() as tmp:
        path = pack(data, Path(tmp))
        client.log_artifact(run_id, str(path), FOLDER)
    return f"{FOLDER}/{path.name}"


def fetch(tracking_uri: str, run_id: str, artifact_path: str) -> LabelledImages:
    """Download the data set a driver uploaded and read it (on a worker)."""
    import mlflow.artifacts

    with tempfile.TemporaryDirectory() as tmp:
        local = mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=artifact_path, dst_path=tmp, tracking_uri=tracking_uri
        )
        return unpack(Path(local))
