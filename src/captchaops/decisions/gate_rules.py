"""The gate's rules and every threshold they use, in one place; MLflow-free.

`GateConfig` holds the thresholds: `promote --auto`'s options set some (`with_options`), the
settings fill the rest (`resolved`). `judge` and `judge_evidence` are the promotion rules and
`staging_rejection` is training's staging rule; `decisions.gate` applies them and has the
registry write the outcome.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from captchaops.evaluation.evalset import Score
    from captchaops.evaluation.evidence import Evidence
    from captchaops.settings import Settings

EPSILON = 1e-9


@dataclass(frozen=True)
class GateConfig:
    """Every rule's threshold, in one place.

    `promote --auto`'s options set the first five (`with_options`); what is left None is filled
    from the settings by `resolved`. Training's staging uses `staging_floor` (`stage_candidate`).
    """

    margin: float = 0.0
    """Candidate sequence accuracy must reach the champion's plus this."""
    floor: float | None = None
    """Accuracy a first candidate (no champion) needs; None means the staging floor."""
    cer_tolerance: float = 0.0
    """How much higher than the champion's the candidate's CER may be."""
    latency_ratio: float = 1.5
    """Candidate p95 latency budget as a multiple of the champion's..."""
    latency_slack_ms: float = 5.0
    """...plus this many milliseconds, so timer noise on tiny models does not decide."""
    batch_size: int = 64
    latency_samples: int = 50
    staging_floor: float | None = None
    """Test accuracy a trained version needs for @staging (settings.staging_floor)."""
    min_shadow: int | None = None
    """Shadow comparisons needed to use shadow agreement (settings.gate_min_shadow)."""
    min_agreement: float | None = None
    """Least shadow agreement of a candidate that does not win (settings.gate_min_agreement)."""
    live_points: float | None = None
    """Most points the live estimate may trail production's (settings.gate_live_points)."""

    @classmethod
    def with_options(
        cls,
        *,
        margin: float | None = None,
        floor: float | None = None,
        cer_tolerance: float | None = None,
        latency_ratio: float | None = None,
        latency_slack_ms: float | None = None,
    ) -> GateConfig:
        """The defaults with the `promote --auto` options a user gave (None: not given)."""
        given: dict[str, Any] = {
            "margin": margin,
            "floor": floor,
            "cer_tolerance": cer_tolerance,
            "latency_ratio": latency_ratio,
            "latency_slack_ms": latency_slack_ms,
        }
        return replace(cls(), **{k: v for k, v in given.items() if v is not None})

    def resolved(self, settings: Settings) -> GateConfig:
        """Every threshold left None filled from the settings."""
        defaults: dict[str, Any] = {
            "staging_floor": settings.staging_floor,
            "min_shadow": settings.gate_min_shadow,
            "min_agreement": settings.gate_min_agreement,
            "live_points": settings.gate_live_points,
        }
        filled = replace(self, **{k: v for k, v in defaults.items() if getattr(self, k) is None})
        return filled if filled.floor is not None else replace(filled, floor=filled.staging_floor)

    def thresholds(self, settings: Settings) -> dict[str, float]:
        """The numbers the decision used, for the audit record."""
        values = asdict(self.resolved(settings))
        del values["staging_floor"]  # training's rule, not the gate's
        return {k: float(v) for k, v in values.items()}


def staging_rejection(accuracy: float, floor: float) -> str | None:
    """Why a trained version may not be staged (below the floor); None when it may."""
    if accuracy >= floor:
        return None
    return f"test sequence accuracy {accuracy:.4f} is below the staging floor {floor}"


def judge(candidate: Score, champion: Score | None, config: GateConfig, floor: float) -> list[str]:
    """Why the candidate may not replace the champion; empty when it may."""
    if not candidate.ok:
        return [f"candidate v{candidate.version} failed to load or predict ({candidate.error})"]
    if champion is None or not champion.ok:
        if candidate.seq_acc + EPSILON < floor:
            return [f"accuracy {candidate.seq_acc:.4f} is below the floor {floor:.4f}"]
        return []
    refusals = []
    needed = champion.seq_acc + config.margin
    if candidate.seq_acc + EPSILON < needed:
        refusals.append(
            f"accuracy {candidate.seq_acc:.4f} < champion {champion.seq_acc:.4f} + margin {config.margin}"
        )
    if candidate.cer > champion.cer + config.cer_tolerance + EPSILON:
        refusals.append(f"CER {candidate.cer:.4f} is worse than champion {champion.cer:.4f}")
    budget = champion.p95_ms * config.latency_ratio + config.latency_slack_ms
    if candidate.p95_ms > budget:
        refusals.append(f"p95 latency {candidate.p95_ms:.1f} ms is over budget {budget:.1f} ms")
    return refusals


def judge_evidence(
    evidence: Evidence, candidate: Score, champion: Score | None, thresholds: dict[str, float]
) -> list[str]:
    """Why live evidence refuses a candidate the frozen set let through; empty when it does not.

    Its live estimate may not trail production's over the same period by more than
    `live_points`; its shadow agreement with production may not fall below `min_agreement`
    unless it wins on the frozen set (a better model must disagree somewhere).
    """
    refusals = []
    points = thresholds["live_points"]
    mine, theirs = evidence.candidate_estimate, evidence.champion_estimate
    if mine is not None and theirs is not None and mine + EPSILON < theirs - points / 100:
        refusals.append(
            f"live estimate {mine:.1%} is {(theirs - mine) * 100:.1f} points below production's "
            f"{theirs:.1%} over the same period (at most {points:g} allowed)"
        )
    wins = champion is None or not champion.ok or candidate.seq_acc > champion.seq_acc + EPSILON
    agreement, least = evidence.agreement, thresholds["min_agreement"]
    if evidence.shadow and agreement is not None and agreement < least and not wins:
        refusals.append(
            f"shadow agreement {agreement:.1%} over {evidence.comparisons} comparisons is below "
            f"{least:.0%} and it does not beat production on the frozen set"
        )
    return refusals
