"""Commands on the registry: models, promote, rollback and the frozen evaluation set."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from captchaops.cli import canary as canaries
from captchaops.cli.base import (
    ACTOR_OPTION,
    MODEL_NAME_OPTION,
    app,
    audited_actor,
    console,
    fail,
    parse_length,
    require_access,
    settings_for,
)
from captchaops.console import (
    literal,
    live_lines,
    print_decision,
    unaudited_lines,
    version_notes,
    versions_table,
)
from captchaops.data.synthetic import DIGITS_UPPER
from captchaops.decisions import approval, gate
from captchaops.decisions.gate_rules import GateConfig
from captchaops.evaluation import report
from captchaops.evaluation.evalset import create_evalset
from captchaops.mlflow_scope import client
from captchaops.registry.aliases import adopt_aliases, require_model, signing_key_dir
from captchaops.registry.errors import RegistryError, one_line_errors
from captchaops.registry.listing import list_versions
from captchaops.registry.names import default_actor
from captchaops.registry.requests import Request
from captchaops.settings import Settings
from captchaops.stack.promotions import run as run_promotions
from captchaops.stack.promotions_client import ServiceError, ask, pin_evalset

_GATE = GateConfig()


@app.command()
def models(
    limit: int = typer.Option(20, help="show at most this many versions"),
    version: str | None = typer.Option(
        None, "--version", help="name where version N's visual report is (and its numbers)"
    ),
    model_name: str | None = MODEL_NAME_OPTION,
) -> None:
    """List model versions with aliases, metrics, validation status and the last alias moves."""
    settings = settings_for(model_name)
    require_access(settings, "models")
    if version is not None:
        _report(settings, version)
        return
    try:
        listing = list_versions(settings, limit=limit)
    except RegistryError as exc:
        fail(str(exc))
    console.print(versions_table(listing, console.width))
    for line in version_notes(listing):
        console.print(line, highlight=False, markup=False)
    for line in live_lines(listing.live):
        console.print(line, highlight=False)
    for alias, move in sorted(listing.last_moves.items()):
        console.print(literal(f"last {alias} move: {move}"), highlight=False)
    for line in unaudited_lines(listing.unaudited):
        console.print(line, highlight=False)


def _report(settings: Settings, version: str) -> None:
    """Print where a version's report is, and its headline numbers."""
    try:
        with one_line_errors(settings):
            where = report.locate(
                client(settings),
                settings.public_tracking_url,
                settings.model_name,
                version,
            )
    except RegistryError as exc:
        fail(str(exc))
    name = f"{settings.model_name} v{version}"
    if where["run_id"] is None:
        fail(f"{name} has no run, so no report; register it with `captchaops train` or `register`")
    console.print(f"{name}: run {where['run_id']}", highlight=False)
    console.print(f"report: {where['artifact_uri']}", highlight=False)
    console.print(f"MLflow UI: {where['ui_url']}", highlight=False)
    found = where["report"]
    if found is None:
        console.print(
            f"no report yet: `captchaops promote --auto --model-name {settings.model_name}` "
            "scores it and writes one",
            highlight=False,
        )
        return
    confused = ", ".join(
        f"{c['true']}->{c['pred']} ({c['count']})" for c in found["top_confusions"][:5]
    )
    console.print(
        f"accuracy {found['seq_acc']:.4f}, CER {found['cer']:.4f}, calibration error "
        f"{found['expected_calibration_error']:.3f} on {found['n']} images; most confused: "
        f"{confused or 'none'}",
        highlight=False,
    )


