"""The gate's rules on exact numbers (the integration tests drive the same rules with real models)."""

from __future__ import annotations

import pytest

from captchaops.evalset import Score
from captchaops.gate import GateConfig, judge
from captchaops.registry import Move, production_stack


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
