"""Requests for @production and @canary moves that wait for a second account: the queue, in the
audit trail.

A request is an audit run of the promotions experiment (decision `requested`), written here like
every other decision: the requester, the account that may not approve it, the move asked for and
the gate's verdict. It is only the queue. Nothing a model server follows reads it (servers trust
the signature on a move, `registry.signing`), so an edited or forged request moves nothing; an
approval is a signed move naming the approver. A request stays pending until a finished audit run
names it in `request_id` with a closing decision (the approved move, or the gate's rejection on
approval), or until the alias already holds what it asks for. A refused approval (by the
requester's own account) is audited with both names and leaves it pending.

The promotion service (`stack.promotions`) signs each request it records with its promotion key
(run tag `request_signature`, over the run id and every field an approval acts on) and approves
only requests whose signature verifies: a run an editor writes into the audit experiment by hand
is not a request the service made, and a signature copied from one run to another does not
verify, because the run id is inside it.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, replace

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from mlflow import MlflowClient
from mlflow.entities import Run

from captchaops.registry.aliases import alias_version, last_seq
from captchaops.registry.audit import (
    AUDIT_EXPERIMENT,
    Move,
    Scored,
    abandon_record,
    close_record,
    open_record,
)
from captchaops.registry.errors import RegistryError
from captchaops.registry.names import PRODUCTION

REQUESTED = "requested"
REFUSED = "refused"
"""An approval refused (self-approval): audited, the request stays pending."""
CLOSING = ("promoted", "rolled-back", "rejected", "canary")
"""Decisions that answer a request for good when they carry its `request_id` (`canary`: the
approved start of a canary, which stays answered after the canary ends)."""
SHORT_ID = 8
"""Characters of a request's id (its audit run id) that commands print; any unique prefix of
at least MIN_ID characters names it."""
MIN_ID = 6
REQUEST_SIGNATURE = "request_signature"
"""Run tag of a request the promotion service recorded: its base64 Ed25519 signature."""


@dataclass(frozen=True)
class Request:
    """One @production or @canary move waiting for a second account's approval."""

    id: str
    """The request's audit run id."""
    model: str
    alias: str
    from_version: str | None
    to_version: str
    kind: str
    """`manual` (promote), `gate` (promote --auto), `rollback`, `canary` (on @production: a
    canary's --then-promote; on @canary: its start, the share in `thresholds["percent"]`)."""
    requester: str
    """Who asked, as the audit trail names them (`alice (as ci-bot)`)."""
    account: str
    """The account that may not approve it: the requester's login."""
    verdict: str
    """What the checks said when it was asked (the gate's verdict, the scores)."""
    reason: str
    at: str
    forced: bool
    thresholds: dict[str, float]
    signature: str = ""
    """The promotion service's signature (`signed_bytes`); "" for a request made without it."""

    @property
    def short_id(self) -> str:
        """The id as commands print it."""
        return self.id[:SHORT_ID]

    def line(self) -> str:
        """The request as one human line."""
        source = f"v{self.from_version}" if self.from_version else "nothing"
        return (
            f"{self.short_id} @{self.alias} {source} -> v{self.to_version} ({self.kind}) "
            f"requested by {self.requester} at {self.at}: {self.reason} [{self.verdict}]"
        )


def signed_bytes(request: Request) -> bytes:
    """The exact bytes a request's signature covers: its run id and every field an approval
    acts on, as they read back from the audit run."""
    record = {
        "id": request.id,
        "model": request.model,
        "alias": request.alias,
        "from_version": request.from_version or "",
        "to_version": request.to_version,
        "kind": request.kind,
        "requester": request.requester,
        "account": request.account[:500],
        "reason": request.reason[:4000],
        "forced": request.forced,
        "thresholds": {k: repr(float(v)) for k, v in sorted(request.thresholds.items())},
    }
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def provenance_problem(request: Request, key: Ed25519PublicKey) -> str | None:
    """Why a request is not one the holder of `key` recorded (no signature, or one that does not
    verify for this run and these fields); None when it is."""
    if not request.signature:
        return f"request {request.short_id} was not recorded by the promotion service"
    try:
        key.verify(base64.b64decode(request.signature, validate=True), signed_bytes(request))
    except (InvalidSignature, binascii.Error, ValueError):
        return (
            f"request {request.short_id}'s signature does not verify: it was not recorded by "
            "the promotion service as it reads now"
        )
    return None


