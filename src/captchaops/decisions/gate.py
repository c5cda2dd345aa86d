"""The continuous-deployment gate: candidate @staging vs champion @production on the frozen set.

It applies the rules of `decisions.gate_rules` (the thresholds' one home) and has `registry`
write what it decided: `auto_promote` (`promote --auto`) and `stage_candidate` (training's
staging floor). One `MlflowClient` is made at the top of each and passed down.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from captchaops import mlflow_scope
from captchaops.decisions.gate_rules import (
    GateConfig,
    judge,
    judge_evidence,
    staging_rejection,
)
from captchaops.decisions.promotion import stage_version, to_production
from captchaops.decisions.scores import record_score
from captchaops.evaluation import report
from captchaops.evaluation.evalset import EvalSet, Score, ensure_evalset, score
from captchaops.evaluation.evidence import Evidence, gather
from captchaops.evaluation.scheme import scheme_of, scheme_refusals
from captchaops.registry.aliases import (
    alias_version,
    named_version,
    record_rejection,
    signing_key_dir,
)
from captchaops.registry.audit import Move
from captchaops.registry.errors import RegistryError, one_line_errors
from captchaops.registry.names import PRODUCTION, STAGING, default_actor
from captchaops.registry.versions import evalset_problem
from captchaops.settings import Settings

__all__ = [
    "EXIT_ERROR",
    "EXIT_PROMOTED",
    "EXIT_REJECTED",
    "Decision",
    "GateConfig",
    "auto_promote",
    "decide",
    "gate_reason",
    "judge",
    "judge_evidence",
    "record_decision",
    "stage_candidate",
]
log = logging.getLogger(__name__)
EXIT_PROMOTED = 0
EXIT_ERROR = 1
EXIT_REJECTED = 3


def stage_candidate(
    client: MlflowClient,
    settings: Settings,
    version: str,
    accuracy: float,
    *,
    actor: str | None = None,
) -> str | None:
    """Decide whether a trained version reaches the staging floor and have the registry write
    it (@staging, or the audited rejection); the rejection reason, or None when staged."""
    floor = GateConfig().resolved(settings).staging_floor
    assert floor is not None
    rejection = staging_rejection(accuracy, floor)
    stage_version(
        client,
        settings.model_name,
        version,
        accuracy=accuracy,
        rejection=rejection,
        floor=floor,
        actor=actor,
        key_dir=signing_key_dir(settings),
    )
    return rejection


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


def decide(
    settings: Settings,
    config: GateConfig | None = None,
    evalset: EvalSet | None = None,
    *,
    client: MlflowClient | None = None,
    version: str | None = None,
) -> Decision:
    """Score @staging (or `version`) and @production on the frozen set and judge
    them; changes no alias.

    A synthetic scheme's first frozen set is generated with its candidate's alphabet and
    lengths. A candidate of another scheme than the champion, or one that cannot read the
    frozen set's characters, is refused without being scored. Every read goes through
    `client` (one is made when none is given).
    """
    config = (config or GateConfig()).resolved(settings)
    thresholds = config.thresholds(settings)
    name = settings.model_name
    with one_line_errors(settings):
        client = client or mlflow_scope.client(settings)
        candidate_version = named_version(
            settings, version=version, alias=STAGING, mlflow_client=client
        )
        champion_version = alias_version(client, name, PRODUCTION)

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
    with one_line_errors(settings):
        tags = client.get_model_version(name, candidate_version).tags
        if tags.get("validation_status") == "rejected":
            why = tags.get("rejection_reason", "no reason recorded")[:200]
            return refused(
                [f"v{candidate_version} was rejected before ({why}); train a new candidate"],
                audited=False,
            )
        scheme = scheme_of(client, name, candidate_version)
        if evalset is None:
            evalset = ensure_evalset(client, settings, scheme=scheme)
            pinned = dict(client.get_registered_model(name).tags)
            problem = evalset_problem(pinned, name, settings.effective_signing_public_key)
            if problem:
                raise RegistryError(problem)
        refusals = scheme_refusals(
            candidate_version,
            scheme,
            champion_version,
            scheme_of(client, name, champion_version) if champion_version else None,
            evalset.labels,
        )
    if refusals:
        return refused(refusals, digest=evalset.digest)
    kwargs: dict[str, Any] = {
        "batch_size": config.batch_size,
        "latency_samples": config.latency_samples,
        "client": client,
    }
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
    with one_line_errors(settings):
        for result in (candidate, champion):
            if result is not None:
                record_score(client, name, result)
    _reports(client, name, evalset, readings)
    assert config.floor is not None and config.min_shadow is not None
    refusals = judge(candidate, champion, config, config.floor)
    with one_line_errors(settings):
        evidence = gather(
            client, name, candidate_version, champion_version, min_shadow=config.min_shadow
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
    """Run the gate and act on it: promote and audit, or audit the rejection (one client)."""
    actor = actor or default_actor()
    with one_line_errors(settings):
        client = mlflow_scope.client(settings)
    decision = decide(settings, config, evalset, client=client)
    why = gate_reason(decision, reason)
    if not decision.promote and not decision.audited:
        return decision, None
    with one_line_errors(settings):
        move = record_decision(client, settings, decision, why, actor)
    return decision, move


def gate_reason(decision: Decision, reason: str = "") -> str:
    """What the audit record of a gate decision says: the verdict, then the person's reason."""
    return f"gate: {decision.reason()}" + (f" ({reason})" if reason else "")


def record_decision(
    client: MlflowClient,
    settings: Settings,
    decision: Decision,
    why: str,
    actor: str,
    *,
    approver: str = "",
    request_id: str = "",
) -> Move:
    """Promote (signed with the settings' promotion key) and audit, or audit the rejection;
    `approver` and `request_id` when it answers an approved request."""
    name = settings.model_name
    record: dict[str, Any] = {
        "reason": why,
        "actor": actor,
        "kind": "gate",
        "candidate": decision.candidate,
        "champion": decision.champion,
        "thresholds": decision.thresholds,
        "approver": approver,
        "request_id": request_id,
    }
    if decision.promote:
        return to_production(
            client,
            name,
            decision.candidate_version,
            expect_from=decision.champion_version,
            validated=True,
            key_dir=signing_key_dir(settings),
            **record,
        )
    return record_rejection(
        client,
        name,
        version=decision.candidate_version,
        digest=decision.digest,
        version_tags={"validated_at": datetime.now(UTC).isoformat(timespec="seconds")},
        **record,
    )
