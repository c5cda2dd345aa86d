"""Generate shows the served scheme: held-out images of a folder scheme, generated ones otherwise.

Real parts: the session's `mlflow server`; runs, registered versions, aliases, tags and the
frozen set's `evalset.zip` are written with MlflowClient exactly as training and `captchaops
evalset` lay them out (no model is trained; the model servers are absent, so the app finds the
served version through the registry's aliases).
"""

from __future__ import annotations

import base64
import io
import json
import random
import re
import tempfile
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient
from mlflow import MlflowClient
from mlflow.entities import Param
from PIL import Image, ImageDraw

from captchaops.evaluation.evalset import ARTIFACT, DIGEST_TAG, EVAL_EXPERIMENT, digest_of
from captchaops.webapp.app import EXTENSION, create_app
from captchaops.webapp.service import Demo
from tests.fixtures.models import make_settings
from tests.fixtures.stack import Tracking, free_port
from tests.unit.test_frozen import amplified

pytestmark = pytest.mark.slow

ALPHABET = "2345678bcdefgmnpwxy"
TOKEN = re.compile(r'name="csrf_token" value="([^"]+)"')


@dataclass(frozen=True)
class Scheme:
    """A registered model whose production version was trained on a folder (v1, @production)
    next to a synthetic version (v2, @staging), and its frozen set's held-out images."""

    name: str
    images: list[bytes]
    labels: list[str]
    digest: str


def folder_image(label: str, seed: int, fmt: str = "PNG") -> bytes:
    """A 200x50 stand-in for a real folder CAPTCHA (Pillow's renderer, not the captcha package)."""
    rng = random.Random(seed)
    image = Image.new("RGB", (200, 50), (rng.randrange(200, 256),) * 3)
    draw = ImageDraw.Draw(image)
    for _ in range(300):
        draw.point((rng.randrange(200), rng.randrange(50)), fill=(rng.randrange(256),) * 3)
    draw.text((20 + rng.randrange(30), 15), " ".join(label), fill=(20, 20, 90))
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def register(client: MlflowClient, name: str, params: dict[str, str], alias: str) -> str:
    """A finished training-like run with these params, registered as a new version under alias."""
    experiment = client.get_experiment_by_name("text-captcha")
    experiment_id = (
        experiment.experiment_id if experiment else client.create_experiment("text-captcha")
    )
    run = client.create_run(experiment_id, run_name=f"{name} training")
    client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in params.items()])
    client.set_terminated(run.info.run_id)
    if not client.search_registered_models(f"name = '{name}'"):
        client.create_registered_model(name)
    version = client.create_model_version(
        name, f"{run.info.artifact_uri}/model", run_id=run.info.run_id
    ).version
    client.set_registered_model_alias(name, alias, str(version))
    return str(version)


def store_evalset(
    client: MlflowClient, name: str, images: list[bytes], labels: list[str], kind: str = "folder"
) -> str:
    """Store a frozen set in the evaluation experiment (the evalset.zip layout) and pin it."""
    digest = digest_of(images, labels)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        items = []
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            archive.writestr(f"images/{i:06d}.bin", image)
            items.append({"file": f"images/{i:06d}.bin", "label": label})
        meta = {"seed": 0, "kind": kind, "alphabet": ALPHABET, "items": items}
        archive.writestr("labels.json", json.dumps(meta))
    return store_archive(client, name, buffer.getvalue(), digest)


def store_archive(client: MlflowClient, name: str, data: bytes, digest: str) -> str:
    """Store `data` as a frozen set's evalset.zip under `digest` and pin it for the model."""
    experiment = client.get_experiment_by_name(EVAL_EXPERIMENT)
    experiment_id = (
        experiment.experiment_id if experiment else client.create_experiment(EVAL_EXPERIMENT)
    )
    run = client.create_run(experiment_id, tags={DIGEST_TAG: digest, "kind": "evalset"})
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / ARTIFACT
        path.write_bytes(data)
        client.log_artifact(run.info.run_id, str(path))
    client.set_terminated(run.info.run_id)
    client.set_registered_model_tag(name, DIGEST_TAG, digest)
    return digest


