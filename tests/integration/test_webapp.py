"""The web app through Flask's test client, against real model servers and a real tracking server."""

from __future__ import annotations

import base64
import io
import os
import re
import socket
import struct
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import flask
import httpx
import pytest
from flask import Flask
from flask.testing import FlaskClient
from mlflow import MlflowClient

from captchaops.data.corrections import download_feedback
from captchaops.data.synthetic import generate, generate_one
from captchaops.live.estimate import Calibration
from captchaops.settings import Settings, load_settings
from captchaops.webapp.app import SECURITY_HEADERS, create_app
from tests.fixtures.models import TrainedModel
from tests.fixtures.serving import ModelServer, start_model_server
from tests.fixtures.signing import signed_alias
from tests.fixtures.stack import VENV_BIN, Tracking, free_port, start_http_process, stop_process

MODEL_NAME = "webapp-demo"
TOKEN = re.compile(r'name="csrf_token" value="([^"]+)"')

pytestmark = pytest.mark.slow


@dataclass
class WebappStack:
    """A model registered under its own name (two versions) served as production and staging,
    and a feedback experiment of its own, empty at first."""

    tracking_uri: str
    home: Path
    versions: tuple[str, str]
    production: ModelServer
    staging: ModelServer
    feedback_experiment: str

    def settings(self, **overrides: object) -> Settings:
        """Settings that point the web app at these servers."""
        values: dict[str, object] = {
            "home": self.home,
            "tracking_uri": self.tracking_uri,
            "model_name": MODEL_NAME,
            "production_port": self.production.port,
            "staging_port": self.staging.port,
            "feedback_experiment": self.feedback_experiment,
        }
        return load_settings(**(values | overrides))

    def move(self, alias: str, version: str) -> None:
        """Point an alias at a version (signed) and wait until its server has swapped."""
        signed_alias(self.tracking_uri, MODEL_NAME, alias, version)
        getattr(self, alias).wait_version(version)


