"""The names the registry works with: aliases, scheme (registered model) names, actors, times."""

from __future__ import annotations

import getpass
from datetime import UTC, datetime

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


def now() -> str:
    """The current UTC time as the registry writes it (ISO 8601, seconds)."""
    return datetime.now(UTC).isoformat(timespec="seconds")
