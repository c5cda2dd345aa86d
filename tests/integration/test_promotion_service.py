"""The promotion service (issue 37): the one process that holds the promotion key, reached by
commands that hold none (CAPTCHAOPS_PROMOTIONS_URL), on real tracking servers.

Locally, a key-less `promote --auto` (the @staging version through the gate) and `promote
--version N` go through the service, and the model servers' own signature check
(`serving.audit_gate.AuditGate`, the service's public key) follows each move. In
team mode (a basic-auth tracking server; the service logs in as admin) the tracking server says
who calls: a wrong password is 401, a reader 403; editor ed's production request waits, ed may
not approve it, alice's approval makes the signed move naming both, and a production server that
trusts only the service's key serves it. A request ed writes straight into the audit trail, bare
or wearing a real request's signature, is not approved. The client's own settings choose nothing:
an empty CAPTCHAOPS_PRODUCTION_APPROVAL still waits, and a dead CAPTCHAOPS_PRODUCTION_URL does not
make a rollback skip the approval (the service asks its own production server). ed's canary
waits for a second account too, and ends (an alias deletion, which needs the service account's
MANAGE) without one.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest
from mlflow import MlflowClient
from prometheus_client import CollectorRegistry, Gauge
from pydantic import SecretStr
from typer.testing import CliRunner, Result

from captchaops import mlflow_scope
from captchaops.canary.watch import Outcome
from captchaops.cli import app
from captchaops.cli import canary as canary_cli
from captchaops.data.frozen import ARTIFACT, EVAL_EXPERIMENT, pack
from captchaops.evaluation.evalset import create_evalset
from captchaops.registry.aliases import adopt_aliases, alias_version, assign_alias
from captchaops.registry.audit import moves
from captchaops.registry.requests import REQUEST_SIGNATURE, pending_requests, record_request
from captchaops.registry.signing import PRIVATE_KEY, PUBLIC_KEY, SignedMove
from captchaops.registry.unaudited import signed_move
from captchaops.registry.versions import evalset_problem
from captchaops.serving.audit_gate import AuditGate
from captchaops.settings import Settings, load_settings
from captchaops.stack.promotions_client import stage_candidate
from captchaops.team_accounts import add_user, ensure_promotions_account
from captchaops.tracking_rest import TrackingRest
from tests.fixtures.models import TrainedModel, copies, make_settings
from tests.fixtures.serving import ModelServer, start_model_server
from tests.fixtures.stack import (
    VENV_BIN,
    Tracking,
    basic_auth_tracking,
    free_port,
    start_http_process,
    stop_process,
)
from tests.integration.test_approvals import _cheap_password_checks, _copy_tiny_model

pytestmark = pytest.mark.slow
NAME = "text-captcha"
PRODUCTION = "production"
POLL_S = 1.0
PASSWORDS = {
    "admin": "admin-password-for-tests",
    "ed": "ed-password-for-tests",
    "alice": "alice-password-for-tests",
    "captchaops-promotions": "promotions-password-for-tests",
}


def start_service(home: Path, tracking_uri: str, **env: str) -> tuple[str, subprocess.Popen]:
    """`captchaops promotions serve` on a free loopback port with its own home and key folder;
    (its URL, the process)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    values = {
        **os.environ,
        "CAPTCHAOPS_HOME": str(home),
        "CAPTCHAOPS_TRACKING_URI": tracking_uri,
        "CAPTCHAOPS_SIGNING_KEY_DIR": str(home / "keys"),
        **env,
    }
    for name in (
        "CAPTCHAOPS_PRODUCTION_APPROVAL",
        "CAPTCHAOPS_PROMOTIONS_URL",
        "MLFLOW_TRACKING_URI",
    ):
        values.pop(name, None)
    cmd = [str(VENV_BIN / "captchaops"), "promotions", "serve", "--port", str(port)]
    proc = start_http_process(cmd, f"{url}/health", env=values, log=home / "service.log")
    return url, proc


