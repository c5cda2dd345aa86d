"""Point MLflow's process-wide client state at one server for a block, then put it back.

MLflow's fluent API (`start_run`, `log_model`, `set_experiment`, pyfunc loads) reads module
globals and environment variables: the tracking and registry URIs, the credentials and the
active experiment. Code that sets them for one job and leaves them behind sends the next
job in the same process (a test, a notebook cell, the demo) to the wrong server, where
MLflow's retries can hang it for minutes. `pointed_at` scopes all of it to a `with` block;
`point_at` is the unscoped form for one-shot processes such as a CLI command.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import mlflow
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


def point_at(settings: Settings) -> None:
    """From now on MLflow's fluent API talks to `settings`' server.

    Credentials come from the settings when they have them; otherwise whatever MLflow would
    use anyway (MLFLOW_TRACKING_USERNAME/_PASSWORD, ~/.mlflow/credentials) stays in force.
    """
    os.environ.update(settings.mlflow_env())
    mlflow.set_tracking_uri(settings.effective_tracking_uri)
    mlflow.set_registry_uri(settings.effective_tracking_uri)


@contextmanager
def pointed_at(settings: Settings) -> Iterator[None]:
    """`point_at` for the duration of a `with` block; the previous state comes back after."""
    saved_env = {key: os.environ.get(key) for key in _ENV_KEYS}
    saved_tracking = tracking_utils._tracking_uri
    saved_registry = registry_utils._registry_uri
    saved_experiment = fluent._active_experiment_id
    try:
        point_at(settings)
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
