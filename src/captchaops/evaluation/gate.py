"""The continuous-deployment gate: candidate @staging vs champion @production on the frozen set."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from captchaops import registry
from captchaops.evaluation import report
from captchaops.evaluation.evalset import EvalSet, Score, ensure_evalset, score
from captchaops.evaluation.evidence import Evidence, gather
from captchaops.evaluation.scheme import scheme_of, scheme_refusals
from captchaops.registry import PRODUCTION, STAGING, Move
from captchaops.settings import Settings

log = logging.getLogger(__name__)
EPSILON = 1e-9
EXIT_PROMOTED = 0
EXIT_ERROR = 1
EXIT_REJECTED = 3


@dataclass(frozen=True)
class GateConfig:
    """Thresholds of the gate; every field is a `captchaops promote --auto` option."""

    margin: float = 0.0
    """Candidate sequence accuracy must reach the champion's plus this."""
    floor: float | None = None
    """Accuracy a first candidate (no champion) needs; None means settings.staging_floor."""
    cer_tolerance: float = 0.0
    """How much higher than the champion's the candidate's CER may be."""
    latency_ratio: float = 1.5
    """Candidate p95 latency budget as a multiple of the champion's..."""
    latency_slack_ms: float = 5.0
    """...plus this many milliseconds, so timer noise on tiny models does not decide."""
    batch_size: int = 64
    latency_samples: int = 50

    def thresholds(self, settings: Settings) -> dict[str, float]:
        """The numbers the decision used, for the audit record."""
        values = asdict(self)
        values["floor"] = self.effective_floor(settings)
        values["min_shadow"] = settings.gate_min_shadow
        values["min_agreement"] = settings.gate_min_agreement
        values["live_points"] = settings.gate_live_points
        return {k: float(v) for k, v in values.items()}

    def effective_floor(self, settings: Settings) -> float:
        """The floor in force."""
        return settings.staging_floor if self.floor is None else self.floor


@dataclass(frozen=True)
class Decision:
    """What the gate concluded and why; `refusals` is empty exactly when it promotes."""

    candidate_version: str
    champion_version: str | None
    candidate: Score | None
    champion: Score | None
    thresholds: dict[str, float]
    refusals: list[str] = field(default_factory=list)
    audited: bool = True
    """Whether auto_promote records the decision (audit run, candidate tags)."""
    digest: str = ""
    """The frozen set the decision was about ('' when none was loaded)."""
    evidence: Evidence | None = None
    """What the monitoring runs said (None when the gate refused before scoring)."""

    @property
    def promote(self) -> bool:
        """Whether the candidate may become @production."""
        return not self.refusals

    def reason(self) -> str:
        """One line: the refusals, or the comparison that let the candidate through, and the
        live evidence used."""
        used = f"; {self.evidence.line()}" if self.evidence is not None else ""
        return self._verdict() + used

    def _verdict(self) -> str:
        if self.refusals:
            return "; ".join(self.refusals)
        c = self.candidate
        assert c is not None
        if self.champion is None or not self.champion.ok:
            return f"first production candidate: accuracy {c.seq_acc:.4f} >= floor {self.thresholds['floor']:.4f}"
        p = self.champion
        return (
            f"accuracy {c.seq_acc:.4f} vs {p.seq_acc:.4f} (margin {self.thresholds['margin']}), "
            f"CER {c.cer:.4f} vs {p.cer:.4f}, p95 {c.p95_ms:.1f} vs {p.p95_ms:.1f} ms"
        )


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