def new_scheme(
    tracking_server: Tracking, params: dict[str, str] | None = None, alias: str = "production"
) -> str:
    """A fresh registered model with one version (these run params) under alias."""
    name = f"scheme-{uuid.uuid4().hex[:8]}"
    client = MlflowClient(tracking_server.uri, registry_uri=tracking_server.uri)
    base = {"data_kind": "folder", "alphabet": ALPHABET, "min_length": "5", "max_length": "5"}
    register(client, name, base if params is None else params, alias)
    return name


@pytest.fixture(scope="module")
def scheme(tracking_server: Tracking) -> Scheme:
    """A folder scheme @production with a frozen set of held-out images, a synthetic v2 @staging."""
    rng = random.Random(12)
    labels = ["".join(rng.choice(ALPHABET) for _ in range(5)) for _ in range(6)]
    images = [folder_image(label, i, "JPEG" if i == 0 else "PNG") for i, label in enumerate(labels)]
    name = new_scheme(tracking_server)
    client = MlflowClient(tracking_server.uri, registry_uri=tracking_server.uri)
    register(client, name, {"alphabet": "AB", "min_length": "3", "max_length": "3"}, "staging")
    digest = store_evalset(client, name, images, labels)
    return Scheme(name, images, labels, digest)


def app_for(tracking_server: Tracking, tmp_path: Path, name: str, **overrides: object) -> Flask:
    """The web app for one scheme, with no model server listening (production and staging down)."""
    settings = make_settings(
        tracking_server,
        tmp_path,
        model_name=name,
        production_port=free_port(),
        staging_port=free_port(),
        **overrides,
    )
    return create_app(settings, timeout=1.0)


def generate(client: FlaskClient) -> tuple[bytes, str, str, str]:
    """Press Generate: the shown image's bytes, its true label, the origin line, the whole page."""
    token = TOKEN.search(client.get("/").text)
    assert token, "the page has no CSRF token"
    resp = client.post("/generate", data={"csrf_token": token.group(1)})
    assert resp.status_code == 200, resp.text
    page = resp.text
    image = re.search(r'src="data:image/(?:png|jpeg);base64,([^"]+)"', page)
    truth = re.search(r'id="truth">([^<]+)<', page)
    origin = re.search(r'id="origin"[^>]*>([^<]+)<', page)
    assert image and truth and origin, page
    return base64.b64decode(image.group(1)), truth.group(1), origin.group(1), page


def test_folder_scheme_shows_held_out_examples_with_their_true_labels(
    tracking_server: Tracking, scheme: Scheme, tmp_path: Path
) -> None:
    client = app_for(tracking_server, tmp_path, scheme.name).test_client()
    seen = set()
    for _ in range(6):
        image, truth, origin, page = generate(client)
        assert image in scheme.images, "the shown image is not one of the held-out images"
        index = scheme.images.index(image)
        assert truth == scheme.labels[index]
        seen.add(index)
        assert origin.startswith(f"Held-out example of {scheme.name} v1 (folder scheme)")
        assert 'id="generate-note"' not in page
        assert "Production is unavailable" in page and "Staging is unavailable" in page
    assert len(seen) > 1, "every press showed the same image"


def test_held_out_set_is_downloaded_once_and_kept_in_memory(
    tracking_server: Tracking, scheme: Scheme, tmp_path: Path
) -> None:
    demo: Demo = app_for(tracking_server, tmp_path, scheme.name).extensions[EXTENSION]
    first = demo.generate()
    assert first.held_out and first.image in scheme.images
    client = MlflowClient(tracking_server.uri, registry_uri=tracking_server.uri)
    experiment = client.get_experiment_by_name(EVAL_EXPERIMENT)
    assert experiment is not None
    (run,) = client.search_runs(
        [experiment.experiment_id], f"tags.{DIGEST_TAG} = '{scheme.digest}'"
    )
    (stored,) = (tracking_server.home / "artifacts").glob(
        f"*/{run.info.run_id}/artifacts/{ARTIFACT}"
    )
    moved = stored.with_suffix(".moved")
    stored.rename(moved)
    try:
        again = demo.generate()
        assert again.held_out and again.image in scheme.images
        fresh: Demo = app_for(tracking_server, tmp_path, scheme.name).extensions[EXTENSION]
        missing = fresh.generate()
        assert not missing.held_out and missing.note
        assert missing.note.startswith(f"No held-out example of {scheme.name} v1 to show")
    finally:
        moved.rename(stored)


