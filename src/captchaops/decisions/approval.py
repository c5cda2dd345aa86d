"""Production moves that wait for a second account: requests, approvals and the live check.

Where `settings.approval_required` (every scheme in team mode, none locally, unless
`CAPTCHAOPS_PRODUCTION_APPROVAL` says otherwise), `promote`, `promote --auto`, a canary's
`--then-promote`, a `rollback` of a production that passes its live check and the start of a
canary (`promote --canary`, which would put up to half of production's traffic on the
candidate) run every check the move would run (scores, the signed frozen set, the gate) and
record a request (`registry.requests`) instead of moving @production or @canary. `approve` by another account runs the
checks again and makes the signed move with both names, the approver inside the signature. A
rollback while production fails its live check moves at once, with the failure in its reason:
it can only go back to a version that held production before.

The promotion service (`stack.promotions`) calls the same functions with `account` (who the
tracking server says the caller is, never the service's own login) and `request_key` (its key
folder): it signs the requests it records and approves only requests that carry its signature.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from captchaops.canary import moves as canaries
from captchaops.decisions import gate, promotion
from captchaops.decisions.gate_rules import GateConfig
from captchaops.evaluation.evalset import Score
from captchaops.live.reported import from_health
from captchaops.mlflow_scope import client
from captchaops.registry.aliases import alias_version, named_version
from captchaops.registry.audit import Move
from captchaops.registry.errors import RegistryError, one_line_errors
from captchaops.registry.names import CANARY, PRODUCTION, STAGING, default_actor
from captchaops.registry.requests import (
    Request,
    pending_request,
    pending_requests,
    provenance_problem,
    record_request,
    refuse_approval,
)
from captchaops.registry.signing import ensure_key
from captchaops.settings import Settings

LIVE_CHECK_TIMEOUT_S = 3.0


def account_of(settings: Settings, actor: str | None, account: str | None = None) -> str:
    """The account a request or an approval is made by: the one the promotion service
    authenticated, else the tracking server's login where there is one, else the actor (--actor,
    CAPTCHAOPS_ACTOR, the login name)."""
    return account or settings.tracking_username or actor or default_actor()


def _verdict(candidate: Score, champion: Score | None, forced: bool) -> str:
    """The frozen set's scores of a manual request, in one line."""

    def one(score: Score) -> str:
        if not score.ok:
            return f"v{score.version} failed ({score.error})"
        return f"v{score.version} accuracy {score.seq_acc:.4f} CER {score.cer:.4f}"

    versus = f" vs {one(champion)}" if champion is not None else " (no champion)"
    return f"frozen set: {one(candidate)}{versus}" + (" (forced)" if forced else "")


def promote(
    settings: Settings,
    *,
    version: str | None,
    from_alias: str | None,
    reason: str,
    actor: str | None,
    force: bool = False,
    kind: str = "manual",
    account: str | None = None,
    request_key: Path | None = None,
) -> Move | Request:
    """`promotion.promote`, or its request where production moves need an approval (signed with
    the key in `request_key` when given)."""
    if not settings.approval_required:
        return promotion.promote(
            settings,
            version=version,
            from_alias=from_alias,
            reason=reason,
            actor=actor,
            force=force,
        )
    requester = actor or settings.tracking_username or default_actor()
    target = named_version(settings, version=version, alias=from_alias)
    with one_line_errors(settings):
        mlflow_client = client(settings)
        current, candidate, champion = promotion.check_promotion(
            mlflow_client, settings, target, force=force
        )
        return record_request(
            mlflow_client,
            settings.model_name,
            from_version=current,
            to_version=target,
            kind=kind,
            requester=requester,
            account=account_of(settings, actor, account),
            verdict=_verdict(candidate, champion, force),
            reason=reason,
            forced=force,
            candidate=candidate,
            champion=champion,
            thresholds={"forced": float(force)},
            key=_signer(request_key),
        )


def _signer(request_key: Path | None) -> Ed25519PrivateKey | None:
    """The promotion service's private key in `request_key`; None without one."""
    return None if request_key is None else ensure_key(request_key)


