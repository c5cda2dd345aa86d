"""Team mode: who this command logs in as, and whether that account may do what it is about to.

A command that writes (`train`, `promote`, `rollback`, `evalset`) or reads (`models`) checks its
login and its permissions here first, with one cheap authenticated read of the account's own
grants (`/users/current/permissions`, which any logged-in user may read), so that a missing
login or a missing role fails in one line that names the fix before any data is read or any
run is started. A tracking server without basic-auth (404 there) passes every check.

That check is a convenience and fails open. `require` is the strict one, for a process that acts
for others with more rights than they hold (the promotion service): anything it does not
understand refuses, the registered model must exist, and only an explicit grant at the needed
level on it (or an admin account) allows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx

from captchaops.settings import Settings, mask_credentials

PERMISSIONS = "/api/3.0/mlflow/users/current/permissions"
LOOKUP = {
    "experiment": ("/api/2.0/mlflow/experiments/get-by-name", "experiment_name"),
    "registered_model": ("/api/2.0/mlflow/registered-models/get", "name"),
}
MISSING = "RESOURCE_DOES_NOT_EXIST"
LEVELS = {"NO_PERMISSIONS": 0, "DENY": 0, "READ": 1, "USE": 1, "EDIT": 2, "MANAGE": 3}
ROLE_FOR = {1: "reader", 2: "editor", 3: "admin"}
# Experiments captchaops writes besides the settings' experiment_name and feedback_experiment.
# Their owners (data/frozen.py, registry/audit.py) sit in layers above this one and import MLflow;
# repeating the names keeps `captchaops users` quick, and tests/unit/test_users.py checks them.
EVAL_EXPERIMENT = "text-captcha-evaluation"
AUDIT_EXPERIMENT = "text-captcha-promotions"


class AccessError(Exception):
    """The account cannot do what the command is about to do; the message names the fix."""


class Unverified(Exception):
    """The tracking server's answers do not show who may do what; a strict check refuses."""


@dataclass(frozen=True)
class Need:
    """A permission an action needs: a level on a resource (an experiment or registered model)."""

    kind: str  # "experiment" or "registered_model"
    name: str
    level: str = "EDIT"


def needs(settings: Settings, action: str) -> list[Need]:
    """What each command needs beyond logging in; readers need nothing more than a login."""
    model = Need("registered_model", settings.model_name)
    if action == "train":
        return [Need("experiment", settings.experiment_name), model]
    if action in ("promote", "rollback", "approve"):
        return [model, Need("experiment", AUDIT_EXPERIMENT)]
    if action == "evalset":
        return [model, Need("experiment", EVAL_EXPERIMENT)]
    return []


def login(settings: Settings) -> tuple[str, str] | None:
    """The account MLflow would use: the settings', else MLFLOW_TRACKING_USERNAME/PASSWORD or
    ~/.mlflow/credentials (read by MLflow's own helper); None when there is none."""
    if settings.tracking_username and settings.tracking_password:
        return settings.tracking_username, settings.tracking_password.get_secret_value()
    # here, not at the top: model servers and the web app import this module and stay MLflow-free
    from mlflow.utils.credentials import read_mlflow_creds

    creds = read_mlflow_creds()
    if creds.username and creds.password:
        return creds.username, creds.password
    return None


def how_to_log_in(settings: Settings) -> str:
    """The one sentence that says where a login goes."""
    env_file = settings.home_dir / ".env"
    return (
        "log in with CAPTCHAOPS_TRACKING_USERNAME and CAPTCHAOPS_TRACKING_PASSWORD (in the "
        f"environment or {env_file}), or in ~/.mlflow/credentials under [mlflow] "
        "(mlflow_tracking_username = ..., mlflow_tracking_password = ...)"
    )


def refused_login(settings: Settings, username: str | None) -> str:
    """The 401 message: who was refused (or that nobody logged in) and how to log in."""
    where = mask_credentials(settings.effective_tracking_uri)
    if username:
        return (
            f"the tracking server at {where} refused user {username!r} (401): check the "
            f"password, or {how_to_log_in(settings)}"
        )
    return f"the tracking server at {where} needs a login (401): {how_to_log_in(settings)}"


def denied(settings: Settings, username: str, action: str, missing: list[Need]) -> str:
    """The 403 message: the account, the action, the role and permissions it needs."""
    level = max(LEVELS[need.level] for need in missing)
    what = ", ".join(
        f"{need.level} on {need.kind.replace('_', ' ')} {need.name}" for need in missing
    )
    return (
        f"user {username!r} may not {action} {settings.model_name}: that needs the "
        f"{ROLE_FOR[level]} role ({what}); ask an admin to give it to {username!r} "
        "(MLflow UI: Settings > Users, or `captchaops users add NAME --role editor` for a new account)"
    )


def explain(settings: Settings, message: str) -> str | None:
    """A tracking error's first line in words that name the fix, for a 401 or a 403; else None."""
    if "error code 401" in message or "UNAUTHENTICATED" in message:
        return refused_login(settings, (login(settings) or (None,))[0])
    if "error code 403" in message or "PERMISSION_DENIED" in message:
        account = login(settings)
        who = f"user {account[0]!r}" if account else "this account"
        return (
            f"{who} may not do this on {settings.model_name} (403): it needs the editor role "
            "(EDIT on the model and its experiments); ask an admin to give it"
        )
    return None


