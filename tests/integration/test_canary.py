"""Canaries on a real stack: `promote --canary` through the CLI, a real production model server
that follows @canary, routes its share and trips its breaker, and the audit trail.

One module stack: a scheme of its own with a small frozen set, @production on a copy of the
session's tiny model, and three candidates: a good copy, a bad copy (its calibration tags say
95% accuracy that no answer can reach, so its live estimate reads 0), and a version of another
scheme (its run says alphabet "ABC").
"""

from __future__ import annotations

import base64
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from captchaops import mlflow_scope
from captchaops.canary import moves as canaries
from captchaops.cli import app
from captchaops.data.synthetic import generate
from captchaops.decisions import promotion
from captchaops.evaluation import evalset
from captchaops.live.estimate import Calibration
from captchaops.registry.aliases import resolve_alias
from captchaops.registry.audit import Move, history
from captchaops.registry.names import CANARY
from captchaops.registry.signing import SIGNED_MOVE, load_public_key, open_seal
from captchaops.settings import Settings
from tests.fixtures.models import TrainedModel, make_settings
from tests.fixtures.serving import ModelServer, start_model_server
from tests.fixtures.stack import Tracking, stop_process
from tests.integration.test_gate import copy_version

pytestmark = pytest.mark.slow

IMAGES = [base64.b64encode(s.image).decode() for s in generate(8, seed=17)]
MIN_ANSWERS = 20


@dataclass(frozen=True)
class Stack:
    """A scheme with @production, three candidates and its production model server."""

    settings: Settings
    production: str
    good: str
    bad: str
    stranger: str
    server: ModelServer


def other_scheme_version(settings: Settings, base: TrainedModel) -> str:
    """The base model's artifacts registered with a run whose parameters name another scheme."""
    client = mlflow_scope.client(settings)
    experiment_id = client.create_experiment(f"{settings.model_name}-other-scheme")
    run = client.create_run(experiment_id)
    for key, value in {"alphabet": "ABC", "min_length": "3", "max_length": "3"}.items():
        client.log_param(run.info.run_id, key, value)
    client.set_terminated(run.info.run_id)
    source = client.get_model_version(base.model_name, base.version)
    uri = str(source.source)
    model_id = uri.removeprefix("models:/") if uri.startswith("models:/m-") else None
    made = client.create_model_version(settings.model_name, uri, run.info.run_id, model_id=model_id)
    return str(made.version)


