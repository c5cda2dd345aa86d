"""Replicas of one alias: three `captchaops serve` processes of the same model and alias, each
bound with `--host` to its own address, logging its own monitoring run, relaying webhooks to the
others; the gate's evidence, `models` and `status` sum them; the balancer `up --replicas` runs
(HAProxy, `stack/balancer.py`) in front of them loses no request when one is killed.

Where the multi-host test bed can be made (root: `harness/hosts.py`), the replicas run on three
network-namespace hosts, each on port 8888 of its own address, reaching the tracking server
through a forwarder on the bridge; the balancer runs on a fourth host, its clients on a fifth,
and this process is a client on the bridge's address. Elsewhere they all run on loopback
(127.0.0.1 twice and 127.0.0.2, distinct ports).
"""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from mlflow import MlflowClient

from captchaops import registry
from captchaops.data.synthetic import generate
from captchaops.evaluation import evidence
from captchaops.live import monitoring, reported
from captchaops.live.estimate import Calibration
from captchaops.serving.webhook import sign
from captchaops.settings import Settings
from captchaops.stack import balancer
from harness import hosts
from harness.processes import VENV_BIN, free_port, start_http_process, stop_process, wait_http
from harness.replicas import load_result, start_load
from tests.fixtures.models import TrainedModel
from tests.fixtures.signing import signed_alias
from tests.fixtures.stack import Tracking

pytestmark = pytest.mark.slow

ALIAS = "staging"
SECRET = "replicas-webhook-secret"
REQUESTS = 20
IMAGE = base64.b64encode(generate(1, seed=43)[0].image).decode()


@dataclass
class Replica:
    """One `captchaops serve` process of the module's model and alias."""

    url: str
    host: str
    port: int
    proc: subprocess.Popen


@dataclass
class Replicas:
    tracking: Tracking
    on_hosts: bool
    model: str
    version: str
    replicas: list[Replica]
    lb_host: hosts.Host | None
    """Where the balancer runs (None: here), and its clients (`client_host`)."""
    client_host: hosts.Host | None
    balancer_address: str
    start: Callable[[int], Replica]
    """Start replica n again where it ran (stopped with the module)."""

    def client(self) -> MlflowClient:
        return MlflowClient(self.tracking.uri, registry_uri=self.tracking.uri)


def start_replica(
    tracking_uri: str,
    model: str,
    home: Path,
    where: hosts.Host | None,
    address: str,
    port: int,
    peers: list[str],
    proxy: str,
) -> Replica:
    """`captchaops serve --host ADDRESS --port PORT` (on host `where`, if any) for the model's
    @staging, monitoring every 1 s and relaying webhooks to `peers`; ready once /ping answers
    through a Host naming ADDRESS."""
    home.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "CAPTCHAOPS_HOME": str(home),
        "CAPTCHAOPS_TRACKING_URI": tracking_uri,
        "CAPTCHAOPS_MODEL_NAME": model,
        "CAPTCHAOPS_POLL_SECONDS": "0.5",
        "CAPTCHAOPS_MONITOR_SECONDS": "1",
        "CAPTCHAOPS_WEBHOOK_SECRET": SECRET,
        "CAPTCHAOPS_WEBHOOK_PEERS": ",".join(peers),
        # the balancer: its forwarded client is believed, and the Host its clients send answered
        "CAPTCHAOPS_TRUSTED_PROXIES": proxy,
        "CAPTCHAOPS_ALLOWED_HOSTS": proxy,
    }
    for name in ("MLFLOW_TRACKING_URI", "CAPTCHAOPS_REPLICA_ID"):
        env.pop(name, None)
    url = f"http://{address}:{port}"
    cmd = [str(VENV_BIN / "captchaops"), "serve", "--alias", ALIAS]
    cmd += ["--host", address, "--port", str(port)]
    if where is not None:
        cmd = where.command(cmd)
    proc = start_http_process(cmd, f"{url}/ping", env=env, log=home / f"serve-{port}.log")
    return Replica(url, address, port, proc)


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
    client = MlflowClient(tracking_server.uri, registry_uri=tracking_server.uri)
    model = f"replicas-{uuid.uuid4().hex[:8]}"
    source = client.get_model_version(tiny_model.model_name, tiny_model.version)
    version = registry.register_version(client, model, str(source.source), str(source.run_id))
    for key, tag in Calibration(threshold=1.0, accuracy=0.95, size=2000).tags().items():
        client.set_model_version_tag(model, version, key, tag)
    signed_alias(tracking_server.uri, model, ALIAS, version)
    home = tmp_path_factory.mktemp("replicas")
    with ExitStack() as later:  # undone in reverse: replicas, forwarder, hosts
        on_hosts = hosts.unavailable() is None
        lb: hosts.Host | None = None
        client: hosts.Host | None = None
        if on_hosts:
            net = later.enter_context(hosts.host_net(["r1", "r2", "r3", "lb", "client"]))
            places = [(net[name], net[name].address, 8888) for name in ("r1", "r2", "r3")]
            tracking_uri = bridge_forwarder(later, net.gateway, tracking_server.uri)
            lb, client = net["lb"], net["client"]
            proxy = lb.address
        else:
            assert not hosts.required(), f"no multi-host test bed: {hosts.unavailable()}"
            addresses = ("127.0.0.1", "127.0.0.1", "127.0.0.2")
            places = [(None, address, free_port()) for address in addresses]
            tracking_uri = tracking_server.uri
            proxy = "127.0.0.1"
        urls = [f"http://{address}:{port}" for _, address, port in places]

        def start(n: int) -> Replica:
            where, address, port = places[n]
            peers = [url for url in urls if url != urls[n]]
            replica = start_replica(
                tracking_uri, model, home / str(n), where, address, port, peers, proxy
            )
            later.callback(stop_process, replica.proc)
            return replica

        with ThreadPoolExecutor(len(places)) as pool:  # started side by side
            started = [pool.submit(start, n) for n in range(len(places))]
        replicas = [future.result() for future in started if future.exception() is None]
        assert len(replicas) == len(places), [f.exception() for f in started]
        for replica in replicas:
            wait_serving(replica, version)
        yield Replicas(
            tracking_server, on_hosts, model, version, replicas, lb, client, proxy, start
        )


