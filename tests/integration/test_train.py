"""A real short training run against a real tracking server; the registered model loads and serves."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import mlflow
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from captchaops.data import synthetic
from captchaops.data.corrections import download_feedback
from tests.fixtures.models import TrainedModel, make_settings, train_tiny
from tests.fixtures.stack import VENV_BIN, Tracking, free_port, wait_http

pytestmark = pytest.mark.slow


def b64_images(n: int, seed: int) -> list[str]:
    return [base64.b64encode(s.image).decode() for s in synthetic.generate(n, seed)]


def test_run_has_params_metrics_dataset_and_artifacts(
    tiny_model: TrainedModel, tracking_server: Tracking, mlflow_client_env: str
) -> None:
    client = MlflowClient(tracking_server.uri, registry_uri=tracking_server.uri)
    run = client.get_run(tiny_model.run_id)
    params = run.data.params
    assert params["alphabet"] == synthetic.DIGITS_UPPER
    assert params["optimizer"] == "AdamW"
    assert {"arch_height", "arch_width", "arch_filters", "batch_size", "data_source"} <= set(params)
    assert len(params["dataset_sha256"]) == 64
    assert params["data_path"] == "fresh"  # synthetic presets draw new images while training
    for key in ("loss", "val_loss", "val_seq_acc", "val_cer"):
        assert len(client.get_metric_history(run.info.run_id, key)) == 2
    assert {"test_seq_acc", "test_cer", "wall_seconds"} <= set(run.data.metrics)
    done = run.data.metrics  # the tiny preset plans 2 epochs x 8 steps and runs all of them
    assert done["steps_planned"] == done["steps_run"] == float(params["planned_steps"]) == 16
    assert (
        done["images_per_second"] > 0 and 0 < done["seconds_to_first_step"] < done["wall_seconds"]
    )
    assert 256 <= done["fresh_images"] < 16 * 32  # new images, fewer than the steps drew (reuse)
    steps = client.get_metric_history(run.info.run_id, "steps")
    assert [m.value for m in steps] == [8.0, 16.0]
    [dataset] = run.inputs.dataset_inputs
    assert dataset.dataset.digest == params["dataset_sha256"][:32]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"keras", "confusions.json", "test_samples.png", "report"} <= artifacts
    assert [a.path for a in client.list_artifacts(run.info.run_id, "keras")] == ["keras/crnn.keras"]
    version = client.get_model_version(tiny_model.model_name, tiny_model.version)
    assert version.run_id == tiny_model.run_id
    assert version.tags["validation_status"] == "pending"
    requirements = Path(mlflow.pyfunc.get_model_dependencies(tiny_model.uri)).read_text()
    assert "onnxruntime" in requirements
    assert "tensorflow" not in requirements and "keras" not in requirements


def test_model_loads_and_predicts_without_tensorflow(
    tiny_model: TrainedModel, tracking_server: Tracking
) -> None:
    images = b64_images(3, seed=99)
    script = """
