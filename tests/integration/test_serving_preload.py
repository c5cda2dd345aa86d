"""A promotion is a pointer swap (issue 39): the production server pre-loads the version a signed
move put on @staging, with every check, and serves it only once a signed move of @production
names it; the sandboxed trial runs once per ONNX network (its verdict kept in the home).

One server of `preload@production` (polling every POLL_S) over three versions of the tiny model
(the same network, registered three times).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
from mlflow import MlflowClient

from captchaops.registry.aliases import assign_alias
from tests.fixtures.models import TrainedModel, copies
from tests.fixtures.serving import ModelServer, start_model_server
from tests.fixtures.stack import Tracking, stop_process

pytestmark = pytest.mark.slow

NAME = "preload"
POLL_S = 0.5
HELD_S = 2.0
"""How long an unsigned move is watched not being followed: four polls."""


@dataclass
class Setup:
    client: MlflowClient
    server: ModelServer
    versions: list[str]


@pytest.fixture(scope="module")
def setup(
    tracking_server: Tracking, tiny_model: TrainedModel, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Setup]:
    client = MlflowClient(tracking_server.uri, registry_uri=tracking_server.uri)
    versions = copies(client, tiny_model, NAME, 3)
    assign_alias(client, NAME, "production", versions[0], reason="first", actor="tests")
    home = tmp_path_factory.mktemp("preload")
    server = start_model_server(
        tracking_server.uri, "production", home, model_name=NAME, poll_seconds=POLL_S
    )
    try:
        server.wait_version(versions[0])
        yield Setup(client, server, versions)
    finally:
        stop_process(server.proc)


def _health(server: ModelServer) -> dict[str, object]:
    return dict(httpx.get(f"{server.url}/health", timeout=5).json())


def _wait(
    server: ModelServer, field: str, value: object, timeout: float = 60.0
) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        health = _health(server)
        if health.get(field) == value:
            return health
        time.sleep(0.1)
    raise TimeoutError(f"{field} never became {value!r}: {server.log.read_text()[-3000:]}")


def test_a_staged_version_is_preloaded_and_served_only_after_a_signed_move(setup: Setup) -> None:
    server, client, (first, staged, _) = setup.server, setup.client, setup.versions
    assert _health(setup.server)["trials"] == {"run": 1, "passed_cached": 0, "refused_cached": 0}

    assign_alias(client, NAME, "staging", staged, reason="stage", actor="tests")
    health = _wait(server, "preloaded_version", staged)
    # the same network as the served one: its verdict is reused, no second trial
    assert health["trials"] == {"run": 1, "passed_cached": 1, "refused_cached": 0}
    assert health["version"] == first

    # a raw move of @production to the pre-loaded version is not followed
    client.set_registered_model_alias(NAME, "production", staged)
    _wait(server, "unaudited_version", staged, timeout=10)
    time.sleep(HELD_S)
    health = _health(server)
    assert (health["version"], health["preloaded_version"]) == (first, staged)

    # the signed move is: a pointer swap, without a trial or another load
    assign_alias(client, NAME, "production", staged, reason="promote", actor="tests")
    server.wait_version(staged, timeout=30)
    health = _health(server)
    assert health["last_swap"]["preloaded"] is True  # type: ignore[index]
    assert health["trials"] == {"run": 1, "passed_cached": 1, "refused_cached": 0}
    assert (health["preloaded_version"], health["unaudited_version"]) == (None, None)
    good = server.log.parent / "serving-cache" / NAME / "production" / "good.json"
    assert json.loads(good.read_text())["version"] == staged  # kept for a restart


def test_a_move_to_a_version_never_staged_reuses_the_verdict_of_its_network(setup: Setup) -> None:
    server, client, (_, _, other) = setup.server, setup.client, setup.versions
    before = _health(server)["trials"]
    assign_alias(client, NAME, "production", other, reason="move", actor="tests")
    server.wait_version(other, timeout=30)
    health = _health(server)
    assert health["last_swap"]["preloaded"] is False  # type: ignore[index]
    assert health["trials"]["run"] == before["run"]  # type: ignore[index]
    # (and @staging's version, no longer served, is pre-loaded again: a rollback's likely target)
    assert health["trials"]["passed_cached"] > before["passed_cached"]  # type: ignore[index]
