"""A version's visual report: its numbers from known readings, and four PNGs drawn from them."""

from __future__ import annotations

import sys

import pytest

from captchaops.data.synthetic import generate
from captchaops.evaluation import report
from captchaops.evaluation.accuracy import aligned_pairs

LABELS = ["AB12", "AB12", "CD34", "CD345", "EF56", "GH78"]
OUTPUTS = [
    {"text": "AB12", "confidence": 0.95},  # right, sure
    {"text": "A812", "confidence": 0.91},  # B read as 8, sure: worst among equals
    {"text": "CD34", "confidence": 0.55},  # right, unsure
    {"text": "CD34", "confidence": 0.15},  # the 5 missed
    {"text": "EF56", "confidence": 0.93},  # right, sure
    {"text": "", "confidence": 0.05},  # read nothing
]


def test_the_numbers_match_the_readings() -> None:
    found = report.build(LABELS, OUTPUTS, model_name="m", version="3", evalset_digest="d")
    assert (found["model_name"], found["version"], found["evalset_digest"]) == ("m", "3", "d")
    assert found["n"] == 6 and found["seq_acc"] == pytest.approx(3 / 6)
    assert found["by_length"] == {
        "4": {"n": 5, "accuracy": pytest.approx(3 / 5), "cer": pytest.approx(5 / 20)},
        "5": {"n": 1, "accuracy": 0.0, "cer": pytest.approx(1 / 5)},
    }
    chars = found["confusion_matrix"]["characters"]
    counts = found["confusion_matrix"]["counts"]
    assert chars[-1] == report.GAP and "8" in chars
    assert counts[chars.index("B")][chars.index("8")] == 1
    assert counts[chars.index("B")][chars.index("B")] == 1
    assert counts[chars.index("5")][chars.index(report.GAP)] == 1  # CD345's 5 missed
    assert counts[chars.index("G")][chars.index(report.GAP)] == 1  # GH78 read as nothing
    assert found["top_confusions"] == [{"true": "B", "pred": "8", "count": 1}]
    # Worst first: nothing read (CER 1), then one character wrong of four, then of five.
    assert [w["label"] for w in found["worst"]] == ["GH78", "AB12", "CD345"]
    assert [b["n"] for b in found["reliability"]] == [1, 1, 0, 0, 0, 1, 0, 0, 0, 3]
    # ECE: each bin's |mean confidence - accuracy| weighted by its share of the images.
    sure = abs((0.95 + 0.91 + 0.93) / 3 - 2 / 3) * 3 / 6
    rest = (abs(0.55 - 1) + abs(0.15 - 0) + abs(0.05 - 0)) / 6
    assert found["expected_calibration_error"] == pytest.approx(sure + rest)


def test_alignment_pairs_read_in_order_with_gaps() -> None:
    assert aligned_pairs("A812", "AB12") == [("A", "A"), ("B", "8"), ("1", "1"), ("2", "2")]
    assert aligned_pairs("CD34", "CD345")[-1] == ("5", "")
    assert aligned_pairs("XAB", "AB") == [("", "X"), ("A", "A"), ("B", "B")]


def test_the_figures_are_pngs() -> None:
    images = [s.image for s in generate(len(LABELS), seed=1)]
    found = report.build(LABELS, OUTPUTS, model_name="m", version="3")
    pngs = report.render(found, images)
    assert sorted(pngs) == sorted(report.PNG_FILES)
    assert all(data.startswith(b"\x89PNG\r\n\x1a\n") for data in pngs.values())


def test_the_ui_link_is_the_runs_report_folder_with_ids_escaped() -> None:
    url = report.ui_url("http://mlflow.example:5000/", "7", "ab/../c d")
    assert (
        url == "http://mlflow.example:5000/#/experiments/7/runs/ab%2F..%2Fc%20d/artifactPath/report"
    )


def test_without_matplotlib_the_report_is_its_numbers_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails
    found = report.build(LABELS, OUTPUTS)
    assert report.render(found, []) == {}
