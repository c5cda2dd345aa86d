"""The audit gate's run-id cache against a real tracking server: a registered model deleted and
made again between two reads (within one poll interval) numbers its versions afresh, and the
gate must name the new version 1's run, not the one it remembered for the old version 1."""

from __future__ import annotations

import uuid

from mlflow import MlflowClient
from prometheus_client import CollectorRegistry, Gauge

from captchaops.registry.versions import register_version
from captchaops.serving.audit_gate import AuditGate
from captchaops.settings import load_settings
from captchaops.tracking_rest import TrackingRest
from harness.processes import Tracking
from tests.fixtures.models import TrainedModel
from tests.fixtures.signing import signed_alias


def _version_from(client: MlflowClient, base: TrainedModel, name: str, run_id: str) -> str:
    """Register the base model's network as a version of `name` under run `run_id`."""
    source = client.get_model_version(base.model_name, base.version).source
    return register_version(client, name, str(source), run_id)


def test_a_model_made_again_is_resolved_afresh(
    tracking_server: Tracking, tiny_model: TrainedModel
) -> None:
    uri = tracking_server.uri
    client = MlflowClient(uri, registry_uri=uri)
    name = f"recreated-{uuid.uuid4().hex[:8]}"
    experiment = client.get_run(tiny_model.run_id).info.experiment_id
    first = _version_from(client, tiny_model, name, tiny_model.run_id)
    signed_alias(uri, name, "production", first)
    rest = TrackingRest(uri)
    gate = AuditGate(
        rest,
        name,
        "production",
        key_path=load_settings().effective_signing_public_key,
        gauge=Gauge("unaudited", "test", registry=CollectorRegistry()),
    )
    try:
        ref = gate.judge()
        assert ref is not None and (ref.version, ref.run_id) == (first, tiny_model.run_id)

        client.delete_registered_model(name)  # no read sees it missing: made again at once
        other_run = client.create_run(experiment).info.run_id
        again = _version_from(client, tiny_model, name, other_run)
        signed_alias(uri, name, "production", again)
        assert again == first  # the same number, another version

        ref = gate.judge()
        assert ref is not None and ref.run_id == other_run
        assert gate.ref(again).run_id == other_run
        assert gate.unaudited is None
    finally:
        rest.close()
        client.delete_registered_model(name)
