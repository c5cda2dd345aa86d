"""The names the registry works with: aliases, scheme (registered model) names, actors, times."""

from __future__ import annotations

import getpass
import re
from datetime import UTC, datetime

from captchaops.registry.errors import RegistryError

PRODUCTION = "production"
STAGING = "staging"
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
RESERVED_SUFFIX = ".promotion-lock"
"""Older releases kept their lock as a registered model with this suffix; no scheme may use it."""


def check_model_name(name: str) -> str:
    """The name of a scheme's registered model, if usable; a one-line `RegistryError` if not."""
    if not MODEL_NAME.fullmatch(name) or name.endswith(RESERVED_SUFFIX):
        raise RegistryError(
            f"model name {name!r} is not usable; name a scheme with 1-100 letters, digits, "
            "'-', '_' or '.', starting with a letter or digit (e.g. --model-name bank-captcha)"
        )
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
