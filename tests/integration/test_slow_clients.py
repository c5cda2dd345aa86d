"""Slow clients cost nothing: a model server closes a head that does not arrive in time, answers
408 to a body that does not, caps the connections one address may hold and reads bodies before
they take a request slot; the web app (waitress) stays open to new visitors meanwhile."""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from harness import slow
from harness.attacks import b64, captcha, scoring
from tests.fixtures.models import TrainedModel
from tests.fixtures.serving import ModelServer, start_model_server
from tests.fixtures.signing import signed_stage
from tests.fixtures.stack import VENV_BIN, Tracking, free_port, start_http_process, stop_process
from tests.integration.test_gate import copy_version, isolated

pytestmark = pytest.mark.slow
HEAD_TIMEOUT_S = 2.0
BODY_TIMEOUT_S = 2.0
PER_CLIENT = 64


@dataclass
class Servers:
    model: ModelServer
    app: str


@pytest.fixture(scope="module")
def servers(
    tracking_server: Tracking, tiny_model: TrainedModel, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Servers]:
    """A staging model server with short head and body deadlines, and the web app before it."""
    home = tmp_path_factory.mktemp("slow")
    settings = isolated(tracking_server, home)
    version = copy_version(settings, tiny_model)
    signed_stage(settings, version)
    model = start_model_server(
        tracking_server.uri,
        "staging",
        home / "serve",
        model_name=settings.model_name,
        settings={
            "head_timeout_seconds": str(HEAD_TIMEOUT_S),
            "body_timeout_seconds": str(BODY_TIMEOUT_S),
            "max_connections_per_client": str(PER_CLIENT),
        },
    )
    port = free_port()
    env = {
        **os.environ,
        "CAPTCHAOPS_HOME": str(home / "app"),
        "CAPTCHAOPS_TRACKING_URI": tracking_server.uri,
        "CAPTCHAOPS_MODEL_NAME": settings.model_name,
        "CAPTCHAOPS_PRODUCTION_PORT": str(model.port),
        "CAPTCHAOPS_STAGING_PORT": str(model.port),
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    url = f"http://127.0.0.1:{port}"
    app = start_http_process(
        [str(VENV_BIN / "captchaops"), "app", "--port", str(port)],
        f"{url}/healthz",
        env=env,
        log=home / "app.log",
        timeout=60,
    )
    try:
        model.wait_version(version)
        yield Servers(model, url)
    finally:
        stop_process(app)
        stop_process(model.proc)


def normal(url: str) -> int:
    with httpx.Client(timeout=10) as client:
        return client.post(f"{url}/invocations", json=scoring(b64(captcha()))).status_code


def test_an_unfinished_head_is_closed_after_the_head_deadline(servers: Servers) -> None:
    url = servers.model.url
    silent = slow.connect(url)
    partial = slow.connect(url)
    partial.sendall(b"POST /invocations HTTP/1.1\r\nHost: x\r\n")
    assert not slow.closed(partial, wait=0.5)
    assert slow.closed(partial, wait=HEAD_TIMEOUT_S + 5)
    assert slow.closed(silent, wait=1)


def test_a_keep_alive_connection_gets_a_new_head_deadline_after_each_answer(
    servers: Servers,
) -> None:
    url = servers.model.url
    with httpx.Client(timeout=10) as client:
        for _ in range(3):
            response = client.get(f"{url}/ping")
            assert response.status_code == 200
            time.sleep(HEAD_TIMEOUT_S / 2)


def test_a_body_slower_than_its_deadline_gets_a_408_with_a_json_reason(servers: Servers) -> None:
    url = servers.model.url
    sock = slow.connect(url)
    sock.sendall(slow.head(url, "/invocations", 1000) + b'{"dataframe_split"')
    answer = slow.read_answer(sock, timeout=BODY_TIMEOUT_S + 8)
    status, _, rest = answer.partition("\r\n")
    assert status.startswith("HTTP/1.1 408"), answer
    body = json.loads(rest.split("\r\n\r\n", 1)[1])
    assert body["error"] == "body_timeout" and "send it at once" in body["detail"]


def test_one_address_holds_at_most_its_share_of_connections(servers: Servers) -> None:
    url = servers.model.url
    with slow.holding(url, PER_CLIENT + 20, b"", source="127.0.0.2") as held:
        assert held.still_open() == PER_CLIENT
        assert held.refused == 20
        assert normal(url) == 200  # another address is still served


def test_slow_bodies_take_no_request_slot(servers: Servers) -> None:
    url = servers.model.url
    body_head = slow.head(url, "/invocations", 10_000) + b"{"
    sources = [f"127.0.0.{n}" for n in range(10, 15)]  # 5 clients x 60 = 300 bodies, over 256
    with contextlib.ExitStack() as stack:
        held = [stack.enter_context(slow.holding(url, 60, body_head, s)) for s in sources]
        assert sum(h.still_open() for h in held) == 300
        answers = [normal(url) for _ in range(20)]
    assert answers == [200] * 20


def test_the_web_app_serves_a_new_visitor_during_120_slow_connections(servers: Servers) -> None:
    with slow.holding(servers.app, 120, b"GET / HTTP/1.1\r\nHo") as held:
        assert held.still_open() == 120
        with httpx.Client(timeout=10) as client:
            assert client.get(f"{servers.app}/healthz").status_code in (200, 503)
