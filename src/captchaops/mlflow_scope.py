"""How captchaops talks to MLflow: explicit clients, and scoped fluent-API state where needed.

`client` and `tracking_uri` give a client (or a URI for calls that take one) for the
configured server, with the settings' credentials in the URI, and change nothing
process-wide. Library code uses them.

MLflow's fluent API (`start_run`, `log_model`, `set_experiment`, pyfunc loads) reads module
globals and environment variables: the tracking and registry URIs, the credentials and the
active experiment. Code that sets them for one job and leaves them behind sends the next
job in the same process (a test, a notebook cell, the demo) to the wrong server, where
MLflow's retries can hang it for minutes. `pointed_at` scopes all of it to a `with` block,
for the code that needs the fluent API (training's `start_run`/`log_model`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import quote, urlsplit, urlunsplit

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.tracking import fluent
from mlflow.tracking._model_registry import utils as registry_utils
from mlflow.tracking._tracking_service import utils as tracking_utils

from captchaops.settings import Settings

_ENV_KEYS = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_REGISTRY_URI",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_EXPERIMENT_ID",
    "MLFLOW_EXPERIMENT_NAME",
)


def tracking_uri(settings: Settings) -> str:
    """The tracking server's URI for MLflow calls that take one, credentials included.

    MLflow reads credentials from environment variables on every request; putting the
    settings' account into the URI (HTTP basic auth, which MLflow's requests honour when
    no environment credentials are set) keeps them to the calls made with this URI.
    """
    uri = settings.effective_tracking_uri
    if not (settings.tracking_username and settings.tracking_password):
        return uri
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https") or "@" in parts.netloc:
        return uri
    user = quote(settings.tracking_username, safe="")
    password = quote(settings.tracking_password.get_secret_value(), safe="")
    return urlunsplit(parts._replace(netloc=f"{user}:{password}@{parts.netloc}"))


def client(settings: Settings) -> MlflowClient:
    """An MLflow client for the configured tracking server and registry; no global state."""
    uri = tracking_uri(settings)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def finish_run(mlflow_client: MlflowClient, run_id: str, status: str = "FINISHED") -> None:
    """End a run without MLflow's "View run at <URL>" print (which would show credentials)."""
    mlflow_client.update_run(run_id, status=status)


def _point_at(settings: Settings) -> None:
    """From now on MLflow's fluent API talks to `settings`' server.

    Credentials come from the settings when they have them; otherwise whatever MLflow would
    use anyway (MLFLOW_TRACKING_USERNAME/_PASSWORD, ~/.mlflow/credentials) stays in force.
    """
    os.environ.update(settings.mlflow_env())
    mlflow.set_tracking_uri(settings.effective_tracking_uri)
    mlflow.set_registry_uri(settings.effective_tracking_uri)


@contextmanager
def pointed_at(settings: Settings) -> Iterator[None]:
    """`_point_at` for the duration of a `with` block; the previous state comes back after."""
    saved_env = {key: os.environ.get(key) for key in _ENV_KEYS}
    saved_tracking = tracking_utils._tracking_uri
    saved_registry = registry_utils._registry_uri
    saved_experiment = fluent._active_experiment_id
    try:
        _point_at(settings)
        yield
    finally:
        # None is what MLflow's own _use_tracking_uri restores too: it unsets the URI.
        mlflow.set_tracking_uri(saved_tracking)  # type: ignore[arg-type]
        registry_utils._registry_uri = saved_registry
        fluent._active_experiment_id = saved_experiment
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def experiment_id(mlflow_client: MlflowClient, name: str, tags: dict[str, str]) -> str:
    """The id of experiment `name`, created with `tags` on first use (safe when two race)."""
    experiment = mlflow_client.get_experiment_by_name(name)
    if experiment is not None:
        return str(experiment.experiment_id)
    try:
        return str(mlflow_client.create_experiment(name, tags=tags))
    except MlflowException as exc:
        existing = mlflow_client.get_experiment_by_name(name)
        if exc.error_code != "RESOURCE_ALREADY_EXISTS" or existing is None:
            raise
        return str(existing.experiment_id)
