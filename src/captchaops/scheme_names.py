"""Which scheme (registered model) names are usable, and the canary's alias and tag: MLflow-free,
so a model server can check its name and follow a canary without importing the registry."""

from __future__ import annotations

import re

MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
RESERVED_SUFFIX = ".promotion-lock"
"""Older releases kept their lock as a registered model with this suffix; no scheme may use it."""
CANARY = "canary"
"""The alias of a version that gets a share of production's traffic (`promote --canary`)."""
CANARY_PERCENT_TAG = "canary_percent"
"""The version tag holding that share in percent ("0" once the canary ended)."""
CANARY_MAX_PERCENT = 50


def model_name_problem(name: str) -> str | None:
    """Why `name` cannot name a scheme, in one line with the fix; None when it can."""
    if MODEL_NAME.fullmatch(name) and not name.endswith(RESERVED_SUFFIX):
        return None
    return (
        f"model name {name!r} is not usable; name a scheme with 1-100 letters, digits, "
        "'-', '_' or '.', starting with a letter or digit (e.g. --model-name bank-captcha)"
    )
