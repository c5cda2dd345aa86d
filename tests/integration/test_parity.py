"""Parity: the same image bytes become the same network input in training and in a served version.

Training's side is its real data path: `load_data` (synthetic CAPTCHAs preprocessed inside its
worker processes, or a folder read by `read_folder`) and `training.tensors.arrays`, which stacks
what the network is fitted on. The serving side is a registered version loaded twice, as our
servers load it (`open_version`: `captchaops.model.reader`) and as stock `mlflow models serve`
loads it (the pyfunc with its shipped `captcha_runtime` copy); each reader's ONNX session is
wrapped so the test sees the exact batch it feeds the network while the real session still runs.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient
from PIL import Image

from captchaops.data import synthetic
from captchaops.model.version import check_model_dir, open_version
from captchaops.training.run import TrainConfig, load_data
from captchaops.training.tensors import arrays
from harness.training import tiny_config
from tests.fixtures.models import TrainedModel, make_settings
from tests.fixtures.stack import Tracking


class FeedRecorder:
    """An ONNX Runtime session that keeps a copy of every input batch, then runs for real."""

    def __init__(self, session: Any) -> None:
        self.session = session
        self.feeds: list[np.ndarray] = []

    def run(self, outputs: Any, feed: dict[str, np.ndarray]) -> Any:
        (batch,) = feed.values()
        self.feeds.append(np.array(batch, copy=True))
        return self.session.run(outputs, feed)


def network_input(reader: Any, images: list[bytes]) -> tuple[np.ndarray, list[str]]:
    """The batch `reader` feeds ONNX for `images`, and the texts it read from them."""
    recorder = FeedRecorder(reader._session)
    reader._session = recorder
    try:
        texts = [row["text"] for row in reader.predict_images(images)]
    finally:
        reader._session = recorder.session
    (batch,) = recorder.feeds
    return batch, texts


@pytest.fixture(scope="module")
def version_dir(
    tracking_server: Tracking, tiny_model: TrainedModel, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The registered tiny version's MLflow model folder, downloaded."""
    uri = tracking_server.uri
    source = MlflowClient(uri, uri).get_model_version_download_uri(
        tiny_model.model_name, tiny_model.version
    )
    local = mlflow.artifacts.download_artifacts(
        artifact_uri=source, dst_path=str(tmp_path_factory.mktemp("version")), tracking_uri=uri
    )
    return Path(local)


@pytest.fixture(scope="module")
def readers(version_dir: Path) -> Iterator[dict[str, Any]]:
    """The version as our servers open it and as stock MLflow loads it (shipped code)."""
    path, modules = list(sys.path), set(sys.modules)
    stock = mlflow.pyfunc.load_model(str(version_dir)).unwrap_python_model().reader  # type: ignore[attr-defined]
    try:
        assert type(stock).__module__ == "captcha_runtime.reader"
        yield {
            "captchaops": open_version(version_dir),
            "captchaops, 2 threads": open_version(version_dir, threads=2),  # images side by side
            "captcha_runtime": stock,
        }
    finally:
        sys.path[:] = path
        for name in set(sys.modules) - modules:
            if name.split(".")[0] == "captcha_runtime":
                del sys.modules[name]


@pytest.fixture(scope="module")
def config(version_dir: Path) -> TrainConfig:
    """The tiny training preset at the version's input geometry."""
    meta, _ = check_model_dir(version_dir)
    tiny = tiny_config()
    return replace(tiny, arch=replace(tiny.arch, height=meta.height, width=meta.width))