def record_request(
    mlflow_client: MlflowClient,
    name: str,
    *,
    from_version: str | None,
    to_version: str,
    kind: str,
    requester: str,
    account: str,
    verdict: str,
    reason: str,
    forced: bool = False,
    candidate: Scored | None = None,
    champion: Scored | None = None,
    thresholds: dict[str, float] | None = None,
    alias: str = PRODUCTION,
    key: Ed25519PrivateKey | None = None,
) -> Request:
    """Audit a request to move `name@alias` to a version; it waits for another account (signed
    with `key`, the promotion service's, when given)."""
    move = open_record(
        mlflow_client,
        name,
        alias=alias,
        from_version=from_version,
        to_version=to_version,
        actor=requester,
        reason=reason,
        kind=kind,
        decision=REQUESTED,
        seq=last_seq(mlflow_client, name, alias),
        candidate=candidate,
        champion=champion,
        thresholds=thresholds,
        extra={"requester": account, "verdict": verdict, "forced": str(forced).lower()},
    )
    request = Request(
        move.run_id,
        name,
        alias,
        from_version,
        to_version,
        kind,
        requester,
        account[:500],
        verdict[:500],
        reason[:4000],
        move.at,
        forced,
        {k: float(v) for k, v in (thresholds or {}).items()},
    )
    try:
        if key is not None:
            signature = base64.b64encode(key.sign(signed_bytes(request))).decode()
            mlflow_client.set_tag(move.run_id, REQUEST_SIGNATURE, signature)
            request = replace(request, signature=signature)
        close_record(mlflow_client, move.run_id)
    except BaseException:
        abandon_record(mlflow_client, move.run_id)
        raise
    return request


def refuse_approval(
    mlflow_client: MlflowClient, request: Request, *, approver: str, why: str
) -> Move:
    """Audit an approval refused (the request stays pending), naming approver and requester."""
    move = open_record(
        mlflow_client,
        request.model,
        alias=request.alias,
        from_version=request.from_version,
        to_version=request.to_version,
        actor=approver,
        reason=why,
        kind=request.kind,
        decision=REFUSED,
        seq=last_seq(mlflow_client, request.model, request.alias),
        request_id=request.id,
        extra={"requester": request.requester},
    )
    try:
        close_record(mlflow_client, move.run_id)
    except BaseException:
        abandon_record(mlflow_client, move.run_id)
        raise
    return move


def _request_of(run: Run, name: str) -> Request | None:
    """The request an audit run records; None for a run that is not a well-formed one."""
    params, tags = run.data.params, run.data.tags
    if tags.get("decision") != REQUESTED or tags.get("model_name") != name:
        return None
    try:
        thresholds = {
            key.removeprefix("threshold_"): float(value)
            for key, value in params.items()
            if key.startswith("threshold_")
        }
        return Request(
            id=run.info.run_id,
            model=name,
            alias=tags["alias"],
            from_version=params.get("from_version") or None,
            to_version=params["to_version"],
            kind=params["kind"],
            requester=params["actor"],
            account=params["requester"],
            verdict=params.get("verdict", ""),
            reason=tags.get("reason", params.get("reason", "")),
            at=params.get("at", ""),
            forced=params.get("forced") == "true",
            thresholds=thresholds,
            signature=tags.get(REQUEST_SIGNATURE, ""),
        )
    except (KeyError, ValueError):
        return None


def pending_requests(mlflow_client: MlflowClient, name: str) -> list[Request]:
    """The requests of a model no closing decision answered yet, oldest first."""
    experiment = mlflow_client.get_experiment_by_name(AUDIT_EXPERIMENT)
    if experiment is None:
        return []
    finished = f"tags.model_name = '{name}' and attributes.status = 'FINISHED'"
    asked = mlflow_client.search_runs(
        [experiment.experiment_id],
        f"{finished} and tags.decision = '{REQUESTED}'",
        max_results=5000,
    )
    answered = mlflow_client.search_runs(
        [experiment.experiment_id], f"{finished} and tags.request_id LIKE '%'", max_results=5000
    )
    closed = {
        run.data.tags["request_id"] for run in answered if run.data.tags.get("decision") in CLOSING
    }
    found = [r for r in (_request_of(run, name) for run in asked) if r and r.id not in closed]
    holders = {
        alias: alias_version(mlflow_client, name, alias) for alias in {r.alias for r in found}
    }
    return sorted((r for r in found if holders[r.alias] != r.to_version), key=lambda r: r.at)


def pending_request(mlflow_client: MlflowClient, name: str, given: str) -> Request:
    """The pending request of a model whose id starts with `given`; a one-line RegistryError
    when none or several do."""
    given = given.strip().lower()
    listing = f"`captchaops requests --model-name {name}` lists the pending ones"
    if len(given) < MIN_ID:
        raise RegistryError(f"give at least {MIN_ID} characters of the request id; {listing}")
    matches = [r for r in pending_requests(mlflow_client, name) if r.id.startswith(given)]
    if not matches:
        raise RegistryError(f"{name} has no pending request {given}; {listing}")
    if len(matches) > 1:
        raise RegistryError(f"{given} names {len(matches)} requests of {name}; give more of it")
    return matches[0]
