"""Replicas of one alias: three `captchaops serve` processes of the same model and alias, each
bound with `--host` to its own address, logging its own monitoring run, relaying webhooks to the
others; the gate's evidence, `models` and `status` sum them; the balancer `up --replicas` runs
(HAProxy, `stack/balancer.py`) in front of them loses no request when one is killed.

The layout is `harness/replica_hosts.py`'s, as the benchmarks use it: where the multi-host test
bed can be made (root: `harness/hosts.py`), the replicas run on three network-namespace hosts,
each on port 8888 of its own address, reaching the tracking server through a forwarder on the
bridge; the balancer runs on a fourth host, its clients on a fifth, and this process is a client
on the bridge's address. Elsewhere they all run on loopback (127.0.0.1 twice and 127.0.0.2,
distinct ports).
"""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from mlflow import MlflowClient

from captchaops.data.synthetic import generate
from captchaops.evaluation import evidence
from captchaops.live import monitoring, reported
from captchaops.live.estimate import Calibration
from captchaops.registry.versions import register_version
from captchaops.serving.webhook import sign
from captchaops.settings import Settings
from harness import hosts, replica_hosts
from harness.replica_hosts import Replica
from harness.replicas import answered, drill
from tests.fixtures.models import TrainedModel
from tests.fixtures.signing import signed_alias
from tests.fixtures.stack import Tracking

pytestmark = pytest.mark.slow

ALIAS = "staging"
SECRET = "replicas-webhook-secret"
REQUESTS = 20
DROPPED = ("MLFLOW_TRACKING_URI", "CAPTCHAOPS_REPLICA_ID")
IMAGE = base64.b64encode(generate(1, seed=43)[0].image).decode()


@dataclass
class Replicas:
    tracking: Tracking
    bed: replica_hosts.Bed
    model: str
    version: str

    @property
    def on_hosts(self) -> bool:
        return self.bed.on_hosts

    @property
    def replicas(self) -> list[Replica]:
        return self.bed.replicas

    def client(self) -> MlflowClient:
        return MlflowClient(self.tracking.uri, registry_uri=self.tracking.uri)


def wait_serving(replica: Replica, version: str) -> None:
    """Until the replica serves `version` and has read its calibration (every answer counts)."""
    deadline = time.monotonic() + 60
    while True:
        health = httpx.get(f"{replica.url}/health", timeout=10).json()
        if health.get("version") == version and version in health.get("live_estimate", {}):
            return
        assert time.monotonic() < deadline, health
        time.sleep(0.2)


@pytest.fixture(scope="module")
def three(
    tracking_server: Tracking, tiny_model: TrainedModel, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Replicas]:
    """Three replicas of the module's model at @staging (`harness.replica_hosts`: on three
    hosts, the balancer's host their trusted proxy), monitoring every 1 s and relaying webhooks
    to each other."""
    client = MlflowClient(tracking_server.uri, registry_uri=tracking_server.uri)
    model = f"replicas-{uuid.uuid4().hex[:8]}"
    source = client.get_model_version(tiny_model.model_name, tiny_model.version)
    version = register_version(client, model, str(source.source), str(source.run_id))
    for key, tag in Calibration(threshold=1.0, accuracy=0.95, size=2000).tags().items():
        client.set_model_version_tag(model, version, key, tag)
    signed_alias(tracking_server.uri, model, ALIAS, version)
    on_hosts = hosts.unavailable() is None
    if not on_hosts:
        assert not hosts.required(), f"no multi-host test bed: {hosts.unavailable()}"
    home = tmp_path_factory.mktemp("replicas")
    base = {k: v for k, v in os.environ.items() if k not in DROPPED}
    with replica_hosts.bed(tracking_server.uri, 3, home, loopback=not on_hosts) as bed:

        def env(n: int) -> dict[str, str]:
            return {
                "CAPTCHAOPS_MODEL_NAME": model,
                "CAPTCHAOPS_POLL_SECONDS": "0.5",
                "CAPTCHAOPS_MONITOR_SECONDS": "1",
                "CAPTCHAOPS_WEBHOOK_SECRET": SECRET,
                "CAPTCHAOPS_WEBHOOK_PEERS": ",".join(bed.peers(n)),
            }

        bed.serve(ALIAS, base, env)
        for replica in bed.replicas:
            wait_serving(replica, version)
        yield Replicas(tracking_server, bed, model, version)


def test_serve_host_answers_its_own_address_and_refuses_foreign_names(three: Replicas) -> None:
    bound = three.replicas[2]
    assert bound.host != "127.0.0.1"
    if three.on_hosts:  # a host of the test bed: an address no loopback name covers
        assert ipaddress.ip_address(bound.host) in hosts.RANGE
    answer = httpx.post(f"{bound.url}/invocations", json={"inputs": [IMAGE]}, timeout=30)
    assert answer.status_code == 200, answer.text
    foreign = httpx.get(f"{bound.url}/ping", headers={"Host": f"evil.example:{bound.port}"})
    assert foreign.status_code == 400 and foreign.json()["error"] == "bad_host"


