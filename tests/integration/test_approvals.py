"""Production moves that need a second account, in team mode, on a real basic-auth tracking server
and a real production model server (issue 37).

Editors `ed` and `alice` and reader `rita` use the CLI in-process. ed's `promote` waits as a
request; ed may not approve his own, rita may neither ask nor approve; alice's approval makes
the signed move (approver inside the signature), which the server follows within about one poll.
A rollback waits while production passes its live check and moves at once when it fails it.
Then the tags alone (a forged `last_move_` line and signed record, no alias move) make the
server serve nothing new, and `models` reports the alias unaudited. Last, on the session's
tracking server in local mode (approval turned on for one scheme), `promote --auto` waits and
the gate runs again on approval: its scoring is cheap there, where every request to the
basic-auth server checks a password hash.
"""

from __future__ import annotations

import json
import re
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import mlflow.artifacts
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from mlflow import MlflowClient
from typer.testing import CliRunner, Result
from werkzeug.security import generate_password_hash

from captchaops import mlflow_scope
from captchaops.cli import app
from captchaops.evaluation.evalset import create_evalset
from captchaops.registry import audit
from captchaops.registry.aliases import alias_version, assign_alias
from captchaops.registry.listing import list_versions
from captchaops.registry.requests import pending_requests
from captchaops.registry.signing import SIGNED_MOVE, SignedMove, new_nonce, seal
from captchaops.registry.versions import register_version
from captchaops.settings import Settings, load_settings
from captchaops.team_accounts import add_user
from tests.fixtures.models import TrainedModel, copies, make_settings
from tests.fixtures.serving import ModelServer, start_model_server
from tests.fixtures.stack import Tracking, basic_auth_tracking, free_port, stop_process

pytestmark = pytest.mark.slow
NAME = "text-captcha"
PRODUCTION = "production"
POLL_S = 1.0
FOLLOWED_S = 4.0
"""How long after the approving command returns the server may take: one poll plus this shared
box's slack (a basic-auth tracking server checks a password hash on every request)."""
PASSWORDS = {
    "admin": "admin-password-for-tests",
    "ed": "ed-password-for-tests",
    "alice": "alice-password-for-tests",
}


@dataclass
class Team:
    uri: str
    home: Path
    passwords: dict[str, str]
    versions: list[str]
    server: ModelServer
    asked: dict[str, str] = field(default_factory=dict)

    def settings(self, user: str) -> Settings:
        return load_settings(
            home=self.home / "cli",
            tracking_uri=self.uri,
            tracking_username=user,
            tracking_password=self.passwords[user],
        )

    def client(self, user: str = "ed") -> MlflowClient:
        return mlflow_scope.client(self.settings(user))

    def cli(self, user: str, *args: str, production_url: str | None = None) -> Result:
        """`captchaops ARGS` as `user` in team mode, production's live check at the server."""
        runner = CliRunner(
            env={
                "CAPTCHAOPS_HOME": str(self.home / "cli"),
                "CAPTCHAOPS_TRACKING_URI": self.uri,
                "CAPTCHAOPS_TRACKING_USERNAME": user,
                "CAPTCHAOPS_TRACKING_PASSWORD": self.passwords[user],
                "CAPTCHAOPS_AUTH": "true",
                "CAPTCHAOPS_MODEL_NAME": NAME,
                "CAPTCHAOPS_PRODUCTION_URL": production_url or self.server.url,
                "CAPTCHAOPS_PRODUCTION_APPROVAL": None,
                "CAPTCHAOPS_ACTOR": None,
            }
        )
        return runner.invoke(app, list(args))

    def production(self) -> str | None:
        return alias_version(self.client(), NAME, PRODUCTION)

    def signed(self) -> SignedMove:
        tags = self.client().get_registered_model(NAME).tags
        return SignedMove(**json.loads(tags[SIGNED_MOVE + PRODUCTION])["move"])