def bridge_forwarder(later: ExitStack, gateway: str, tracking_uri: str) -> str:
    """A TCP forwarder on the bridge's address to the tracking server on this machine's
    loopback (the hosts reach nothing else); its URI."""
    port = free_port()
    target = tracking_uri.removeprefix("http://").rstrip("/")
    proc = subprocess.Popen(
        [sys.executable, "-c", hosts.FORWARD, gateway, str(port), target],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    later.callback(stop_process, proc)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "listening"
    return f"http://{gateway}:{port}"


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
    port = 8888 if three.on_hosts else free_port()
    url = f"http://{three.balancer_address}:{port}"
    upstreams = [f"{r.host}:{r.port}" for r in three.replicas]
    config = tmp_path / "haproxy.cfg"
    config.write_text(
        balancer.config(ALIAS, three.balancer_address, port, upstreams, three.balancer_address)
    )
    command = ["haproxy", "-db", "-f", str(config)]
    where = three.lb_host.command if three.lb_host else list
    proxy = subprocess.Popen(where(command), stderr=subprocess.DEVNULL)
    body = tmp_path / "body.json"
    body.write_text(json.dumps({"inputs": [IMAGE]}))
    try:
        wait_http(f"{url}/ping", timeout=30, proc=proxy)
        time.sleep(balancer.HEALTH_INTERVAL_S + 0.5)  # a first check of every replica
        clients = three.client_host.command if three.client_host else list
        load = start_load(url, 6, 12, body, where=clients)
        time.sleep(4)
        killed = three.replicas[2]
        killed.proc.kill()
        result = load_result(load)
        assert result.failed == 0 and result.ok > 30, result
        back = three.start(2)
        three.replicas[2] = back
        wait_serving(back, three.version)
        deadline = time.monotonic() + 30
        with httpx.Client(timeout=30) as http:
            while answered(back) == 0:
                answer = http.post(f"{url}/invocations", json={"inputs": [IMAGE]})
                assert answer.status_code == 200, answer.text
                assert time.monotonic() < deadline, "the restarted replica never got a request"
    finally:
        stop_process(proxy)


def answered(replica: Replica) -> float:
    """/invocations the replica answered 200 since it started (0 before the first)."""
    text = httpx.get(f"{replica.url}/metrics", timeout=10).text
    line = 'captchaops_requests_total{status="200"} '
    return sum(float(ln.split()[-1]) for ln in text.splitlines() if ln.startswith(line))
