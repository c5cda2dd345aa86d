"""Model servers follow only alias moves the promotion key signed (issue 37).

One server of `signed-moves@production` (local mode, polling every POLL_S) is walked through the
attacks the issue names: a raw REST move with a forged `last_move_` tag, a forged audit run, a
tampered signature and a signature for another network. Each is not followed and is reported in
`/health`, the metric and `captchaops models`'s listing within about one poll interval; a signed
move through the registry writer, and `captchaops promotions adopt`, are followed. Last, a
frozen set put in place of the signed one is refused by `promote` and `promote --auto`.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace

import httpx
import pytest
from mlflow import MlflowClient

from captchaops.decisions import promotion
from captchaops.registry.aliases import assign_alias
from captchaops.registry.audit import audit_experiment
from captchaops.registry.audit import moves as audited_moves
from captchaops.registry.errors import RegistryError
from captchaops.registry.listing import list_versions
from captchaops.registry.signing import SIGNED_MOVE, SignedMove, ensure_key, seal
from captchaops.settings import Settings
from tests.fixtures.models import TrainedModel, copies, make_settings
from tests.fixtures.serving import ModelServer, start_model_server
from tests.fixtures.stack import VENV_BIN, Tracking, stop_process

pytestmark = pytest.mark.slow

NAME = "signed-moves"
ALIAS = "production"
POLL_S = 0.5
REPORTED_S = 3.0
"""How long a forged move may go unreported: one poll interval plus this box's slack."""


@dataclass
class Setup:
    client: MlflowClient
    settings: Settings
    server: ModelServer
    versions: list[str]


@pytest.fixture(scope="module")
def setup(
    tracking_server: Tracking, tiny_model: TrainedModel, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Setup]:
    client = MlflowClient(tracking_server.uri, registry_uri=tracking_server.uri)
    versions = copies(client, tiny_model, NAME, 3)
    home = tmp_path_factory.mktemp("signed-moves")
    settings = make_settings(tracking_server, home / "cli", model_name=NAME)
    assign_alias(client, NAME, ALIAS, versions[0], reason="first", actor="tests")
    server = start_model_server(
        tracking_server.uri, ALIAS, home / "serve", model_name=NAME, poll_seconds=POLL_S
    )
    try:
        server.wait_version(versions[0])
        yield Setup(client, settings, server, versions)
    finally:
        stop_process(server.proc)


def _health(server: ModelServer) -> dict[str, object]:
    return dict(httpx.get(f"{server.url}/health", timeout=5).json())


