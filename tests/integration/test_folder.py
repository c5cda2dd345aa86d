"""A team's folder of real-shaped CAPTCHAs through the CLI: train, frozen held-out set, gate."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from captchaops import mlflow_scope
from captchaops.data import standin
from captchaops.data.folder import read_folder
from captchaops.evaluation import evalset
from tests.fixtures.models import make_settings
from tests.fixtures.stack import VENV_BIN, Tracking

pytestmark = pytest.mark.slow
SCHEME = "standin-scheme"


def cli(args: list[str], tracking: Tracking, home: Path) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "CAPTCHAOPS_TRACKING_URI": tracking.uri,
        "CAPTCHAOPS_HOME": str(home),
        "CAPTCHAOPS_STAGING_FLOOR": "0",
        "COLUMNS": "120",
    }
    return subprocess.run(
        [str(VENV_BIN / "captchaops"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
        check=False,
    )


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("standin") / "captchas"
    standin.build(path, count=260, seed=3)
    return path


@pytest.fixture(scope="module")
def trained(
    folder: Path, tracking_server: Tracking, tmp_path_factory: pytest.TempPathFactory
) -> subprocess.CompletedProcess[str]:
    home = tmp_path_factory.mktemp("folder-home")
    return cli(
        ["train", "--data", str(folder), "--max-minutes", "0.4", "--model-name", SCHEME],
        tracking_server,
        home,
    )


def test_train_on_a_folder_freezes_held_out_images_never_trained_on(
    trained: subprocess.CompletedProcess[str], folder: Path, tracking_server: Tracking
) -> None:
    assert trained.returncode == 0, trained.stderr[-2000:]
    client = MlflowClient(tracking_server.uri, tracking_server.uri)
    model = client.get_registered_model(SCHEME)
    assert model.tags["evalset_kind"] == "folder"
    settings = make_settings(tracking_server, folder.parent, model_name=SCHEME)
    frozen = evalset.load_evalset(mlflow_scope.client(settings), model.tags[evalset.DIGEST_TAG])
    on_disk = {hashlib.sha256(p.read_bytes()).hexdigest(): p.stem for p in folder.iterdir()}
    # Every frozen image is one of the folder's files, with that file's label.
    assert frozen.kind == "folder" and 20 <= len(frozen) <= 80
    for image, label in zip(frozen.images, frozen.labels, strict=True):
        assert on_disk[hashlib.sha256(image).hexdigest()] == label
    [version] = client.search_model_versions(f"name = '{SCHEME}'")
    params = client.get_run(version.run_id).data.params
    assert params["data_kind"] == "folder" and params["scheme"] == SCHEME
    assert params["alphabet"] == "".join(sorted(set(standin.ALPHABET)))
    assert int(params["arch_width"]) == 4 * int(params["arch_height"])  # 200x50 -> 4:1
    assert params["frozen_evalset_digest"] == frozen.digest
    assert int(params["excluded_frozen_images"]) == len(frozen)
    assert int(params["n_train"]) + int(params["n_val"]) == 260 - len(frozen)
    assert int(params["n_test"]) == len(frozen)
    metrics = client.get_run(version.run_id).data.metrics
    # Either the model reads something, or the run said so in one line with the fix.
    if metrics["test_seq_acc"] == 0:
        assert "warning: the model reads none of its test images" in trained.stdout
        assert "--max-minutes" in trained.stdout
    else:
        assert "warning:" not in trained.stdout


def test_folder_scheme_keeps_its_frozen_set_and_refuses_a_generated_one(
    trained: subprocess.CompletedProcess[str], folder: Path, tracking_server: Tracking
) -> None:
    settings = make_settings(tracking_server, folder.parent, model_name=SCHEME)
    data = read_folder(folder)
    digest = evalset.current_digest(mlflow_scope.client(settings), settings)
    assert (
        evalset.folder_evalset(mlflow_scope.client(settings), settings, data, 0.5).digest == digest
    )  # reused, not re-made
    synthetic = make_settings(tracking_server, folder.parent, model_name="generated-scheme")
    evalset.create_evalset(mlflow_scope.client(synthetic), synthetic, size=12)
    with pytest.raises(evalset.EvalSetError, match="--model-name"):
        evalset.folder_evalset(mlflow_scope.client(synthetic), synthetic, data, 0.2)


def test_gate_judges_the_folder_scheme_on_its_own_held_out_images(
    trained: subprocess.CompletedProcess[str],
    tracking_server: Tracking,
    tmp_path: Path,
) -> None:
    assert trained.returncode == 0, trained.stderr[-2000:]
    settings = make_settings(tracking_server, tmp_path, model_name=SCHEME)
    frozen = evalset.load_evalset(
        mlflow_scope.client(settings),
        evalset.current_digest(mlflow_scope.client(settings), settings) or "",
    )
    done = cli(["promote", "--auto", "--model-name", SCHEME], tracking_server, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"({len(frozen)} images)" in done.stdout
    client = MlflowClient(tracking_server.uri, tracking_server.uri)
    assert client.get_registered_model(SCHEME).aliases.get("production") is not None