def encoded(image: Image.Image, fmt: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def scene(size: tuple[int, int], seed: int) -> Image.Image:
    """Noise with dark strokes: detail that any difference in decoding or resizing would show."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(150, 256, (size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(pixels, "RGB")
    for i in range(4):
        x = size[0] * (i + 1) // 5
        image.paste((20 + 30 * i, 10, 60), (x, size[1] // 4, min(size[0], x + 3), size[1] * 3 // 4))
    return image


def odd_images() -> dict[str, bytes]:
    """One file per case, named <label>.<ext> as a team's folder would be."""
    base = scene((160, 60), 1)
    rgba = base.convert("RGBA")
    alpha = Image.new("L", rgba.size, 255)
    alpha.paste(0, (0, 0, 80, 60))  # fully transparent half, with coloured pixels under it
    alpha.paste(128, (80, 0, 120, 60))  # half transparent band
    rgba.putalpha(alpha)
    palette = base.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    la = base.convert("LA")
    la.putalpha(alpha)
    return {
        "RGBA1.png": encoded(rgba, "PNG"),
        "PTRNS2.png": encoded(palette, "PNG", transparency=0),
        "LA3.png": encoded(la, "PNG"),
        "JPEG4.jpg": encoded(scene((173, 41), 2), "JPEG", quality=85),
        "GRAY5.jpg": encoded(scene((97, 33), 3).convert("L"), "JPEG", quality=70),
        "GRAY6.png": encoded(scene((211, 47), 4).convert("L"), "PNG"),
        "TINY7.png": encoded(scene((7, 3), 5), "PNG"),
        "TALL8.png": encoded(scene((30, 200), 6), "PNG"),
        "WIDE9.bmp": encoded(scene((401, 97), 7), "BMP"),
        "DEEP10.png": encoded(scene((150, 50), 8).convert("I;16"), "PNG"),
        "BITS11.png": encoded(scene((120, 40), 9).convert("1"), "PNG"),
        "GIF12.gif": encoded(scene((160, 60), 10).convert("P"), "GIF", transparency=3),
    }


def assert_same_everywhere(
    readers: dict[str, Any], images: list[bytes], trained_on: np.ndarray
) -> None:
    assert trained_on.dtype == np.float32 and trained_on.shape[0] == len(images)
    assert all(row.std() > 0.01 for row in trained_on), "a blank input proves nothing"
    texts = {}
    for name, reader in readers.items():
        served, texts[name] = network_input(reader, images)
        assert served.dtype == trained_on.dtype and served.shape == trained_on.shape, name
        differ = [i for i in range(len(images)) if not np.array_equal(served[i], trained_on[i])]
        assert differ == [], f"{name} feeds other arrays than training for images {differ}"
    assert texts["captchaops"] == texts["captcha_runtime"]


def test_folder_images_of_every_kind_reach_the_network_identically(
    tracking_server: Tracking,
    readers: dict[str, Any],
    config: TrainConfig,
    tmp_path: Path,
) -> None:
    folder = tmp_path / "folder"
    folder.mkdir()
    files = odd_images()
    for name, data in files.items():
        (folder / name).write_bytes(data)
    data = load_data(
        replace(config, data_dir=folder), make_settings(tracking_server, tmp_path), lambda *_: None
    )
    assert data.skipped.total == 0
    assert data.images == [files[name] for name in data.names]  # the very bytes written
    trained_on = arrays(data, list(range(len(data))), config.arch)
    assert_same_everywhere(readers, data.images, trained_on)
    transparent = data.names.index("RGBA1.png")
    assert trained_on[transparent, :, : config.arch.width // 3].min() == 1.0, "alpha 0 is white"


def test_synthetic_images_preprocessed_in_worker_processes_reach_the_network_identically(
    tracking_server: Tracking,
    readers: dict[str, Any],
    config: TrainConfig,
    tmp_path: Path,
) -> None:
    n = synthetic._CHUNK + 40  # more than one chunk: generate() hands them to its worker pool
    wanted = replace(config, synthetic=n, workers=2)
    data = load_data(wanted, make_settings(tracking_server, tmp_path), lambda *_: None)
    assert data.arrays is not None and len(data.arrays) == n
    rows = [*range(8), *range(n - 8, n)]  # the first and the last chunk
    assert all(data.arrays[i] is not None for i in rows)
    trained_on = arrays(data, rows, config.arch)
    assert all(np.array_equal(trained_on[k], data.arrays[i]) for k, i in enumerate(rows))
    assert_same_everywhere(readers, [data.images[i] for i in rows], trained_on)
