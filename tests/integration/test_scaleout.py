"""Folds and trials on a real two-node Ray cluster, end to end with a real tracking server.

One `ray.cluster_utils.Cluster` (a head and one worker node, one CPU each, both on 127.0.0.1)
serves the whole module; the commands run as a user runs them, in a subprocess with
`--cluster`, on a tiny stand-in folder with a few optimiser steps per run.
"""

from __future__ import annotations

import base64
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from captchaops.data import standin
from harness.mlflow_state import mlflow_state_restored
from tests.fixtures.stack import VENV_BIN, Tracking, free_port, stop_process

pytestmark = pytest.mark.slow
STEPS = ["--steps", "12", "--max-minutes", "1.5"]
# Ray 2.60 swaps a loopback node address for the machine's outward one unless this is off,
# and a head started by `ray start` requires its token from drivers (docs/training.md).
LOOPBACK_HEAD = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token"}


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    """A two-node Ray cluster (head + worker, 1 CPU each) on 127.0.0.1; yields its address."""
    from ray.cluster_utils import Cluster

    node = {"num_cpus": 1, "node_ip_address": "127.0.0.1", "include_dashboard": False}
    ray_cluster = Cluster(initialize_head=True, head_node_args=node)
    try:
        ray_cluster.add_node(**node)
        yield str(ray_cluster.address)
    finally:
        ray_cluster.shutdown()


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("scaleout") / "captchas"
    standin.build(path, count=60, seed=5)
    return path


