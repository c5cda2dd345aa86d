"""The review queue: low-confidence predictions kept once, listed, labelled into corrections that
training fetches, discarded, never fetched unlabelled; the caps hold; only loopback or the token
reaches it. Real model servers and a real tracking server, as in test_webapp_corrections."""

from __future__ import annotations

import base64
import hashlib
import io
import socket
import time
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient
from mlflow import MlflowClient

from captchaops.data.corrections import DIGEST_TAG, download_feedback
from captchaops.data.synthetic import generate_one
from captchaops.webapp.app import EXTENSION, create_app
from captchaops.webapp.sampler import ReviewSampler
from captchaops.webapp.service import Demo
from tests.integration.test_webapp import MODEL_NAME, WebappStack, csrf, webapp_stack

__all__ = ["webapp_stack"]  # the module's own stack (module scope), reused from test_webapp

pytestmark = pytest.mark.slow

FAR = "203.0.113.40"
TOKEN = "review-token-for-tests-0123456789"


def review_app(stack: WebappStack, **overrides: object) -> tuple[Flask, Demo]:
    """A fresh app (fresh counts) that offers every prediction below 100 % for review."""
    values: dict[str, object] = {"review_below_confidence": 1.0} | overrides
    app = create_app(stack.settings(**values))
    demo = app.extensions[EXTENSION]
    assert isinstance(demo, Demo)
    return app, demo


def drained(demo: Demo, timeout: float = 120.0) -> None:
    """Wait until the app's background thread has stored or dropped everything offered (the
    sampler's stats, as GET /api/review shows them, hold nothing in memory)."""
    deadline = time.monotonic() + timeout
    while demo.sampler.stats()["in_memory"]:
        assert time.monotonic() < deadline, "the review thread did not finish"
        time.sleep(0.05)


def b64(image: bytes) -> str:
    """An image as the JSON API takes it."""
    return base64.b64encode(image).decode()


def offer(client: FlaskClient, image: bytes, **fields: object) -> dict[str, object]:
    """POST /api/review as a model server would; the JSON answer."""
    body = {"image": b64(image), "text": "RV12", "confidence": 0.3, "model": f"{MODEL_NAME}/1"}
    resp = client.post("/api/review", json=body | fields)
    assert resp.status_code in (200, 202), resp.text
    answer = resp.json
    assert isinstance(answer, dict)
    return answer


def review_runs(stack: WebappStack, image: bytes) -> list[tuple[str, dict[str, str]]]:
    """Run id and tags of every review item holding exactly these image bytes."""
    mlflow = MlflowClient(stack.tracking_uri, registry_uri=stack.tracking_uri)
    experiment = mlflow.get_experiment_by_name(stack.feedback_experiment)
    assert experiment is not None
    digest = hashlib.sha256(image).hexdigest()
    runs = mlflow.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`{DIGEST_TAG}` = '{digest}' and tags.`captchaops.kind` = 'review'",
    )
    return [(r.info.run_id, dict(r.data.tags)) for r in runs]


def fetched_images(stack: WebappStack, dest: Path) -> dict[str, bytes]:
    """What `train --include-feedback` would fetch: file name -> bytes."""
    download_feedback(stack.settings(), dest)
    return {p.name: p.read_bytes() for p in dest.iterdir()}


def counts(client: FlaskClient) -> dict[str, object]:
    """GET /api/review."""
    resp = client.get("/api/review")
    assert resp.status_code == 200, resp.text
    body = resp.json
    assert isinstance(body, dict)
    return body