def decide(
    settings: Settings, config: GateConfig | None = None, evalset: EvalSet | None = None
) -> Decision:
    """Score @staging and @production on the frozen set and judge them; changes no alias.

    A synthetic scheme's first frozen set is generated with its candidate's alphabet and
    lengths. A candidate of another scheme than the champion, or one that cannot read the
    frozen set's characters, is refused without being scored.
    """
    config = config or GateConfig()
    thresholds = config.thresholds(settings)
    candidate_version = registry.resolve(settings, alias=STAGING)
    champion_version = registry.resolve_alias(settings, PRODUCTION)

    def refused(reasons: list[str], audited: bool = True, digest: str = "") -> Decision:
        return Decision(
            candidate_version,
            champion_version,
            None,
            None,
            thresholds,
            reasons,
            audited=audited,
            digest=digest,
        )

    if candidate_version == champion_version:
        return refused(
            [f"v{candidate_version} is already @production; train a new candidate first"],
            audited=False,
        )
    with registry.one_line_errors(settings):
        client = registry.client(settings)
        tags = client.get_model_version(settings.model_name, candidate_version).tags
        if tags.get("validation_status") == "rejected":
            why = tags.get("rejection_reason", "no reason recorded")[:200]
            return refused(
                [f"v{candidate_version} was rejected before ({why}); train a new candidate"],
                audited=False,
            )
        scheme = scheme_of(client, settings.model_name, candidate_version)
        if evalset is None:
            evalset = ensure_evalset(settings, scheme=scheme)
        refusals = scheme_refusals(
            candidate_version,
            scheme,
            champion_version,
            scheme_of(client, settings.model_name, champion_version) if champion_version else None,
            evalset.labels,
        )
    if refusals:
        return refused(refusals, digest=evalset.digest)
    kwargs = {"batch_size": config.batch_size, "latency_samples": config.latency_samples}
    readings: dict[str, list[dict[str, Any]]] = {candidate_version: []}
    candidate = score(
        settings, candidate_version, evalset, readings=readings[candidate_version], **kwargs
    )
    champion = None
    if champion_version:
        readings[champion_version] = []
        champion = score(
            settings, champion_version, evalset, readings=readings[champion_version], **kwargs
        )
    with registry.one_line_errors(settings):
        for result in (candidate, champion):
            if result is not None:
                registry.record_score(client, settings.model_name, result)
    _reports(client, settings.model_name, evalset, readings)
    refusals = judge(candidate, champion, config, config.effective_floor(settings))
    with registry.one_line_errors(settings):
        evidence = gather(
            client,
            settings.model_name,
            candidate_version,
            champion_version,
            min_shadow=settings.gate_min_shadow,
        )
    if not refusals:
        refusals = judge_evidence(evidence, candidate, champion, thresholds)
    return Decision(
        candidate_version,
        champion_version,
        candidate,
        champion,
        thresholds,
        refusals,
        digest=evalset.digest,
        evidence=evidence,
    )


def _reports(
    client: MlflowClient, name: str, evalset: EvalSet, readings: dict[str, list[dict[str, Any]]]
) -> None:
    """Log each scored version's visual report to its run; a report that cannot be written is
    logged as a warning and never decides anything."""
    for version, outputs in readings.items():
        if len(outputs) != len(evalset):
            continue  # it failed to load or predict: nothing to show
        try:
            report.log_for_version(
                client, name, version, evalset.labels, evalset.images, outputs, evalset.digest
            )
        except (MlflowException, OSError) as exc:
            log.warning("no report for %s v%s: %s", name, version, exc)


def auto_promote(
    settings: Settings,
    config: GateConfig | None = None,
    *,
    actor: str | None = None,
    reason: str = "",
    evalset: EvalSet | None = None,
) -> tuple[Decision, Move | None]:
    """Run the gate and act on it: promote and audit, or audit the rejection."""
    actor = actor or registry.default_actor()
    decision = decide(settings, config, evalset)
    why = f"gate: {decision.reason()}" + (f" ({reason})" if reason else "")
    if not decision.promote and not decision.audited:
        return decision, None
    with registry.one_line_errors(settings):
        move = _record(registry.client(settings), settings.model_name, decision, why, actor)
    return decision, move


def _record(client: MlflowClient, name: str, decision: Decision, why: str, actor: str) -> Move:
    """Promote and audit, or audit the rejection: the same record either way."""
    record: dict[str, Any] = {
        "reason": why,
        "actor": actor,
        "kind": "gate",
        "candidate": decision.candidate,
        "champion": decision.champion,
        "thresholds": decision.thresholds,
    }
    if decision.promote:
        return registry.to_production(
            client,
            name,
            decision.candidate_version,
            expect_from=decision.champion_version,
            validated=True,
            **record,
        )
    return registry.record_rejection(
        client,
        name,
        version=decision.candidate_version,
        digest=decision.digest,
        version_tags={"validated_at": datetime.now(UTC).isoformat(timespec="seconds")},
        **record,
    )
