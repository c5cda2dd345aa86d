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


def test_a_batch_reads_exactly_as_each_image_alone() -> None:
    """The batch is decoded in one pass: every text and confidence (to the bit) is what that
    image decoded on its own gives, whichever end the blank is at."""
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(32, 20, 37)) * 4
    logits[::3, :, -1] += 3  # mostly blanks
    logits[1::4] = logits[1::4, :1]  # long repeats
    probs = (np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)).astype(np.float32)
    alphabet = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    for blank in ("last", "first"):
        alone = [decode_greedy(row[None], alphabet, blank)[0] for row in probs]
        assert decode_greedy(probs, alphabet, blank) == alone
        assert len({text for text, _ in alone}) > 10