def cli(home: Path, service: str, tracking_uri: str, name: str, *args: str, **env: str) -> Result:
    """`captchaops ARGS` from a home with no promotion key, its work sent to the service."""
    runner = CliRunner(
        env={
            "CAPTCHAOPS_HOME": str(home),
            "CAPTCHAOPS_SIGNING_KEY_DIR": str(home / "keys"),
            "CAPTCHAOPS_TRACKING_URI": tracking_uri,
            "CAPTCHAOPS_PROMOTIONS_URL": service,
            "CAPTCHAOPS_MODEL_NAME": name,
            "CAPTCHAOPS_PRODUCTION_APPROVAL": None,
            "CAPTCHAOPS_AUTH": None,
            "CAPTCHAOPS_TRACKING_USERNAME": None,
            "CAPTCHAOPS_TRACKING_PASSWORD": None,
            "CAPTCHAOPS_ACTOR": None,
            **env,
        }
    )
    return runner.invoke(app, list(args))


def servers_follow(uri: str, name: str, key: Path, auth: tuple[str, str] | None = None) -> str:
    """The version a model server's own signature check serves for @production (it must be the
    alias's version: an unsigned or foreign-signed move is held back and flagged)."""
    rest = TrackingRest(uri, auth)
    try:
        gauge = Gauge("unaudited", "test", registry=CollectorRegistry())
        judged = AuditGate(rest, name, PRODUCTION, key_path=key, gauge=gauge)
        ref = rest.alias_version(name, PRODUCTION)
        followed = judged.judge()
        assert followed is not None and ref is not None, judged.reason()
        assert judged.unaudited is None and followed.version == ref.version, judged.reason()
        return followed.version
    finally:
        rest.close()


def test_a_keyless_client_promotes_staging_through_the_service(
    tracking_server: Tracking, tiny_model: TrainedModel, tmp_path: Path, isolated_mlflow: None
) -> None:
    name = "promotion-service-local"
    client = MlflowClient(tracking_server.uri, registry_uri=tracking_server.uri)
    first, second = copies(client, tiny_model, name, 2)
    service_home = tmp_path / "service"
    keys = service_home / "keys"
    setup = make_settings(tracking_server, service_home, model_name=name, signing_key_dir=keys)
    create_evalset(client, setup, size=20)  # pinned and signed with the service's key
    assign_alias(client, name, PRODUCTION, first, reason="first", actor="tests")
    assign_alias(client, name, "staging", second, reason="trained", actor="tests")
    url, proc = start_service(service_home, tracking_server.uri)
    try:
        home = tmp_path / "laptop"
        gated = cli(home, url, tracking_server.uri, name, "promote", "--auto",
                    "--latency-slack-ms", "1000", "--actor", "ed")  # fmt: skip
        assert gated.exit_code == 0, gated.output
        assert gated.stdout.startswith(f"promoted v{second}: accuracy "), gated.stdout
        assert servers_follow(tracking_server.uri, name, keys / PUBLIC_KEY) == second
        # The key's holders dump no core: the service and its gate worker (made by now).
        holders = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        assert len(holders) >= 2
        assert {h.rlimit(psutil.RLIMIT_CORE) for h in holders} == {(0, 0)}
        done = cli(home, url, tracking_server.uri, name, "promote", "--version", first,
                   "--reason", "back to the first", "--actor", "ed")  # fmt: skip
        assert done.exit_code == 0, done.output
        assert f"promoted: @production v{second} -> v{first} (promoted) by ed at" in done.stdout
        assert servers_follow(tracking_server.uri, name, keys / PUBLIC_KEY) == first
        assert not (home / "keys").exists() and (keys / PRIVATE_KEY).exists()

        wrong = cli(home, url, tracking_server.uri, name, "promote", "--version", "99",
                    "--reason", "x")  # fmt: skip
        assert wrong.exit_code == 1
        assert wrong.stderr.strip().splitlines() == [  # the registry's line, relayed (409)
            f"error: {name} has no version 99; see `captchaops models` for the versions"
        ]
        dead = f"http://127.0.0.1:{free_port()}"
        down = cli(home, dead, tracking_server.uri, name, "requests")
        assert down.exit_code == 1
        assert down.stderr.strip().splitlines() == [
            f"error: the promotion service at {dead} does not answer (ConnectError); start it "
            "with `captchaops promotions serve`, or check CAPTCHAOPS_PROMOTIONS_URL"
        ]
    finally:
        stop_process(proc)


