"""The names the registry works with: aliases, scheme (registered model) names, actors, times."""

from __future__ import annotations

import getpass
from datetime import UTC, datetime
from typing import Protocol
from urllib.parse import urlsplit

from captchaops.registry.errors import RegistryError
from captchaops.scheme_names import CANARY, MODEL_NAME, RESERVED_SUFFIX, model_name_problem

PRODUCTION = "production"
STAGING = "staging"
__all__ = ["CANARY", "MODEL_NAME", "PRODUCTION", "RESERVED_SUFFIX", "STAGING", "check_model_name"]


def check_model_name(name: str) -> str:
    """The name of a scheme's registered model, if usable; a one-line `RegistryError` if not."""
    problem = model_name_problem(name)
    if problem:
        raise RegistryError(problem)
    return name


def default_actor() -> str:
    """Who is acting when nobody says: the login name of this process."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


class _HasTrackingUri(Protocol):
    @property
    def tracking_uri(self) -> str: ...


def client_actor(mlflow_client: _HasTrackingUri) -> str:
    """Who acts through a client: the account it authenticates as (team mode), else the login."""
    return urlsplit(str(mlflow_client.tracking_uri)).username or default_actor()


def now() -> str:
    """The current UTC time as the registry writes it (ISO 8601, seconds)."""
    return datetime.now(UTC).isoformat(timespec="seconds")