import json, sys
import mlflow.pyfunc, pandas as pd
model = mlflow.pyfunc.load_model(sys.argv[1])
out = model.predict(pd.DataFrame({"image": json.loads(sys.argv[2])}))
inner = model.unwrap_python_model()
assert "tensorflow" not in sys.modules and "keras" not in sys.modules, "TensorFlow was imported"
ours = sorted(m for m in sys.modules if m.split(".")[0] == "captchaops")
assert not ours, f"the stock pyfunc imported captchaops: {ours}"
print(json.dumps({"rows": out.to_dict("records"), "meta": inner.reader.meta}))
"""
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_server.uri}
    done = subprocess.run(
        [sys.executable, "-c", script, tiny_model.uri, json.dumps(images)],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(result["rows"]) == 3
    assert all(isinstance(r["text"], str) and 0 <= r["confidence"] <= 1 for r in result["rows"])
    assert (
        result["meta"] | {"alphabet": synthetic.DIGITS_UPPER, "model_format": "onnx"}
        == result["meta"]
    )
    assert (result["meta"]["height"], result["meta"]["width"]) == (24, 72)


def test_predict_images_names_the_bad_item(
    tiny_model: TrainedModel, mlflow_client_env: str
) -> None:
    import importlib.util

    from captchaops.model.preprocess import InvalidImage
    from captchaops.model.version import load_registered

    where = importlib.util.find_spec("captchaops")
    stock = mlflow.pyfunc.load_model(tiny_model.uri).unwrap_python_model()
    assert importlib.util.find_spec("captchaops") == where, "the model shadowed captchaops"
    ours = load_registered(mlflow_client_env, tiny_model.model_name, tiny_model.version)
    good = synthetic.generate_one(1).image
    for model in (ours, stock.reader):
        assert len(model.predict_images([good, good])) == 2
        with pytest.raises(Exception, match="image 1"):
            model.predict_images([good, b"nope"])
    with pytest.raises(InvalidImage, match="image 1"):
        ours.predict_images([good, b"nope"])
    with pytest.raises(Exception, match="image 0 is not valid base64"):
        stock.predict(None, pd.DataFrame({"image": ["***"]}))


def test_mlflow_models_serve_matches_in_process(
    tiny_model: TrainedModel, tracking_server: Tracking, mlflow_client_env: str, tmp_path: Path
) -> None:
    images = b64_images(4, seed=7)
    expected = mlflow.pyfunc.load_model(tiny_model.uri).predict(pd.DataFrame({"image": images}))
    port = free_port()
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen(
        [
            str(VENV_BIN / "mlflow"),
            "models",
            "serve",
            "-m",
            tiny_model.uri,
            "--env-manager",
            "local",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        env={
            **os.environ,
            "MLFLOW_TRACKING_URI": tracking_server.uri,
            "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        },
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/ping", timeout=120, proc=proc)
        body = {"dataframe_split": {"columns": ["image"], "data": [[i] for i in images]}}
        answer = httpx.post(f"http://127.0.0.1:{port}/invocations", json=body, timeout=60)
        assert answer.status_code == 200, answer.text
        got = answer.json()["predictions"]
        assert [r["text"] for r in got] == expected["text"].tolist()
        assert [r["confidence"] for r in got] == pytest.approx(expected["confidence"].tolist())
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_low_accuracy_version_is_rejected_with_reason(
    tracking_server: Tracking, tmp_path: Path
) -> None:
    settings = make_settings(tracking_server, tmp_path, staging_floor=1.0)
    model = train_tiny(settings, epochs=1, seed=5)
    client = MlflowClient(tracking_server.uri, registry_uri=tracking_server.uri)
    version = client.get_model_version(model.model_name, model.version)
    assert version.tags["validation_status"] == "rejected"
    assert "below the staging floor" in version.tags["rejection_reason"]
    assert "staging" not in version.aliases


def test_training_leaves_the_callers_mlflow_state_as_it_was_and_no_workers(
    tracking_server: Tracking, tmp_path: Path, isolated_mlflow: None
) -> None:
    """A notebook or test that trains in-process keeps talking to its own server afterwards,
    and nothing of the training stream outlives `train`: no drawing worker, no pool thread."""
    import multiprocessing
    import threading

    from mlflow.tracking import fluent

    elsewhere = "http://127.0.0.1:9"
    mlflow.set_tracking_uri(elsewhere)
    mlflow.set_registry_uri(elsewhere)
    fluent._active_experiment_id = None
    before = {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_")}
    model = train_tiny(make_settings(tracking_server, tmp_path), epochs=1, seed=8)
    after = {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_")}
    assert (mlflow.get_tracking_uri(), mlflow.get_registry_uri()) == (elsewhere, elsewhere)
    assert after == before
    assert fluent._active_experiment_id is None
    client = MlflowClient(tracking_server.uri, registry_uri=tracking_server.uri)
    assert client.get_model_version(model.model_name, model.version).run_id == model.run_id
    assert not multiprocessing.active_children()
    pools = [t for t in threading.enumerate() if type(t).__name__ == "_ExecutorManagerThread"]
    assert not pools


def test_folder_training_reports_skips_and_feedback_merges(
    tracking_server: Tracking, tmp_path: Path
) -> None:
    from dataclasses import replace

    from captchaops.training.run import train
    from harness.training import tiny_config

    settings = make_settings(tracking_server, tmp_path / "home", model_name="folder-skips")
    folder = tmp_path / "real"
    folder.mkdir()
    for sample in synthetic.generate(
        120, seed=11, alphabet="abc123", length=(5, 5), width=200, height=50
    ):
        Image.open(__import__("io").BytesIO(sample.image)).convert("RGBA").save(
            folder / f"{sample.label}.png"
        )
    (folder / "broken.png").write_bytes(b"garbage")
    waiting = download_feedback(settings, tmp_path / "before")  # other tests may store some too
    mlflow.set_tracking_uri(tracking_server.uri)
    mlflow.set_experiment(settings.feedback_experiment)
    with mlflow.start_run():
        fb = tmp_path / "fb"
        fb.mkdir()
        (fb / "abc12_0d1e2f.png").write_bytes(synthetic.generate_one(3, alphabet="abc123").image)
        mlflow.log_artifacts(str(fb), "feedback")
    assert download_feedback(settings, tmp_path / "fetched") == waiting + 1
    assert download_feedback(settings, tmp_path / "fetched") == 0
    config = replace(tiny_config(), data_dir=folder, include_feedback=True, epochs=1)
    result = train(config, settings)
    assert "1 unreadable image (e.g. broken.png)" in result.skipped
    params = (
        MlflowClient(tracking_server.uri, registry_uri=tracking_server.uri)
        .get_run(result.run_id)
        .data.params
    )
    assert params["alphabet"] == "123abc"
    assert params["augment_applied"] == "True"
    assert "feedback" in params["data_source"]


def test_cli_train_reports_bad_data_in_one_line(tmp_path: Path, tracking_server: Tracking) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "x.png").write_bytes(b"garbage")
    env = {
        **os.environ,
        "CAPTCHAOPS_HOME": str(tmp_path / "home"),
        "CAPTCHAOPS_TRACKING_URI": tracking_server.uri,
    }
    done = subprocess.run(
        [str(VENV_BIN / "captchaops"), "train", "--data", str(tmp_path / "data")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 1
    assert "no usable images" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout


def test_cli_train_runs_with_progress_and_registers(
    tmp_path: Path, tracking_server: Tracking
) -> None:
    env = {
        **os.environ,
        "CAPTCHAOPS_HOME": str(tmp_path),
        "CAPTCHAOPS_TRACKING_URI": tracking_server.uri,
        "CAPTCHAOPS_STAGING_FLOOR": "1.0",
    }
    done = subprocess.run(
        [str(VENV_BIN / "captchaops"), "train", "--synthetic", "200", "--epochs", "1", "--seed", "4"],
        env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "test sequence accuracy" in done.stdout
    assert "5 of 5 planned steps" in done.stdout  # 160 pool images / batch 32, one epoch
    assert "images/s" in done.stdout and "first step after" in done.stdout
    assert "registered models:/text-captcha/" in done.stdout
    assert "not staged: test sequence accuracy" in done.stdout