def test_every_signing_command_goes_through_the_service_and_a_replaced_set_is_refused(
    tracking_server: Tracking, tiny_model: TrainedModel, tmp_path: Path, isolated_mlflow: None
) -> None:
    """Issue 37, item 1 and 3: a key-less home makes the frozen set (the service computes its
    digest from the logged archive and signs the pin), adopts, stages (train's move after its
    floor), starts, ends, promotes and trips a canary; each move carries the service's signature. An
    editor who then replaces the logged archive gets the gate's one-line refusal."""
    name = "promotion-service-every-move"
    client = MlflowClient(tracking_server.uri, registry_uri=tracking_server.uri)
    first, second, third = copies(client, tiny_model, name, 3)
    service_home = tmp_path / "service"
    public = service_home / "keys" / PUBLIC_KEY
    service_home.mkdir()
    url, proc = start_service(service_home, tracking_server.uri, CAPTCHAOPS_STAGING_FLOOR="0")
    home = tmp_path / "laptop"

    def run(*args: str) -> Result:
        return cli(home, url, tracking_server.uri, name, *args, CAPTCHAOPS_ACTOR="ed")

    def signed(alias: str) -> SignedMove:
        return signed_move(client.get_registered_model(name).tags, alias, public, name)

    try:
        made = run("evalset", "--size", "20")
        assert made.exit_code == 0, made.output
        digest = made.stdout.split()[3]
        tags = client.get_registered_model(name).tags
        assert tags["evalset_digest"] == digest
        assert evalset_problem(tags, name, public) is None  # signed with the service's key

        client.set_registered_model_alias(name, PRODUCTION, first)  # as an older stack left it
        adopted = run("promotions", "adopt")
        assert adopted.exit_code == 0, adopted.output
        assert f"signed: @production v{first} -> v{first} (adopted) by ed" in adopted.stdout
        assert signed(PRODUCTION).version == first

        laptop = load_settings(
            home=home, tracking_uri=tracking_server.uri, model_name=name, promotions_url=url,
            staging_floor=1.0,  # the service's floor decides, not the caller's
        )  # fmt: skip
        assert stage_candidate(client, laptop, third, 0.0) is None  # nor the caller's accuracy
        assert signed("staging").version == third == alias_version(client, name, "staging")

        started = run("promote", "--canary", "10", "--version", second, "--detach")
        assert started.exit_code == 0, started.output
        assert f"canary: @canary nothing -> v{second} (canary) by ed" in started.stdout
        assert signed("canary").version == second
        ended = run("rollback", "--canary", "--reason", "not today")
        assert ended.exit_code == 0, ended.output
        assert alias_version(client, name, "canary") is None and signed("canary").version == ""
        assert run("promote", "--canary", "10", "--version", second, "--detach").exit_code == 0
        block = {"state": "routing", "answers": 500, "estimate": 0.9, "p99_ms": 5.0}
        passed = Outcome(0, "canary passed", block, left_to_caller="promote")
        promoted = canary_cli._service_act(laptop, second, passed, 1.0, "ed")
        assert promoted.code == 0 and "promoted: @production" in promoted.line, promoted.line
        assert signed(PRODUCTION).version == second
        assert alias_version(client, name, "canary") is None  # the promotion ended the canary
        # A tripped breaker: the watch leaves the end to the service, which marks it rejected.
        assert run("promote", "--canary", "10", "--version", third, "--detach").exit_code == 0
        bad = {"state": "tripped", "answers": 50, "estimate": 0.1, "p99_ms": 5.0}
        trip = Outcome(3, "live estimate 10.0% is far below", bad, left_to_caller="end")
        tripped = canary_cli._service_act(laptop, third, trip, 1.0, "ed")
        assert tripped.code == 3 and "rolled back: @canary" in tripped.line, tripped.line
        assert alias_version(client, name, "canary") is None and signed("canary").version == ""
        assert client.get_model_version(name, third).tags["validation_status"] == "rejected"
        assert not (home / "keys").exists()

        # An editor replaces the logged archive through MLflow's artifact API.
        run_id = client.search_runs(
            [client.get_experiment_by_name(EVAL_EXPERIMENT).experiment_id],
            f"tags.evalset_digest = '{digest}'",
        )[0].info.run_id
        other = create_evalset(client, make_settings(tracking_server, tmp_path / "x",
                               model_name=f"{name}-other"), size=20, seed=1)  # fmt: skip
        (tmp_path / "swap").mkdir()
        (tmp_path / "swap" / ARTIFACT).write_bytes(pack(other.images, other.labels, {"seed": 1}))
        client.log_artifact(run_id, str(tmp_path / "swap" / ARTIFACT))
        client.set_registered_model_alias(name, "staging", first)
        refused = run("promote", "--auto")
        assert refused.exit_code == 1, refused.output
        assert refused.stderr.strip().splitlines() == [
            f"error: the stored frozen set {digest[:12]} does not match its digest; make a new "
            "one with `captchaops evalset --replace`"
        ]
        assert alias_version(client, name, PRODUCTION) == second
    finally:
        stop_process(proc)


