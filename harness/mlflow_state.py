"""Put back, after a block, the process-wide MLflow state the code inside it changed.

MLflow's fluent API keeps the tracking URI, the registry URI and the active experiment in module
globals and mirrors them into `MLFLOW_*` environment variables. A test or benchmark that calls
code which sets them must not hand them on to the next one. Restoring a variable that was absent
before means deleting it afterwards, which `monkeypatch.delenv` cannot do: it records nothing for
a variable that is absent, so one set later inside the block would survive it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def mlflow_state_restored() -> Iterator[None]:
    """Run a block; afterwards MLflow's URIs, active experiment and `MLFLOW_*` variables are
    exactly what they were before it."""
    import mlflow
    from mlflow.tracking import fluent
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    saved_env = {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_")}
    saved_tracking = tracking_utils._tracking_uri
    saved_registry = registry_utils._registry_uri
    saved_experiment = fluent._active_experiment_id
    try:
        yield
    finally:
        # set_tracking_uri also resets the tracer provider that cached the URI; None unsets it.
        mlflow.set_tracking_uri(saved_tracking)  # type: ignore[arg-type]
        registry_utils._registry_uri = saved_registry
        fluent._active_experiment_id = saved_experiment
        for key in [k for k in os.environ if k.startswith("MLFLOW_")]:
            del os.environ[key]
        os.environ.update(saved_env)