def test_a_low_confidence_prediction_is_queued_once_and_listed(webapp_stack: WebappStack) -> None:
    app, demo = review_app(webapp_stack)
    client = app.test_client()
    image = generate_one(70_000).image
    first = client.post("/api/predict", json={"image": b64(image)})
    assert first.status_code == 200, first.text
    production = first.json["environments"]["production"]
    assert production["confidence"] < 1.0
    drained(demo)
    page_upload = client.post(
        "/predict", data={"csrf_token": csrf(client), "image": (io.BytesIO(image), "a.png")}
    )
    assert page_upload.status_code == 200
    client.post("/api/predict", json={"image": b64(image)})
    drained(demo)

    runs = review_runs(webapp_stack, image)
    assert len(runs) == 1, runs
    run_id, tags = runs[0]
    assert tags["review_state"] == "pending" and tags["source"] == "api"
    assert tags["text"] == production["text"]
    assert tags["model_version"] == f"{MODEL_NAME}/{webapp_stack.versions[0]}"
    assert abs(float(tags["confidence"]) - production["confidence"]) < 1e-5
    stats = counts(client)
    assert stats["stored"] == 1 and stats["offered"] == 3
    assert stats["dropped"] == {
        "duplicate": 2,
        "rate_limited": 0,
        "queue_full": 0,
        "pending_full": 0,
        "failed": 0,
    }

    page = client.get("/review")
    assert page.status_code == 200
    assert f'id="item-{run_id}"' in page.text
    assert f'src="data:image/png;base64,{b64(image)}"' in page.text
    assert f'value="{production["text"]}"' in page.text and "Cannot read" in page.text

    # Generated images carry their true label and are not offered; a fresh app asks the
    # tracking server and still stores the same image only once.
    client.post("/generate", data={"csrf_token": csrf(client)})
    assert counts(client)["offered"] == 3
    other, other_demo = review_app(webapp_stack)
    other.test_client().post("/api/predict", json={"image": b64(image)})
    drained(other_demo)
    assert other_demo.sampler.stats()["dropped"]["duplicate"] == 1  # type: ignore[index]
    assert len(review_runs(webapp_stack, image)) == 1


def test_confident_predictions_are_not_offered(webapp_stack: WebappStack) -> None:
    app, demo = review_app(webapp_stack, review_below_confidence=0.0)
    client = app.test_client()
    image = generate_one(70_500).image
    assert client.post("/api/predict", json={"image": b64(image)}).status_code == 200
    drained(demo)
    assert counts(client)["offered"] == 0
    assert review_runs(webapp_stack, image) == []


def test_labelling_makes_a_correction_and_discarding_removes_the_item(
    webapp_stack: WebappStack, tmp_path: Path
) -> None:
    app, demo = review_app(webapp_stack)
    client = app.test_client()
    readable, unreadable = generate_one(71_000).image, generate_one(71_001).image
    for image in (readable, unreadable):
        assert client.post("/api/predict", json={"image": b64(image)}).status_code == 200
    drained(demo)
    [(labelled_id, _)] = review_runs(webapp_stack, readable)
    [(discarded_id, _)] = review_runs(webapp_stack, unreadable)
    token = csrf(client)

    refused = client.post(f"/review/{labelled_id}/label", data={"csrf_token": token, "label": "a?"})
    assert refused.status_code == 400 and 'id="label-error"' in refused.text
    waiting_before = int(client.get("/api/feedback").json["waiting"])
    saved = client.post(f"/review/{labelled_id}/label", data={"csrf_token": token, "label": "RV12"})
    assert saved.status_code == 303
    assert "it is now a correction" in client.get(saved.headers["Location"]).text
    dropped = client.post(f"/review/{discarded_id}/discard", data={"csrf_token": token})
    assert dropped.status_code == 303
    assert "will not be offered again" in client.get(dropped.headers["Location"]).text
    assert int(client.get("/api/feedback").json["waiting"]) == waiting_before + 1

    page = client.get("/review").text
    assert labelled_id not in page and discarded_id not in page
    [(_, tags)] = review_runs(webapp_stack, readable)
    assert tags["review_state"] == "labelled" and tags["review_label"] == "RV12"
    assert tags["correction"].startswith("feedback/RV12_")
    [(_, tags)] = review_runs(webapp_stack, unreadable)
    assert tags["review_state"] == "discarded"

    fetched = fetched_images(webapp_stack, tmp_path / "fetched")
    assert fetched[tags_name(webapp_stack, readable)] == readable
    assert unreadable not in fetched.values()

    # Either item again (a second tab, a replayed form) changes nothing.
    again = client.post(f"/review/{labelled_id}/label", data={"csrf_token": token, "label": "CD34"})
    assert again.status_code == 303
    assert "labelled or discarded already" in client.get(again.headers["Location"]).text
    late = client.post(f"/review/{discarded_id}/label", data={"csrf_token": token, "label": "CD"})
    assert late.status_code == 303
    assert int(client.get("/api/feedback").json["waiting"]) == waiting_before + 1
    # A run that is not a review item (a training run, no run at all) is left alone.
    mlflow = MlflowClient(webapp_stack.tracking_uri, registry_uri=webapp_stack.tracking_uri)
    training_run = mlflow.get_model_version(MODEL_NAME, webapp_stack.versions[0]).run_id
    assert training_run
    for bogus in ("0" * 32, "not-a-run-id", training_run):
        resp = client.post(f"/review/{bogus}/discard", data={"csrf_token": token})
        assert resp.status_code == 303, resp.status_code
    assert "review_state" not in mlflow.get_run(training_run).data.tags
    assert client.post("/review/../../etc/discard", data={"csrf_token": token}).status_code == 404