def auto_promote(
    settings: Settings,
    config: GateConfig | None,
    *,
    actor: str | None,
    reason: str = "",
    account: str | None = None,
    request_key: Path | None = None,
) -> tuple[gate.Decision, Move | Request | None]:
    """`gate.auto_promote`, or, where production moves need an approval, the same gate whose
    promotion becomes a request (a rejection is audited at once, as without approval)."""
    if not settings.approval_required:
        return gate.auto_promote(settings, config, actor=actor, reason=reason)
    requester = actor or settings.tracking_username or default_actor()
    with one_line_errors(settings):
        mlflow_client = client(settings)
    decision = gate.decide(settings, config, client=mlflow_client)
    why = gate.gate_reason(decision, reason)
    if not decision.promote and not decision.audited:
        return decision, None
    with one_line_errors(settings):
        if not decision.promote:
            return decision, gate.record_decision(mlflow_client, settings, decision, why, requester)
        assert decision.candidate is not None
        return decision, record_request(
            mlflow_client,
            settings.model_name,
            from_version=decision.champion_version,
            to_version=decision.candidate_version,
            kind="gate",
            requester=requester,
            account=account_of(settings, actor, account),
            verdict=f"gate: {decision.reason()}",
            reason=why,
            candidate=decision.candidate,
            champion=decision.champion,
            thresholds=decision.thresholds,
            key=_signer(request_key),
        )


def start_canary(
    settings: Settings,
    *,
    percent: int,
    version: str | None,
    from_alias: str | None,
    reason: str,
    actor: str | None,
    account: str | None = None,
    request_key: Path | None = None,
) -> Move | Request:
    """`canaries.start_canary`, or, where production moves need an approval, the same checks and
    a request for @canary (the share in its `percent` threshold) that `approve` starts."""
    if not settings.approval_required:
        return canaries.start_canary(
            settings,
            percent=percent,
            version=version,
            from_alias=from_alias,
            reason=reason,
            actor=actor,
        )
    canaries.check_percent(percent)
    requester = actor or settings.tracking_username or default_actor()
    target = named_version(settings, version=version, alias=from_alias or STAGING)
    with one_line_errors(settings):
        mlflow_client = client(settings)
        current, candidate, champion = canaries.check_canary(mlflow_client, settings, target)
        return record_request(
            mlflow_client,
            settings.model_name,
            from_version=current,
            to_version=target,
            kind="canary",
            requester=requester,
            account=account_of(settings, actor, account),
            verdict=f"{percent}% of production's traffic; {_verdict(candidate, champion, False)}",
            reason=reason or f"canary: {percent}% of production's traffic",
            candidate=candidate,
            champion=champion,
            thresholds={"percent": float(percent)},
            alias=CANARY,
            key=_signer(request_key),
        )


def health_failure(status_code: int, body: Any) -> str | None:
    """Why a production server's `/health` answer fails the live check (no model served, or its
    live estimate fell too far below the gate's accuracy); None when it passes."""
    if not isinstance(body, dict) or not body.get("model_loaded") or status_code >= 500:
        why = body.get("reason") if isinstance(body, dict) else None
        return f"it serves no model ({why or f'HTTP {status_code}'})"
    for state in from_health(PRODUCTION, body):
        if state.alias == PRODUCTION and state.alert:
            return f"v{state.version}: {state.alert}"
    return None


def live_failure(settings: Settings, timeout: float = LIVE_CHECK_TIMEOUT_S) -> str | None:
    """Why production fails its live check (`health_failure`, or its server does not answer
    `/health`); None when it passes."""
    url = settings.server_url(PRODUCTION)
    try:
        answer = httpx.get(f"{url}/health", timeout=timeout)
        body = answer.json()
    except (httpx.HTTPError, ValueError) as exc:
        return f"the production server at {url} does not answer /health ({type(exc).__name__})"
    return health_failure(answer.status_code, body)


def rollback(
    settings: Settings,
    *,
    to: str | None,
    reason: str,
    actor: str | None,
    account: str | None = None,
    request_key: Path | None = None,
) -> Move | Request:
    """`promotion.rollback`; where production moves need an approval, at once only while
    production fails its live check (the failure goes into the reason), else a request."""
    if not settings.approval_required:
        return promotion.rollback(settings, to=to, reason=reason, actor=actor)
    failing = live_failure(settings)
    if failing is not None:
        lead = f"{reason}; " if reason else ""
        why = f"{lead}production fails its live check, so no approval: {failing}"
        return promotion.rollback(settings, to=to, reason=why, actor=actor)
    requester = actor or settings.tracking_username or default_actor()
    with one_line_errors(settings):
        mlflow_client = client(settings)
        current, target = promotion.rollback_target(mlflow_client, settings, to)
        promotion.require_signed_evalset(mlflow_client, settings)
        return record_request(
            mlflow_client,
            settings.model_name,
            from_version=current,
            to_version=target,
            kind="rollback",
            requester=requester,
            account=account_of(settings, actor, account),
            verdict=f"production passes its live check; v{target} held production before",
            reason=reason or f"rollback from v{current}",
            key=_signer(request_key),
        )


