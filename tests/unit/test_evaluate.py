"""Metrics: sequence accuracy, character error rate, confusions."""

from __future__ import annotations

import pytest

from captchaops.evaluation.accuracy import character_error_rate, confusions, sequence_accuracy


def test_sequence_accuracy() -> None:
    assert sequence_accuracy(["AB12", "CD34"], ["AB12", "CD35"]) == 0.5
    assert sequence_accuracy([], []) == 0.0
    with pytest.raises(ValueError):
        sequence_accuracy(["A"], [])


def test_character_error_rate_counts_edits_over_true_chars() -> None:
    assert character_error_rate(["AB12"], ["AB12"]) == 0.0
    assert character_error_rate(["AB1"], ["AB12"]) == pytest.approx(1 / 4)
    assert character_error_rate(["XB12", ""], ["AB12", "CD"]) == pytest.approx(3 / 6)


def test_confusions_lists_substitutions_most_frequent_first() -> None:
    pred = ["0B12", "0C", "8X"]
    true = ["OB12", "OC", "BX"]
    assert confusions(pred, true) == [("O", "0", 2), ("B", "8", 1)]
    assert confusions(pred, true, top=1) == [("O", "0", 2)]