@pytest.fixture(scope="module")
def webapp_stack(
    request: pytest.FixtureRequest,
    tracking_server: Tracking,
    tiny_model: TrainedModel,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[WebappStack]:
    """Versions 1 (@production) and 2 (@staging) of MODEL_NAME, both the tiny model, served; the
    feedback experiment is the test module's own, so no other module's corrections or review
    items are in it."""
    home = tmp_path_factory.mktemp("webapp")
    client = MlflowClient(tracking_server.uri, registry_uri=tracking_server.uri)
    source = f"models:/{tiny_model.model_name}/{tiny_model.version}"
    if not client.search_registered_models(f"name = '{MODEL_NAME}'"):
        client.create_registered_model(MODEL_NAME)
    versions = tuple(str(client.create_model_version(MODEL_NAME, source).version) for _ in range(2))
    for version in versions:  # every answer counts as right: the estimate reads 100 %
        for key, tag in Calibration(threshold=0.0, accuracy=0.9, size=200).tags().items():
            client.set_model_version_tag(MODEL_NAME, version, key, tag)
    signed_alias(tracking_server.uri, MODEL_NAME, "production", versions[0])
    signed_alias(tracking_server.uri, MODEL_NAME, "staging", versions[1])
    servers: list[ModelServer] = []
    try:
        for alias in ("production", "staging"):
            servers.append(
                start_model_server(tracking_server.uri, alias, home, model_name=MODEL_NAME)
            )
        feedback = f"{request.module.__name__.rsplit('.', 1)[-1]}-feedback"
        stack = WebappStack(
            tracking_server.uri, home, (versions[0], versions[1]), *servers, feedback
        )
        stack.production.wait_version(versions[0])
        stack.staging.wait_version(versions[1])
        yield stack
    finally:
        for server in servers:
            stop_process(server.proc)


@pytest.fixture()
def app(webapp_stack: WebappStack) -> Flask:
    """The web app with CSRF protection on, as visitors get it."""
    return create_app(webapp_stack.settings())


@pytest.fixture()
def client(app: Flask) -> FlaskClient:
    """A browser-like client keeping the session cookie."""
    return app.test_client()


def csrf(client: FlaskClient) -> str:
    """The CSRF token the page hands out."""
    match = TOKEN.search(client.get("/").text)
    assert match, "the page has no CSRF token"
    return match.group(1)


def png() -> bytes:
    """A fresh generated CAPTCHA."""
    return generate_one(7).image


def bomb_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares a huge canvas."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def waiting(client: FlaskClient) -> int:
    """The count of waiting corrections, as the JSON API reports it."""
    resp = client.get("/api/feedback")
    assert resp.status_code == 200, resp.text
    return int(resp.json["waiting"])


def feedback_names(stack: WebappStack) -> list[str]:
    """Every stored correction's artifact path."""
    mlflow = MlflowClient(stack.tracking_uri, registry_uri=stack.tracking_uri)
    experiment = mlflow.get_experiment_by_name(stack.feedback_experiment)
    if experiment is None:
        return []
    runs = mlflow.search_runs([experiment.experiment_id])
    return [a.path for r in runs for a in mlflow.list_artifacts(r.info.run_id, "feedback")]


def test_upload_shows_both_environments_with_versions_and_run_links(
    client: FlaskClient, webapp_stack: WebappStack
) -> None:
    resp = client.post(
        "/predict",
        data={"csrf_token": csrf(client), "image": (io.BytesIO(png()), "captcha.png")},
    )
    assert resp.status_code == 200, resp.text
    page = resp.text
    prod, stag = webapp_stack.versions
    assert 'id="answer-production"' in page and 'id="answer-staging"' in page
    assert f'{MODEL_NAME} @production <span class="version">v{prod}</span>' in page
    assert f'{MODEL_NAME} @staging <span class="version">v{stag}</span>' in page
    assert re.search(r'class="confidence">\d+\.\d %<', page)
    assert re.search(r'class="latency">\d+ ms<', page)
    run_id = (
        MlflowClient(webapp_stack.tracking_uri, registry_uri=webapp_stack.tracking_uri)
        .get_model_version(MODEL_NAME, prod)
        .run_id
    )
    assert f"{webapp_stack.tracking_uri}/#/experiments/" in page and f"/runs/{run_id}" in page
    assert f"/#/models/{MODEL_NAME}/versions/{prod}" in page
    assert "unavailable" not in page


def test_each_served_version_links_to_its_visual_report(
    client: FlaskClient, webapp_stack: WebappStack
) -> None:
    page = client.get("/").text
    mlflow = MlflowClient(webapp_stack.tracking_uri, registry_uri=webapp_stack.tracking_uri)
    for alias, version in zip(("production", "staging"), webapp_stack.versions, strict=True):
        block = page.split(f'data-env="{alias}"', 1)[1].split("</div>", 1)[0]
        run = mlflow.get_run(mlflow.get_model_version(MODEL_NAME, version).run_id)
        url = (
            f"{webapp_stack.tracking_uri}/#/experiments/{run.info.experiment_id}/runs/"
            f"{run.info.run_id}/artifactPath/report"
        )
        assert (
            f'<a class="report-link" href="{url}" rel="noopener" target="_blank">report</a>'
            in block
        )
        assert {"report/report.json", "report/reliability.png"} <= {
            f.path for f in mlflow.list_artifacts(run.info.run_id, "report")
        }  # training logged it


def test_the_live_estimate_is_shown_beside_the_served_version(
    client: FlaskClient, webapp_stack: WebappStack
) -> None:
    """Production has answered enough for an estimate, staging has not: each says so."""
    server, prod = webapp_stack.production, webapp_stack.versions[0]
    images = [base64.b64encode(s.image).decode() for s in generate(10, seed=3)]
    deadline = time.monotonic() + 30
    while prod not in httpx.get(f"{server.url}/health", timeout=10).json()["live_estimate"]:
        assert time.monotonic() < deadline, "production never read the calibration"  # at load
        time.sleep(0.2)
    for _ in range(5):
        assert server.invoke({"inputs": images}).status_code == 200
    page = client.get("/").text
    production = page.split('data-env="production"', 1)[1].split("</div>", 1)[0]
    assert re.search(r"live estimate 100\.0 % \(\d+ answers\)", production), production
    staging = page.split('data-env="staging"', 1)[1].split("</div>", 1)[0]
    assert re.search(r"live estimate after more answers \(\d+ so far\)", staging), staging
    resp = client.post(
        "/predict",
        data={"csrf_token": csrf(client), "image": (io.BytesIO(png()), "captcha.png")},
    )
    card = resp.text.split('id="answer-production"', 1)[1].split("</article>", 1)[0]
    assert re.search(r"live estimate 100\.0 % over \d+ answers, gate 90\.0 %", card), card
    assert "live-alert" not in resp.text


def test_a_local_server_serves_the_signed_move_and_reports_nothing_unaudited(
    webapp_stack: WebappStack,
) -> None:
    """The fixture moved both aliases through the registry writer: signed, so served as is
    (a raw move is not followed even locally: tests/integration/test_signed_moves.py)."""
    health = httpx.get(f"{webapp_stack.production.url}/health", timeout=10).json()
    assert health["version"] == health["signed_version"] == webapp_stack.versions[0]
    assert health["unaudited_version"] is None and health["follows_unaudited"] is False
    assert health["status"] == "ok"
    metrics = httpx.get(f"{webapp_stack.production.url}/metrics", timeout=10).text
    assert "\ncaptchaops_unaudited_alias 0.0\n" in metrics


def test_generate_shows_sample_with_true_label(
    client: FlaskClient, webapp_stack: WebappStack
) -> None:
    resp = client.post("/generate", data={"csrf_token": csrf(client)})
    assert resp.status_code == 200, resp.text
    truth = re.search(r'id="truth">([0-9A-Z]+)<', resp.text)
    assert truth and len(truth.group(1)) == 4
    assert 'src="data:image/png;base64,' in resp.text
    assert resp.text.count('class="prediction"') == 2
    served = f"{MODEL_NAME} v{webapp_stack.versions[0]}"
    assert f"Generated CAPTCHA of {served} (synthetic scheme)." in resp.text
    assert 'id="generate-note"' not in resp.text


def test_promotion_shows_new_version_on_next_prediction(
    client: FlaskClient, webapp_stack: WebappStack
) -> None:
    prod, stag = webapp_stack.versions
    first = client.post("/api/predict", json={"image": base64.b64encode(png()).decode()})
    assert first.json["environments"]["production"]["model"]["version"] == prod
    webapp_stack.move("production", stag)
    try:
        second = client.post("/api/predict", json={"image": base64.b64encode(png()).decode()})
        assert second.json["environments"]["production"]["model"]["version"] == stag
    finally:
        webapp_stack.move("production", prod)


def test_correction_is_stored_for_training_and_counted(
    client: FlaskClient, webapp_stack: WebappStack, tmp_path: Path
) -> None:
    before = waiting(client)
    token = csrf(client)
    image = png()
    resp = client.post(
        "/feedback",
        data={
            "csrf_token": token,
            "image": base64.b64encode(image).decode(),
            "label": "AB12",
            "answered": f"{MODEL_NAME}/{webapp_stack.versions[0]}",
            "source": "upload",
        },
    )
    assert resp.status_code == 303, resp.text
    page = client.get(resp.headers["Location"]).text
    assert "Thanks: saved as &#39;AB12&#39;" in page
    assert f'id="waiting-count">{before + 1}<' in page
    names = feedback_names(webapp_stack)
    assert any(re.fullmatch(r"feedback/AB12_[0-9a-f]{32}\.png", n) for n in names), names
    fetched = download_feedback(webapp_stack.settings(), tmp_path / "feedback")
    assert fetched >= 1
    stored = [p for p in (tmp_path / "feedback").iterdir() if p.name.startswith("AB12_")]
    assert stored and stored[0].read_bytes() == image


@pytest.mark.parametrize(
    ("label", "message"),
    [
        ("ab12", "use upper case"),
        ("A-12", "which the model cannot read"),
        ("", "The correction is empty"),
        ("A" * 65, "too long"),
    ],
)
def test_bad_correction_is_refused_and_nothing_written(
    client: FlaskClient, webapp_stack: WebappStack, label: str, message: str
) -> None:
    before = feedback_names(webapp_stack)
    resp = client.post(
        "/feedback",
        data={
            "csrf_token": csrf(client),
            "image": base64.b64encode(png()).decode(),
            "label": label,
            "answered": f"{MODEL_NAME}/{webapp_stack.versions[0]}",
        },
    )
    assert resp.status_code == 400
    assert 'id="label-error"' in resp.text and message in resp.text
    assert feedback_names(webapp_stack) == before


def test_correction_of_a_non_image_is_refused(
    client: FlaskClient, webapp_stack: WebappStack
) -> None:
    before = feedback_names(webapp_stack)
    resp = client.post(
        "/feedback",
        data={
            "csrf_token": csrf(client),
            "image": base64.b64encode(b"<script>alert(1)</script>").decode(),
            "label": "AB12",
        },
    )
    assert resp.status_code == 415
    assert "Not a PNG, JPEG, GIF or BMP image" in resp.text
    assert feedback_names(webapp_stack) == before


@pytest.mark.parametrize(
    ("data", "status", "message"),
    [
        (b"\x89PNG\r\n\x1a\n" + b"\0" * (1024 * 1024), 413, "send one of at most 1024 KiB"),
        (b"GIF89a this is text", 415, "cannot be decoded"),
        (b"%PDF-1.4 not an image", 415, "Not a PNG, JPEG, GIF or BMP image"),
        (bomb_png(5_000, 5_000), 415, "1,000,000"),
        (bomb_png(30_000, 30_000), 415, "1,000,000"),
        (b"", 400, "No image was sent"),
    ],
    ids=["too-large", "broken-gif", "pdf-named-png", "25-megapixels", "bomb", "empty"],
)
def test_bad_upload_gets_a_clear_message_on_page_and_api(
    client: FlaskClient, data: bytes, status: int, message: str
) -> None:
    page = client.post(
        "/predict",
        data={"csrf_token": csrf(client), "image": (io.BytesIO(data), "captcha.png")},
    )
    assert page.status_code == status
    assert 'id="error"' in page.text and message in page.text
    api = client.post("/api/predict", data={"image": (io.BytesIO(data), "captcha.png")})
    assert api.status_code == status
    assert set(api.json) == {"error", "detail"} and message in api.json["detail"]


def test_form_without_file_field_is_an_empty_form(client: FlaskClient) -> None:
    resp = client.post("/predict", data={"csrf_token": csrf(client)})
    assert resp.status_code == 400 and "No image was sent" in resp.text


def test_body_over_the_request_limit_is_413(client: FlaskClient) -> None:
    big = b"\x89PNG\r\n\x1a\n" + b"\0" * (3 * 1024 * 1024)
    page = client.post(
        "/predict", data={"csrf_token": csrf(client), "image": (io.BytesIO(big), "x.png")}
    )
    assert page.status_code == 413 and "too large" in page.text
    api = client.post("/api/predict", data={"image": (io.BytesIO(big), "x.png")})
    assert api.status_code == 413 and api.json["error"] == "too_large"


def test_forms_need_the_csrf_token(client: FlaskClient, webapp_stack: WebappStack) -> None:
    before = feedback_names(webapp_stack)
    for path, data in [
        ("/predict", {"image": (io.BytesIO(png()), "x.png")}),
        ("/generate", {}),
        ("/feedback", {"image": base64.b64encode(png()).decode(), "label": "AB12"}),
    ]:
        resp = client.post(path, data=data)
        assert resp.status_code == 400, path
        assert "reload the page and retry" in resp.text
    assert feedback_names(webapp_stack) == before


def test_security_headers_on_page_api_and_static(client: FlaskClient) -> None:
    for resp in (client.get("/"), client.get("/healthz"), client.get("/static/style.css")):
        for header, value in SECURITY_HEADERS.items():
            assert resp.headers[header] == value
    assert "default-src 'self'" in SECURITY_HEADERS["Content-Security-Policy"]
    page = client.get("/").text
    assert "http://" not in page.split("<footer>")[0].replace('href="http', ""), (
        "no external resources"
    )


def test_api_predict_multipart_and_json(client: FlaskClient, webapp_stack: WebappStack) -> None:
    image = png()
    multipart = client.post("/api/predict", data={"image": (io.BytesIO(image), "a.png")})
    as_json = client.post("/api/predict", json={"image": base64.b64encode(image).decode()})
    for resp in (multipart, as_json):
        assert resp.status_code == 200, resp.text
        envs = resp.json["environments"]
        assert set(envs) == {"production", "staging"}
        for alias, version in zip(("production", "staging"), webapp_stack.versions, strict=True):
            answer = envs[alias]
            assert answer["available"] is True
            assert isinstance(answer["text"], str) and 0 <= answer["confidence"] <= 1
            assert answer["latency_ms"] > 0
            assert answer["model"]["version"] == version and answer["model"]["alias"] == alias
            assert answer["model"]["run_url"].endswith(f"/runs/{answer['model']['run_id']}")
    assert (
        multipart.json["environments"]["production"]["text"]
        == (as_json.json["environments"]["production"]["text"])
    )


@pytest.mark.parametrize(
    ("kwargs", "status", "error"),
    [
        ({"data": b"image=abc", "content_type": "text/plain"}, 415, "unsupported_media_type"),
        ({"json": {"image": "not base64!"}}, 400, "bad_base64"),
        ({"json": {"picture": "abc"}}, 400, "empty"),
        ({"json": ["image"]}, 400, "bad_json"),
        ({"data": "{", "content_type": "application/json"}, 400, "bad_json"),
    ],
)
def test_api_predict_bad_requests_are_json(
    client: FlaskClient, kwargs: dict[str, object], status: int, error: str
) -> None:
    resp = client.post("/api/predict", **kwargs)
    assert resp.status_code == status
    assert resp.json["error"] == error and resp.json["detail"]


def test_api_feedback_stores_json_and_refuses_forms(
    client: FlaskClient, webapp_stack: WebappStack
) -> None:
    before = waiting(client)
    image = base64.b64encode(png()).decode()
    form = client.post("/api/feedback", data={"image": image, "label": "ZZ99"})
    assert form.status_code == 415
    bad = client.post("/api/feedback", json={"image": image, "label": "zz 99"})
    assert bad.status_code == 400 and bad.json["error"] == "bad_label"
    assert waiting(client) == before
    good = client.post(
        "/api/feedback",
        json={"image": image, "label": "ZZ99", "model": f"{MODEL_NAME}/{webapp_stack.versions[1]}"},
    )
    assert good.status_code == 201, good.text
    assert re.fullmatch(r"feedback/ZZ99_[0-9a-f]{32}\.png", good.json["stored"])
    assert good.json["waiting"] == before + 1 == waiting(client)


def test_uploads_stay_in_memory(app: Flask) -> None:
    big = b"\x89PNG\r\n\x1a\n" + b"\0" * (900 * 1024)
    with app.test_request_context(
        "/predict", method="POST", data={"image": (io.BytesIO(big), "../../etc/evil.png")}
    ):
        stream = flask.request.files["image"].stream
        assert isinstance(stream, io.BytesIO)
        assert stream.getvalue() == big


def test_unavailable_environments_are_named_and_the_rest_works(
    webapp_stack: WebappStack,
) -> None:
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        dead = free_port()
        slow_staging = create_app(
            webapp_stack.settings(staging_port=silent.getsockname()[1]), timeout=0.5
        ).test_client()
        # How long a hanging environment delays the answer is measured by bench_webapp.py.
        page = slow_staging.post(
            "/predict",
            data={"csrf_token": csrf(slow_staging), "image": (io.BytesIO(png()), "a.png")},
        )
        assert page.status_code == 200
        assert "Staging is unavailable: no answer within 0.5 s." in page.text
        assert f'<span class="version">v{webapp_stack.versions[0]}</span>' in page.text

        nothing = create_app(
            webapp_stack.settings(production_port=dead, staging_port=silent.getsockname()[1]),
            timeout=0.5,
        ).test_client()
        home = nothing.get("/").text
        assert "unavailable (server not reachable)" in home
        assert "unavailable (no answer within 0.5 s)" in home
        page = nothing.post(
            "/predict",
            data={"csrf_token": csrf(nothing), "image": (io.BytesIO(png()), "a.png")},
        )
        assert page.status_code == 200
        assert "Production is unavailable: server not reachable." in page.text
        api = nothing.post("/api/predict", data={"image": (io.BytesIO(png()), "a.png")})
        assert api.status_code == 503 and api.json["error"] == "no_model_server"
        assert api.json["environments"]["staging"] == {
            "available": False,
            "error": "no answer within 0.5 s",
        }
        assert nothing.get("/healthz").json == {"status": "ok"}


def test_tracking_server_down_keeps_predictions_working(webapp_stack: WebappStack) -> None:
    client = create_app(webapp_stack.settings(tracking_uri=f"http://127.0.0.1:{free_port()}"))
    page = client.test_client()
    resp = page.post(
        "/predict", data={"csrf_token": csrf(page), "image": (io.BytesIO(png()), "a.png")}
    )
    assert resp.status_code == 200
    assert resp.text.count('class="prediction"') == 2
    assert "Corrections waiting: unknown" in resp.text
    assert page.get("/api/feedback").status_code == 503


def test_secret_key_is_generated_once_and_kept(webapp_stack: WebappStack, tmp_path: Path) -> None:
    settings = webapp_stack.settings(home=tmp_path)
    first = create_app(settings).config["SECRET_KEY"]
    assert first and first == create_app(load_settings(home=tmp_path)).config["SECRET_KEY"]
    assert (tmp_path / ".env").stat().st_mode & 0o077 == 0


@pytest.fixture(scope="module")
def app_url(webapp_stack: WebappStack) -> Iterator[str]:
    """`captchaops app` as `captchaops up` starts it: a separate process under waitress
    (used by the browser and fuzz tests)."""
    port = free_port()
    env = {
        **os.environ,
        "CAPTCHAOPS_HOME": str(webapp_stack.home),
        "CAPTCHAOPS_TRACKING_URI": webapp_stack.tracking_uri,
        "CAPTCHAOPS_MODEL_NAME": MODEL_NAME,
        "CAPTCHAOPS_PRODUCTION_PORT": str(webapp_stack.production.port),
        "CAPTCHAOPS_STAGING_PORT": str(webapp_stack.staging.port),
        "CAPTCHAOPS_FEEDBACK_EXPERIMENT": webapp_stack.feedback_experiment,
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    url = f"http://127.0.0.1:{port}"
    cmd = [str(VENV_BIN / "captchaops"), "app", "--port", str(port)]
    proc = start_http_process(
        cmd, f"{url}/healthz", env=env, log=webapp_stack.home / "app.log", timeout=60
    )
    try:
        yield url
    finally:
        stop_process(proc)


def test_deeply_nested_json_is_a_400_not_a_500(client: FlaskClient) -> None:
    resp = client.post("/api/predict", data=b"[" * 200_000, content_type="application/json")
    assert resp.status_code == 400 and resp.json["error"] == "bad_json"
    # refused from its bytes (200,000 arrays) before parsing, as the model servers do
    assert "too many arrays, objects or values" in resp.json["detail"]
    assert "Traceback" not in resp.text
    nested = b'{"image": ' + b"[" * 20 + b"]" * 20 + b"}"
    resp = client.post("/api/predict", data=nested, content_type="application/json")
    assert resp.status_code == 400 and "nested too deeply" in resp.json["detail"]
