"""The gate's rules on exact numbers (the integration tests drive the same rules with real models)."""

from __future__ import annotations

from pathlib import Path

import pytest

from captchaops.cli import parse_length
from captchaops.decisions.gate import GateConfig, judge, judge_evidence
from captchaops.decisions.gate_rules import staging_rejection
from captchaops.evaluation.evalset import Score
from captchaops.evaluation.evidence import Evidence
from captchaops.evaluation.scheme import Scheme, scheme_refusals
from captchaops.registry.audit import Move, production_stack
from captchaops.registry.errors import RegistryError
from captchaops.registry.names import check_model_name
from captchaops.settings import load_settings


def result(acc: float, cer: float, p95: float = 10.0, version: str = "2") -> Score:
    return Score(version, "digest", seq_acc=acc, cer=cer, p50_ms=p95 / 2, p95_ms=p95, n=100)


def test_better_candidate_passes() -> None:
    assert judge(result(0.91, 0.02), result(0.90, 0.03, version="1"), GateConfig(), 0.5) == []


def test_equal_candidate_passes_without_margin_and_fails_with_one() -> None:
    same, champion = result(0.90, 0.03), result(0.90, 0.03, version="1")
    assert judge(same, champion, GateConfig(margin=0.0), 0.5) == []
    (refusal,) = judge(same, champion, GateConfig(margin=0.01), 0.5)
    assert "margin 0.01" in refusal


def test_margin_boundary_is_inclusive() -> None:
    assert (
        judge(result(0.51, 0.1), result(0.50, 0.1, version="1"), GateConfig(margin=0.01), 0) == []
    )


def test_worse_cer_is_refused_unless_tolerated() -> None:
    candidate, champion = result(0.95, 0.05), result(0.90, 0.04, version="1")
    assert any("CER" in r for r in judge(candidate, champion, GateConfig(), 0.5))
    assert judge(candidate, champion, GateConfig(cer_tolerance=0.02), 0.5) == []


def test_latency_budget_is_relative_to_the_champion() -> None:
    champion = result(0.90, 0.03, p95=10.0, version="1")
    config = GateConfig(latency_ratio=1.5, latency_slack_ms=5.0)
    assert judge(result(0.90, 0.03, p95=20.0), champion, config, 0.5) == []
    (refusal,) = judge(result(0.90, 0.03, p95=20.1), champion, config, 0.5)
    assert "over budget 20.0 ms" in refusal


@pytest.mark.parametrize(("acc", "passes"), [(0.49, False), (0.5, True), (0.8, True)])
def test_without_champion_the_floor_decides(acc: float, passes: bool) -> None:
    assert (judge(result(acc, 0.5), None, GateConfig(), 0.5) == []) is passes


def test_broken_candidate_is_refused_and_broken_champion_falls_back_to_floor() -> None:
    broken = Score("2", "digest", error="InvalidProtobuf: bad file")
    assert "failed to load or predict" in judge(broken, result(0.1, 0.9), GateConfig(), 0.0)[0]
    champion_broken = Score("1", "digest", error="gone")
    assert judge(result(0.6, 0.2), champion_broken, GateConfig(), 0.5) == []


def move(to: str, kind: str = "gate", decision: str = "promoted") -> Move:
    return Move("production", None, to, "me", "", kind, decision, "", "", 0)


def test_production_stack_replays_promotions_and_rollbacks() -> None:
    moves = [move("1"), move("2"), move("3", decision="rejected"), move("4"), move("2", "rollback")]
    assert production_stack(moves) == ["1", "2"]
    assert production_stack([*moves, move("1", "rollback")]) == ["1"]
    assert production_stack([*moves, move("5", "manual")]) == ["1", "2", "5"]


DIGITS_UPPER = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
STANDIN = "2345678bcdefgmnpwxy"


def test_same_scheme_is_compared() -> None:
    scheme = Scheme(DIGITS_UPPER, 4, 4)
    reordered = Scheme(DIGITS_UPPER[::-1], 4, 6)
    assert scheme_refusals("5", scheme, "3", reordered, ["AB12", "Z9Z9"]) == []


def test_other_alphabet_or_data_kind_is_another_scheme() -> None:
    champion = Scheme(DIGITS_UPPER, 4, 4)
    (refusal,) = scheme_refusals("5", Scheme(STANDIN, 5, 5, "folder"), "3", champion, [])
    assert refusal == (
        f"candidate v5 reads alphabet '{STANDIN}' (folder) but champion v3 reads alphabet "
        f"'{DIGITS_UPPER}' (synthetic): different schemes; register it under its own --model-name"
    )
    (refusal,) = scheme_refusals("5", Scheme(DIGITS_UPPER, 4, 4, "folder"), "3", champion, [])
    assert "different schemes" in refusal