def test_a_replaced_frozen_set_is_shown_on_the_next_press(
    tracking_server: Tracking, tmp_path: Path
) -> None:
    name = new_scheme(tracking_server)
    client = MlflowClient(tracking_server.uri, registry_uri=tracking_server.uri)
    old, new = [folder_image("bcdef", 1)], [folder_image("mnpwx", 2)]
    store_evalset(client, name, old, ["bcdef"])
    page = app_for(tracking_server, tmp_path, name).test_client()
    assert generate(page)[:2] == (old[0], "bcdef")
    store_evalset(client, name, new, ["mnpwx"])
    assert generate(page)[:2] == (new[0], "mnpwx")


def test_synthetic_scheme_generates_in_its_alphabet_and_length(
    tracking_server: Tracking, tmp_path: Path
) -> None:
    params = {"alphabet": "XYZ", "min_length": "6", "max_length": "6"}  # an old run: no data_kind
    name = new_scheme(tracking_server, params, alias="staging")
    image, truth, origin, page = generate(app_for(tracking_server, tmp_path, name).test_client())
    assert re.fullmatch(r"[XYZ]{6}", truth)
    assert image.startswith(b"\x89PNG")
    assert origin == f"Generated CAPTCHA of {name} v1 (synthetic scheme)."
    assert 'id="generate-note"' not in page


@pytest.mark.parametrize(
    "problem", ["no_set", "unknown_digest", "too_large", "not_folder", "amplified"]
)
def test_folder_scheme_without_a_usable_set_falls_back_with_a_message(
    tracking_server: Tracking, tmp_path: Path, problem: str
) -> None:
    name = new_scheme(tracking_server)
    client = MlflowClient(tracking_server.uri, registry_uri=tracking_server.uri)
    held_out = [folder_image("bcdef", 1)]
    if problem == "unknown_digest":
        client.set_registered_model_tag(name, DIGEST_TAG, "0" * 64)
    elif problem in ("too_large", "not_folder"):
        kind = "synthetic" if problem == "not_folder" else "folder"
        store_evalset(client, name, held_out, ["bcdef"], kind=kind)
    elif problem == "amplified":
        store_archive(client, name, amplified(), "a" * 64)
    app = app_for(tracking_server, tmp_path, name)
    if problem == "too_large":
        app.extensions[EXTENSION].held_out.max_bytes = 1024
    image, truth, origin, page = generate(app.test_client())
    assert image not in held_out
    assert len(truth) == 5 and set(truth) <= set(ALPHABET)
    assert origin == f"Generated CAPTCHA of {name} v1 (folder scheme)."
    note = re.search(r'id="generate-note">([^<]+)<', page)
    assert note and note.group(1).startswith(f"No held-out example of {name} v1 to show (")
    expected = {
        "no_set": "has no frozen evaluation set yet",
        "unknown_digest": "is not stored in text-captcha-evaluation",
        "too_large": "is too large to show",
        "not_folder": "holds no held-out folder images",
        "amplified": "not a readable evalset.zip: its labels.json names one image more than once",
    }[problem]
    assert expected in note.group(1)


def test_tracking_server_down_still_generates(
    tracking_server: Tracking, scheme: Scheme, tmp_path: Path
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    app = app_for(tracking_server, tmp_path, scheme.name, tracking_uri=dead)
    image, truth, origin, page = generate(app.test_client())
    assert image not in scheme.images and re.fullmatch(r"[0-9A-Z]{4}", truth)
    assert origin == "Generated CAPTCHA in the default alphabet: no served model version was found."
    note = re.search(r'id="generate-note">([^<]+)<', page)
    assert note and "The tracking server is not reachable" in note.group(1)
    assert dead not in page  # the address (maybe with credentials) never reaches visitors