def _copy_tiny_model(
    session_uri: str, base: TrainedModel, to: MlflowClient, folder: Path, count: int
) -> list[str]:
    """Log the tiny model's files to a run on the team server and register them `count` times."""
    session = MlflowClient(session_uri, registry_uri=session_uri)
    source = session.get_model_version_download_uri(base.model_name, base.version)
    local = mlflow.artifacts.download_artifacts(
        artifact_uri=source, dst_path=str(folder), tracking_uri=session_uri
    )
    experiment = to.get_experiment_by_name(NAME)
    assert experiment is not None
    run = to.create_run(experiment.experiment_id)
    to.log_artifacts(run.info.run_id, local, "model")
    to.set_terminated(run.info.run_id)
    uri = f"{run.info.artifact_uri}/model"
    return [register_version(to, NAME, uri, run.info.run_id) for _ in range(count)]


def _cheap_password_checks(database: Path, passwords: dict[str, str]) -> None:
    """Store the test accounts' passwords with one PBKDF2 round instead of scrypt: basic-auth
    checks the hash on every request, which otherwise makes up most of this module's time."""
    with sqlite3.connect(database) as conn:
        for user, password in passwords.items():
            cheap = generate_password_hash(password, "pbkdf2:sha256:1")
            conn.execute("UPDATE users SET password_hash = ? WHERE username = ?", (cheap, user))


@pytest.fixture(scope="module")
def team(
    tracking_server: Tracking, tiny_model: TrainedModel, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Team]:
    """A basic-auth tracking server with editors ed and alice and reader rita, two copies of
    the tiny model, a 20-image frozen set, @production at the first (signed), and its server."""
    home = tmp_path_factory.mktemp("approvals")
    server = None
    with basic_auth_tracking(home, PASSWORDS["admin"]) as admin:
        uri = admin.tracking_uri
        assert uri is not None
        try:
            add_user(admin, "ed", "editor", PASSWORDS["ed"])
            add_user(admin, "alice", "editor", PASSWORDS["alice"])
            reader = add_user(admin, "rita", "reader")
            assert reader.password
            passwords = PASSWORDS | {"rita": reader.password}
            _cheap_password_checks(home / "basic_auth.db", passwords)
            ed_settings = load_settings(
                home=home / "cli", tracking_uri=uri, tracking_username="ed",
                tracking_password=passwords["ed"],
            )  # fmt: skip
            ed = mlflow_scope.client(ed_settings)
            versions = _copy_tiny_model(tracking_server.uri, tiny_model, ed, home / "model", 2)
            create_evalset(ed, ed_settings, size=20)
            assign_alias(ed, NAME, PRODUCTION, versions[0], reason="first", actor="ed")
            server = start_model_server(
                uri,
                PRODUCTION,
                home / "serve",
                poll_seconds=POLL_S,
                settings={
                    "tracking_username": "admin",
                    "tracking_password": PASSWORDS["admin"],
                    "canary": "false",  # one poller, not two, on the one-worker tracking server
                },
            )
            server.wait_version(versions[0])
            yield Team(uri, home, passwords, versions, server)
        finally:
            if server is not None:
                stop_process(server.proc)


def _request_id(result: Result, name: str = NAME) -> str:
    assert result.exit_code == 0, result.output
    assert "waiting for approval: " in result.stdout, result.stdout
    found = re.search(rf"captchaops approve ([0-9a-f]+) --model-name {name}$", result.stdout, re.M)
    assert found, result.stdout
    return found[1]


def _served(server: ModelServer) -> str | None:
    version = httpx.get(f"{server.url}/health", timeout=5).json()["version"]
    return None if version is None else str(version)


def _followed(team: Team, version: str) -> float:
    """Seconds until the production server serves `version`."""
    began = time.monotonic()
    while time.monotonic() - began < 30:
        if _served(team.server) == version:
            return time.monotonic() - began
        time.sleep(0.05)
    raise AssertionError(f"never served v{version}: {team.server.log.read_text()[-2000:]}")