@dataclass
class Team:
    uri: str
    home: Path
    service: str
    passwords: dict[str, str]
    versions: list[str]
    server: ModelServer

    @property
    def public_key(self) -> Path:
        return self.home / "service" / "keys" / PUBLIC_KEY

    def settings(self, user: str) -> Settings:
        return load_settings(
            home=self.home / "laptop",
            tracking_uri=self.uri,
            tracking_username=user,
            tracking_password=self.passwords[user],
        )

    def client(self, user: str = "ed") -> MlflowClient:
        return mlflow_scope.client(self.settings(user))

    def cli(self, user: str, *args: str, **env: str) -> Result:
        return cli(
            self.home / "laptop", self.service, self.uri, NAME, *args,
            CAPTCHAOPS_AUTH="true", CAPTCHAOPS_TRACKING_USERNAME=user,
            CAPTCHAOPS_TRACKING_PASSWORD=self.passwords[user], **env,
        )  # fmt: skip

    def served(self, version: str, within: float = 10.0) -> float:
        """Seconds until the production server serves `version` (it checks every POLL_S)."""
        began = time.monotonic()
        while time.monotonic() - began < within:
            health = httpx.get(f"{self.server.url}/health", timeout=5).json()
            if str(health.get("version")) == version:
                return time.monotonic() - began
            time.sleep(0.05)
        raise AssertionError(f"never served v{version}: {self.server.log.read_text()[-2000:]}")


@pytest.fixture(scope="module")
def team(
    tracking_server: Tracking, tiny_model: TrainedModel, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Team]:
    """A basic-auth tracking server (editors ed and alice, reader rita), two versions, a signed
    frozen set, @production at the first (signed with the service's key), a production server
    that trusts only that key, and the promotion service logged in as admin."""
    home = tmp_path_factory.mktemp("promotion-service")
    with basic_auth_tracking(home, PASSWORDS["admin"]) as admin:
        uri = admin.tracking_uri
        assert uri is not None
        add_user(admin, "ed", "editor", PASSWORDS["ed"])
        add_user(admin, "alice", "editor", PASSWORDS["alice"])
        reader = add_user(admin, "rita", "reader")
        assert reader.password
        passwords = PASSWORDS | {"rita": reader.password}
        _cheap_password_checks(home / "basic_auth.db", passwords)
        keys = home / "service" / "keys"
        ed_settings = load_settings(
            home=home / "service", tracking_uri=uri, tracking_username="ed",
            tracking_password=passwords["ed"], signing_key_dir=keys,
        )  # fmt: skip
        ed = mlflow_scope.client(ed_settings)
        versions = _copy_tiny_model(tracking_server.uri, tiny_model, ed, home / "model", 2)
        create_evalset(ed, ed_settings, size=20)
        assign_alias(ed, NAME, PRODUCTION, versions[0], reason="first", actor="ed")
        adopt_aliases(ed, NAME, actor="ed", key_dir=keys)
        server = start_model_server(
            uri, PRODUCTION, home / "serve", poll_seconds=POLL_S,
            settings={
                "tracking_username": "admin", "tracking_password": PASSWORDS["admin"],
                "signing_public_key": str(keys / PUBLIC_KEY), "canary": "false",
            },
        )  # fmt: skip
        # The service's own account (as team-mode `up` makes it): EDIT, not admin.
        ensure_promotions_account(
            admin.model_copy(
                update={"promotions_password": SecretStr(PASSWORDS["captchaops-promotions"])}
            )
        )
        url, proc = start_service(
            home / "service", uri, CAPTCHAOPS_AUTH="true",
            CAPTCHAOPS_TRACKING_USERNAME="captchaops-promotions",
            CAPTCHAOPS_TRACKING_PASSWORD=PASSWORDS["captchaops-promotions"],
            CAPTCHAOPS_PRODUCTION_URL=server.url,
        )  # fmt: skip
        try:
            team = Team(uri, home, url, passwords, versions, server)
            team.served(versions[0], within=60)
            yield team
        finally:
            stop_process(proc)
            stop_process(server.proc)