def tags_name(stack: WebappStack, image: bytes) -> str:
    """The file name of the correction a review item became."""
    [(_, tags)] = review_runs(stack, image)
    return tags["correction"].rsplit("/", 1)[-1]


def test_unlabelled_items_are_never_fetched_for_training(
    webapp_stack: WebappStack, tmp_path: Path
) -> None:
    app, demo = review_app(webapp_stack)
    pending = generate_one(72_000).image
    assert offer(app.test_client(), pending) == {"queued": True}
    drained(demo)
    assert review_runs(webapp_stack, pending)
    # A review run holding a file under feedback/ (another writer, tampering) is skipped too.
    mlflow = MlflowClient(webapp_stack.tracking_uri, registry_uri=webapp_stack.tracking_uri)
    experiment = mlflow.get_experiment_by_name(webapp_stack.feedback_experiment)
    assert experiment is not None
    stray = generate_one(72_001).image
    run = mlflow.create_run(
        experiment.experiment_id,
        tags={"captchaops.kind": "review", "review_state": "pending"},
    )
    (tmp_path / "ZZ99_stray.png").write_bytes(stray)
    mlflow.log_artifact(run.info.run_id, str(tmp_path / "ZZ99_stray.png"), "feedback")
    mlflow.set_terminated(run.info.run_id, "FINISHED")
    fetched = fetched_images(webapp_stack, tmp_path / "fetched")
    assert pending not in fetched.values() and stray not in fetched.values()
    assert "ZZ99_stray.png" not in fetched


def test_the_pending_and_hourly_caps_hold(webapp_stack: WebappStack) -> None:
    probe, _ = review_app(webapp_stack)
    before = counts(probe.test_client())["pending"]
    assert isinstance(before, int)
    capped, demo = review_app(webapp_stack, review_max_pending=before + 1)
    client = capped.test_client()
    images = [generate_one(73_000 + i).image for i in range(3)]
    assert [offer(client, i)["queued"] for i in images] == [True, True, True]
    drained(demo)
    stats = counts(client)
    assert stats["stored"] == 1 and stats["pending"] == before + 1
    assert stats["dropped"]["pending_full"] == 2  # type: ignore[index]
    assert sum(bool(review_runs(webapp_stack, i)) for i in images) == 1

    hourly, demo = review_app(webapp_stack, review_per_hour=2)
    now = [1_000_000.0]
    demo.sampler = ReviewSampler(demo.review, demo.settings, clock=lambda: now[0])
    client = hourly.test_client()
    answers = [offer(client, generate_one(74_000 + i).image) for i in range(5)]
    drained(demo)
    stats = counts(client)
    assert stats["stored"] == 2
    assert stats["dropped"]["rate_limited"] == 3  # type: ignore[index]
    # Over the cap at offer time or when the thread got to it: refused either way.
    assert all(
        a in ({"queued": True}, {"queued": False, "reason": "rate_limited"}) for a in answers
    )
    now[0] += 3599
    assert offer(client, generate_one(74_100).image)["reason"] == "rate_limited"
    now[0] += 1  # the first two are an hour old
    assert offer(client, generate_one(74_101).image) == {"queued": True}
    drained(demo)
    assert counts(client)["stored"] == 3