def test_an_editors_production_request_waits_and_is_listed(
    team: Team, isolated_mlflow: None
) -> None:
    first, second = team.versions[:2]
    asked = team.cli("ed", "promote", "--version", second, "--reason", "new fonts")
    request_id = _request_id(asked)
    team.asked["manual"] = request_id
    assert f"@production v{first} -> v{second} (manual) requested by ed" in asked.stdout
    assert "frozen set: v" in asked.stdout  # the verdict the request records

    listed = team.cli("alice", "requests")
    assert listed.exit_code == 0, listed.output
    assert f"{request_id} @production v{first} -> v{second} (manual) requested by ed" in (
        listed.stdout
    )
    trail = audit.moves(team.client("alice"), NAME, PRODUCTION)
    requested = [(m.actor, m.to_version) for m in trail if m.decision == "requested"]
    assert requested == [("ed", second)]
    time.sleep(2 * POLL_S)
    assert team.production() == first and _served(team.server) == first


def test_the_requester_and_a_reader_cannot_approve(team: Team, isolated_mlflow: None) -> None:
    request_id = team.asked["manual"]
    own = team.cli("ed", "approve", request_id)
    assert own.exit_code == 1, own.output
    assert own.stderr.strip().splitlines() == [
        f"error: ed requested {request_id}; another account must approve it (ask someone else "
        f"to run `captchaops approve {request_id}`)"
    ]
    trail = audit.moves(team.client(), NAME, PRODUCTION)
    assert [m.actor for m in trail if m.decision == "refused"] == ["ed"]
    assert [r.short_id for r in pending_requests(team.client(), NAME)] == [request_id]

    for args in (
        ("promote", "--version", team.versions[1], "--reason", "mine"),
        ("approve", request_id),
    ):
        done = team.cli("rita", *args)
        assert done.exit_code == 1, done.output
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: user 'rita' may not {args[0]}")
        assert "that needs the editor role" in lines[0]
    assert team.production() == team.versions[0]


def test_another_account_approves_and_the_server_follows(team: Team, isolated_mlflow: None) -> None:
    first, second = team.versions[:2]
    request_id = team.asked["manual"]
    done = team.cli("alice", "approve", request_id)
    assert done.exit_code == 0, done.output
    seconds = _followed(team, second)
    print(f"served {seconds:.2f} s after `approve` returned (poll {POLL_S} s)")
    assert seconds <= FOLLOWED_S
    assert f"approved {request_id}: @production v{first} -> v{second} (promoted) by ed, " in (
        done.stdout
    )
    assert "approved by alice at" in done.stdout
    signed = team.signed()
    assert (signed.version, signed.actor, signed.approver) == (second, "ed", "alice")
    health = httpx.get(f"{team.server.url}/health", timeout=5).json()
    assert health["status"] == "ok" and health["signed_version"] == second, health
    assert pending_requests(team.client(), NAME) == []
    moved = audit.moves(team.client(), NAME, PRODUCTION)[-1]
    assert (moved.decision, moved.actor, moved.approver) == ("promoted", "ed", "alice")


def test_rollback_waits_unless_production_fails_its_live_check(
    team: Team, isolated_mlflow: None
) -> None:
    first, second = team.versions
    waits = team.cli("ed", "rollback", "--reason", "complaints")
    request_id = _request_id(waits)
    assert f"@production v{second} -> v{first} (rollback) requested by ed" in waits.stdout
    assert team.production() == second

    nobody = f"http://127.0.0.1:{free_port()}"
    done = team.cli("ed", "rollback", "--reason", "down", production_url=nobody)
    assert done.exit_code == 0, done.output
    assert f"rolled back: @production v{second} -> v{first} (rolled-back) by ed at" in done.stdout
    assert (
        f"production fails its live check, so no approval: the production server at {nobody}"
        in (done.stdout)
    )
    assert _followed(team, first) <= FOLLOWED_S
    assert team.signed().approver == ""
    # The waiting rollback asked for what production now holds: nothing is left to approve.
    assert request_id not in {r.short_id for r in pending_requests(team.client(), NAME)}


