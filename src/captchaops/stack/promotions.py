"""The promotion service: the one process that holds the promotion key and moves @production.

Clients (every command that would sign, with CAPTCHAOPS_PROMOTIONS_URL set: `promote` and its
canaries, `approve`, `rollback`, `requests`, `promotions adopt`, `evalset`'s pin, `train`'s
@staging move) send it what they want and hold no key. It runs the same `decisions.approval` code they would run, with
ITS settings: its home's key, its approval policy, its production server for rollback's live
check, its own tracking-server account. Who the caller is comes from the tracking server, never
from the request:

- team mode (`auth`): each request carries the caller's tracking-server login (HTTP Basic); the
  service asks the tracking server who that is (`/users/current`) and what they may do
  (`access.require` with their login: strict, unlike the commands' own pre-check, since the
  service acts with more rights than its callers), and names that account in every request,
  approval and move. An answer it does not understand refuses (503), never allows.
- local mode: the service answers loopback peers only. Local mode has no accounts, so it trusts
  the name a caller gives (`actor`) as the audit trail's name, as local commands always did;
  what it adds is that the key stays in the service's home, out of the callers' reach.

The work itself (scoring versions on the frozen set, then signing and moving) runs in a worker
process the kernel limits (`LimitedWork`), so a version's network cannot take the service down.

A body holds only the fields its endpoint knows, each of its type; anything else is a 400.
Answers are JSON: `{"result", "line", ...}`, or `{"error", "detail"}` with 400, 401, 403, 404,
405, 409 (the registry refused: the one line a command prints), 413 or 503.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import ipaddress
import logging
import math
import multiprocessing
import os
import resource
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

import httpx
import uvicorn
from pydantic import SecretStr
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse
from starlette.routing import Route

from captchaops import bounded_json
from captchaops.access import PERMISSIONS, AccessError, Unverified, require
from captchaops.canary import moves as canaries
from captchaops.decisions import approval, gate, promotion
from captchaops.decisions.gate_rules import GateConfig
from captchaops.evaluation.evalset import pin_logged
from captchaops.mlflow_scope import client
from captchaops.model import decode_worker
from captchaops.registry.aliases import adopt_aliases, require_model
from captchaops.registry.audit import Move
from captchaops.registry.errors import RegistryError, one_line_errors
from captchaops.registry.names import PRODUCTION
from captchaops.registry.requests import Request
from captchaops.registry.signing import ensure_key
from captchaops.scheme_names import model_name_problem
from captchaops.service_auth import allowed_hosts, bind_names, host_allowed
from captchaops.serving import connections
from captchaops.settings import Settings, mask_credentials

log = logging.getLogger(__name__)
MAX_BODY = 64 * 1024
MAX_TEXT = 4000
CURRENT_USER = "/api/2.0/mlflow/users/current"
GATE_OPTIONS = ("margin", "floor", "cer_tolerance", "latency_ratio", "latency_slack_ms")
"""The `promote --auto` thresholds a caller may set (as the command's options)."""
AUTH_TIMEOUT_S = 15.0
COMMON = frozenset({"model", "alias", "actor"})
FIELDS = {
    "promote": COMMON | {"auto", "reason", "version", "from", "force", "canary", *GATE_OPTIONS},
    "rollback": COMMON | {"to", "reason"},
    "approve": COMMON | {"request"},
    "models": frozenset({"model"}),
    "canary": COMMON | {"version", "from", "percent", "reason"},
    "canary_end": COMMON | {"version", "reason", "tripped"},
    "stage": COMMON | {"version"},
    "adopt": COMMON,
    "evalset": COMMON | {"run", "replace"},
}
"""The fields each action's body (or query) may hold; any other is refused, never ignored."""
CHECKED_AS = {"canary": "promote", "canary_end": "rollback", "stage": "train", "adopt": "promote"}
"""The `access.needs` action an endpoint's caller is checked for, where it is not its own name."""


class Refused(Exception):
    """An answer other than the work: an HTTP status, a short error and the one-line detail."""

    def __init__(self, status: int, error: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.error, self.detail = status, error, detail


@dataclass(frozen=True)
class Caller:
    """Who sent a request, as the service knows them."""

    account: str
    """The account the tracking server authenticated; locally, the name the caller gave."""
    actor: str
    """How the audit trail names them (`alice`, or `alice (as ci-bot)`)."""


def _login(header: str | None) -> tuple[str, str]:
    """The (username, password) of a Basic Authorization header; Refused 401 without one."""
    fix = "log in with CAPTCHAOPS_TRACKING_USERNAME and CAPTCHAOPS_TRACKING_PASSWORD"
    scheme, _, value = (header or "").partition(" ")
    if scheme.lower() != "basic" or not value:
        raise Refused(401, "login required", f"the promotion service needs a login: {fix}")
    try:
        username, sep, password = base64.b64decode(value, validate=True).decode().partition(":")
    except (binascii.Error, ValueError) as exc:
        raise Refused(401, "login required", f"the login header is not Basic: {fix}") from exc
    if not sep or not username:
        raise Refused(401, "login required", f"the login header names nobody: {fix}")
    if not password:  # an empty one would make the account check fall back to the service's own
        raise Refused(401, "login required", f"the login header has no password: {fix}")
    return username, password


def _who(settings: Settings, login: tuple[str, str]) -> str:
    """The account name the tracking server gives this login; Refused 401 when it refuses it."""
    base = settings.effective_tracking_uri.rstrip("/")
    shown = mask_credentials(base)
    try:
        answer = httpx.get(base + CURRENT_USER, auth=login, timeout=AUTH_TIMEOUT_S)
    except httpx.HTTPError as exc:
        raise Refused(
            503, "tracking server unreachable", f"the promotion service cannot reach {shown}"
        ) from exc
    if answer.status_code == 401:
        raise Refused(
            401,
            "login refused",
            f"the tracking server refused user {login[0]!r}: check the password",
        )
    try:
        name = answer.json()["user"]["username"]
    except (ValueError, KeyError, TypeError) as exc:
        raise Refused(
            503,
            "no account check",
            f"the tracking server at {shown} does not say who logged in (HTTP "
            f"{answer.status_code}); run it with basic-auth (team mode)",
        ) from exc
    if not isinstance(name, str) or not name:
        raise Refused(503, "no account check", "the tracking server named no account")
    return name


def _given_actor(body: dict[str, Any]) -> str | None:
    """The `actor` a caller names (its --actor); None when it names none."""
    given = body.get("actor")
    if given is None or given == "":
        return None
    if not isinstance(given, str) or len(given) > 200 or not given.isprintable():
        raise Refused(400, "bad actor", "actor must be printable text of at most 200 characters")
    return given


def _require_admin(settings: Settings, login: tuple[str, str], action: str) -> None:
    """Nothing when the tracking server says this login is an admin; Refused 403 (or 503 when
    its answer does not say) otherwise."""
    base = settings.effective_tracking_uri.rstrip("/")
    try:
        answer = httpx.get(base + PERMISSIONS, auth=login, timeout=AUTH_TIMEOUT_S)
        admin = answer.json().get("is_admin") if answer.status_code == 200 else None
    except (httpx.HTTPError, ValueError, AttributeError) as exc:
        raise Refused(
            503,
            "no account check",
            f"the tracking server does not say whether {login[0]!r} is an admin",
        ) from exc
    if not isinstance(admin, bool):
        raise Refused(
            503,
            "no account check",
            f"the tracking server does not say whether {login[0]!r} is an admin",
        )
    if not admin:
        raise Refused(
            403,
            "forbidden",
            f"user {login[0]!r} may not adopt {settings.model_name}'s aliases: signing what "
            "the aliases hold now needs an admin account"
            if action == "adopt"
            else f"user {login[0]!r} may not replace {settings.model_name}'s frozen evaluation "
            "set: the set the gate judges on is changed by an admin account",
        )


def authenticate(
    settings: Settings, request: HttpRequest, body: dict[str, Any], action: str
) -> Caller:
    """Who the caller is and that they may do `action` (`access.needs`; `adopt`: an admin);
    Refused when not."""
    given = _given_actor(body)
    if not settings.auth:
        peer = request.client.host if request.client else ""
        try:
            loopback = ipaddress.ip_address(peer).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise Refused(
                403,
                "loopback only",
                "in local mode the promotion service answers this host only; use team mode "
                "(CAPTCHAOPS_AUTH=true) to reach it from elsewhere",
            )
        name = given or "unknown"
        return Caller(account=name, actor=name)
    login = _login(request.headers.get("authorization"))
    account = _who(settings, login)
    caller = settings.model_copy(
        update={"tracking_username": login[0], "tracking_password": SecretStr(login[1])}
    )
    try:
        require(caller, CHECKED_AS.get(action, action), timeout=AUTH_TIMEOUT_S)
    except AccessError as exc:
        raise Refused(403, "forbidden", str(exc)) from exc
    except Unverified as exc:
        raise Refused(503, "no account check", str(exc)) from exc
    if action == "adopt" or (action == "evalset" and body.get("replace") is True):
        _require_admin(
            settings, login, action
        )  # replacing the set the gate judges on is an admin's
    actor = account if given in (None, account) else f"{account} (as {given})"
    return Caller(account=account, actor=actor)


def _not_from_a_browser(request: HttpRequest) -> None:
    """Refused 403 for a request a web browser made: its callers are the commands and the web
    app's server side, none of which sends Origin or Sec-Fetch-*. A page the developer opens
    could otherwise post a form to 127.0.0.1, which local mode's loopback check lets through."""
    if "origin" in request.headers or "sec-fetch-site" in request.headers:
        raise Refused(
            403,
            "browser request",
            "the promotion service answers the captchaops commands and the web app's "
            "approvals page, not a browser",
        )


async def _body(request: HttpRequest) -> dict[str, Any]:
    """The JSON object of a request (at most MAX_BODY bytes), sent as application/json (a
    browser form cannot send that type without asking first); Refused 400/413/415 otherwise."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":
        raise Refused(415, "not json", "send the request body as Content-Type: application/json")
    raw = b""
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_BODY:
            raise Refused(413, "too large", f"a request body holds at most {MAX_BODY} bytes")
    if not raw:
        return {}
    try:
        body = bounded_json.loads(raw)
    except bounded_json.JsonShapeError as exc:
        raise Refused(400, "bad json", f"the request body is refused: {exc.detail}") from exc
    if not isinstance(body, dict):
        raise Refused(400, "bad json", "the request body is not a JSON object")
    return body


def _text(body: dict[str, Any], field: str, *, required: bool = False) -> str | None:
    """A text field of the body (None when absent); Refused 400 when it is not text."""
    value = body.get(field)
    if value is None or value == "":
        if required:
            raise Refused(400, f"no {field}", f"say {field} in the request")
        return None
    if not isinstance(value, str) or len(value) > MAX_TEXT:
        raise Refused(400, f"bad {field}", f"{field} must be text of at most {MAX_TEXT} characters")
    return value


def _flag(body: dict[str, Any], field: str) -> bool:
    """A true/false field of the body (false when absent); Refused 400 when it is not one."""
    value = body.get(field)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise Refused(400, f"bad {field}", f"{field} must be true or false")
    return value


def _known(body: dict[str, Any], action: str) -> None:
    """Refused 400 when the body holds a field `action` does not know."""
    unknown = sorted(set(body) - FIELDS[action])
    if unknown:
        known = ", ".join(sorted(FIELDS[action]))
        raise Refused(400, "unknown field", f"unknown field {unknown[0]!r}; this takes: {known}")


def _number(body: dict[str, Any], field: str) -> float | None:
    """A number field of the body (None when absent); Refused 400 when it is not a number."""
    value = body.get(field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise Refused(400, f"bad {field}", f"{field} must be a number")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):  # NaN compares false both ways: a gate that passes anything
        raise Refused(400, f"bad {field}", f"{field} must be a finite number")
    return number


def _scheme(settings: Settings, body: dict[str, Any]) -> Settings:
    """The service's settings for the scheme the body names (`model`)."""
    name = _text(body, "model") or settings.model_name
    problem = model_name_problem(name)
    if problem:
        raise Refused(400, "bad model", problem)
    alias = _text(body, "alias") or PRODUCTION
    if alias != PRODUCTION:
        raise Refused(
            400,
            "bad alias",
            f"the promotion service moves @production only; @{alias} moves with `captchaops "
            "train` and `promote --canary`",
        )
    return settings.model_copy(update={"model_name": name})


def _request_json(request: Request) -> dict[str, Any]:
    """A request as the service answers it."""
    return {
        "id": request.id,
        "short_id": request.short_id,
        "model": request.model,
        "from_version": request.from_version,
        "to_version": request.to_version,
        "kind": request.kind,
        "requester": request.requester,
        "line": request.line(),
    }


def _outcome(done: Move | Request, moved: str) -> dict[str, Any]:
    """The answer to work that either moved @production (`moved`) or recorded a request."""
    if isinstance(done, Request):
        return {"result": "waiting", "line": done.line(), "request": _request_json(done)}
    return {"result": moved, "line": done.line(), "version": done.to_version}


# The work of each action, run in the service's kernel-limited worker (`LimitedWork`): each
# takes the scheme's settings (the service's own, its key folder among them), the caller and
# the body, and answers JSON, or raises Refused or RegistryError.


def through_gate(scheme: Settings, caller: Caller, body: dict[str, Any]) -> dict[str, Any]:
    """`promote --auto`: the gate, then the move, its request or the audited rejection."""
    config = GateConfig.with_options(**{k: _number(body, k) for k in GATE_OPTIONS})
    decision, outcome = approval.auto_promote(
        scheme,
        config,
        actor=caller.actor,
        reason=_text(body, "reason") or "",
        account=caller.account,
        request_key=scheme.effective_signing_key_dir,
    )
    verdict = f"v{decision.candidate_version}: {decision.reason()}"
    if isinstance(outcome, Request):
        return _outcome(outcome, "promoted") | {"verdict": verdict}
    result = "promoted" if decision.promote else "rejected"
    return {"result": result, "line": verdict, "verdict": verdict}


def promote(scheme: Settings, caller: Caller, body: dict[str, Any]) -> dict[str, Any]:
    """`promote --version N | --from ALIAS` (also a canary's --then-promote): move or request."""
    if _flag(body, "auto"):
        return through_gate(scheme, caller, body)
    version, source = _text(body, "version"), _text(body, "from")
    if (version is None) == (source is None):
        raise Refused(400, "no version", "say which: version N or from an alias (staging)")
    canary = _flag(body, "canary")
    reason = _text(body, "reason", required=True) or ""
    done = approval.promote(
        scheme,
        version=version,
        from_alias=source,
        reason=reason,
        actor=caller.actor,
        force=_flag(body, "force"),
        kind="canary" if canary else "manual",
        account=caller.account,
        request_key=scheme.effective_signing_key_dir,
    )
    if canary and isinstance(done, Move):  # a canary's --then-promote: it leaves @canary
        canaries.end_canary_of(scheme, done.to_version, reason=reason, actor=caller.actor)
    return _outcome(done, "promoted")


def canary(scheme: Settings, caller: Caller, body: dict[str, Any]) -> dict[str, Any]:
    """`promote --canary PERCENT`: give the candidate @canary, or record the request."""
    percent = _number(body, "percent")
    if percent is None or not percent.is_integer():
        raise Refused(400, "bad percent", "percent must be a whole number of 1-50")
    done = approval.start_canary(
        scheme,
        percent=int(percent),
        version=_text(body, "version"),
        from_alias=_text(body, "from"),
        reason=_text(body, "reason") or "",
        actor=caller.actor,
        account=caller.account,
        request_key=scheme.effective_signing_key_dir,
    )
    return _outcome(done, "canary")


def canary_end(scheme: Settings, caller: Caller, body: dict[str, Any]) -> dict[str, Any]:
    """`rollback --canary`, or the end of a canary whose breaker tripped."""
    move = canaries.end_canary(
        scheme,
        reason=_text(body, "reason") or "canary ended by hand",
        actor=caller.actor,
        version=_text(body, "version"),
        tripped=_flag(body, "tripped"),
    )
    return {"result": move.decision, "line": move.line(), "version": move.from_version}


def stage(scheme: Settings, caller: Caller, body: dict[str, Any]) -> dict[str, Any]:
    """`train`'s @staging move: the service's floor on the accuracy the version's run logged."""
    version = _text(body, "version", required=True) or ""
    with one_line_errors(scheme):
        mlflow_client = client(scheme)
        accuracy = promotion.logged_accuracy(mlflow_client, scheme.model_name, version)
        rejection = gate.stage_candidate(
            mlflow_client, scheme, version, accuracy, actor=caller.actor
        )
    result = "rejected" if rejection else "staged"
    line = rejection or f"v{version} @staging: test sequence accuracy {accuracy:.4f}"
    return {"result": result, "line": line, "version": version, "rejection": rejection}


def adopt(scheme: Settings, caller: Caller, body: dict[str, Any]) -> dict[str, Any]:
    """`promotions adopt`: sign where the managed aliases point now (an admin caller only)."""
    with one_line_errors(scheme):
        mlflow_client = client(scheme)
        require_model(mlflow_client, scheme)
        adopted = adopt_aliases(
            mlflow_client,
            scheme.model_name,
            actor=caller.actor,
            key_dir=scheme.effective_signing_key_dir,
        )
    return {"result": "adopted", "lines": [move.line() for move in adopted]}


def evalset(scheme: Settings, caller: Caller, body: dict[str, Any]) -> dict[str, Any]:
    """Pin the frozen set logged in a run, by the digest computed here from its archive."""
    run = _text(body, "run", required=True) or ""
    with one_line_errors(scheme):
        made = pin_logged(
            client(scheme),
            scheme,
            run,
            replace_set=_flag(body, "replace"),
            actor=caller.actor,
        )
    return {"result": "pinned", "digest": made.digest, "images": len(made), "seed": made.seed}


def rollback(scheme: Settings, caller: Caller, body: dict[str, Any]) -> dict[str, Any]:
    """`rollback`: move @production back, or record the request."""
    done = approval.rollback(
        scheme,
        to=_text(body, "to"),
        reason=_text(body, "reason") or "",
        actor=caller.actor,
        account=caller.account,
        request_key=scheme.effective_signing_key_dir,
    )
    return _outcome(done, "rolled-back")


def approve(scheme: Settings, caller: Caller, body: dict[str, Any]) -> dict[str, Any]:
    """`approve ID`: check the request again and make the signed move naming both accounts."""
    asked, move = approval.approve(
        scheme,
        _text(body, "request", required=True) or "",
        actor=caller.actor,
        account=caller.account,
        request_key=scheme.effective_signing_key_dir,
    )
    return {"result": move.decision, "line": move.line(), "request": _request_json(asked)}


def listing(scheme: Settings, caller: Caller, body: dict[str, Any]) -> dict[str, Any]:
    """`requests`: the pending requests."""
    return {"requests": [_request_json(r) for r in approval.requests(scheme)]}


WORK = {
    "promote": promote,
    "rollback": rollback,
    "approve": approve,
    "models": listing,
    "canary": canary,
    "canary_end": canary_end,
    "stage": stage,
    "adopt": adopt,
    "evalset": evalset,
}
"""What each action does; `models` (the request list) reads only and runs in the service."""
WORK_CPU_SECONDS = 900
"""CPU seconds one action may spend in the worker (the gate scores two versions on a frozen set
of up to 100,000 images); past it the kernel ends the worker (SIGXCPU)."""
WORK_MEMORY_BYTES = 6 * 2**30
"""Address space the worker may map beyond what it maps when it starts (MLflow, onnxruntime
and two versions' sessions fit with room); an allocation past it fails."""


def _worked(
    name: str, scheme: Settings, caller: Caller, body: dict[str, Any], cpu_seconds: int
) -> tuple[str, Any]:
    """In the worker: the action `name` within `cpu_seconds` more of CPU (RLIMIT_CPU, as
    `decode_worker.decode_images` sets it per call), its answer or refusal as plain data."""

    usage = resource.getrusage(resource.RUSAGE_SELF)
    _, hard = resource.getrlimit(resource.RLIMIT_CPU)
    budget = math.ceil(usage.ru_utime + usage.ru_stime + cpu_seconds) + 1
    unlimited = hard == resource.RLIM_INFINITY
    resource.setrlimit(resource.RLIMIT_CPU, (budget if unlimited else min(budget, hard), hard))
    return _answer(name, scheme, caller, body)


def _answer(name: str, scheme: Settings, caller: Caller, body: dict[str, Any]) -> tuple[str, Any]:
    """The action `name`'s answer or refusal as plain data; any failure it does not name is a
    one-line 503, never a 500 with a traceback."""
    try:
        return "done", WORK[name](scheme, caller, body)
    except Refused as exc:
        return "refused", (exc.status, exc.error, exc.detail)
    except RegistryError as exc:
        return "registry", str(exc)
    except MemoryError:
        detail = f"the work needed more than {WORK_MEMORY_BYTES // 2**20} MiB of memory"
        return "refused", (503, "stopped", f"{detail}; check `captchaops models` for what moved")
    except Exception as exc:
        log.exception("promotion service: %s failed", name)
        line = (str(exc).splitlines() or [""])[0][:300]
        return "refused", (503, "failed", f"{name} failed: {type(exc).__name__}: {line}")


UNSCORED = frozenset({"rollback", "canary_end"})
"""Actions that run no version's network (they move back to what was served, or end a canary),
run beside the limited worker so a long gate run never holds a rollback back."""


class LimitedWork:
    """The service's actions, run one at a time in a worker process the kernel limits: its
    address space capped and its CPU time per action bounded (`decode_worker.limit_worker`, the
    model servers' decoding workers' initializer; RLIMIT_CPU per call). A version the gate scores
    runs its network there, so a graph that allocates or spins for ever ends the worker, never
    the service; a worker the kernel ended is replaced on the next action."""

    def __init__(
        self, cpu_seconds: int = WORK_CPU_SECONDS, memory_bytes: int = WORK_MEMORY_BYTES
    ) -> None:
        self.cpu_seconds, self.memory_bytes = cpu_seconds, memory_bytes
        self._lock = threading.Lock()
        self._executor: ProcessPoolExecutor | None = None

    def _pool(self) -> ProcessPoolExecutor:
        if self._executor is None:
            self._executor = ProcessPoolExecutor(
                max_workers=1,
                mp_context=multiprocessing.get_context("forkserver"),
                initializer=decode_worker.limit_worker,
                initargs=(self.memory_bytes, os.getpid()),
            )
        return self._executor

    def run(self, name: str, scheme: Settings, caller: Caller, body: dict[str, Any]) -> Any:
        """The answer of action `name`; Refused (503) when the kernel ended the worker."""
        if name in UNSCORED:  # the registry's promotion lock orders it with the others
            return self._unpacked(*_answer(name, scheme, caller, body))
        with self._lock:  # one action at a time, as the promotion lock would order them anyway
            try:
                kind, found = (
                    self._pool()
                    .submit(_worked, name, scheme, caller, body, self.cpu_seconds)
                    .result()
                )
            except BrokenProcessPool as exc:
                if self._executor is not None:
                    self._executor.shutdown(wait=True, cancel_futures=True)  # reaps it
                self._executor = None
                raise Refused(
                    503,
                    "stopped",
                    f"the promotion service's work on {scheme.model_name} ran past its limits "
                    f"({self.cpu_seconds} s of CPU, {self.memory_bytes // 2**20} MiB of memory) "
                    "and was stopped; check `captchaops models`, then try again",
                ) from exc
        return self._unpacked(kind, found)

    @staticmethod
    def _unpacked(kind: str, found: Any) -> Any:
        if kind == "refused":
            raise Refused(*found)
        if kind == "registry":
            raise RegistryError(found)
        return found

    def close(self) -> None:
        """Stop the worker."""
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None


def create_app(settings: Settings) -> Starlette:
    """The service's ASGI app, acting with `settings` (its home's key, policy and servers)."""
    # The service signs: a CAPTCHAOPS_PROMOTIONS_URL in its home (which `up` writes for the
    # callers) names the service itself, never somewhere to send its own work.
    settings = settings.model_copy(update={"promotions_url": None})
    hosts = allowed_hosts(settings) | bind_names(settings.host)
    limited = LimitedWork()

    def guarded(action: str) -> Any:
        async def endpoint(request: HttpRequest) -> JSONResponse:
            try:
                if not host_allowed(request.headers.get("host"), hosts):
                    raise Refused(400, "bad host", "this service does not answer that Host name")
                _not_from_a_browser(request)
                if request.method == "POST":
                    if request.query_params:
                        raise Refused(
                            400, "bad query", "a POST says its fields in its JSON body only"
                        )
                    body = await _body(request)
                else:
                    body = dict(request.query_params)
                    if len(body) != len(request.query_params.multi_items()):
                        raise Refused(400, "bad query", "name each query parameter once")
                _known(body, action)
                scheme = _scheme(settings, body)
                caller = await run_in_threadpool(authenticate, scheme, request, body, action)
                if action == "models":  # reads only
                    answer = await run_in_threadpool(listing, scheme, caller, body)
                else:
                    answer = await run_in_threadpool(limited.run, action, scheme, caller, body)
            except Refused as exc:
                return JSONResponse({"error": exc.error, "detail": exc.detail}, exc.status)
            except RegistryError as exc:
                return JSONResponse({"error": "refused", "detail": str(exc)}, 409)
            return JSONResponse(answer)

        return endpoint

    async def health(request: HttpRequest) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    async def unrouted(request: HttpRequest, exc: Exception) -> JSONResponse:
        status = exc.status_code if isinstance(exc, HTTPException) else 404
        paths = (
            "POST /promote, /rollback, /approve, /canary, /canary/end, /stage, /adopt, /evalset; "
            "GET /requests, /health"
        )
        detail = f"{request.method} {request.url.path} is not an action here; the actions: {paths}"
        return JSONResponse({"error": "no such action", "detail": detail}, status)

    async def failed(request: HttpRequest, exc: Exception) -> JSONResponse:
        log.exception("promotion service failed on %s", request.url.path, exc_info=exc)
        detail = f"the promotion service failed ({type(exc).__name__}); its log says why"
        return JSONResponse({"error": "internal", "detail": detail}, 500)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        limited.close()

    return Starlette(
        lifespan=lifespan,
        exception_handlers={404: unrouted, 405: unrouted, Exception: failed},
        routes=[
            Route("/health", health),
            Route("/promote", guarded("promote"), methods=["POST"]),
            Route("/rollback", guarded("rollback"), methods=["POST"]),
            Route("/approve", guarded("approve"), methods=["POST"]),
            Route("/requests", guarded("models"), methods=["GET"]),
            Route("/canary", guarded("canary"), methods=["POST"]),
            Route("/canary/end", guarded("canary_end"), methods=["POST"]),
            Route("/stage", guarded("stage"), methods=["POST"]),
            Route("/adopt", guarded("adopt"), methods=["POST"]),
            Route("/evalset", guarded("evalset"), methods=["POST"]),
        ],
    )


def run(settings: Settings, port: int, host: str | None = None) -> None:
    """Serve the promotion service on host:port (loopback by default) until stopped, with the
    model servers' connection limits (a deadline for each request head, a cap per client
    address), so slow clients cannot hold its connections, and no core files."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    bind = host or settings.host
    # The private key is in this process's memory (and its workers', which inherit the limit
    # through the forkserver): no core file of any of them may hold it.
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    ensure_key(settings.effective_signing_key_dir)
    log.info(
        "promotion service on http://%s:%d, moves signed with %s (servers trust %s)",
        bind,
        port,
        settings.effective_signing_key_dir,
        settings.effective_signing_public_key,
    )
    uvicorn.run(
        create_app(settings),
        host=bind,
        port=port,
        workers=1,
        access_log=False,
        log_level="info",
        timeout_graceful_shutdown=5,
        timeout_keep_alive=5,
        http=connections.guarded_protocol(  # no trusted proxies: the peer is the caller, so
            settings.head_timeout_seconds,  # local mode's loopback check sees the real one
            settings.max_connections_per_client,
        ),
        proxy_headers=False,  # connections.ForwardedClients decides whom to believe
        limit_concurrency=connections.MAX_CONNECTIONS,
        h11_max_incomplete_event_size=connections.MAX_HEAD_BYTES,
    )
