"""Corrections under hostile traffic: rate limit, daily quota, de-duplication, only finished runs
ingested, a forged `answered` list, the cached waiting count. Real model servers and a real
tracking server; the app's tracking calls pass through a counting proxy."""

from __future__ import annotations

import base64
import hashlib
import threading
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from flask.testing import FlaskClient
from mlflow import MlflowClient

from captchaops.data.corrections import DIGEST_TAG, download_feedback
from captchaops.data.synthetic import generate_one
from captchaops.webapp.app import create_app
from tests.integration.test_webapp import (
    MODEL_NAME,
    WebappStack,
    csrf,
    feedback_names,
    webapp_stack,
)

__all__ = ["webapp_stack"]  # the module's own stack (module scope), reused from test_webapp

pytestmark = pytest.mark.slow

_ARTIFACTS = "/api/2.0/mlflow-artifacts/artifacts"
_HOP = {"host", "content-length", "transfer-encoding", "connection", "content-encoding"}


def endpoint(path: str) -> str:
    """The endpoint a request path calls (an artifact upload's file path left out)."""
    path = path.split("?")[0]
    if path.startswith(_ARTIFACTS):
        return _ARTIFACTS
    return path


class CountingProxy:
    """An HTTP proxy in front of the tracking server that records every call the app makes."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.calls: list[str] = []
        self._lock = threading.Lock()
        self._http = httpx.Client(timeout=60)
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with proxy._lock:
                    proxy.calls.append(f"{self.command} {endpoint(self.path)}")
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
                resp = proxy._http.request(
                    self.command, proxy.upstream + self.path, headers=headers, content=body
                )
                self.send_response(resp.status_code)
                for key, value in resp.headers.items():
                    if key.lower() not in _HOP:
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(resp.content)))
                self.end_headers()
                self.wfile.write(resp.content)

            do_GET = do_POST = do_PUT = _forward

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.uri = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def since(self, mark: int) -> list[str]:
        """The calls recorded after the first `mark` ones."""
        with self._lock:
            return self.calls[mark:]

    def mark(self) -> int:
        """How many calls are recorded so far."""
        with self._lock:
            return len(self.calls)

    def close(self) -> None:
        """Stop listening."""
        self.server.shutdown()
        self.server.server_close()
        self._http.close()


@pytest.fixture(scope="module")
def proxy(webapp_stack: WebappStack) -> Iterator[CountingProxy]:
    """The tracking server as the app under test reaches it: through a counting proxy."""
    counting = CountingProxy(webapp_stack.tracking_uri)
    try:
        yield counting
    finally:
        counting.close()


def client_for(
    stack: WebappStack, proxy: CountingProxy, address: str, **overrides: object
) -> FlaskClient:
    """A fresh app (fresh limits) and a client calling it from `address`."""
    client = create_app(stack.settings(tracking_uri=proxy.uri, **overrides)).test_client()
    client.environ_base["REMOTE_ADDR"] = address
    return client


def b64(image: bytes) -> str:
    """An image as the JSON API takes it."""
    return base64.b64encode(image).decode()


def runs_with_digest(stack: WebappStack, image: bytes) -> list[dict[str, str]]:
    """The tags of every stored correction of exactly these image bytes."""
    mlflow = MlflowClient(stack.tracking_uri, registry_uri=stack.tracking_uri)
    experiment = mlflow.get_experiment_by_name(stack.feedback_experiment)
    assert experiment is not None
    digest = hashlib.sha256(image).hexdigest()
    runs = mlflow.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`{DIGEST_TAG}` = '{digest}'"
    )
    return [dict(r.data.tags) for r in runs]


def test_a_flood_from_one_client_is_throttled_after_the_limit_and_nothing_accepted_is_lost(
    webapp_stack: WebappStack, proxy: CountingProxy, tmp_path: Path
) -> None:
    limit = webapp_stack.settings().feedback_per_minute
    client = client_for(webapp_stack, proxy, "203.0.113.7")
    images = [generate_one(10_000 + i).image for i in range(200)]
    answers = [
        client.post("/api/feedback", json={"image": b64(i), "label": "AB12"}) for i in images
    ]
    statuses = [a.status_code for a in answers]
    assert statuses == [201] * limit + [429] * (200 - limit), Counter(statuses)
    for refused in answers[limit:]:
        assert refused.json["error"] == "rate_limited"
        assert f"at most {limit} a minute" in refused.json["detail"]
        assert 1 <= int(refused.headers["Retry-After"]) <= 60
    other = client_for(webapp_stack, proxy, "198.51.100.9")
    assert (
        other.post("/api/feedback", json={"image": b64(images[-1]), "label": "AB12"}).status_code
        == 201
    )
    # Every accepted correction is stored, and training fetches it byte for byte.
    stored = {a.json["stored"] for a in answers[:limit]}
    assert stored <= set(feedback_names(webapp_stack))
    download_feedback(webapp_stack.settings(), tmp_path / "fetched")
    fetched = {f"feedback/{p.name}": p.read_bytes() for p in (tmp_path / "fetched").iterdir()}
    assert [fetched[a.json["stored"]] for a in answers[:limit]] == images[:limit]
    for image in images[limit:-1]:
        assert runs_with_digest(webapp_stack, image) == []


def test_the_page_says_when_to_retry_and_the_daily_quota_holds(
    webapp_stack: WebappStack, proxy: CountingProxy
) -> None:
    page = client_for(webapp_stack, proxy, "203.0.113.8", feedback_per_minute=2)
    token = csrf(page)
    sent = [
        page.post(
            "/feedback",
            data={
                "csrf_token": token,
                "image": b64(generate_one(20_000 + i).image),
                "label": "CD34",
            },
        )
        for i in range(3)
    ]
    assert [r.status_code for r in sent] == [303, 303, 429]
    assert 'id="error"' in sent[2].text and "at most 2 a minute" in sent[2].text
    assert 1 <= int(sent[2].headers["Retry-After"]) <= 60

    quota = client_for(webapp_stack, proxy, "203.0.113.9", feedback_per_day=2)
    codes = [
        quota.post(
            "/api/feedback", json={"image": b64(generate_one(21_000 + i).image), "label": "EF56"}
        )
        for i in range(3)
    ]
    assert [c.status_code for c in codes] == [201, 201, 429]
    assert codes[2].json["error"] == "daily_quota" and "retry tomorrow" in codes[2].json["detail"]
    assert int(codes[2].headers["Retry-After"]) <= 86_400


def test_the_same_image_and_label_is_stored_once(
    webapp_stack: WebappStack, proxy: CountingProxy
) -> None:
    client = client_for(webapp_stack, proxy, "203.0.113.10")
    image = generate_one(30_000).image
    first = client.post("/api/feedback", json={"image": b64(image), "label": "GH78"})
    assert first.status_code == 201, first.text
    again = client.post("/api/feedback", json={"image": b64(image), "label": "GH78"})
    assert again.status_code == 409
    assert again.json["error"] == "duplicate" and "nothing was added" in again.json["detail"]
    assert again.json["stored"] == first.json["stored"]
    page = client.post(
        "/feedback", data={"csrf_token": csrf(client), "image": b64(image), "label": "GH78"}
    )
    assert page.status_code == 303
    assert "Already saved as &#39;GH78&#39;" in client.get(page.headers["Location"]).text
    assert [t["label"] for t in runs_with_digest(webapp_stack, image)] == ["GH78"]
    # Another label for the same image is a different correction.
    other = client.post("/api/feedback", json={"image": b64(image), "label": "GH79"})
    assert other.status_code == 201
    labels = sorted(t["label"] for t in runs_with_digest(webapp_stack, image))
    assert labels == ["GH78", "GH79"]


def test_only_finished_corrections_are_ingested(
    webapp_stack: WebappStack, mlflow_client_env: str, tmp_path: Path
) -> None:
    mlflow = MlflowClient(webapp_stack.tracking_uri, registry_uri=webapp_stack.tracking_uri)
    feedback = webapp_stack.feedback_experiment
    experiment = mlflow.get_experiment_by_name(feedback)
    experiment_id = experiment.experiment_id if experiment else mlflow.create_experiment(feedback)
    names: dict[str, str] = {}
    for status in ("RUNNING", "FAILED", "FINISHED"):
        run = mlflow.create_run(experiment_id, tags={"captchaops.kind": "correction"})
        image = tmp_path / f"{status[:4]}_{run.info.run_id}.png"
        image.write_bytes(generate_one(40_000).image)
        mlflow.log_artifact(run.info.run_id, str(image), "feedback")
        if status != "RUNNING":
            mlflow.set_terminated(run.info.run_id, status)
        names[status] = image.name
    download_feedback(webapp_stack.settings(), tmp_path / "fetched")
    fetched = {p.name for p in (tmp_path / "fetched").iterdir()}
    assert names["FINISHED"] in fetched
    assert names["RUNNING"] not in fetched and names["FAILED"] not in fetched


def test_answered_with_junk_costs_no_tracking_call(
    webapp_stack: WebappStack, proxy: CountingProxy
) -> None:
    client = client_for(webapp_stack, proxy, "203.0.113.11")
    token = csrf(client)
    served = f"{MODEL_NAME}/{webapp_stack.versions[0]}"
    shown = client.post("/generate", data={"csrf_token": token})
    assert f'name="answered" value="{served}"' in shown.text

    def correct(seed: int, answered: list[str]) -> list[str]:
        mark = proxy.mark()
        resp = client.post(
            "/feedback",
            data={
                "csrf_token": token,
                "image": b64(generate_one(seed).image),
                "label": "JK12",
                "answered": answered,
            },
        )
        assert resp.status_code == 303, resp.text[-2000:]
        return sorted(proxy.since(mark))

    correct(50_000, [served])  # looks the feedback experiment up once
    clean = correct(50_001, [served])
    junk = [f"{MODEL_NAME}/{n}" for n in range(100, 1100)]
    assert len(junk) == 1000
    with_junk = correct(50_002, [*junk, served, served])
    only_junk = correct(50_003, junk)
    assert with_junk == clean == only_junk, (clean, with_junk, only_junk)
    assert len(clean) <= 5 and not [c for c in clean if "model-versions" in c or "runs/get" in c]
    tags = runs_with_digest(webapp_stack, generate_one(50_002).image)
    assert [t["model_version"] for t in tags] == [served]
    api = client.post(
        "/api/feedback",
        json={"image": b64(generate_one(50_004).image), "label": "JK12", "model": "x" * 5000},
    )
    assert api.status_code == 201, api.text


def test_the_waiting_count_is_cached_not_counted_on_every_page(
    webapp_stack: WebappStack, proxy: CountingProxy
) -> None:
    client = client_for(webapp_stack, proxy, "203.0.113.12", feedback_count_seconds=3600)
    mark = proxy.mark()
    first = client.get("/")
    assert first.status_code == 200
    for _ in range(20):
        missing = client.get("/no-such-page")
        assert missing.status_code == 404 and 'id="waiting-count"' in missing.text
    for _ in range(5):
        client.get("/")
        client.get("/api/feedback")
    counted = [c for c in proxy.since(mark) if "runs/search" in c]
    assert len(counted) == 1, counted
    before = int(client.get("/api/feedback").json["waiting"])
    stored = client.post(
        "/api/feedback", json={"image": b64(generate_one(60_000).image), "label": "LM34"}
    )
    assert stored.status_code == 201 and stored.json["waiting"] == before + 1
    assert int(client.get("/api/feedback").json["waiting"]) == before + 1