def test_a_full_queue_drops_and_counts_without_waiting(webapp_stack: WebappStack) -> None:
    with socket.socket() as silent:  # a tracking server that accepts and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        settings = webapp_stack.settings(
            tracking_uri=f"http://127.0.0.1:{silent.getsockname()[1]}",
            review_below_confidence=1.0,
            review_queue_size=2,
        )
        app = create_app(settings, timeout=60)
        client = app.test_client()
        answers = [offer(client, generate_one(75_000 + i).image) for i in range(10)]
        queued = [a for a in answers if a["queued"]]
        # The queue holds 2; the thread may already hold a third while it waits on the server.
        assert len(queued) in (2, 3), answers
        assert all(a == {"queued": False, "reason": "queue_full"} for a in answers[len(queued) :])
        stats = client.get("/api/review").json
        assert stats["dropped"]["queue_full"] == 10 - len(queued)
        assert stats["offered"] == 10 and stats["stored"] == 0


def test_only_loopback_or_the_token_reaches_the_queue(
    webapp_stack: WebappStack, tmp_path: Path
) -> None:
    image = generate_one(76_000).image
    app, _ = review_app(webapp_stack)
    far = app.test_client()
    far.environ_base["REMOTE_ADDR"] = FAR
    refused = far.post("/api/review", json={"image": b64(image), "text": "A", "confidence": 0.1})
    assert refused.status_code == 403 and refused.json["error"] == "forbidden"
    page = far.get("/review")
    assert page.status_code == 403 and "loopback" in page.text and 'id="item-' not in page.text

    near = app.test_client()
    bad = {
        "form": near.post("/api/review", data={"image": b64(image)}),
        "text": near.post("/api/review", json={"image": b64(image), "confidence": 0.1}),
        "string confidence": near.post(
            "/api/review", json={"image": b64(image), "text": "A", "confidence": "0.1"}
        ),
        "over one": near.post(
            "/api/review", json={"image": b64(image), "text": "A", "confidence": 1.5}
        ),
        "NaN": near.post(
            "/api/review",
            data=f'{{"image": "{b64(image)}", "text": "A", "confidence": NaN}}',
            content_type="application/json",
        ),
        "not an image": near.post(
            "/api/review", json={"image": b64(b"hello"), "text": "A", "confidence": 0.1}
        ),
    }
    assert {k: r.status_code for k, r in bad.items()} == {
        "form": 415,
        "text": 400,
        "string confidence": 400,
        "over one": 400,
        "NaN": 400,
        "not an image": 415,
    }
    assert all(r.is_json and r.json["detail"] for r in bad.values())
    assert offer(near, image, confidence=1.0) == {"queued": False, "reason": "confident"}

    with_token, _ = review_app(webapp_stack, review_token=TOKEN)
    for address in (FAR, "127.0.0.1"):
        client = with_token.test_client()
        client.environ_base["REMOTE_ADDR"] = address
        assert client.post("/api/review", json={"image": b64(image)}).status_code == 403
        header = {"Authorization": f"Bearer {TOKEN}"}
        ok = client.post(
            "/api/review",
            json={"image": b64(image), "text": "A", "confidence": 0.1},
            headers=header,
        )
        assert ok.status_code in (200, 202), ok.text
        locked = client.get("/review")
        assert locked.status_code == 403 and 'id="token"' in locked.text
        token = csrf(client)
        wrong = client.post("/review/login", data={"csrf_token": token, "token": "guess"})
        assert wrong.status_code == 403 and "not the review token" in wrong.text
        right = client.post("/review/login", data={"csrf_token": token, "token": TOKEN})
        assert right.status_code == 303
        assert client.get("/review").status_code == 200

    guessing, _ = review_app(webapp_stack, review_token=TOKEN, feedback_per_minute=1)
    guesser = guessing.test_client()
    guesser.environ_base["REMOTE_ADDR"] = FAR
    token = csrf(guesser)
    guesses = [
        guesser.post("/review/login", data={"csrf_token": token, "token": t})
        for t in ("guess", TOKEN)
    ]
    assert [g.status_code for g in guesses] == [403, 429]
    assert "Retry-After" in guesses[1].headers

    off, _ = review_app(webapp_stack, review_per_hour=0)
    assert offer(off.test_client(), image) == {"queued": False, "reason": "disabled"}

    team_settings = webapp_stack.settings(home=tmp_path, auth=True, app_login=False)
    team = create_app(team_settings).test_client()
    assert team.post("/api/review", json={"image": b64(image)}).status_code == 403
    assert "CAPTCHAOPS_REVIEW_TOKEN=" in (tmp_path / ".env").read_text()
