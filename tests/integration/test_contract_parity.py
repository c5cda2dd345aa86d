"""Our trained network re-exported in another contract reads exactly like the original.

The tiny model's registered ONNX network (NHWC grey, probabilities [B, T, C], blank last) is
wrapped by `tests.fixtures.foreign.reexport` into NCHW with the blank first (and other
contracts); read by `OnnxReader` under the matching meta.json it must give the same texts and
confidences as the version itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from captchaops.data.synthetic import generate
from captchaops.model.reader import OnnxReader
from captchaops.model.version import META_SCHEMA, check_model_dir, parse_meta
from tests.fixtures.foreign import reexport
from tests.fixtures.models import TrainedModel
from tests.fixtures.stack import Tracking

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def version_dir(
    tracking_server: Tracking, tiny_model: TrainedModel, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    client = MlflowClient(tracking_server.uri, tracking_server.uri)
    source = client.get_model_version_download_uri(tiny_model.model_name, tiny_model.version)
    local = mlflow.artifacts.download_artifacts(
        artifact_uri=source,
        dst_path=str(tmp_path_factory.mktemp("version")),
        tracking_uri=tracking_server.uri,
    )
    return Path(local)


@pytest.mark.parametrize(
    "wrapping",
    [
        {"input_layout": "NCHW", "blank": "first"},
        {"input_layout": "NCHW", "blank": "first", "output_kind": "logits", "output_layout": "TBC"},
        {"input_layout": "NHWC", "blank": "last", "pixel_scaling": "mean_std"},
    ],
    ids=["nchw-blank-first", "logits-tbc", "mean-std"],
)
def test_our_network_rewrapped_reads_like_the_version(
    version_dir: Path, tmp_path: Path, wrapping: dict[str, str]
) -> None:
    meta, onnx_path = check_model_dir(version_dir)
    assert meta.schema_version == META_SCHEMA  # training declares its contract
    contract = reexport(onnx_path, tmp_path / "theirs.onnx", **wrapping)
    theirs_meta = parse_meta(json.dumps(meta.model_dump() | contract).encode())
    images = [s.image for s in generate(64, seed=23)]

    ours = OnnxReader(onnx_path, meta.model_dump()).predict_images(images)
    theirs = OnnxReader(tmp_path / "theirs.onnx", theirs_meta.model_dump()).predict_images(images)

    assert [o["text"] for o in theirs] == [o["text"] for o in ours]
    for got, want in zip(theirs, ours, strict=True):
        assert got["confidence"] == pytest.approx(want["confidence"], rel=1e-5, abs=1e-7)
