"""The commands' side of the promotion service: one HTTP call, its answer or one line why not.

With CAPTCHAOPS_PROMOTIONS_URL set, every command that would sign sends its work here instead of
running it with a local key: `promote` (also --canary), `approve`, `rollback` (also --canary),
`requests`, `promotions adopt`, `evalset`'s pin and `train`'s @staging move. The caller's tracking-server login (team mode)
travels as HTTP Basic; the service asks the tracking server who that is.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import httpx

from captchaops.access import login
from captchaops.decisions import gate
from captchaops.registry.names import default_actor
from captchaops.settings import Settings
from captchaops.stack.promotions_wire import exchange

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from captchaops.evaluation.evalset import EvalSet

TIMEOUT_S = 300.0
"""A promotion scores both versions on the frozen set before it moves: allow for that."""


class ServiceError(Exception):
    """The service did not do the work; the message is the one line a command prints."""


def ask(
    settings: Settings,
    method: str,
    path: str,
    body: dict[str, Any] | None = None,
    *,
    actor: str | None = None,
) -> dict[str, Any]:
    """Send one piece of work to the promotion service for the settings' scheme; its answer."""
    base = (settings.promotions_url or "").rstrip("/")
    # Team mode: the service names the account the tracking server vouches for, and `actor`
    # only beside it when one was given (--actor); locally, the name is the audit trail's.
    given = actor if settings.auth else actor or default_actor()
    payload = {"model": settings.model_name, "actor": given, **(body or {})}
    fields = payload if method == "POST" else {"model": settings.model_name}
    try:
        status, found = exchange(base, method, path, fields, login(settings), TIMEOUT_S)
    except httpx.HTTPError as exc:
        raise ServiceError(
            f"the promotion service at {base} does not answer ({type(exc).__name__}); start it "
            "with `captchaops promotions serve`, or check CAPTCHAOPS_PROMOTIONS_URL"
        ) from exc
    if found is None:
        raise ServiceError(
            f"the promotion service at {base} answered HTTP {status} without JSON; "
            "check CAPTCHAOPS_PROMOTIONS_URL names the promotion service"
        )
    if status >= 400:
        detail = str(found.get("detail") or found.get("error") or f"HTTP {status}")
        raise ServiceError(detail.splitlines()[0] if detail else detail)
    return found


def stage_candidate(
    mlflow_client: MlflowClient,
    settings: Settings,
    version: str,
    accuracy: float,
    *,
    actor: str | None = None,
) -> str | None:
    """`decisions.gate.stage_candidate`, by the promotion service where one signs for the stack
    (it reads the accuracy the version's run logged and applies its own staging floor); the
    rejection reason, or None when staged. ServiceError when the service did not decide."""
    if not settings.promotions_url:
        return gate.stage_candidate(mlflow_client, settings, version, accuracy, actor=actor)
    answer = ask(settings, "POST", "/stage", {"version": version}, actor=actor)
    result = answer.get("result")
    if result == "staged":
        return None
    if result == "rejected" and isinstance(answer.get("rejection"), str):
        return str(answer["rejection"])
    raise ServiceError(
        f"the promotion service at {settings.promotions_url} answered {result!r} to staging "
        f"v{version}, neither staged nor rejected: check CAPTCHAOPS_PROMOTIONS_URL"
    )


def pin_evalset(settings: Settings, evalset: EvalSet, *, replace: bool = False) -> None:
    """Have the promotion service pin a frozen set this process logged but did not sign
    (`EvalSet.unpinned_run`); nothing for a set already pinned. ServiceError when it did not
    pin that very set (it computes the digest from the logged archive itself)."""
    if not evalset.unpinned_run:
        return
    answer = ask(settings, "POST", "/evalset", {"run": evalset.unpinned_run, "replace": replace})
    if answer.get("result") != "pinned" or answer.get("digest") != evalset.digest:
        raise ServiceError(
            f"the promotion service at {settings.promotions_url} did not pin the frozen set "
            f"{evalset.digest[:12]} (it answered {answer.get('result')!r}, digest "
            f"{str(answer.get('digest'))[:12]}): check CAPTCHAOPS_PROMOTIONS_URL"
        )
