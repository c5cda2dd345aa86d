"""Push-based swaps: a real MLflow server (sqlite) delivers signed alias webhooks to real model
servers, which swap at once; forged, stale and foreign deliveries change nothing."""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from mlflow import MlflowClient

from captchaops.registry.aliases import remove_alias
from captchaops.serving.webhook import sign
from captchaops.settings import Settings, load_settings
from captchaops.stack import webhooks
from harness.processes import (
    VENV_BIN,
    Tracking,
    free_port,
    start_http_process,
    start_tracking_server,
    stop_process,
)
from harness.stack import PrivateStack
from tests.fixtures.models import make_settings, train_tiny
from tests.fixtures.signing import signed_alias
from tests.integration.test_serving import copy_version, set_alias

pytestmark = pytest.mark.slow

NEVER = "3600"
"""Poll interval of the servers under test: only a webhook can make them swap in time."""


@dataclass
class Server:
    """A running `captchaops serve` process."""

    alias: str
    url: str
    proc: object

    def health(self) -> dict[str, object]:
        body: dict[str, object] = httpx.get(f"{self.url}/health", timeout=5).json()
        return body

    def wait_version(self, version: str, timeout: float = 60.0) -> dict[str, object]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            health = self.health()
            if health.get("version") == version:
                return health
            time.sleep(0.1)
        raise TimeoutError(f"{self.alias} never served v{version}: {self.health()}")

    def counter(self, name: str, label: str, value: str) -> float:
        text = httpx.get(f"{self.url}/metrics", timeout=5).text
        line = f'{name}{{{label}="{value}"}} '
        return float(next(row for row in text.splitlines() if row.startswith(line)).split()[-1])

    def deliveries(self, outcome: str) -> float:
        return self.counter("captchaops_webhook_deliveries_total", "outcome", outcome)


@dataclass
class WebhookStack:
    tracking: Tracking
    settings: Settings
    versions: list[str]
    production: Server
    staging: Server


def _serve(alias: str, settings: Settings, home: Path) -> Server:
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CAPTCHAOPS_", "MLFLOW_"))}
    assert settings.webhook_secret is not None
    env.update(
        CAPTCHAOPS_HOME=str(home),
        CAPTCHAOPS_TRACKING_URI=settings.effective_tracking_uri,
        CAPTCHAOPS_MODEL_NAME=settings.model_name,
        CAPTCHAOPS_POLL_SECONDS=NEVER,
        CAPTCHAOPS_WEBHOOK_POLL_SECONDS=NEVER,
        CAPTCHAOPS_WEBHOOK_SECRET=settings.webhook_secret.get_secret_value(),
        CAPTCHAOPS_SIGNING_PUBLIC_KEY=str(settings.effective_signing_public_key),
    )
    url = f"http://127.0.0.1:{port}"
    cmd = [str(VENV_BIN / "captchaops"), "serve", "--alias", alias, "--port", str(port)]
    proc = start_http_process(cmd, f"{url}/ping", env=env, log=home / f"{alias}.log")
    return Server(alias, url, proc)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebhookStack]:
    """A tracking server started with `up`'s webhook settings, three versions of one model,
    production and staging servers at version 1 (only production gets a webhook)."""
    home = tmp_path_factory.mktemp("webhook-home")
    settings = webhooks.ensure_secrets(load_settings(home=home))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CAPTCHAOPS_", "MLFLOW_"))}
    tracking = start_tracking_server(
        tmp_path_factory.mktemp("webhook-tracking"), env={**env, **webhooks.tracking_env(settings)}
    )
    servers: list[Server] = []
    try:
        settings = settings.model_copy(update={"tracking_uri": tracking.uri})
        first = train_tiny(make_settings(tracking, home / "train"))
        versions = [first.version]
        versions += [copy_version(tracking.uri, first.model_name, first.version) for _ in "ab"]
        for alias in ("production", "staging"):
            set_alias(tracking.uri, first.model_name, alias, versions[0])
        for alias in ("production", "staging"):
            servers.append(_serve(alias, settings, home / alias))
            servers[-1].wait_version(versions[0])
        settings = settings.model_copy(
            update={"model_name": first.model_name, "production_url": servers[0].url}
        )
        yield WebhookStack(tracking, settings, versions, servers[0], servers[1])
    finally:
        for server in servers:
            stop_process(server.proc)  # type: ignore[arg-type]
        stop_process(tracking.proc)