@app.command()
def promote(
    version: str | None = typer.Option(None, "--version", help="version number to promote"),
    from_alias: str | None = typer.Option(
        None, "--from", help="promote the version with this alias"
    ),
    reason: str = typer.Option("", "--reason", help="why (recorded in the audit trail)"),
    force: bool = typer.Option(False, "--force", help="promote even a rejected or failing version"),
    auto: bool = typer.Option(
        False, "--auto", help="let the gate decide: exit 0 promoted, 3 rejected, 1 error"
    ),
    margin: float | None = typer.Option(
        None, help=f"gate: accuracy the candidate must add over the champion [{_GATE.margin}]"
    ),
    floor: float | None = typer.Option(
        None, help="gate: accuracy a first candidate needs [the staging floor]"
    ),
    cer_tolerance: float | None = typer.Option(
        None, help=f"gate: how much worse the CER may be [{_GATE.cer_tolerance}]"
    ),
    latency_ratio: float | None = typer.Option(
        None,
        help=f"gate: p95 latency budget as a multiple of the champion's [{_GATE.latency_ratio}]",
    ),
    latency_slack_ms: float | None = typer.Option(
        None, help=f"gate: milliseconds added to the latency budget [{_GATE.latency_slack_ms}]"
    ),
    canary: int | None = typer.Option(
        None, "--canary", help="send PERCENT (1-50) of production's traffic to the candidate"
    ),
    watch: float | None = typer.Option(
        None, "--watch", help="canary: minutes to watch its breaker (default 5)"
    ),
    detach: bool = typer.Option(False, "--detach", help="canary: start it and return at once"),
    then_promote: bool = typer.Option(
        False, "--then-promote", help="canary: promote it when the watch passes cleanly"
    ),
    actor: str | None = ACTOR_OPTION,
    model_name: str | None = MODEL_NAME_OPTION,
) -> None:
    """Move @production: by hand (--version N | --from staging), through the gate (--auto), or
    try a candidate on a share of production's traffic first (--canary PERCENT)."""
    settings = settings_for(model_name)
    require_access(settings, "promote")
    if canary is None and (watch is not None or detach or then_promote):
        fail("--watch, --detach and --then-promote go with --canary PERCENT")
    if canary is not None:
        if auto or force:
            fail("--canary takes no --auto or --force; the canary's breaker is its gate")
        canaries.start(
            settings,
            percent=canary,
            version=version,
            from_alias=from_alias,
            reason=reason,
            # the service names the caller itself; locally the audit trail's name is chosen here
            actor=actor if settings.promotions_url else audited_actor(settings, actor),
            watch_minutes=canaries.WATCH_MINUTES if watch is None else watch,
            detach=detach,
            then_promote=then_promote,
        )
        return
    if settings.promotions_url:
        if auto:
            gate_options = {
                "margin": margin,
                "floor": floor,
                "cer_tolerance": cer_tolerance,
                "latency_ratio": latency_ratio,
                "latency_slack_ms": latency_slack_ms,
            }
            _gate_through_service(settings, {"reason": reason, **gate_options}, actor)
        if not reason:
            fail('say why with --reason "..." (it goes into the audit trail)')
        body = {"version": version, "from": from_alias, "reason": reason, "force": force}
        _through_service(settings, "/promote", body, actor, "promoted")
        return
    actor = audited_actor(settings, actor)
    if not auto and not reason:
        fail('say why with --reason "..." (it goes into the audit trail)')
    try:
        if not auto:
            moved = approval.promote(
                settings,
                version=version,
                from_alias=from_alias,
                reason=reason,
                actor=actor,
                force=force,
            )
            if isinstance(moved, Request):
                _waiting(settings, moved)
                return
            console.print(literal(f"promoted: {moved.line()}"), highlight=False)
            return
        config = GateConfig.with_options(
            margin=margin,
            floor=floor,
            cer_tolerance=cer_tolerance,
            latency_ratio=latency_ratio,
            latency_slack_ms=latency_slack_ms,
        )
        decision, outcome = approval.auto_promote(settings, config, actor=actor, reason=reason)
    except RegistryError as exc:
        fail(str(exc), gate.EXIT_ERROR)
    if isinstance(outcome, Request):
        line = f"passed the gate v{decision.candidate_version}: {decision.reason()}"
        console.print(literal(line), highlight=False)
        _waiting(settings, outcome)
        raise typer.Exit(gate.EXIT_PROMOTED)
    print_decision(console, decision)
    raise typer.Exit(gate.EXIT_PROMOTED if decision.promote else gate.EXIT_REJECTED)


def _waiting(settings: Settings, request: Request) -> None:
    """The two lines of a production move that waits: what waits, and the one command to
    approve it."""
    _waiting_lines(settings, request.line(), request.short_id)


def _waiting_lines(settings: Settings, line: str, short_id: str) -> None:
    """`_waiting`, from a request's line and short id."""
    console.print(literal(f"waiting for approval: {line}"), highlight=False)
    console.print(
        f"another account approves it with: captchaops approve {short_id} "
        f"--model-name {settings.model_name}",
        highlight=False,
    )


def _ask(
    settings: Settings, method: str, path: str, body: dict[str, Any], actor: str | None
) -> dict[str, Any]:
    """The promotion service's answer to one piece of work; one line and exit 1 when it refuses."""
    try:
        return ask(settings, method, path, body, actor=actor)
    except ServiceError as exc:
        fail(str(exc))
        raise  # fail exits; this line only tells the type checker


