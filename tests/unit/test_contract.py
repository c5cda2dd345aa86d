"""A version's declared contract: the reader feeds and reads a network the way meta.json says.

A small CTC network built with `onnx.helper` (`tiny_ctc`) stands in for ours (NHWC grey in [0, 1], output
probabilities [B, T, C], blank last); `tests.fixtures.foreign.reexport` wraps it into other
contracts, and read under the matching contract every wrapping must give exactly its answers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from captchaops.data.synthetic import generate
from captchaops.model.ctc import decode_greedy
from captchaops.model.preprocess import network_input, preprocess
from captchaops.model.reader import CONTRACT, ContractError, OnnxReader
from captchaops.model.version import META_SCHEMA, VersionError, parse_meta
from tests.fixtures.foreign import ALPHABET, HEIGHT, WIDTH, reexport, tiny_ctc


def meta(**contract: object) -> dict[str, object]:
    base: dict[str, object] = {
        "schema_version": META_SCHEMA,
        "alphabet": ALPHABET,
        "min_length": 4,
        "max_length": 4,
        "height": HEIGHT,
        "width": WIDTH,
        "preprocessing": 1,
        "onnx_sha256": "0" * 64,
        "scheme": "text-captcha",
        "data_kind": "synthetic",
    }
    return base | contract


@pytest.fixture(scope="module")
def images() -> list[bytes]:
    return [s.image for s in generate(24, seed=5)]


@pytest.fixture(scope="module")
def ours(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_ctc(tmp_path_factory.mktemp("ours") / "ours.onnx")


@pytest.mark.parametrize(
    "wrapping",
    [
        {"input_layout": "NCHW", "blank": "first"},
        {"input_layout": "NHWC", "blank": "last", "output_kind": "logits"},
        {"input_layout": "NCHW", "blank": "first", "output_layout": "TBC"},
        {"input_layout": "NHWC", "blank": "last", "pixel_scaling": "-1..1"},
        {"input_layout": "NCHW", "blank": "first", "pixel_scaling": "mean_std"},
    ],
    ids=lambda w: "+".join(str(v) for v in w.values()),
)
def test_a_rewrapped_network_read_under_its_contract_answers_exactly_like_ours(
    ours: Path, images: list[bytes], tmp_path: Path, wrapping: dict[str, str]
) -> None:
    contract = reexport(ours, tmp_path / "theirs.onnx", **wrapping)
    checked = parse_meta(json.dumps(meta(**contract)).encode())
    theirs = OnnxReader(tmp_path / "theirs.onnx", checked.model_dump()).predict_images(images)
    want = OnnxReader(ours, meta()).predict_images(images)
    assert [o["text"] for o in theirs] == [o["text"] for o in want]
    assert len({o["text"] for o in want}) > 5  # the network reads differently per image
    for got, expected in zip(theirs, want, strict=True):
        assert got["confidence"] == pytest.approx(expected["confidence"], rel=1e-5, abs=1e-7)


def test_read_under_our_contract_a_rewrapped_network_is_refused_or_reads_otherwise(
    ours: Path, images: list[bytes], tmp_path: Path
) -> None:
    reexport(ours, tmp_path / "nchw.onnx", input_layout="NCHW", blank="last")
    with pytest.raises(ContractError, match=r"input is \[\?, 1, 16, 64\]") as info:
        OnnxReader(tmp_path / "nchw.onnx", meta())
    assert info.value.fix == {"input_layout": "NCHW"}

    reexport(ours, tmp_path / "first.onnx", input_layout="NHWC", blank="first")
    wrong = OnnxReader(tmp_path / "first.onnx", meta()).predict_images(images)
    right = OnnxReader(ours, meta()).predict_images(images)
    assert [o["text"] for o in wrong] != [o["text"] for o in right]

    reexport(ours, tmp_path / "tbc.onnx", input_layout="NHWC", blank="last", output_layout="TBC")
    with pytest.raises(ContractError, match="batch axis") as info:
        OnnxReader(tmp_path / "tbc.onnx", meta()).predict_images(images[:3])
    assert info.value.fix == {"output_layout": "TBC"}


def test_a_network_with_the_wrong_number_of_classes_is_refused(ours: Path) -> None:
    with pytest.raises(ContractError, match="37 classes but the alphabet has 10"):
        OnnxReader(ours, meta(alphabet="0123456789"))


def test_rgb_input_is_the_same_picture_in_three_channels(images: list[bytes]) -> None:
    grey = preprocess(images[0], HEIGHT, WIDTH)
    rgb = preprocess(images[0], HEIGHT, WIDTH, channels=3)
    assert grey.shape == (HEIGHT, WIDTH, 1) and rgb.shape == (HEIGHT, WIDTH, 3)
    luma = rgb @ np.array([0.299, 0.587, 0.114], np.float32)  # what Pillow's L mode keeps
    assert np.abs(luma - grey[:, :, 0]).max() < 0.02
    batch = rgb[None]
    assert network_input(batch) is batch  # our own contract costs nothing
    nchw = network_input(batch, "NCHW", "mean_std", [0.5, 0.5, 0.5], [0.25, 0.25, 0.25])
    assert nchw.shape == (1, 3, HEIGHT, WIDTH)
    assert np.allclose(nchw[0, 1], (rgb[:, :, 1] - 0.5) / 0.25)
    assert np.allclose(network_input(batch, scaling="-1..1"), batch * 2 - 1)


def test_decoding_with_the_blank_first_reads_the_same_path() -> None:
    probs = np.full((1, 5, 3), 0.05, np.float32)
    for t, k in enumerate([0, 2, 1, 1, 2]):  # blank last: A, blank, B, B, blank
        probs[0, t, k] = 0.9
    first = probs[:, :, [2, 0, 1]]  # the same, blank moved to the front
    assert (
        decode_greedy(probs, "AB")
        == decode_greedy(first, "AB", blank="first")
        == [("AB", pytest.approx(0.9**5))]
    )


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"schema_version": 1, "blank": "first"}, "declare schema_version 2"),
        ({"pixel_scaling": "mean_std"}, "pixel_mean goes with"),
        ({"pixel_mean": [0.5], "pixel_std": [0.2]}, "pixel_mean goes with"),
        (
            {"pixel_scaling": "mean_std", "pixel_mean": [0.5], "pixel_std": [0.2, 0.2]},
            "one value per channel",
        ),
        ({"pixel_scaling": "mean_std", "pixel_mean": [0.5], "pixel_std": [0]}, "zero"),
        ({"output_layout": "BCT"}, "output_layout"),
        ({"channels": 2}, "channels"),
    ],
)
def test_a_contract_that_cannot_be_read_is_refused_in_one_line(
    changes: dict[str, object], message: str
) -> None:
    with pytest.raises(VersionError, match=message) as info:
        parse_meta(json.dumps(meta(**changes)).encode())
    assert "\n" not in str(info.value)


def test_a_schema_1_meta_gets_our_contract() -> None:
    old = parse_meta(json.dumps(meta(schema_version=1, width=128)).encode())
    assert old.contract() == CONTRACT