def _ours(settings: Settings) -> list[dict[str, object]]:
    rest = webhooks.admin_rest(settings)
    try:
        listing = rest.call("GET", webhooks.WEBHOOKS)
    finally:
        rest.close()
    return [w for w in listing.get("webhooks", []) if w.get("name", "").startswith("captchaops-")]


def test_registration_is_verified_and_idempotent(stack: WebhookStack) -> None:
    assert stack.production.health()["swap_mode"] == "polling"
    first = webhooks.register(stack.settings, ("production",))
    assert [(r.alias, r.ok) for r in first] == [("production", True)], first
    assert "created" in first[0].detail
    # MLflow's signed test delivery (for its example model) reached the server and was verified.
    health = stack.production.health()
    assert health["swap_mode"] == "webhooks"
    assert health["poll_seconds"] == float(NEVER)
    assert webhooks.describe_swaps(health).startswith("webhooks (last delivery ")
    assert stack.production.deliveries("ignored") >= 1

    again = webhooks.register(stack.settings, ("production",))
    assert again[0].ok and "updated" in again[0].detail, again
    ours = _ours(stack.settings)
    assert [(w["name"], w["url"]) for w in ours] == [
        (webhooks.webhook_name(stack.settings, "production"), stack.production.url + "/webhook")
    ]
    assert webhooks.describe_swaps(stack.staging.health()) == f"polling every {NEVER} s"