def _gate_through_service(settings: Settings, body: dict[str, Any], actor: str | None) -> None:
    """`promote --auto` by the promotion service: its verdict, and the gate's exit code."""
    answer = _ask(settings, "POST", "/promote", {"auto": True, **body}, actor)
    result = answer.get("result")
    if result == "waiting":
        console.print(literal(f"passed the gate {answer.get('verdict')}"), highlight=False)
        request = answer.get("request") or {}
        _waiting_lines(settings, str(answer.get("line")), str(request.get("short_id")))
        raise typer.Exit(gate.EXIT_PROMOTED)
    console.print(literal(f"{result} {answer.get('line')}"), highlight=False)
    raise typer.Exit(gate.EXIT_PROMOTED if result == "promoted" else gate.EXIT_REJECTED)


def _through_service(
    settings: Settings, path: str, body: dict[str, Any], actor: str | None, done: str
) -> None:
    """Send a promotion or rollback to the promotion service and print what it did."""
    answer = _ask(settings, "POST", path, body, actor)
    result = answer.get("result")
    if result == "waiting":
        request = answer.get("request") or {}
        _waiting_lines(settings, str(answer.get("line")), str(request.get("short_id")))
        return
    if result not in SERVICE_MOVES:  # an answer this command does not know moved nothing known
        fail(
            f"the promotion service at {settings.promotions_url} answered {result!r}, not a "
            "move: check CAPTCHAOPS_PROMOTIONS_URL names the promotion service"
        )
    console.print(literal(f"{done}: {answer.get('line')}"), highlight=False)


SERVICE_MOVES = frozenset({"promoted", "rolled-back", "canary"})
"""The `result`s of a promotion service's answer that report a move."""


@app.command()
def rollback(
    to: str | None = typer.Option(
        None, "--to", help="an earlier production version (default: the previous one)"
    ),
    reason: str = typer.Option("", "--reason", help="why (recorded in the audit trail)"),
    canary: bool = typer.Option(False, "--canary", help="end the canary instead (remove @canary)"),
    actor: str | None = ACTOR_OPTION,
    model_name: str | None = MODEL_NAME_OPTION,
) -> None:
    """Move @production back to the previous production version in the audit trail, or end the
    canary (--canary)."""
    settings = settings_for(model_name)
    require_access(settings, "rollback")
    if canary:
        if to is not None:
            fail("--canary ends the canary and takes no --to")
        who = actor if settings.promotions_url else audited_actor(settings, actor)
        canaries.end(settings, reason=reason, actor=who)
        return
    if settings.promotions_url:
        _through_service(settings, "/rollback", {"to": to, "reason": reason}, actor, "rolled back")
        return
    actor = audited_actor(settings, actor)
    try:
        moved = approval.rollback(settings, to=to, reason=reason, actor=actor)
    except RegistryError as exc:
        fail(str(exc))
    if isinstance(moved, Request):
        _waiting(settings, moved)
        return
    console.print(literal(f"rolled back: {moved.line()}"), highlight=False)


@app.command()
def approve(
    request: str = typer.Argument(..., help="the request id (or its first 6+ characters)"),
    actor: str | None = ACTOR_OPTION,
    model_name: str | None = MODEL_NAME_OPTION,
) -> None:
    """Approve another account's pending @production move: its checks (the gate) run again and
    the signed move names you as approver. Exit 0 moved, 3 the gate now refuses, 1 error."""
    settings = settings_for(model_name)
    require_access(settings, "approve")
    if settings.promotions_url:
        answer = _ask(settings, "POST", "/approve", {"request": request}, actor)
        _approved(settings, request, answer)
        return
    actor = audited_actor(settings, actor)
    try:
        asked, move = approval.approve(settings, request, actor=actor)
    except RegistryError as exc:
        fail(str(exc), gate.EXIT_ERROR)
    if move.decision == "rejected":
        fail(f"request {asked.short_id} not approved: {move.line()}", gate.EXIT_REJECTED)
    console.print(literal(f"approved {asked.short_id}: {move.line()}"), highlight=False)


def _approved(settings: Settings, asked: str, answer: dict[str, Any]) -> None:
    """Say what the promotion service did with an approval; exit 0 only on a move or an approval
    it recorded while the request still waits, 3 when the gate refused it now, 1 otherwise
    (an answer this command does not know is an error: it fails closed)."""
    result, line = answer.get("result"), answer.get("line")
    short_id = str((answer.get("request") or {}).get("short_id") or asked)
    if result in SERVICE_MOVES:
        console.print(literal(f"approved {short_id}: {line}"), highlight=False)
    elif result == "waiting":
        console.print(
            literal(f"approval of {short_id} recorded; it still waits: {line}"), highlight=False
        )
    elif result == "rejected":
        fail(f"request {short_id} not approved: {line}", gate.EXIT_REJECTED)
    elif result == "refused":
        fail(f"request {short_id} refused: {line}")
    else:
        fail(
            f"the promotion service at {settings.promotions_url} answered {result!r} to the "
            f"approval of {short_id}, so nothing is known to have moved: check "
            "CAPTCHAOPS_PROMOTIONS_URL names the promotion service and `captchaops models`"
        )


