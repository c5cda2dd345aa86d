"""Registry writes over REST for account admin: the `users` command must not import MLflow."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

RestCall = Callable[..., dict[str, Any]]
"""`call(method, path, ok_missing, **kwargs)`: one JSON call, `{}` for a missing resource."""


def ensure_registered_model(call: RestCall, name: str) -> str:
    """The name of a registered model, created over REST when missing (so it can be granted)."""
    found = call("GET", "/api/2.0/mlflow/registered-models/get", True, params={"name": name})
    if not found:
        call("POST", "/api/2.0/mlflow/registered-models/create", json={"name": name})
    return name
