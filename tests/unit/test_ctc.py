"""Greedy CTC decoding and label encoding (blank = last class)."""

from __future__ import annotations

import numpy as np
import pytest

from captchaops.model.ctc import decode_greedy, encode_labels

ALPHABET = "AB"  # classes: A=0, B=1, blank=2


def one_hot(path: list[int], p: float = 1.0) -> np.ndarray:
    probs = np.full((len(path), 3), (1 - p) / 2, dtype=np.float32)
    probs[np.arange(len(path)), path] = p
    return probs


@pytest.mark.parametrize(
    ("path", "text"),
    [
        ([0, 0, 2, 1], "AB"),
        ([0, 2, 0], "AA"),
        ([0, 0, 0], "A"),
        ([2, 2, 2], ""),
        ([2, 1, 1, 2, 1, 0], "BBA"),
    ],
)
def test_collapses_repeats_and_drops_blanks(path: list[int], text: str) -> None:
    [(decoded, confidence)] = decode_greedy(one_hot(path)[None], ALPHABET)
    assert decoded == text
    assert confidence == pytest.approx(1.0)


def test_confidence_is_product_of_step_maxima() -> None:
    probs = np.stack([one_hot([0, 2, 1], p=0.8), one_hot([2, 2, 2], p=0.5)])
    results = decode_greedy(probs, ALPHABET)
    assert [t for t, _ in results] == ["AB", ""]
    assert results[0][1] == pytest.approx(0.8**3, rel=1e-5)
    assert results[1][1] == pytest.approx(0.5**3, rel=1e-5)
    assert all(0.0 <= c <= 1.0 for _, c in results)


def test_wrong_class_count_is_an_error() -> None:
    with pytest.raises(ValueError, match="expected probabilities"):
        decode_greedy(np.zeros((1, 4, 5), np.float32), ALPHABET)


def test_empty_batch() -> None:
    assert decode_greedy(np.zeros((0, 4, 3), np.float32), ALPHABET) == []


def test_encode_labels_pads_with_minus_one() -> None:
    encoded = encode_labels(["AB", "B"], ALPHABET, 3)
    assert encoded.tolist() == [[0, 1, -1], [1, -1, -1]]
    assert encoded.dtype == np.int32