def test_the_tags_alone_make_no_server_serve_a_version(team: Team, isolated_mlflow: None) -> None:
    served, other = team.versions
    ed = team.client()
    ed.set_registered_model_tag(
        NAME, f"last_move_{PRODUCTION}", f"@production v{served} -> v{other} (promoted) by admin"
    )
    legit = team.signed()
    forged = SignedMove(
        NAME, PRODUCTION, other, legit.onnx_sha256, legit.evalset_sha256, "admin", "admin",
        legit.at, legit.seq + 1, new_nonce(),
    )  # fmt: skip
    ed.set_registered_model_tag(
        NAME, SIGNED_MOVE + PRODUCTION, seal(forged, Ed25519PrivateKey.generate())
    )
    time.sleep(4 * POLL_S)
    health = httpx.get(f"{team.server.url}/health", timeout=5).json()
    assert health["version"] == served and health["signed_version"] == served, health
    assert team.production() == served
    listing = team.cli("rita", "models")
    assert listing.exit_code == 0, listing.output
    assert f"UNAUDITED: @production -> v{served}" in listing.stdout, listing.stdout
    assert list_versions(team.settings("rita")).unaudited == {PRODUCTION: served}


def test_a_gate_request_is_judged_again_on_approval(
    tracking_server: Tracking,
    tiny_model: TrainedModel,
    tmp_path: Path,
    isolated_mlflow: None,
) -> None:
    name = "approvals-local"
    client = MlflowClient(tracking_server.uri, registry_uri=tracking_server.uri)
    champion, candidate = copies(client, tiny_model, name, 2)
    settings = make_settings(tracking_server, tmp_path, model_name=name)
    create_evalset(client, settings, size=20)
    assign_alias(client, name, PRODUCTION, champion, reason="first", actor="ed")
    assign_alias(client, name, "staging", candidate, reason="trained", actor="ed")
    runner = CliRunner(
        env={
            "CAPTCHAOPS_HOME": str(tmp_path),
            "CAPTCHAOPS_TRACKING_URI": tracking_server.uri,
            "CAPTCHAOPS_MODEL_NAME": name,
            "CAPTCHAOPS_PRODUCTION_APPROVAL": f"other-scheme,{name}",
            "CAPTCHAOPS_AUTH": None,
            "CAPTCHAOPS_TRACKING_USERNAME": None,
            "CAPTCHAOPS_ACTOR": None,
        }
    )
    asked = runner.invoke(app, ["promote", "--auto", "--latency-slack-ms", "1000", "--actor", "ed"])
    request_id = _request_id(asked, name)
    assert f"passed the gate v{candidate}: " in asked.stdout
    assert alias_version(client, name, PRODUCTION) == champion
    own = runner.invoke(app, ["approve", request_id, "--actor", "ed"])
    assert own.exit_code == 1 and "another account must approve it" in own.stderr
    done = runner.invoke(app, ["approve", request_id, "--actor", "alice"])
    assert done.exit_code == 0, done.output
    assert f"@production v{champion} -> v{candidate} (promoted) by ed, approved by alice" in (
        done.stdout
    )
    assert "gate: accuracy " in done.stdout and f"approved request {request_id}" in done.stdout
    assert alias_version(client, name, PRODUCTION) == candidate
    tags = client.get_registered_model(name).tags
    signed = SignedMove(**json.loads(tags[SIGNED_MOVE + PRODUCTION])["move"])
    assert (signed.version, signed.actor, signed.approver) == (candidate, "ed", "alice")
    moved = audit.moves(client, name, PRODUCTION)[-1]
    assert (moved.kind, moved.approver) == ("gate", "alice")