def _request_id(result: Result) -> str:
    assert result.exit_code == 0, result.output
    assert "waiting for approval: " in result.stdout, result.stdout
    found = re.search(rf"captchaops approve ([0-9a-f]+) --model-name {NAME}$", result.stdout, re.M)
    assert found, result.stdout
    return found[1]


def test_the_tracking_server_says_who_calls(team: Team) -> None:
    body = {"model": NAME, "version": team.versions[1], "reason": "mine", "actor": "alice"}
    wrong = httpx.post(f"{team.service}/promote", json=body, auth=("ed", "guess"), timeout=30)
    assert wrong.status_code == 401 and wrong.json()["error"] == "login refused", wrong.text
    nobody = httpx.post(f"{team.service}/promote", json=body, timeout=30)
    assert nobody.status_code == 401 and set(nobody.json()) == {"error", "detail"}
    rita = httpx.post(
        f"{team.service}/promote", json=body, auth=("rita", team.passwords["rita"]), timeout=30
    )
    assert rita.status_code == 403, rita.text
    assert rita.json()["detail"].startswith(f"user 'rita' may not promote {NAME}")
    assert alias_version(team.client(), NAME, PRODUCTION) == team.versions[0]


def test_an_editors_request_waits_for_a_second_account(team: Team, isolated_mlflow: None) -> None:
    first, second = team.versions
    # The client's empty approval setting is not the service's: the request still waits.
    asked = team.cli(
        "ed", "promote", "--version", second, "--reason", "new fonts",
        CAPTCHAOPS_PRODUCTION_APPROVAL="",
    )  # fmt: skip
    request_id = _request_id(asked)
    assert f"@production v{first} -> v{second} (manual) requested by ed at" in asked.stdout
    listed = team.cli("alice", "requests")
    assert listed.exit_code == 0 and f"{request_id} @production v{first}" in listed.stdout

    own = team.cli("ed", "approve", request_id)
    assert own.exit_code == 1, own.output
    assert own.stderr.strip().splitlines() == [
        f"error: ed requested {request_id}; another account must approve it (ask someone else "
        f"to run `captchaops approve {request_id}`)"
    ]
    assert alias_version(team.client(), NAME, PRODUCTION) == first

    done = team.cli("alice", "approve", request_id)
    assert done.exit_code == 0, done.output
    assert f"approved {request_id}: @production v{first} -> v{second} (promoted) by ed" in (
        done.stdout
    )
    print(f"served {team.served(second):.2f} s after `approve` returned (poll {POLL_S} s)")
    admin = ("admin", team.passwords["admin"])
    assert servers_follow(team.uri, NAME, team.public_key, admin) == second
    tags = team.client().get_registered_model(NAME).tags
    signed: SignedMove = signed_move(tags, PRODUCTION, team.public_key, NAME)
    assert (signed.version, signed.actor, signed.approver) == (second, "ed", "alice")
    assert not (team.home / "laptop" / "keys").exists()


