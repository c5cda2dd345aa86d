"""Registered models and their versions: creating them."""

from __future__ import annotations

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException


def ensure_model(mlflow_client: MlflowClient, name: str) -> None:
    """Create the registered model `name` unless it exists (safe when two processes race)."""
    try:
        mlflow_client.get_registered_model(name)
        return
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
    try:
        mlflow_client.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


def register_version(client: MlflowClient, model_name: str, model_uri: str, run_id: str) -> str:
    """Create a version of `model_name` from a logged model (`ModelInfo.model_uri`), creating the registered model if missing; returns the version number."""
    ensure_model(client, model_name)
    model_id = model_uri.removeprefix("models:/") if model_uri.startswith("models:/m-") else None
    version = client.create_model_version(model_name, model_uri, run_id, model_id=model_id)
    return str(version.version)
