"""One HTTP exchange with the promotion service, MLflow-free: the commands' client
(`stack.promotions_client`) and the web app's approvals page word its failures each their own
way over the same call."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import httpx


def exchange(
    base: str,
    method: str,
    path: str,
    fields: Mapping[str, Any],
    auth: tuple[str, str] | None,
    timeout: float,
) -> tuple[int, dict[str, Any] | None]:
    """One call to the promotion service at `base` (`fields` as the query of a GET, the JSON
    body of a POST): its HTTP status and its JSON object, None when the answer is not one.
    httpx.HTTPError when it does not answer."""
    answer = httpx.request(
        method,
        base + path,
        json=dict(fields) if method == "POST" else None,
        params=dict(fields) if method == "GET" else None,
        auth=auth,
        timeout=timeout,
    )
    try:
        found = answer.json()
    except ValueError:
        found = None
    return answer.status_code, found if isinstance(found, dict) else None
