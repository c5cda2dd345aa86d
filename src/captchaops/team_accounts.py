"""Team accounts on the tracking server's basic-auth: one role per person, one service account.

Least privilege: visitors' uploads (the feedback experiment, corrections and review items alike)
are readable only by the service account and admins; readers and editors get DENY on
it, explicitly, because the server's default permission is READ. The names only the product
should make (the feedback and the scheme's monitoring experiment, and the scheme's registered
model unless an account that may train the scheme made it) are not adopted when another non-admin
account created them first (it would hold MANAGE on them): that is refused in one line that names
the account and the fix."""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from typing import Any

from captchaops.access import AUDIT_EXPERIMENT, EVAL_EXPERIMENT
from captchaops.live import monitoring
from captchaops.registry.rest_writes import ensure_registered_model
from captchaops.settings import Settings
from captchaops.tracking_rest import MISSING, TrackingError, TrackingRest, TrackingUnreachable

ROLES = ("reader", "editor", "admin")
MIN_PASSWORD = 12
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")


class UsersError(Exception):
    """An account could not be created or changed; the message says how to fix it."""


@dataclass(frozen=True)
class Account:
    """A user as `users add` left it; `password` is set only when it was generated here."""

    username: str
    role: str
    grants: tuple[str, ...]
    password: str | None = None


def _admin_auth(settings: Settings) -> tuple[str, str]:
    """The credentials that manage users: the configured client account, else the bootstrap admin."""
    if settings.tracking_username and settings.tracking_password:
        return settings.tracking_username, settings.tracking_password.get_secret_value()
    if settings.admin_password:
        return settings.admin_username, settings.admin_password.get_secret_value()
    raise UsersError(
        "no admin credentials: set CAPTCHAOPS_TRACKING_USERNAME and CAPTCHAOPS_TRACKING_PASSWORD "
        "to an admin account (or run this on the server, whose .env holds CAPTCHAOPS_ADMIN_PASSWORD)"
    )