def cli(
    args: list[str], tracking: Tracking, home: Path, **extra: str
) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "CAPTCHAOPS_TRACKING_URI": tracking.uri,
        "CAPTCHAOPS_HOME": str(home),
        "CAPTCHAOPS_STAGING_FLOOR": "0",
        "COLUMNS": "120",
        **extra,
    }
    env.pop("RAY_ADDRESS", None)
    return subprocess.run(
        [str(VENV_BIN / "captchaops"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=800,
        check=False,
    )


def children(client: MlflowClient, parent: str) -> list:
    run = client.get_run(parent)
    return client.search_runs(
        [run.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'"
    )


def parent_of(stdout: str) -> str:
    [line] = [line for line in stdout.splitlines() if line.startswith("parent run ")]
    return line.split()[2]


@pytest.fixture(scope="module")
def cv_run(
    cluster: str, folder: Path, tracking_server: Tracking, tmp_path_factory: pytest.TempPathFactory
) -> subprocess.CompletedProcess[str]:
    home = tmp_path_factory.mktemp("cv-home")
    return cli(
        ["cv", "--data", str(folder), "--folds", "2", "--cluster", cluster, *STEPS],
        tracking_server,
        home,
    )


def test_cv_runs_each_fold_as_a_child_run_and_prints_the_summary(
    cv_run: subprocess.CompletedProcess[str], tracking_server: Tracking, folder: Path
) -> None:
    assert cv_run.returncode == 0, cv_run.stdout[-2000:] + cv_run.stderr[-2000:]
    out = cv_run.stdout
    assert "fold 1: " in out and "fold 2: " in out
    assert "held-out accuracy" in out and "mean " in out and "worst fold" in out
    assert "t-interval over folds" in out
    client = MlflowClient(tracking_server.uri)
    parent = parent_of(out)
    runs = children(client, parent)
    assert sorted(r.info.run_name for r in runs) == ["fold 1", "fold 2"]
    held_out = 0
    for run in runs:
        assert run.info.status == "FINISHED"
        assert "test_seq_acc" in run.data.metrics and "val_cer" in run.data.metrics
        held_out += int(run.data.params["n_test"])
        # Per-epoch metrics came from the worker, one point per epoch.
        assert len(client.get_metric_history(run.info.run_id, "val_cer")) >= 1
    assert held_out == len(list(folder.iterdir()))  # every image held out exactly once
    top = client.get_run(parent)
    assert top.info.status == "FINISHED"
    assert 0.0 <= top.data.metrics["cv_mean_seq_acc"] <= 1.0
    # The workers read the data set the driver logged once, by digest, on the parent run.
    [logged] = client.list_artifacts(parent, "dataset")
    assert logged.path == f"dataset/{top.data.params['dataset_sha256']}.zip"


def test_cv_refuses_a_bad_fold_count_in_one_line(
    folder: Path, tracking_server: Tracking, tmp_path: Path
) -> None:
    done = cli(["cv", "--data", str(folder), "--folds", "1"], tracking_server, tmp_path)
    assert done.returncode == 1
    assert "--folds 1 is out of range" in done.stderr
    assert "Traceback" not in done.stdout + done.stderr


@pytest.fixture()
def ray_head(tmp_path: Path) -> Iterator[str]:
    """A separately started `ray start --head --block` on 127.0.0.1; its process tree is
    stopped after the test (never `ray stop`, which would stop every Ray on the machine)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | LOOPBACK_HEAD
    cmd = [str(VENV_BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1"]
    cmd += ["--port", str(port), "--num-cpus", "2", "--include-dashboard", "false"]
    proc = subprocess.Popen(
        cmd, env=env, stdout=(tmp_path / "ray.log").open("wb"), stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 90
        while not _listening(port):
            assert proc.poll() is None, (tmp_path / "ray.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "ray start --head did not listen in 90 s"
            time.sleep(0.5)
        yield f"127.0.0.1:{port}"
    finally:
        stop_process(proc)


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_cv_runs_on_a_separately_started_ray_head(
    ray_head: str, folder: Path, tracking_server: Tracking, tmp_path: Path
) -> None:
    done = cli(
        ["cv", "--data", str(folder), "--folds", "2", "--cluster", ray_head, *STEPS],
        tracking_server,
        tmp_path,
        **LOOPBACK_HEAD,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    client = MlflowClient(tracking_server.uri)
    runs = children(client, parent_of(done.stdout))
    assert {r.info.status for r in runs} == {"FINISHED"} and len(runs) == 2


SCHEME = "tuned-scheme"


@pytest.fixture(scope="module")
def tune_run(
    cluster: str, folder: Path, tracking_server: Tracking, tmp_path_factory: pytest.TempPathFactory
) -> subprocess.CompletedProcess[str]:
    home = tmp_path_factory.mktemp("tune-home")
    args = ["tune", "--data", str(folder), "--trials", "2", "--cluster", cluster, *STEPS]
    return cli([*args, "--model-name", SCHEME], tracking_server, home)


def test_tune_logs_a_child_run_per_trial_and_stages_the_best_as_a_version(
    tune_run: subprocess.CompletedProcess[str], tracking_server: Tracking, tmp_path: Path
) -> None:
    assert tune_run.returncode == 0, tune_run.stdout[-2000:] + tune_run.stderr[-2000:]
    out = tune_run.stdout
    assert "best trial " in out and "registered version 1" in out
    assert "frozen evaluation set" in out and "alias staging -> this version" in out
    client = MlflowClient(tracking_server.uri)
    parent = parent_of(out)
    runs = children(client, parent)
    assert len(runs) == 2
    for run in runs:
        assert {"learning_rate", "conv_scale", "rnn_units", "augment_strength"} <= set(
            run.data.params
        )
        assert len(client.get_metric_history(run.info.run_id, "val_cer")) >= 1
    [version] = client.search_model_versions(f"name = '{SCHEME}'")
    assert version.run_id == client.get_run(parent).data.tags["best_trial_run"]
    assert version.run_id in {r.info.run_id for r in runs}
    assert client.get_registered_model(SCHEME).aliases.get("staging") == "1"
    # The gate judges the tuned version on the scheme's frozen set, like any candidate.
    judged = cli(["promote", "--auto", "--model-name", SCHEME], tracking_server, tmp_path)
    assert judged.returncode in (0, 1), judged.stdout + judged.stderr
    assert "Traceback" not in judged.stdout + judged.stderr
    assert "images)" in judged.stdout + judged.stderr


ENSEMBLE = "ensemble-scheme"


@pytest.fixture(scope="module")
def ensemble_run(
    cluster: str, folder: Path, tracking_server: Tracking, tmp_path_factory: pytest.TempPathFactory
) -> subprocess.CompletedProcess[str]:
    home = tmp_path_factory.mktemp("ensemble-home")
    args = ["train", "--data", str(folder), "--members", "2", "--cluster", cluster, *STEPS]
    return cli([*args, "--model-name", ENSEMBLE], tracking_server, home)


def test_members_are_one_version_that_reads_like_one_model(
    ensemble_run: subprocess.CompletedProcess[str],
    tracking_server: Tracking,
    folder: Path,
    tmp_path: Path,
) -> None:
    import mlflow.pyfunc
    import onnx
    import pandas as pd

    from captchaops.model.version import load_registered

    assert ensemble_run.returncode == 0, ensemble_run.stdout[-2000:] + ensemble_run.stderr[-2000:]
    assert "2 members, combined by" in ensemble_run.stdout
    client = MlflowClient(tracking_server.uri)
    [version] = client.search_model_versions(f"name = '{ENSEMBLE}'")
    assert len(children(client, version.run_id)) == 2  # a child run per member
    reader = load_registered(tracking_server.uri, ENSEMBLE, version.version)
    assert reader.meta["members"] == 2 and reader.meta["combine"] in ("max_confidence", "vote")
    local = mlflow.artifacts.download_artifacts(
        artifact_uri=client.get_model_version_download_uri(ENSEMBLE, version.version),
        dst_path=str(tmp_path),
        tracking_uri=tracking_server.uri,
    )
    [graph] = Path(local).rglob("*.onnx")
    model = onnx.load(str(graph))
    assert len(model.graph.input) == 1 and len(model.graph.output) == 2
    # The models-from-code pyfunc (what stock `mlflow models serve` runs) answers as our reader.
    images = [p.read_bytes() for p in sorted(folder.iterdir())[:8]]
    ours = reader.predict_images(images)
    with mlflow_state_restored():
        stock = mlflow.pyfunc.load_model(local)
    b64 = [base64.b64encode(i).decode() for i in images]
    answers = stock.predict(pd.DataFrame({"image": b64}))
    assert list(answers["text"]) == [o["text"] for o in ours]
    assert list(answers["confidence"]) == pytest.approx([o["confidence"] for o in ours])
