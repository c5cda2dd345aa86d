"""The promotion lock: one alias move of a model at a time, across processes and machines.

The lock lives in one run of the promotions experiment per model (tags `kind=promotion-lock`,
`lock_of=<model>`). Its parameters are the lock's history: `hold_N` (the N-th holder's token)
and `free_N` (its release). MLflow refuses to change a logged parameter, so writing `hold_N+1`
is an atomic compare-and-set: exactly one contender's write succeeds. Writing a run's
parameters needs EDIT on the promotions experiment, which readers do not have in team mode:
a reader can neither take nor hold the lock (and so cannot block promotions).

The run itself is made once: a creator that finds no other lock run after creating its own
seals it (parameter `sealed`); one that does find another abandons its own (tag `abandoned`:
editors may not delete runs) and uses the sealed one. At most one run is ever sealed: of two
creators, the later one's search sees the earlier one's run.

A hold is stamped, and judged stale, by the tracking server's clock (the Date header of its
answers), so a holder whose clock runs behind cannot have its fresh lock taken over, nor one
whose clock runs ahead leave a crashed lock that never looks stale.
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from email.utils import parsedate_to_datetime

from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.utils.rest_utils import http_request

from captchaops.mlflow_scope import finish_run
from captchaops.registry.audit import audit_experiment
from captchaops.registry.errors import RegistryError

LOCK_TIMEOUT_S = 120.0
LOCK_STALE_S = 900.0
"""A holder that has not released after this long crashed; the next contender takes over."""
ORPHAN_S = 60.0
"""An unsealed lock run older than this was left by a creator that crashed before sealing."""


def _lock_runs(mlflow_client: MlflowClient, experiment_id: str, name: str) -> list[Run]:
    runs = mlflow_client.search_runs(
        [experiment_id],
        f"tags.kind = 'promotion-lock' and tags.lock_of = '{name}'",
        max_results=100,
    )
    return [r for r in runs if "abandoned" not in r.data.tags]


def _pause() -> None:
    time.sleep(0.1 + random.random() * 0.3)


def lock_run(mlflow_client: MlflowClient, name: str, actor: str) -> str:
    """The id of the model's lock run, made and sealed on first use."""
    experiment_id = audit_experiment(mlflow_client)
    while True:
        sealed = sorted(
            r.info.run_id
            for r in _lock_runs(mlflow_client, experiment_id, name)
            if "sealed" in r.data.params
        )
        if sealed:
            return str(sealed[0])
        mine = str(
            mlflow_client.create_run(
                experiment_id,
                run_name=f"promotion lock of {name}",
                tags={"kind": "promotion-lock", "lock_of": name, "mlflow.user": actor},
            ).info.run_id
        )
        cutoff_ms = (time.time() - ORPHAN_S) * 1000
        others = [
            r
            for r in _lock_runs(mlflow_client, experiment_id, name)
            if r.info.run_id != mine
            and ("sealed" in r.data.params or r.info.start_time > cutoff_ms)
        ]
        if not others:
            mlflow_client.log_param(mine, "sealed", "1")
            finish_run(mlflow_client, mine)
            return mine
        mlflow_client.set_tag(mine, "abandoned", "1")
        finish_run(mlflow_client, mine, "KILLED")
        _pause()


def _state(mlflow_client: MlflowClient, run_id: str) -> tuple[int, str | None]:
    """The number of the last hold and its token, None when it was released."""
    params = mlflow_client.get_run(run_id).data.params
    last = max((int(k[5:]) for k in params if k.startswith("hold_")), default=0)
    if last == 0 or f"free_{last}" in params:
        return last, None
    return last, params[f"hold_{last}"]


def server_time(mlflow_client: MlflowClient) -> float:
    """The tracking server's clock in epoch seconds (the Date header of its /health answer);
    this machine's when the store is not a server or does not say."""
    store = getattr(getattr(mlflow_client, "_tracking_client", None), "store", None)
    host_creds = getattr(store, "get_host_creds", None)
    if host_creds is None:
        return time.time()
    try:
        response = http_request(host_creds(), "/health", "GET", max_retries=0, timeout=10)
        return parsedate_to_datetime(response.headers["Date"]).timestamp()
    except (MlflowException, OSError, KeyError, TypeError, ValueError):
        return time.time()


def _token_age_s(token: str, now: float) -> float:
    try:
        return now - float(token.split("|")[1])
    except (IndexError, ValueError):
        return LOCK_STALE_S + 1


@contextmanager
def promotion_lock(
    mlflow_client: MlflowClient, name: str, actor: str, timeout_s: float = LOCK_TIMEOUT_S
) -> Iterator[None]:
    """Hold the model's promotion lock for a block; RegistryError if it stays taken `timeout_s`."""
    run_id = lock_run(mlflow_client, name, actor)
    deadline = time.monotonic() + timeout_s
    while True:
        last, held = _state(mlflow_client, run_id)
        now = server_time(mlflow_client)
        token = f"{uuid.uuid4().hex}|{now:.0f}|{actor[:200]}"
        if held is None or _token_age_s(held, now) > LOCK_STALE_S:
            try:
                mlflow_client.log_param(run_id, f"hold_{last + 1}", token)
                break
            except MlflowException as exc:
                if exc.error_code != "INVALID_PARAMETER_VALUE":
                    raise
                continue  # another contender took it first
        if time.monotonic() > deadline:
            holder = held.split("|", 2)[-1]
            raise RegistryError(
                f"another promotion of {name} holds the lock (by {holder}, "
                f"{_token_age_s(held, now):.0f}s ago); wait and retry"
            )
        _pause()
    try:
        yield
    finally:
        mlflow_client.log_param(run_id, f"free_{last + 1}", token)
