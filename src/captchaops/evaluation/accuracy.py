"""Evaluation metrics: sequence accuracy, character error rate, most confused characters."""

from __future__ import annotations

from collections import Counter


def sequence_accuracy(pred: list[str], true: list[str]) -> float:
    """Fraction of strings predicted exactly right."""
    if len(pred) != len(true):
        raise ValueError(f"{len(pred)} predictions for {len(true)} labels")
    if not true:
        return 0.0
    return sum(p == t for p, t in zip(pred, true, strict=True)) / len(true)


def aligned_pairs(pred: str, true: str) -> list[tuple[str, str]]:
    """One optimal alignment of `pred` to `true` as (true_char, pred_char) pairs in reading
    order; "" stands for the missing side of an insertion or deletion."""
    rows, cols = len(true) + 1, len(pred) + 1
    dist = [[0] * cols for _ in range(rows)]
    for i in range(rows):
        dist[i][0] = i
    for j in range(cols):
        dist[0][j] = j
    for i in range(1, rows):
        for j in range(1, cols):
            cost = 0 if true[i - 1] == pred[j - 1] else 1
            dist[i][j] = min(dist[i - 1][j] + 1, dist[i][j - 1] + 1, dist[i - 1][j - 1] + cost)
    pairs: list[tuple[str, str]] = []
    i, j = len(true), len(pred)
    while i > 0 or j > 0:
        cost = 0 if i > 0 and j > 0 and true[i - 1] == pred[j - 1] else 1
        if i > 0 and j > 0 and dist[i][j] == dist[i - 1][j - 1] + cost:
            pairs.append((true[i - 1], pred[j - 1]))
            i, j = i - 1, j - 1
        elif i > 0 and dist[i][j] == dist[i - 1][j] + 1:
            pairs.append((true[i - 1], ""))
            i -= 1
        else:
            pairs.append(("", pred[j - 1]))
            j -= 1
    return pairs[::-1]


def _alignment(pred: str, true: str) -> tuple[int, list[tuple[str, str]]]:
    """Levenshtein distance and the substitutions (true_char, pred_char) of one optimal alignment."""
    pairs = aligned_pairs(pred, true)
    subs = [(t, p) for t, p in reversed(pairs) if t and p and t != p]
    return sum(t != p for t, p in pairs), subs


def character_error_rate(pred: list[str], true: list[str]) -> float:
    """Total edit distance divided by the total number of true characters."""
    if len(pred) != len(true):
        raise ValueError(f"{len(pred)} predictions for {len(true)} labels")
    total = sum(len(t) for t in true)
    if total == 0:
        return 0.0
    return sum(_alignment(p, t)[0] for p, t in zip(pred, true, strict=True)) / total


def confusions(pred: list[str], true: list[str], top: int = 10) -> list[tuple[str, str, int]]:
    """The most frequent substitutions as (true char, predicted char, count), most frequent first."""
    counts: Counter[tuple[str, str]] = Counter()
    for p, t in zip(pred, true, strict=True):
        counts.update(_alignment(p, t)[1])
    return [(t, p, n) for (t, p), n in counts.most_common(top)]