class _Admin:
    """The tracking server's REST API as an admin sees it, with one-sentence errors."""

    def __init__(self, settings: Settings) -> None:
        self.where = settings.masked()["effective_tracking_uri"]
        self.rest = TrackingRest(settings.effective_tracking_uri, _admin_auth(settings), 30.0)

    def call(self, method: str, path: str, ok_missing: bool = False, **kwargs: Any) -> dict:
        """One JSON call; `{}` for a missing resource when ok_missing is set."""
        try:
            return self.rest.call(method, path, missing_ok=ok_missing, **kwargs)
        except TrackingUnreachable as exc:
            raise UsersError(
                f"cannot reach the tracking server at {self.where}; start it with `captchaops up` "
                "or set CAPTCHAOPS_TRACKING_URI"
            ) from exc
        except TrackingError as exc:
            raise UsersError(self._explain(path, exc)) from exc

    def _explain(self, path: str, exc: TrackingError) -> str:
        if exc.status == 401:
            return (
                f"the tracking server at {self.where} refused user {self.rest.username!r}; check "
                "CAPTCHAOPS_TRACKING_USERNAME/PASSWORD (or CAPTCHAOPS_ADMIN_PASSWORD)"
            )
        if exc.status == 403:
            return f"user {self.rest.username!r} is not an admin; ask an admin to run this"
        if exc.status == 404 and "/users/" in path and exc.error_code != MISSING:
            return (
                f"the tracking server at {self.where} has no user management; start it in team "
                "mode (CAPTCHAOPS_AUTH=true, or --app-name basic-auth)"
            )
        return str(exc)

    def experiment_id(self, name: str) -> str:
        """The id of an experiment, creating it when missing."""
        found = self.call(
            "GET", "/api/2.0/mlflow/experiments/get-by-name", True, params={"experiment_name": name}
        )
        if found:
            return str(found["experiment"]["experiment_id"])
        made = self.call("POST", "/api/2.0/mlflow/experiments/create", json={"name": name})
        return str(made["experiment_id"])

    def registered_model(self, name: str) -> str:
        """The name of a registered model, created through the registry when missing."""
        return ensure_registered_model(self.call, name)

    def squatters(
        self, kind: str, resource: str, allowed: set[str], trusted: tuple[str, str] | None = None
    ) -> list[str]:
        """Non-admin accounts (outside `allowed`) holding MANAGE on a resource: whoever made it;
        those with EDIT or MANAGE on the `trusted` (kind, resource) are not counted."""
        users = self.call("GET", "/api/2.0/mlflow/users/list").get("users", [])
        found = []
        for user in users:
            name = str(user.get("username", ""))
            if user.get("is_admin") or name in allowed:
                continue
            grants = self.call(
                "GET", "/api/3.0/mlflow/users/permissions/list", params={"username": name}
            ).get("permissions", [])
            levels = {
                (str(g.get("resource_type")), str(g.get("resource_pattern"))): str(
                    g.get("permission", "")
                ).upper()
                for g in grants
            }
            if levels.get((kind, resource)) == "MANAGE" and (
                trusted is None or levels.get(trusted) not in ("EDIT", "MANAGE")
            ):
                found.append(name)
        return found

    def user_exists(self, username: str) -> bool:
        """True when basic-auth knows this user."""
        return bool(
            self.call("GET", "/api/2.0/mlflow/users/get", True, params={"username": username})
        )

    def grant(self, username: str, kind: str, resource: str, permission: str) -> None:
        """Give a user a permission on one experiment or registered model (replacing an old one)."""
        target = {"username": username, "resource_type": kind, "resource_id": resource}
        grant = {**target, "permission": permission}
        try:
            self.call("POST", "/api/3.0/mlflow/users/permissions/grant", json=grant)
        except UsersError as exc:
            if "RESOURCE_ALREADY_EXISTS" not in str(exc):
                raise
            self.call("POST", "/api/3.0/mlflow/users/permissions/revoke", json=target)
            self.call("POST", "/api/3.0/mlflow/users/permissions/grant", json=grant)


def _grants(settings: Settings, role: str) -> list[tuple[str, str, str]]:
    """(resource type, name, permission) a role gets; promotion is a registry write (EDIT).
    `promotions` (the promotion service's own account, never a user's role) writes as an editor
    and holds MANAGE on the registered model, which deleting an alias (@canary) needs."""
    if role == "admin":
        return []
    write = "EDIT" if role in ("editor", "promotions") else "READ"
    return [
        ("experiment", settings.experiment_name, write),
        ("experiment", EVAL_EXPERIMENT, write),
        ("experiment", AUDIT_EXPERIMENT, write),
        ("experiment", settings.feedback_experiment, "DENY"),
        ("registered_model", settings.model_name, "MANAGE" if role == "promotions" else write),
    ]


def _apply(admin: _Admin, username: str, grants: list[tuple[str, str, str]]) -> tuple[str, ...]:
    done = []
    for kind, name, permission in grants:
        resource = (
            admin.experiment_id(name) if kind == "experiment" else admin.registered_model(name)
        )
        admin.grant(username, kind, resource, permission)
        done.append(f"{permission} {kind.replace('_', ' ')} {name}")
    return tuple(done)


def _check(username: str, password: str | None) -> None:
    if not _NAME.match(username):
        raise UsersError(
            f"{username!r} is not a valid user name; use up to 64 letters, digits, '.', '_', '@' or '-'"
        )
    if password is not None and len(password) < MIN_PASSWORD:
        raise UsersError(f"the password must have at least {MIN_PASSWORD} characters")


