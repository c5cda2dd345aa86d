"""Alphabet <-> indices and greedy CTC decoding with a per-string confidence.

Our CRNN trains with the blank as the last class; a network trained elsewhere may put it first
(PyTorch's `CTCLoss` default), which `decode_greedy(..., blank="first")` reads.
"""

from __future__ import annotations

import numpy as np


def encode_labels(labels: list[str], alphabet: str, max_length: int) -> np.ndarray:
    """Labels as int32[N, max_length] class indices, padded with -1."""
    index = {ch: i for i, ch in enumerate(alphabet)}
    out = np.full((len(labels), max_length), -1, dtype=np.int32)
    for row, label in enumerate(labels):
        out[row, : len(label)] = [index[ch] for ch in label]
    return out


def decode_greedy(probs: np.ndarray, alphabet: str, blank: str = "last") -> list[tuple[str, float]]:
    """Best-path decode of softmax outputs [B, T, C]: (text, confidence) per item.

    The confidence is the product of the per-step maximum probabilities along the kept path.
    `blank` says whether the blank is the `last` class (the alphabet's characters are classes
    0..C-2) or the `first` (they are 1..C-1).
    """
    probs = np.asarray(probs)
    if probs.ndim != 3 or probs.shape[2] != len(alphabet) + 1:
        raise ValueError(
            f"expected probabilities [B, T, {len(alphabet) + 1}], got {list(probs.shape)}"
        )
    if blank == "first":
        probs = np.roll(probs, -1, axis=2)  # class 0 (blank) to the end, characters from 0
    elif blank != "last":
        raise ValueError(f"blank must be 'first' or 'last', not {blank!r}")
    blank = probs.shape[2] - 1
    best = probs.argmax(axis=2)
    best_p = np.take_along_axis(probs, best[:, :, None], axis=2)[:, :, 0].astype(np.float64)
    # The whole batch at once (a model server decodes every call's batch on its one prediction
    # thread): per row, the product over the last, contiguous axis multiplies in the same order
    # as the product of that row alone, so the confidences are the same to the bit.
    keep = best != blank
    keep[:, 1:] &= best[:, 1:] != best[:, :-1]
    confidences = np.clip(np.prod(best_p, axis=1), 0.0, 1.0).tolist()
    chars = list(alphabet)
    return [
        ("".join([chars[i] for i in path[kept].tolist()]), confidence)
        for path, kept, confidence in zip(best, keep, confidences, strict=True)
    ]