@pytest.fixture(scope="module")
def stack(
    tracking_server: Tracking, tiny_model: TrainedModel, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    home = tmp_path_factory.mktemp("canary")
    settings = make_settings(
        tracking_server, home, model_name=f"canary-{uuid.uuid4().hex[:8]}", poll_seconds=0.5
    )
    evalset.create_evalset(mlflow_scope.client(settings), settings, size=60)
    production = copy_version(settings, tiny_model)
    promotion.promote(settings, version=production, reason="first", actor="pytest")
    good, bad = copy_version(settings, tiny_model), copy_version(settings, tiny_model)
    client = mlflow_scope.client(settings)
    scored = client.get_model_version(settings.model_name, production).tags
    tags = {k: v for k, v in scored.items() if k.startswith("eval_")}
    tags |= Calibration(threshold=1.0, accuracy=0.95, size=60).tags()
    for key, value in tags.items():  # a cached score whose calibration no answer can pass
        client.set_model_version_tag(settings.model_name, bad, key, value)
    stranger = other_scheme_version(settings, tiny_model)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CAPTCHAOPS_CANARY_MIN_ANSWERS", str(MIN_ANSWERS))
        # p99 verdicts are unit-tested; on a shared CI machine they would only add noise here.
        patch.setenv("CAPTCHAOPS_CANARY_P99_SLACK_MS", "60000")
        server = start_model_server(
            tracking_server.uri, "production", home / "serve", model_name=settings.model_name
        )
    try:
        server.wait_version(production)
        yield Stack(settings, production, good, bad, stranger, server)
    finally:
        stop_process(server.proc)


@pytest.fixture()
def cli(stack: Stack, tmp_path: Path, isolated_mlflow: None) -> CliRunner:
    """A CliRunner pointed at the stack's scheme, tracking server and production server."""
    return CliRunner(
        env={
            "CAPTCHAOPS_HOME": str(tmp_path),
            "CAPTCHAOPS_TRACKING_URI": stack.settings.effective_tracking_uri,
            "CAPTCHAOPS_MODEL_NAME": stack.settings.model_name,
            "CAPTCHAOPS_PRODUCTION_URL": stack.server.url,
            "CAPTCHAOPS_ACTOR": "cli-test",
        }
    )


def canary_block(server: ModelServer) -> dict[str, object] | None:
    block: dict[str, object] | None = httpx.get(f"{server.url}/health", timeout=10).json()["canary"]
    return block


def wait_canary(server: ModelServer, version: str | None, state: str = "routing") -> None:
    """Until /health shows canary `version` in `state` (None: no canary)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        block = canary_block(server)
        if (block is None and version is None) or (
            block is not None and block["version"] == version and block["state"] == state
        ):
            return
        time.sleep(0.2)
    raise AssertionError(f"/health canary is {canary_block(server)}, not v{version} {state}")


@contextmanager
def traffic(server: ModelServer, images: int = 4) -> Iterator[list[str]]:
    """Requests of `images` images each, one after another, until the block ends; yields the
    answering versions as they come."""
    answered: list[str] = []
    stop = threading.Event()

    def send() -> None:
        with httpx.Client(timeout=30) as client:
            while not stop.is_set():
                resp = client.post(f"{server.url}/invocations", json={"inputs": IMAGES[:images]})
                answered.append(resp.headers.get("X-Model-Version", "none"))

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    try:
        yield answered
    finally:
        stop.set()
        thread.join(30)


def last_canary_move(settings: Settings) -> Move:
    return history(settings, CANARY)[-1]


def test_the_cli_refuses_bad_canaries_in_one_line(stack: Stack, cli: CliRunner) -> None:
    refusals = {
        ("--canary", "0"): "--canary 0 is not a share of 1-50 percent; end a canary with",
        ("--canary", "51"): "--canary 51 is not a share of 1-50 percent",
        ("--canary", "10"): "has alias @staging; train one with `captchaops train` or pass",
        ("--canary", "10", "--version", "999"): "has no version 999",
        ("--canary", "10", "--version", stack.production): "is @production already",
        ("--canary", "10", "--version", stack.stranger): "different schemes",
        ("--canary", "10", "--version", stack.good, "--detach", "--then-promote"): (
            "--then-promote needs the watch; leave out --detach"
        ),
        ("--canary", "10", "--version", stack.good, "--watch", "0"): "--watch takes minutes",
        ("--version", stack.good, "--detach", "--reason", "x"): "go with --canary PERCENT",
    }
    for args, expected in refusals.items():
        result = cli.invoke(app, ["promote", *args])
        assert result.exit_code == 1, (args, result.output)
        assert expected in result.output, (args, result.output)
        assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    ended = cli.invoke(app, ["rollback", "--canary"])
    assert ended.exit_code == 1 and "has @canary; there is no canary to end" in ended.output
    assert resolve_alias(stack.settings, CANARY) is None
    assert resolve_alias(stack.settings, "production") == stack.production


def test_the_canary_gets_its_share_and_ends_by_hand(stack: Stack, cli: CliRunner) -> None:
    started = cli.invoke(app, ["promote", "--canary", "20", "--version", stack.good, "--detach"])
    assert started.exit_code == 0, started.output
    assert f"canary: @canary nothing -> v{stack.good} (canary) by cli-test" in started.output
    wait_canary(stack.server, stack.good)

    answers = [stack.server.invoke({"inputs": IMAGES[:1]}) for _ in range(100)]
    versions = [resp.headers["X-Model-Version"] for resp in answers]
    assert set(versions) == {stack.production, stack.good}
    assert abs(versions.count(stack.good) - 20) <= 5
    aliases = {resp.headers["X-Model-Version"]: resp.headers["X-Model-Alias"] for resp in answers}
    assert aliases == {stack.production: "production", stack.good: "canary"}
    block = canary_block(stack.server)
    assert block is not None and block["percent"] == 20 and block["state"] == "routing"
    assert block["answers"] == versions.count(stack.good) and block["reason"] is None
    record = last_canary_move(stack.settings)
    params = mlflow_scope.client(stack.settings).get_run(record.run_id).data.params
    assert params["threshold_percent"] == "20.0" and record.decision == "canary"

    ended = cli.invoke(app, ["rollback", "--canary", "--reason", "seen enough"])
    assert ended.exit_code == 0, ended.output
    assert f"canary ended: @canary v{stack.good} -> nothing (ended) by cli-test" in ended.output
    wait_canary(stack.server, None)
    after = {
        stack.server.invoke({"inputs": IMAGES[:1]}).headers["X-Model-Version"] for _ in range(10)
    }
    assert after == {stack.production}
    assert resolve_alias(stack.settings, "production") == stack.production


def test_a_bad_canary_trips_and_is_rolled_back_through_the_cli(
    stack: Stack, cli: CliRunner
) -> None:
    with traffic(stack.server) as answered:
        result = cli.invoke(app, ["promote", "--canary", "50", "--version", stack.bad])
        after_trip = len(answered)
    assert result.exit_code == 3, result.output
    assert f"canary v{stack.bad} tripped (live estimate 0.0% is 95.0 points below" in result.output
    assert resolve_alias(stack.settings, CANARY) is None
    assert resolve_alias(stack.settings, "production") == stack.production
    move = last_canary_move(stack.settings)
    assert (move.from_version, move.to_version, move.decision) == (stack.bad, "", "rolled-back")
    assert move.reason.startswith("canary breaker tripped: live estimate 0.0%")
    tags = mlflow_scope.client(stack.settings).get_model_version(
        stack.settings.model_name, stack.bad
    )
    assert tags.tags["validation_status"] == "rejected" and tags.tags["canary_percent"] == "0"
    assert answered[:after_trip].count(stack.bad) >= MIN_ANSWERS
    listing = cli.invoke(app, ["models"])
    assert f"last canary move: @canary v{stack.bad} -> nothing (rolled-back)" in listing.output
    again = cli.invoke(app, ["promote", "--canary", "10", "--version", stack.bad])
    assert again.exit_code == 1 and "was rejected (canary breaker tripped" in again.output


def test_a_clean_window_promotes_the_canary(stack: Stack, cli: CliRunner) -> None:
    with traffic(stack.server):
        result = cli.invoke(
            app,
            [
                "promote",
                "--canary",
                "50",
                "--version",
                stack.good,
                "--watch",
                "0.2",
                "--then-promote",
            ],
        )
    try:
        assert result.exit_code == 0, result.output
        assert f"canary v{stack.good} passed 0.2 min cleanly (routing" in result.output
        assert f"promoted: @production v{stack.production} -> v{stack.good}" in result.output
        assert resolve_alias(stack.settings, "production") == stack.good
        assert resolve_alias(stack.settings, CANARY) is None
        move = last_canary_move(stack.settings)
        assert move.decision == "ended" and move.reason.startswith("promoted to @production")
    finally:
        if resolve_alias(stack.settings, "production") != stack.production:
            promotion.rollback(stack.settings, reason="test cleanup", actor="pytest")


def test_canary_moves_are_signed_with_the_settings_key(
    stack: Stack, tiny_model: TrainedModel, tmp_path: Path
) -> None:
    """Starting and ending a canary signs with the settings' promotion key, whatever key the
    process environment names (last in the module: the server does not trust this key)."""
    settings = stack.settings.model_copy(update={"signing_key_dir": tmp_path / "keys"})
    client = mlflow_scope.client(settings)
    version = copy_version(settings, tiny_model)

    canaries.start_canary(settings, percent=10, version=version, reason="own key", actor="pytest")
    key = load_public_key(settings.effective_signing_public_key)
    tags = client.get_registered_model(settings.model_name).tags
    assert open_seal(tags[SIGNED_MOVE + "canary"], key, model=None, alias="canary").version == (
        version
    )
    canaries.end_canary(settings, reason="own key", actor="pytest", version=version)
    tags = client.get_registered_model(settings.model_name).tags
    assert open_seal(tags[SIGNED_MOVE + "canary"], key, model=None, alias="canary").version == ""