def test_evidence_sums_the_answers_of_every_replica(three: Replicas) -> None:
    for replica in three.replicas:
        with httpx.Client(timeout=30) as http:
            for _ in range(REQUESTS):
                resp = http.post(f"{replica.url}/invocations", json={"inputs": [IMAGE]})
                assert resp.status_code == 200, resp.text
    expected = REQUESTS * len(three.replicas)
    expected += 1  # test_serve_host's answer, on the third replica
    deadline = time.monotonic() + 60
    while True:
        found = evidence.gather(three.client(), three.model, three.version, None, min_shadow=1)
        if found.candidate_answers == expected or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert (found.candidate_answers, found.replicas) == (expected, 3)

    experiment = three.client().get_experiment_by_name(monitoring.experiment_name(three.model))
    runs = three.client().search_runs(
        [experiment.experiment_id],
        monitoring.replicas_filter(three.model, ALIAS, three.version),
    )
    by_replica = {r.data.tags[monitoring.REPLICA_TAG]: r.data.metrics for r in runs}
    expected_ids = {monitoring.default_replica_id(r.port, r.host) for r in three.replicas}
    assert len(expected_ids) == 3 and set(by_replica) == expected_ids
    answers = sorted(m[monitoring.LIVE_ANSWERS] for m in by_replica.values())
    assert answers == [REQUESTS, REQUESTS, REQUESTS + 1]

    # `models` and `status` read one replica's /health (as through a balancer), then the sum.
    settings = Settings(tracking_uri=three.tracking.uri, model_name=three.model)
    (one,) = reported.read({ALIAS: three.replicas[0].url})
    assert (one.answers, one.replicas) == (REQUESTS, 1)
    (state,) = reported.summed(settings, [one])
    assert (state.answers, state.replicas) == (expected, 3)
    assert f"({expected} so far from 3 replicas)" in state.line()


def test_metrics_name_the_replica_and_export_the_process(three: Replicas) -> None:
    replica = three.replicas[0]
    text = httpx.get(f"{replica.url}/metrics", timeout=10).text
    replica_id = monitoring.default_replica_id(replica.port, replica.host)
    assert replica_id.startswith(os.uname().nodename)
    info = (
        f'captchaops_server_info{{alias="{ALIAS}",model="{three.model}",'
        f'replica="{replica_id}",version="{three.version}"}} 1.0'
    )
    assert info in text, text[:2000]
    rss = next(line for line in text.splitlines() if line.startswith("process_resident_memory"))
    assert float(rss.split()[-1]) > 10e6
    assert "process_cpu_seconds_total " in text


def counter(replica: Replica, line_start: str) -> float:
    text = httpx.get(f"{replica.url}/metrics", timeout=10).text
    return next(float(ln.split()[-1]) for ln in text.splitlines() if ln.startswith(line_start))


def test_a_webhook_one_replica_gets_reaches_every_replica(three: Replicas) -> None:
    """MLflow delivers to one address (the balancer's): that replica relays it, as signed, to
    its peers, which verify it and check their alias at once; none relays it again."""
    event: dict[str, object] = {"entity": "model_version_alias", "action": "created"}
    event["data"] = {"name": three.model, "alias": ALIAS, "version": three.version}
    body = json.dumps(event).encode()
    delivery, stamp = uuid.uuid4().hex, str(int(time.time()))
    headers = {
        "Content-Type": "application/json",
        "X-MLflow-Signature": sign(SECRET, delivery, stamp, body),
        "X-MLflow-Timestamp": stamp,
        "X-MLflow-Delivery-Id": delivery,
    }
    first, *others = three.replicas
    answer = httpx.post(f"{first.url}/webhook", content=body, headers=headers, timeout=10)
    assert answer.status_code == 202, answer.text
    accepted = 'captchaops_webhook_deliveries_total{outcome="accepted"}'
    deadline = time.monotonic() + 20
    while [counter(r, accepted) for r in others] != [1.0, 1.0]:
        assert time.monotonic() < deadline, [counter(r, accepted) for r in others]
        time.sleep(0.2)
    assert counter(first, 'captchaops_webhook_relays_total{result="sent"}') == 2
    for replica in others:  # relayed deliveries go no further
        assert counter(replica, 'captchaops_webhook_relays_total{result="sent"}') == 0
    # A forged relay is refused like any unsigned delivery.
    forged = {**headers, "X-MLflow-Signature": "v1,AAAA", "X-Captchaops-Relayed": "1"}
    refused = httpx.post(f"{others[0].url}/webhook", content=body, headers=forged, timeout=10)
    assert refused.status_code == 401


def test_a_replica_killed_behind_the_balancer_costs_no_client_request(
    three: Replicas, tmp_path: Path
) -> None:
    """The balancer of `up --replicas` (its HAProxy config) on a fourth host, 6 clients on a
    fifth: a replica SIGKILLed under their load costs none of them a request (the balancer sends
    what it did not answer to another), and started again it answers through the balancer."""
    if shutil.which("haproxy") is None:  # CI installs it (.ci/run) and must not skip
        assert not hosts.required(), "no haproxy on PATH: apt-get install haproxy"
        pytest.skip("no haproxy on PATH (apt-get install haproxy)")
    bed = three.bed
    url = bed.balancer(ALIAS)
    body = tmp_path / "body.json"
    body.write_text(json.dumps({"inputs": [IMAGE]}))
    result, back = drill(
        url, body, 6, 12, 4, lambda: bed.kill_and_wait(2, body.read_bytes(), timeout=60),
        where=bed.client_command,
    )  # fmt: skip
    assert result.failed == 0 and result.ok > 30, result
    assert back < 60 and answered(three.replicas[2].url) > 0