def test_frozen_set_the_candidate_cannot_read_is_refused() -> None:
    candidate = Scheme("ABC", 3, 3)
    (refusal,) = scheme_refusals("2", candidate, None, None, ["ABC", "A1Z"])
    assert "characters '1Z'" in refusal
    assert "captchaops evalset --replace --alphabet 'ABC' --length 3-3" in refusal
    (refusal,) = scheme_refusals("2", Scheme(STANDIN, 5, 5, "folder"), None, None, ["ABCD"])
    assert "--folder HELD_OUT_DIR --size 0" in refusal and "--model-name" in refusal
    assert scheme_refusals("2", candidate, None, None, ["CAB"]) == []


def test_unknown_candidate_scheme_is_not_compared() -> None:
    assert scheme_refusals("2", None, "1", Scheme("ABC", 3, 3), ["XYZ"]) == []


@pytest.mark.parametrize(
    ("text", "lengths"), [("4-6", (4, 6)), ("5", (5, 5)), ("1-1", (1, 1)), (" 3-4", (3, 4))]
)
def test_length_ranges_parse(text: str, lengths: tuple[int, int]) -> None:
    assert parse_length(text) == lengths


@pytest.mark.parametrize("text", ["", "6-4", "0-3", "a-b", "4-", "-4", "4-5-6", "4..6"])
def test_bad_length_ranges_say_the_fix(text: str) -> None:
    with pytest.raises(ValueError, match=r"e\.g\. --length 4-6"):
        parse_length(text)


@pytest.mark.parametrize("name", ["text-captcha", "bank_captcha.v2", "A", "9" * 100])
def test_model_names_that_mlflow_takes(name: str) -> None:
    assert check_model_name(name) == name


@pytest.mark.parametrize(
    "name", ["", "-x", ".x", "a b", "it's", "a/b", "x" * 101, "text-captcha.promotion-lock"]
)
def test_bad_model_names_say_the_fix(name: str) -> None:
    with pytest.raises(RegistryError, match="--model-name bank-captcha"):
        check_model_name(name)


THRESHOLDS = {"live_points": 5.0, "min_agreement": 0.9}


def evidence(
    mine: float | None = None, theirs: float | None = None, agreement: float | None = None
) -> Evidence:
    return Evidence(
        candidate_estimate=mine,
        candidate_answers=300,
        champion_estimate=theirs,
        comparisons=250 if agreement is not None else 0,
        agreement=agreement,
        min_shadow=200,
    )


def test_a_live_estimate_too_far_below_production_refuses() -> None:
    twin, champion = result(0.9, 0.03), result(0.9, 0.03, version="1")
    assert judge_evidence(evidence(0.85, 0.90), twin, champion, THRESHOLDS) == []
    (refusal,) = judge_evidence(evidence(0.849, 0.90), twin, champion, THRESHOLDS)
    assert "5.1 points below production's 90.0% over the same period" in refusal


def test_low_shadow_agreement_refuses_unless_the_candidate_wins_on_the_frozen_set() -> None:
    champion = result(0.9, 0.03, version="1")
    (refusal,) = judge_evidence(evidence(agreement=0.8), result(0.9, 0.03), champion, THRESHOLDS)
    assert "shadow agreement 80.0% over 250 comparisons is below 90%" in refusal
    assert judge_evidence(evidence(agreement=0.8), result(0.95, 0.02), champion, THRESHOLDS) == []
    assert judge_evidence(evidence(agreement=0.9), result(0.9, 0.03), champion, THRESHOLDS) == []


def test_too_few_comparisons_are_named_but_not_used() -> None:
    few = Evidence(comparisons=150, agreement=0.1, min_shadow=200)
    assert judge_evidence(few, result(0.9, 0.03), result(0.9, 0.03, version="1"), THRESHOLDS) == []
    assert few.line() == "live evidence: 150 shadow comparisons (< 200, unused)"
    assert Evidence().line() == "no live evidence"
    both = evidence(0.8, 0.82, agreement=0.95).line()
    assert both == (
        "live evidence: live estimate 80.0% over 300 answers vs production's 82.0% over the "
        "same period, shadow agreement 95.0% over 250 comparisons"
    )


def test_gate_config_is_the_one_home_of_thresholds_options_first_then_settings(
    tmp_path: Path,
) -> None:
    settings = load_settings(home=tmp_path, staging_floor=0.7, gate_live_points=2.0)
    config = GateConfig.with_options(margin=0.02, floor=None).resolved(settings)
    assert (config.margin, config.floor, config.staging_floor) == (0.02, 0.7, 0.7)
    assert (config.live_points, config.latency_ratio) == (2.0, 1.5)
    assert "staging_floor" not in config.thresholds(settings)  # not a gate threshold
    assert GateConfig.with_options(floor=0.3).resolved(settings).floor == 0.3
    assert staging_rejection(0.7, 0.7) is None
    assert staging_rejection(0.1, 0.5) == (
        "test sequence accuracy 0.1000 is below the staging floor 0.5"
    )