@app.command()
def requests(model_name: str | None = MODEL_NAME_OPTION) -> None:
    """List the @production moves waiting for a second account's approval, oldest first."""
    settings = settings_for(model_name)
    require_access(settings, "models")
    if settings.promotions_url:
        listed = _ask(settings, "GET", "/requests", {}, None).get("requests") or []
        lines = [str(asked.get("line")) for asked in listed]
    else:
        try:
            lines = [asked.line() for asked in approval.requests(settings)]
        except RegistryError as exc:
            fail(str(exc))
    if not lines:
        console.print(f"no requests of {settings.model_name} wait for approval", highlight=False)
    for line in lines:
        console.print(literal(line), highlight=False)


@app.command()
def evalset(
    size: int = typer.Option(2000, min=0, help="generated images (fixed seed)"),
    folder: str | None = typer.Option(
        None, help="also include images named <label>.png from here (--size 0: only these)"
    ),
    alphabet: str | None = typer.Option(
        None,
        "--alphabet",
        help="characters of generated labels (default: 0-9A-Z)",
    ),
    length: str = typer.Option("4-4", "--length", help="generated label lengths MIN-MAX, e.g. 4-6"),
    replace: bool = typer.Option(False, "--replace", help="make a new set even if one exists"),
    model_name: str | None = MODEL_NAME_OPTION,
) -> None:
    """Create the frozen evaluation set every version is judged on (stored by digest)."""
    settings = settings_for(model_name)
    require_access(settings, "evalset")
    try:
        lengths = parse_length(length)
    except ValueError as exc:
        fail(str(exc))
    if alphabet is not None and (not alphabet or any(ch.isspace() for ch in alphabet)):
        fail("--alphabet needs at least one character and no spaces, e.g. --alphabet 0123456789")
    try:
        with one_line_errors(settings):
            made = create_evalset(
                client(settings),
                settings,
                size=size,
                folder=Path(folder) if folder else None,
                alphabet=alphabet or DIGITS_UPPER,
                length=lengths,
                replace=replace,
            )
    except RegistryError as exc:
        fail(str(exc))
    if made.unpinned_run:  # the promotion service computes its digest and signs the pin
        try:
            pin_evalset(settings, made, replace=replace)
        except ServiceError as exc:
            fail(str(exc))
    console.print(
        f"frozen evaluation set {made.digest} of {settings.model_name} "
        f"({len(made)} images, seed {made.seed})",
        highlight=False,
    )


promotions_app = typer.Typer(
    help="Signed alias moves: model servers follow only moves signed by the promotion key.",
    no_args_is_help=True,
)
app.add_typer(promotions_app, name="promotions")


@promotions_app.command("adopt")
def promotions_adopt(
    actor: str | None = ACTOR_OPTION,
    model_name: str | None = MODEL_NAME_OPTION,
) -> None:
    """Sign where @production, @staging and @canary point now (once, after an upgrade), so the
    model servers keep serving what they served."""
    settings = settings_for(model_name)
    require_access(settings, "promote")
    if settings.promotions_url:  # the service checks the caller is an admin and signs
        lines = [
            str(line) for line in _ask(settings, "POST", "/adopt", {}, actor).get("lines") or []
        ]
        if not lines:
            console.print(f"{settings.model_name} has no @production, @staging or @canary to sign")
        for line in lines:
            console.print(literal(f"signed: {line}"), highlight=False)
        return
    who = audited_actor(settings, actor) or default_actor()
    try:
        with one_line_errors(settings):
            mlflow_client = client(settings)
            require_model(mlflow_client, settings)
            adopted = adopt_aliases(
                mlflow_client,
                settings.model_name,
                actor=who,
                key_dir=signing_key_dir(settings),
            )
    except RegistryError as exc:
        fail(str(exc))
    if not adopted:
        console.print(f"{settings.model_name} has no @production, @staging or @canary to sign")
    for move in adopted:
        console.print(literal(f"signed: {move.line()}"), highlight=False)


@promotions_app.command("serve")
def promotions_serve(
    port: int | None = typer.Option(
        None, "--port", help="port to listen on [CAPTCHAOPS_PROMOTIONS_PORT, 8890]"
    ),
    host: str | None = typer.Option(
        None, "--host", help="address to bind [CAPTCHAOPS_HOST, 127.0.0.1]"
    ),
) -> None:
    """Run the promotion service: the one process that holds the promotion key and moves
    @production for the callers the tracking server vouches for (CAPTCHAOPS_PROMOTIONS_URL)."""
    settings = settings_for(None)
    run_promotions(settings, port or settings.promotions_port, host)