def add_user(settings: Settings, username: str, role: str, password: str | None = None) -> Account:
    """Create a user with a role's permissions; generate the password unless one is given."""
    if role not in ROLES:
        raise UsersError(f"unknown role {role!r}; choose one of: {', '.join(ROLES)}")
    _check(username, password)
    admin = _Admin(settings)
    if admin.user_exists(username):
        raise UsersError(
            f"user {username!r} already exists; pick another name or change it in the MLflow UI "
            "(Settings > Users)"
        )
    generated = password is None
    password = password or secrets.token_urlsafe(18)
    admin.call(
        "POST", "/api/2.0/mlflow/users/create", json={"username": username, "password": password}
    )
    if role == "admin":
        admin.call(
            "PATCH",
            "/api/2.0/mlflow/users/update-admin",
            json={"username": username, "is_admin": True},
        )
        grants: tuple[str, ...] = ("admin: every permission, user management",)
    else:
        grants = _apply(admin, username, _grants(settings, role))
    return Account(username, role, grants, password if generated else None)


def _create_or_refresh(admin: _Admin, username: str, password: str) -> None:
    """Make the account `username`, or set its password when it exists."""
    if admin.user_exists(username):
        admin.call(
            "PATCH",
            "/api/2.0/mlflow/users/update-password",
            json={"username": username, "password": password},
        )
    else:
        admin.call(
            "POST",
            "/api/2.0/mlflow/users/create",
            json={"username": username, "password": password},
        )


def ensure_service_account(settings: Settings) -> Account:
    """Create or refresh the account model servers and the app use (read + write feedback)."""
    if not settings.service_password:
        raise UsersError(
            "no service account password: set CAPTCHAOPS_SERVICE_PASSWORD (captchaops up "
            "generates one in team mode)"
        )
    username, password = settings.service_username, settings.service_password.get_secret_value()
    _check(username, password)
    admin = _Admin(settings)
    _create_or_refresh(admin, username, password)
    private = [
        ("experiment", settings.feedback_experiment, "EDIT"),
        ("experiment", monitoring.experiment_name(settings.model_name), "EDIT"),
    ]
    _refuse_squatted(admin, settings, username)
    grants = [
        *(g for g in _grants(settings, "reader") if g[1] != settings.feedback_experiment),
        *private,
    ]
    return Account(username, "service", _apply(admin, username, grants))


def ensure_promotions_account(settings: Settings) -> Account:
    """Create or refresh the promotion service's account: not an admin; MANAGE on the scheme's
    registered model (aliases, its tags, version tags; MLflow lets only MANAGE delete an alias,
    which ending a canary does) and EDIT on the experiments it writes runs in:
    the audit trail (moves, requests, the promotion lock), the frozen sets (a first gate run
    makes one) and the training experiment (the gate logs each scored version's report into the
    version's own run). Visitors' uploads stay DENY."""
    if not settings.promotions_password:
        raise UsersError(
            "no promotion service password: set CAPTCHAOPS_PROMOTIONS_PASSWORD (captchaops up "
            "generates one in team mode)"
        )
    username = settings.promotions_username
    password = settings.promotions_password.get_secret_value()
    _check(username, password)
    admin = _Admin(settings)
    _create_or_refresh(admin, username, password)
    return Account(username, "promotions", _apply(admin, username, _grants(settings, "promotions")))


def _refuse_squatted(admin: _Admin, settings: Settings, service: str) -> None:
    """UsersError when another non-admin account made a name only the product should: the
    feedback or the monitoring experiment, or the scheme's registered model when that account
    may not train the scheme (editors make models by training, by design)."""
    experiments = (settings.feedback_experiment, monitoring.experiment_name(settings.model_name))
    found = [
        (f"experiment {name!r}", who)
        for name in experiments
        for who in admin.squatters("experiment", admin.experiment_id(name), {service})
    ]
    trainers = ("experiment", admin.experiment_id(settings.experiment_name))
    model = admin.registered_model(settings.model_name)
    found += [
        (f"registered model {model!r}", who)
        for who in admin.squatters("registered_model", model, {service}, trainers)
    ]
    if found:
        what, who = found[0]
        raise UsersError(
            f"the {what} was created by user {who!r}, not by captchaops, so the service account "
            f"will not use it; delete it (MLflow UI) or revoke {who!r}'s MANAGE on it, then run "
            "`captchaops users service` again"
        )