def _unaudited_metric(server: ModelServer) -> float:
    for line in httpx.get(f"{server.url}/metrics", timeout=5).text.splitlines():
        if line.startswith("captchaops_unaudited_alias"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("no captchaops_unaudited_alias metric")


def _reported(server: ModelServer, version: str) -> float:
    """Seconds until /health reports `version` as an unsigned move of the alias."""
    began = time.monotonic()
    while time.monotonic() - began < 30:
        health = _health(server)
        if health.get("unaudited_version") == version:
            return time.monotonic() - began
        time.sleep(0.05)
    raise AssertionError(f"never reported: {_health(server)}")


def _still_serving(setup: Setup, version: str, unsigned: str) -> None:
    health = _health(setup.server)
    assert health["version"] == version, health
    assert health["status"] == "degraded", health
    assert "no valid signed move" in str(health["reason"]), health
    assert _unaudited_metric(setup.server) == 1.0
    assert list_versions(setup.settings).unaudited == {ALIAS: unsigned}


def _signed_by_us(setup: Setup) -> SignedMove:
    tags = setup.client.get_registered_model(NAME).tags
    return SignedMove(**json.loads(tags[SIGNED_MOVE + ALIAS])["move"])


def test_a_raw_move_with_a_forged_last_move_tag_is_not_followed(setup: Setup) -> None:
    served, other = setup.versions[0], setup.versions[1]
    setup.client.set_registered_model_alias(NAME, ALIAS, other)
    setup.client.set_registered_model_tag(
        NAME, f"last_move_{ALIAS}", f"@{ALIAS} v{served} -> v{other} (promoted) by admin at now: ok"
    )
    seconds = _reported(setup.server, other)
    print(f"raw move + forged tag reported after {seconds:.2f} s (poll {POLL_S} s)")
    assert seconds <= REPORTED_S
    time.sleep(2 * POLL_S)
    _still_serving(setup, served, other)


def test_a_forged_audit_run_is_not_followed(setup: Setup) -> None:
    served, other = setup.versions[0], setup.versions[1]
    run = setup.client.create_run(
        audit_experiment(setup.client),
        tags={"kind": "promotion", "model_name": NAME, "alias": ALIAS, "decision": "promoted"},
    )
    for key, value in {"to_version": other, "actor": "admin", "seq": "99", "kind": "gate"}.items():
        setup.client.log_param(run.info.run_id, key, value)
    setup.client.set_terminated(run.info.run_id, "FINISHED")
    time.sleep(3 * POLL_S)
    _still_serving(setup, served, other)


def test_a_tampered_or_mismatched_signature_is_refused(setup: Setup) -> None:
    served, other = setup.versions[0], setup.versions[1]
    envelope = json.loads(setup.client.get_registered_model(NAME).tags[SIGNED_MOVE + ALIAS])
    envelope["move"]["version"] = other
    setup.client.set_registered_model_tag(NAME, SIGNED_MOVE + ALIAS, json.dumps(envelope))
    time.sleep(3 * POLL_S)
    _still_serving(setup, served, other)
    assert "does not verify" in str(_health(setup.server)["unaudited_reason"])
    # Signed with the real key, but naming another network: loaded, checked, refused.
    key = ensure_key(setup.settings.effective_signing_key_dir)
    legit = _signed_by_us(setup)
    wrong = replace(legit, version=other, onnx_sha256="0" * 64, seq=legit.seq + 1)
    setup.client.set_registered_model_tag(NAME, SIGNED_MOVE + ALIAS, seal(wrong, key))
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and _health(setup.server).get("failed_version") != other:
        time.sleep(0.2)
    health = _health(setup.server)
    assert health["failed_version"] == other, health
    assert "is not the one the signed move names" in str(health["last_reload_error"]), health
    assert health["version"] == served


def test_a_signed_move_is_followed_and_adopt_signs_what_is_there(setup: Setup) -> None:
    third = setup.versions[2]
    assign_alias(setup.client, NAME, ALIAS, third, reason="signed", actor="tests")
    setup.server.wait_version(third, timeout=60)
    health = _health(setup.server)
    assert health["status"] == "ok" and health["unaudited_version"] is None, health
    assert _unaudited_metric(setup.server) == 0.0
    assert list_versions(setup.settings).unaudited == {}
    # A raw move back, then the admin's one-off adoption of where the aliases point.
    first = setup.versions[0]
    setup.client.set_registered_model_alias(NAME, ALIAS, first)
    _reported(setup.server, first)
    assert _health(setup.server)["version"] == third
    env = {
        **os.environ,
        "CAPTCHAOPS_HOME": str(setup.settings.home_dir),
        "CAPTCHAOPS_TRACKING_URI": setup.settings.effective_tracking_uri,
        "CAPTCHAOPS_MODEL_NAME": NAME,
    }
    done = subprocess.run(
        [str(VENV_BIN / "captchaops"), "promotions", "adopt", "--actor", "admin"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"signed: @{ALIAS} v{first} -> v{first} (adopted) by admin" in done.stdout
    setup.server.wait_version(first, timeout=60)
    assert _health(setup.server)["status"] == "ok"


def test_a_replayed_older_signature_is_refused(setup: Setup) -> None:
    current = _health(setup.server)["version"]
    signed = [
        (m.to_version, setup.client.get_run(m.run_id).data.tags.get("signed_move"))
        for m in audited_moves(setup.client, NAME, ALIAS)
    ]
    older, stale = next((v, s) for v, s in reversed(signed) if s and v != current)
    setup.client.set_registered_model_alias(NAME, ALIAS, older)
    setup.client.set_registered_model_tag(NAME, SIGNED_MOVE + ALIAS, stale)
    _reported(setup.server, older)
    # The alias and the tag are two writes: a check between them sees the alias moved under
    # the current signature; the next one (within a poll) sees the replayed one.
    deadline = time.monotonic() + 30
    while "replayed" not in str(_health(setup.server)["unaudited_reason"]):
        assert time.monotonic() < deadline, _health(setup.server)
        time.sleep(0.05)
    assert _health(setup.server)["version"] == current


def test_a_replaced_frozen_set_is_refused_by_the_gate_in_one_line(setup: Setup) -> None:
    from captchaops.evaluation.evalset import DIGEST_TAG, create_evalset

    create_evalset(setup.client, setup.settings, size=20)
    other = setup.settings.model_copy(update={"model_name": f"{NAME}-other"})
    swapped = create_evalset(setup.client, other, size=20, seed=7)
    # An editor points the scheme at another stored set: the tag is all it takes to write.
    setup.client.set_registered_model_tag(NAME, DIGEST_TAG, swapped.digest)
    with pytest.raises(RegistryError, match="is not the one signed when it was made"):
        promotion.promote(setup.settings, version=setup.versions[1], reason="try")
    assign_alias(setup.client, NAME, "staging", setup.versions[1], reason="t", actor="tests")
    env = {
        **os.environ,
        "CAPTCHAOPS_HOME": str(setup.settings.home_dir),
        "CAPTCHAOPS_TRACKING_URI": setup.settings.effective_tracking_uri,
        "CAPTCHAOPS_MODEL_NAME": NAME,
    }
    done = subprocess.run(
        [str(VENV_BIN / "captchaops"), "promote", "--auto"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert f"the frozen set {swapped.digest[:12]} of {NAME} is not the one signed" in done.stderr