def test_a_request_written_around_the_service_is_not_approved(
    team: Team, isolated_mlflow: None
) -> None:
    first, second = team.versions
    ed = team.client()
    assert alias_version(ed, NAME, PRODUCTION) == second
    legit = [m for m in moves(ed, NAME, PRODUCTION) if m.decision == "requested"]
    signature = ed.get_run(legit[-1].run_id).data.tags[REQUEST_SIGNATURE]
    for copied in ("", signature):
        forged = record_request(
            ed, NAME, from_version=second, to_version=first, kind="rollback",
            requester="ed", account="ed", verdict="looks fine", reason="forged",
        )  # fmt: skip
        if copied:
            ed.set_tag(forged.id, REQUEST_SIGNATURE, copied)
        refused = team.cli("alice", "approve", forged.short_id)
        assert refused.exit_code == 1, refused.output
        why = "'s signature does not verify" if copied else " was not recorded by the promotion"
        lines = refused.stderr.strip().splitlines()
        assert len(lines) == 1 and f"request {forged.short_id}{why}" in lines[0], lines
        assert alias_version(ed, NAME, PRODUCTION) == second
    assert len(pending_requests(ed, NAME)) == 2


def test_a_clients_dead_production_url_does_not_skip_the_approval(
    team: Team, isolated_mlflow: None
) -> None:
    first, second = team.versions
    dead = f"http://127.0.0.1:{free_port()}"
    asked = team.cli("ed", "rollback", "--reason", "complaints", CAPTCHAOPS_PRODUCTION_URL=dead)
    _request_id(asked)  # the service's own production server passes its live check: it waits
    assert f"@production v{second} -> v{first} (rollback) requested by ed at" in asked.stdout
    assert alias_version(team.client(), NAME, PRODUCTION) == second
    assert team.served(second) < 1.0


def test_only_an_admin_adopts_through_the_service(team: Team, isolated_mlflow: None) -> None:
    """The service's own account is no admin, so the admin check is the caller's."""
    refused = team.cli("ed", "promotions", "adopt")
    assert refused.exit_code == 1, refused.output
    assert refused.stderr.strip().splitlines() == [
        f"error: user 'ed' may not adopt {NAME}'s aliases: signing what the aliases hold now "
        "needs an admin account"
    ]
    adopted = team.cli("admin", "promotions", "adopt")
    assert adopted.exit_code == 0, adopted.output
    held = alias_version(team.client(), NAME, PRODUCTION)
    assert f"signed: @production v{held} -> v{held} (adopted) by admin" in adopted.stdout
    signed = signed_move(team.client().get_registered_model(NAME).tags, PRODUCTION,
                         team.public_key, NAME)  # fmt: skip
    assert (signed.version, signed.actor) == (held, "admin")


def test_an_editors_canary_waits_for_a_second_account(team: Team, isolated_mlflow: None) -> None:
    """Where production needs approval, a canary (up to half of production's traffic) does too:
    ed's `promote --canary` records a request, ed may not approve it, and alice's approval
    starts it, signed with both names; ending it needs no approval."""
    ed = team.client()
    production = alias_version(ed, NAME, PRODUCTION)
    candidate = next(v for v in team.versions if v != production)
    asked = team.cli(
        "ed", "promote", "--canary", "20", "--version", candidate, "--reason", "try it"
    )  # fmt: skip
    assert asked.exit_code == 0, asked.output
    assert f"@canary nothing -> v{candidate} (canary) requested by ed at" in asked.stdout
    found = re.search(rf"captchaops approve ([0-9a-f]+) --model-name {NAME}", asked.stdout)
    assert found, asked.stdout
    request_id = found[1]
    assert alias_version(ed, NAME, "canary") is None
    assert team.cli("ed", "approve", request_id).exit_code == 1
    assert alias_version(ed, NAME, "canary") is None

    done = team.cli("alice", "approve", request_id)
    assert done.exit_code == 0, done.output
    assert f"approved {request_id}: @canary nothing -> v{candidate} (canary) by ed" in done.stdout
    assert alias_version(ed, NAME, "canary") == candidate
    assert ed.get_model_version(NAME, candidate).tags["canary_percent"] == "20"
    tags = ed.get_registered_model(NAME).tags
    signed = signed_move(tags, "canary", team.public_key, NAME)
    assert (signed.version, signed.actor, signed.approver) == (candidate, "ed", "alice")
    assert request_id not in {r.short_id for r in pending_requests(ed, NAME)}

    ended = team.cli("ed", "rollback", "--canary", "--reason", "enough")
    assert ended.exit_code == 0, ended.output
    assert alias_version(ed, NAME, "canary") is None
    assert request_id not in {r.short_id for r in pending_requests(ed, NAME)}
    assert alias_version(ed, NAME, PRODUCTION) == production