def test_alias_move_swaps_through_the_webhook(stack: WebhookStack) -> None:
    assert webhooks.register(stack.settings, ("production",))[0].ok
    accepted = stack.production.deliveries("accepted")
    by_webhook = stack.production.counter("captchaops_swaps_total", "cause", "webhook")
    set_alias(stack.tracking.uri, stack.settings.model_name, "production", stack.versions[1])
    health = stack.production.wait_version(stack.versions[1])
    assert health["last_swap"]["cause"] == "webhook"  # type: ignore[index]
    assert stack.production.deliveries("accepted") == accepted + 1
    assert stack.production.counter("captchaops_swaps_total", "cause", "webhook") == by_webhook + 1

    # Deleting the alias (signed, through the registry) is announced too: the server stops
    # serving it.
    remove_alias(
        MlflowClient(stack.tracking.uri, stack.tracking.uri),
        stack.settings.model_name,
        alias="production",
        expect_version=stack.versions[1],
        reason="test",
        actor="tests",
        kind="manual",
        decision="ended",
    )
    deadline = time.monotonic() + 60
    while stack.production.health()["model_loaded"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert stack.production.health()["alias_version"] is None
    assert stack.production.health()["model_loaded"] is False


def _post(server: Server, secret: str, event: dict[str, object], age: int = 0) -> httpx.Response:
    """POST an event signed with `secret` as MLflow signs it, stamped `age` seconds ago."""
    body = json.dumps(event).encode()
    delivery_id, timestamp = str(uuid.uuid4()), str(int(time.time()) - age)
    headers = {
        "Content-Type": "application/json",
        "X-MLflow-Delivery-Id": delivery_id,
        "X-MLflow-Timestamp": timestamp,
        "X-MLflow-Signature": sign(secret, delivery_id, timestamp, body),
    }
    return httpx.post(f"{server.url}/webhook", content=body, headers=headers)


def test_forged_stale_and_foreign_deliveries_change_nothing(stack: WebhookStack) -> None:
    server, name = stack.staging, stack.settings.model_name
    assert stack.settings.webhook_secret is not None
    secret = stack.settings.webhook_secret.get_secret_value()
    # staging has no webhook: its alias moves without the server hearing of it.
    set_alias(stack.tracking.uri, name, "staging", stack.versions[2])
    event = {
        "entity": "model_version_alias",
        "action": "created",
        "data": {"name": name, "alias": "staging", "version": stack.versions[2]},
    }
    forged = _post(server, "not-the-secret", event)
    assert forged.status_code == 401
    assert forged.json()["error"] == "bad_signature"
    unsigned = httpx.post(f"{server.url}/webhook", json=event)
    assert unsigned.status_code == 401
    stale = _post(server, secret, event, age=3600)  # a recorded delivery, replayed an hour later
    assert stale.status_code == 401
    assert "clock" in stale.json()["detail"]
    for other in ({"name": "other-model", "alias": "staging"}, {"name": name, "alias": "champ"}):
        foreign = _post(server, secret, {**event, "data": {**other, "version": "1"}})
        assert foreign.status_code == 200 and foreign.json()["status"] == "ignored"
    assert server.deliveries("refused") == 3
    time.sleep(1.0)  # a check the poller had been asked for would have answered within ms
    health = server.health()
    assert (health["version"], health["alias_version"]) == (stack.versions[0], stack.versions[0])

    accepted = _post(server, secret, event)
    assert accepted.status_code == 202
    health = server.wait_version(stack.versions[2])
    assert health["last_swap"]["cause"] == "webhook"  # type: ignore[index]
    assert health["swap_mode"] == "webhooks"


def test_a_server_that_refuses_webhooks_leaves_polling(
    tracking_server: Tracking, tmp_path: Path
) -> None:
    """The plain tracking server (no webhook settings) refuses http URLs: `up` reports why."""
    settings = webhooks.ensure_secrets(
        load_settings(home=tmp_path, tracking_uri=tracking_server.uri)
    )
    result = webhooks.register(settings, ("production", "staging", "app"))
    assert [r.alias for r in result] == ["production", "staging"]
    assert not any(r.ok for r in result)
    assert all("scheme" in r.detail for r in result), result
    lines: list[str] = []
    webhooks.report(result, settings, lines.append)
    assert all("keeps polling every 2 s" in line for line in lines), lines


def test_up_registers_once_and_status_names_the_swap_mode(tmp_path: Path) -> None:
    """`captchaops up` as users run it: the tracking server it starts delivers to loopback,
    re-running `up` updates rather than adds, and `status` says webhooks are in use."""
    stack = PrivateStack.create(tmp_path / "home")
    try:
        first = stack.up().stdout
        for alias in ("production", "staging"):
            assert f"{stack.url(alias)}/webhook (created, test delivery verified)" in first, first
        assert (stack.home / ".env").stat().st_mode & 0o777 == 0o600
        again = stack.cli("up")
        assert again.returncode == 0, again.stdout + again.stderr
        assert again.stdout.count("(updated, test delivery verified)") == 2, again.stdout
        settings = stack.settings()
        names = sorted(str(w["name"]) for w in _ours(settings))
        assert names == [webhooks.webhook_name(settings, a) for a in ("production", "staging")]
        status = stack.cli("status")
        assert status.returncode == 0, status.stderr
        swaps = next(line for line in status.stdout.splitlines() if line.startswith("swaps:"))
        assert "production webhooks (last delivery" in swaps, swaps
        assert "staging webhooks (last delivery" in swaps, swaps
        assert "********" in status.stdout  # the new secrets are masked like the others
        assert settings.webhook_secret is not None
        assert settings.webhook_secret.get_secret_value() not in status.stdout
    finally:
        stack.down()


def test_a_canary_move_wakes_the_production_servers_canary_slot(stack: WebhookStack) -> None:
    """The production server follows @canary too: its webhook wakes that slot (the servers here
    poll once an hour, so only the delivery can make the canary show up in time)."""
    assert webhooks.register(stack.settings, ("production",))[0].ok
    client = MlflowClient(stack.tracking.uri, stack.tracking.uri)
    name, version = stack.settings.model_name, stack.versions[2]
    client.set_model_version_tag(name, version, "canary_percent", "10")
    accepted = stack.production.deliveries("accepted")

    def canary() -> dict[str, object] | None:
        block: dict[str, object] | None = stack.production.health()["canary"]  # type: ignore[assignment]
        return block

    signed_alias(stack.tracking.uri, name, "canary", version)
    deadline = time.monotonic() + 30
    while (canary() or {}).get("version") != version and time.monotonic() < deadline:
        time.sleep(0.1)
    block = canary()
    assert block is not None and block["version"] == version and block["percent"] == 10
    assert stack.production.deliveries("accepted") == accepted + 1

    remove_alias(
        client,
        name,
        alias="canary",
        expect_version=version,
        reason="test",
        actor="tests",
        kind="canary",
        decision="ended",
    )
    deadline = time.monotonic() + 30
    while canary() is not None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert canary() is None