def _level(grants: list[dict[str, str]], kind: str, resource: str) -> int:
    """The best level the grants give on one resource (MLflow's default READ when none do)."""
    found = [
        LEVELS.get(str(g.get("permission", "")).upper(), 0)
        for g in grants
        if g.get("resource_type") == kind and g.get("resource_pattern") in (resource, "*")
    ]
    return max(found) if found else LEVELS["READ"]


def check(settings: Settings, action: str, timeout: float = 15.0) -> None:
    """Nothing when the account may do `action`; an `AccessError` naming the fix when not."""
    account = login(settings)
    base = settings.effective_tracking_uri.rstrip("/")
    try:
        with httpx.Client(base_url=base, auth=account, timeout=timeout) as http:
            answer = http.get(PERMISSIONS)
            if answer.status_code == 404:  # no basic-auth: nothing to check
                return
            if answer.status_code == 401:
                raise AccessError(refused_login(settings, account[0] if account else None))
            if answer.status_code != 200:
                return
            body = answer.json()
            if body.get("is_admin") or account is None:
                return
            grants = list(body.get("permissions") or [])
            missing = []
            for need in needs(settings, action):
                path, param = LOOKUP[need.kind]
                found = http.get(path, params={param: need.name})
                if found.status_code != 200:  # not made yet: whoever makes it may use it
                    continue
                body = found.json()
                resource = (
                    str(body["experiment"]["experiment_id"])
                    if need.kind == "experiment"
                    else need.name
                )
                if _level(grants, need.kind, resource) < LEVELS[need.level]:
                    missing.append(need)
    except (httpx.HTTPError, ValueError, KeyError):
        return  # unreachable or odd: the command's own call reports that in its own words
    if missing:
        raise AccessError(denied(settings, account[0], action, missing))


def _strict_level(grants: list[Any], kind: str, resource: str) -> int:
    """The level explicit grants give on one resource: its own grants over `*` ones, any DENY
    wins, and no grant is no permission (never the server's default)."""
    rows = [g for g in grants if g.get("resource_type") == kind]
    own = [g for g in rows if g.get("resource_pattern") == resource]
    levels = [
        LEVELS.get(str(g.get("permission", "")).upper(), 0)
        for g in (own or [g for g in rows if g.get("resource_pattern") == "*"])
    ]
    return 0 if not levels or 0 in levels else max(levels)


def require(settings: Settings, action: str, timeout: float = 15.0) -> None:
    """Nothing only when the tracking server shows the account may do `action` on an existing
    registered model; `AccessError` (a refusal) or `Unverified` (no answer to trust) otherwise."""
    account = login(settings)
    if account is None:
        raise AccessError(refused_login(settings, None))
    base = settings.effective_tracking_uri.rstrip("/")
    where = mask_credentials(base)
    unverified = f"the tracking server at {where} does not show what {account[0]!r} may do"
    fix = "run it with basic-auth (team mode) and check that it answers"
    # Every action acts on the scheme: the model must exist and be readable at least.
    wanted = needs(settings, action) or [Need("registered_model", settings.model_name, "READ")]
    try:
        with httpx.Client(base_url=base, auth=account, timeout=timeout) as http:
            answer = http.get(PERMISSIONS)
            if answer.status_code == 401:
                raise AccessError(refused_login(settings, account[0]))
            if answer.status_code != 200:
                raise Unverified(
                    f"{unverified} (HTTP {answer.status_code} on {PERMISSIONS}); {fix}"
                )
            body = answer.json()
            grants = body.get("permissions") if isinstance(body, dict) else None
            admin = body.get("is_admin") if isinstance(body, dict) else None
            if not isinstance(admin, bool) or not isinstance(grants, list):
                raise Unverified(f"{unverified} (an unknown answer on {PERMISSIONS}); {fix}")
            if not all(isinstance(g, dict) for g in grants):
                raise Unverified(f"{unverified} (an unknown grant on {PERMISSIONS}); {fix}")
            missing = []
            for need in wanted:
                path, param = LOOKUP[need.kind]
                found = http.get(path, params={param: need.name})
                if found.status_code == 403:
                    missing.append(need)
                    continue
                absent = found.status_code == 404 and found.json().get("error_code") == MISSING
                if absent and need.kind == "registered_model":
                    raise AccessError(
                        f"there is no registered model {need.name!r} on {where}: train the "
                        "scheme first (`captchaops train`)"
                    )
                if absent:
                    continue  # an audit or evaluation experiment made later; the model decides
                if found.status_code != 200:
                    raise Unverified(f"{unverified} (HTTP {found.status_code} on {path}); {fix}")
                resource = (
                    str(found.json()["experiment"]["experiment_id"])
                    if need.kind == "experiment"
                    else need.name
                )
                if not admin and _strict_level(grants, need.kind, resource) < LEVELS[need.level]:
                    missing.append(need)
    except (httpx.HTTPError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise Unverified(f"{unverified} ({type(exc).__name__}); {fix}") from exc
    if missing:
        raise AccessError(denied(settings, account[0], action, missing))