def requests(settings: Settings) -> list[Request]:
    """The pending requests of the settings' model, oldest first."""
    with one_line_errors(settings):
        return pending_requests(client(settings), settings.model_name)


def approve(
    settings: Settings,
    request_id: str,
    *,
    actor: str | None,
    account: str | None = None,
    request_key: Path | None = None,
) -> tuple[Request, Move]:
    """Approve a pending request as another account: check it again and make the signed move
    naming both (a gate request the gate now refuses ends in the audited rejection instead).

    The requester's own account is refused in one line, audited; the request stays pending. With
    `request_key` (the promotion service), a request its key did not sign is refused in one line.
    """
    approver = actor or settings.tracking_username or default_actor()
    account = account_of(settings, actor, account)
    name = settings.model_name
    with one_line_errors(settings):
        mlflow_client = client(settings)
        request = pending_request(mlflow_client, name, request_id)
        if request_key is not None:
            problem = provenance_problem(request, ensure_key(request_key).public_key())
            if problem:
                raise RegistryError(
                    f"{problem}; nothing moved (ask the requester to run `captchaops promote` "
                    "again with CAPTCHAOPS_PROMOTIONS_URL set)"
                )
        if account == request.account:
            why = f"{account} requested {request.short_id}; another account must approve it"
            refuse_approval(mlflow_client, request, approver=approver, why=why)
            raise RegistryError(
                f"{why} (ask someone else to run `captchaops approve {request.short_id}`)"
            )
    signed = {"actor": request.requester, "approver": approver, "request_id": request.id}
    if request.alias == CANARY:
        return request, _approve_canary(settings, request, **signed)
    if request.alias != PRODUCTION:  # a request for an alias nothing here approves
        raise RegistryError(
            f"request {request.short_id} asks for @{request.alias}, which no approval moves; "
            "nothing moved"
        )
    if request.kind == "rollback":
        return request, promotion.rollback(
            settings, to=request.to_version, reason=request.reason, **signed
        )
    if request.kind == "gate":
        return request, _approve_gate(settings, request, approver)
    move = promotion.promote(
        settings,
        version=request.to_version,
        from_alias=None,
        reason=request.reason,
        force=request.forced,
        **signed,
    )
    if request.kind == "canary":
        with one_line_errors(settings):
            on_canary = alias_version(mlflow_client, name, CANARY)
        if on_canary == request.to_version:
            canaries.end_canary(
                settings,
                reason=f"promoted to @production: {request.reason}",
                actor=approver,
                version=request.to_version,
            )
    return request, move


def _approve_canary(
    settings: Settings, request: Request, *, actor: str, approver: str, request_id: str
) -> Move:
    """Start the canary a request asks for, at its share, after every check again."""
    percent = request.thresholds.get("percent", 0.0)
    if not percent.is_integer():
        raise RegistryError(f"request {request.short_id} names no whole share; nothing moved")
    return canaries.start_canary(
        settings,
        percent=int(percent),
        version=request.to_version,
        reason=request.reason,
        actor=actor,
        approver=approver,
        request_id=request_id,
    )


def _approve_gate(settings: Settings, request: Request, approver: str) -> Move:
    """Run the gate again on the requested version, with the request's thresholds, and act."""
    given = ("margin", "floor", "cer_tolerance", "latency_ratio", "latency_slack_ms")
    config = GateConfig.with_options(**{k: v for k, v in request.thresholds.items() if k in given})
    with one_line_errors(settings):
        mlflow_client = client(settings)
    decision = gate.decide(settings, config, client=mlflow_client, version=request.to_version)
    with one_line_errors(settings):
        if not decision.promote and not decision.audited:
            raise RegistryError(
                f"the gate no longer judges request {request.short_id}: {decision.reason()}"
            )
        why = gate.gate_reason(decision, f"approved request {request.short_id}")
        return gate.record_decision(
            mlflow_client,
            settings,
            decision,
            why,
            request.requester,
            approver=approver,
            request_id=request.id,
        )
