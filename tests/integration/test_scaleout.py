"""Folds, trials and members on real Ray clusters, end to end with a real tracking server.

One `ray.cluster_utils.Cluster` (a head and one worker node, one CPU each, on 127.0.0.1; the
worker declares one GPU, which Ray takes on trust on a machine without one) and one separately
started `ray start --head` serve the whole module. The three long commands run as a user runs
them (`cv` against the `ray start` head, `tune` and `train --members --gpus-per-trial 1`
against the two-node cluster, each a subprocess with `--cluster`) and are started together
when the module begins, so their start-up waits overlap; each test reads the one it checks.
`cv` runs as another login and `tune` as another tracking account than the workers', so that
the runs' credit shows whose it is. A tiny stand-in folder and a few optimiser steps per run
keep the module to a few minutes.
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from mlflow.tracking import MlflowClient

from captchaops.data import standin
from captchaops.scaleout.shipping import Manifest
from harness.processes import process_tree, wait_http
from tests.fixtures.serving import start_model_server
from tests.fixtures.stack import VENV_BIN, Tracking, free_port, stop_process

pytestmark = pytest.mark.slow
STEPS = ["--steps", "4", "--max-minutes", "3"]
# Ray 2.60 swaps a loopback node address for the machine's outward one unless this is off,
# and a head started by `ray start` requires its token from drivers (docs/training.md).
LOOPBACK_HEAD = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token"}
SCHEME = "tuned-scheme"
ENSEMBLE = "ensemble-scheme"
CV_LOGIN = "grace-driver"  # the login `cv` runs as (its Ray's workers run as this process does)
TUNE_ACCOUNT = "ada-driver"  # the tracking account `tune` is configured with


@dataclass
class TwoNodes:
    """The module's Ray cluster: its address, and the id of the node that declares a GPU."""

    address: str
    gpu_node: str


@pytest.fixture(scope="module")
def two_nodes() -> Iterator[TwoNodes]:
    """A two-node Ray cluster (head + worker, 1 CPU each) on 127.0.0.1, the worker declaring
    one GPU (Ray schedules by declared resources, so this machine needs none)."""
    from ray.cluster_utils import Cluster

    node = {"num_cpus": 1, "node_ip_address": "127.0.0.1", "include_dashboard": False}
    ray_cluster = Cluster(initialize_head=True, head_node_args=node | {"num_gpus": 0})
    try:
        gpu = ray_cluster.add_node(**node, num_gpus=1)
        yield TwoNodes(str(ray_cluster.address), str(gpu.node_id))
    finally:
        ray_cluster.shutdown()


@pytest.fixture(scope="module")
def cluster(two_nodes: TwoNodes) -> str:
    """The two-node cluster's address."""
    return two_nodes.address


@pytest.fixture(scope="module")
def head_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """What the `ray start` head and its drivers share: loopback, and a token of the module's
    own (0600, as `ray get-auth-token --generate` writes one), so that the test needs no
    ~/.ray/auth_token on the machine and never touches one that is there."""
    token = tmp_path_factory.mktemp("ray-token") / "auth_token"
    token.touch(mode=0o600)
    token.write_text(secrets.token_hex(32))
    return LOOPBACK_HEAD | {"RAY_AUTH_TOKEN_PATH": str(token)}


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory: pytest.TempPathFactory, head_env: dict[str, str]) -> Iterator[str]:
    """A separately started `ray start --head --block` on 127.0.0.1; its process tree is
    stopped after the module (never `ray stop`, which would stop every Ray on the machine)."""
    port = free_port()
    log = tmp_path_factory.mktemp("ray-head") / "ray.log"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | head_env
    cmd = [str(VENV_BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1"]
    cmd += ["--port", str(port), "--num-cpus", "2", "--include-dashboard", "false"]
    proc = subprocess.Popen(cmd, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        while not _listening(port):
            assert proc.poll() is None, log.read_text()[-2000:]
            assert time.monotonic() < deadline, "ray start --head did not listen in 90 s"
            time.sleep(0.5)
        yield f"127.0.0.1:{port}"
    finally:
        stop_process(proc)


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("scaleout") / "captchas"
    standin.build(path, count=60, seed=5)
    return path


@dataclass
class Command:
    """A `captchaops` command running in the background, its output going to files."""

    proc: subprocess.Popen
    out: Path
    err: Path

    @classmethod
    def start(cls, args: list[str], tracking: Tracking, home: Path, **extra: str) -> Command:
        """Start `captchaops ARGS` as a user would, with its own home and this tracking server."""
        home.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            "CAPTCHAOPS_TRACKING_URI": tracking.uri,
            "CAPTCHAOPS_HOME": str(home),
            "CAPTCHAOPS_STAGING_FLOOR": "0",
            "COLUMNS": "120",
            **extra,
        }
        env.pop("RAY_ADDRESS", None)
        out, err = home / "stdout.txt", home / "stderr.txt"
        proc = subprocess.Popen(
            [str(VENV_BIN / "captchaops"), *args],
            env=env,
            stdout=out.open("wb"),
            stderr=err.open("wb"),
            start_new_session=True,  # Ctrl-C in a terminal goes to the whole group
        )
        return cls(proc, out, err)

    def result(self, timeout: float = 900) -> subprocess.CompletedProcess[str]:
        """Wait for the command; its exit status and output."""
        try:
            self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                stop_process(self.proc)
        return subprocess.CompletedProcess(
            self.proc.args, self.proc.returncode, self.out.read_text(), self.err.read_text()
        )


def cli(
    args: list[str], tracking: Tracking, home: Path, **extra: str
) -> subprocess.CompletedProcess[str]:
    return Command.start(args, tracking, home, **extra).result()


@pytest.fixture(scope="module")
def commands(
    cluster: str,
    ray_head: str,
    head_env: dict[str, str],
    folder: Path,
    tracking_server: Tracking,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[str, Command]]:
    """cv (on the `ray start` head), tune and `train --members 2` (on the two-node cluster),
    all started at once."""
    home = tmp_path_factory.mktemp("homes")
    data = ["--data", str(folder)]
    started = {
        "cv": Command.start(
            ["cv", *data, "--folds", "2", "--cluster", ray_head, *STEPS],
            tracking_server,
            home / "cv",
            **head_env,
            LOGNAME=CV_LOGIN,
            USER=CV_LOGIN,
        ),
        "tune": Command.start(
            ["tune", *data, "--trials", "2", "--cluster", cluster, *STEPS, "--model-name", SCHEME],
            tracking_server,
            home / "tune",
            CAPTCHAOPS_TRACKING_USERNAME=TUNE_ACCOUNT,
        ),
        "members": Command.start(
            [
                "train",
                *data,
                "--members",
                "2",
                "--gpus-per-trial",
                "1",
                "--cluster",
                cluster,
                *STEPS,
                "--model-name",
                ENSEMBLE,
            ],
            tracking_server,
            home / "members",
        ),
    }
    try:
        yield started
    finally:
        for command in started.values():
            if command.proc.poll() is None:
                stop_process(command.proc)


@pytest.fixture(scope="module")
def cv_run(commands: dict[str, Command]) -> subprocess.CompletedProcess[str]:
    return commands["cv"].result()


@pytest.fixture(scope="module")
def tune_run(commands: dict[str, Command]) -> subprocess.CompletedProcess[str]:
    return commands["tune"].result()


@pytest.fixture(scope="module")
def ensemble_run(commands: dict[str, Command]) -> subprocess.CompletedProcess[str]:
    return commands["members"].result()


def children(client: MlflowClient, parent: str) -> list:
    run = client.get_run(parent)
    return client.search_runs(
        [run.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'"
    )


def parent_of(stdout: str) -> str:
    [line] = [line for line in stdout.splitlines() if line.startswith("parent run ")]
    return line.split()[2]


def test_cv_refuses_a_bad_fold_count_in_one_line(
    commands: dict[str, Command], folder: Path, tracking_server: Tracking, tmp_path: Path
) -> None:
    # (Asks for `commands` so that the long commands run while this test does.)
    done = cli(["cv", "--data", str(folder), "--folds", "1"], tracking_server, tmp_path)
    assert done.returncode == 1
    assert "--folds 1 is out of range" in done.stderr
    assert "Traceback" not in done.stdout + done.stderr


def test_a_run_asking_more_gpus_than_any_node_has_is_refused_in_one_line_before_any_work(
    commands: dict[str, Command],
    cluster: str,
    folder: Path,
    tracking_server: Tracking,
    tmp_path: Path,
) -> None:
    """The cluster's one GPU node has one GPU: asking two per trial ends in one line naming
    the most one node has, before a run is made (Ray would keep the trials pending for ever)."""
    args = ["tune", "--data", str(folder), "--trials", "2", "--gpus-per-trial", "2"]
    # Its own experiment: nothing may be logged there.
    extra = {"CAPTCHAOPS_EXPERIMENT_NAME": "too-many-gpus"}
    started = time.monotonic()
    done = cli([*args, "--cluster", cluster, *STEPS], tracking_server, tmp_path, **extra)
    took = time.monotonic() - started
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    assert "Traceback" not in done.stdout + done.stderr
    [line] = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert "--gpus-per-trial 2 asks for more GPUs than any node" in line
    assert "the most on one node is 1" in line
    client = MlflowClient(tracking_server.uri)
    experiment = client.get_experiment_by_name("too-many-gpus")
    assert experiment is None or not client.search_runs([experiment.experiment_id])
    assert took < 120, took  # seconds alone; the long commands run beside it


def test_ctrl_c_ends_cv_as_killed_shuts_its_ray_down_and_prints_one_line(
    commands: dict[str, Command], folder: Path, tracking_server: Tracking, tmp_path: Path
) -> None:
    """Ctrl-C (SIGINT to the command's process group, as a terminal sends it) while the folds
    train on a local Ray: parent and child runs KILLED, every Ray process gone, no traceback.
    (It runs while the long commands do.)"""
    args = ["cv", "--data", str(folder), "--folds", "2", "--cpus", "1", "--steps", "5000"]
    # Its own experiment, so that the folds of the `cv` running beside it are not taken for its own.
    command = Command.start(args, tracking_server, tmp_path, CAPTCHAOPS_EXPERIMENT_NAME="ctrl-c")
    client = MlflowClient(tracking_server.uri)
    deadline = time.monotonic() + 300
    running: list = []
    while not running:
        assert command.proc.poll() is None, command.err.read_text()[-2000:]
        assert time.monotonic() < deadline, "no fold started training in 300 s"
        time.sleep(1)
        experiment = client.get_experiment_by_name("ctrl-c")
        if experiment is not None:
            running = client.search_runs(
                [experiment.experiment_id],
                filter_string="tags.state = 'running' and attributes.status = 'RUNNING'",
            )
    ray_processes = process_tree(command.proc.pid)[1:]
    os.killpg(command.proc.pid, signal.SIGINT)
    # 30 s alone; over 120 s once while a clean clone installed and linted beside the module.
    done = command.result(timeout=240)
    assert done.returncode == 130, done.stdout[-2000:] + done.stderr[-2000:]
    assert "Traceback" not in done.stdout + done.stderr
    assert "stopped by Ctrl-C" in done.stdout
    parent = client.get_run(parent_of(done.stdout))
    assert parent.info.status == "KILLED"
    assert {r.info.status for r in children(client, parent.info.run_id)} <= {"KILLED", "FINISHED"}
    assert "KILLED" in {r.info.status for r in children(client, parent.info.run_id)}
    _, alive = psutil.wait_procs(ray_processes, timeout=30)
    assert not alive, [p.info for p in alive]
    # The local Ray's token was the home's own, readable by its owner alone (issue 35).
    token = tmp_path / "ray" / "auth_token"
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    assert stat.S_IMODE(token.parent.stat().st_mode) == 0o700


def test_cv_on_a_separately_started_head_runs_each_fold_as_a_child_run(
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
    # The workers read the data set the driver stored once, as shards named by their digest,
    # through a manifest the parent run names.
    store, manifest = _manifest_of(client, top)
    assert manifest.dataset_sha256 == top.data.params["dataset_sha256"]
    stored = {Path(f.path).name for f in client.list_artifacts(store, "shards")}
    assert {f"{s.sha256}.tar" for s in manifest.shards} <= stored
    assert top.data.metrics["dataset_shards"] == len(manifest.shards)


def _manifest_of(client: MlflowClient, run: Any) -> tuple[str, Manifest]:
    """The store run and manifest a parent run names (its digest checked)."""
    store, _, path = run.data.tags["captchaops.dataset"].partition("/")
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(client.download_artifacts(store, path, tmp)).read_bytes()
    assert hashlib.sha256(raw).hexdigest() == Path(path).stem
    return store, Manifest.decode(raw)


def test_runs_are_credited_to_who_ran_the_command_not_to_the_workers_account(
    cv_run: subprocess.CompletedProcess[str],
    tune_run: subprocess.CompletedProcess[str],
    tracking_server: Tracking,
) -> None:
    """`mlflow.user` (the MLflow UI's "User") on the parent and every child run is the driver's:
    its login for `cv`, its tracking account for `tune`; the workers run as this test does."""
    import getpass

    assert getpass.getuser() not in (CV_LOGIN, TUNE_ACCOUNT)  # else this could not fail
    assert cv_run.returncode == 0 and tune_run.returncode == 0, cv_run.stderr + tune_run.stderr
    client = MlflowClient(tracking_server.uri)
    for done, who in ((cv_run, CV_LOGIN), (tune_run, TUNE_ACCOUNT)):
        parent = parent_of(done.stdout)
        runs = [client.get_run(parent), *children(client, parent)]
        assert len(runs) == 3
        assert {r.data.tags.get("mlflow.user") for r in runs} == {who}
        assert {r.info.user_id for r in runs} == {who}


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


def test_cv_of_a_trial_with_members_trains_each_fold_as_that_trials_ensemble(
    tune_run: subprocess.CompletedProcess[str],
    cv_run: subprocess.CompletedProcess[str],
    cluster: str,
    folder: Path,
    tracking_server: Tracking,
    tmp_path: Path,
) -> None:
    """`cv --trial RUN` (how bench_tune compares the best trial with the preset) trains the
    folds with the trial's settings, and `--members 2` (how bench_members compares members with
    one run) trains each fold as two members combined into one score; a run that is not a
    trial is refused in one line."""
    assert tune_run.returncode == 0, tune_run.stderr[-2000:]
    client = MlflowClient(tracking_server.uri)
    parent = parent_of(tune_run.stdout)
    best = client.get_run(parent).data.tags["best_trial_run"]
    data = ["cv", "--data", str(folder), "--folds", "2", "--cluster", cluster, *STEPS]
    refused = cli([*data, "--trial", parent], tracking_server, tmp_path / "refused")
    assert refused.returncode == 1
    assert f"run {parent} is not a tune trial" in refused.stderr
    assert "Traceback" not in refused.stdout + refused.stderr
    done = cli([*data, "--trial", best, "--members", "2"], tracking_server, tmp_path / "trial")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "fold 1: " in done.stdout and "fold 2: " in done.stdout and "mean " in done.stdout
    trial = client.get_run(best).data.params
    top = client.get_run(parent_of(done.stdout))
    used = top.data.params
    assert float(used["learning_rate"]) == pytest.approx(float(trial["learning_rate"]))
    assert int(used["arch_rnn_units"]) == int(trial["rnn_units"])
    assert int(used["max_steps"]) == int(trial["max_steps"])
    assert used["members"] == "2"
    # The same folder as the first cv's: its shards are in the store already.
    assert top.data.metrics["dataset_shards_uploaded"] == 0
    runs = {r.info.run_name: r for r in children(client, top.info.run_id)}
    assert sorted(runs) == [
        "fold 1",
        "fold 1 member 1",
        "fold 1 member 2",
        "fold 2",
        "fold 2 member 1",
        "fold 2 member 2",
    ]
    for run in runs.values():
        assert run.info.status == "FINISHED"
        assert 0.0 <= run.data.metrics["test_seq_acc"] <= 1.0
    for k in (1, 2):
        fold = runs[f"fold {k}"]
        assert fold.data.tags["combine"] in {"max_confidence", "vote"}
        assert {"val_seq_acc_max_confidence", "val_seq_acc_vote"} <= set(fold.data.metrics)
        # Member i of fold k trains with seed + (k - 1) + (i - 1) * folds.
        seeds = [int(runs[f"fold {k} member {i}"].data.params["seed"]) for i in (1, 2)]
        assert seeds == [int(used["seed"]) + k - 1, int(used["seed"]) + k + 1]
        # The fold's own score is its combination's, over the fold's held-out images.
        assert int(fold.data.params["n_test"]) == int(
            runs[f"fold {k} member 1"].data.params["n_test"]
        )
    accuracy = [runs[f"fold {k}"].data.metrics["test_seq_acc"] for k in (1, 2)]
    assert top.data.metrics["cv_mean_seq_acc"] == pytest.approx(sum(accuracy) / 2)


def test_members_are_one_version_served_alike_by_our_server_and_stock_mlflow(
    ensemble_run: subprocess.CompletedProcess[str],
    two_nodes: TwoNodes,
    tracking_server: Tracking,
    folder: Path,
    tmp_path: Path,
) -> None:
    import mlflow.artifacts
    import onnx

    from captchaops.model.version import load_registered

    assert ensemble_run.returncode == 0, ensemble_run.stdout[-2000:] + ensemble_run.stderr[-2000:]
    assert "2 members, combined by" in ensemble_run.stdout
    assert "alias staging -> this version" in ensemble_run.stdout
    client = MlflowClient(tracking_server.uri)
    [version] = client.search_model_versions(f"name = '{ENSEMBLE}'")
    members = children(client, version.run_id)
    assert len(members) == 2  # a child run per member
    # Each member asked for a GPU, so Ray ran it on the one node that declares one.
    assert client.get_run(str(version.run_id)).data.params["gpus_per_trial"] == "1.0"
    assert {m.data.tags["captchaops.node_id"] for m in members} == {two_nodes.gpu_node}
    # Stock `mlflow models serve` (the models-from-code pyfunc) starts while we look at the graph.
    port = free_port()
    stock_log = tmp_path / "mlflow-serve.log"
    uri = f"models:/{ENSEMBLE}/{version.version}"
    cmd = [str(VENV_BIN / "mlflow"), "models", "serve", "-m", uri, "--env-manager", "local"]
    stock = subprocess.Popen(
        [*cmd, "--host", "127.0.0.1", "--port", str(port)],
        # mlflow runs `uvicorn` by name: our venv's bin first on PATH, as an activated venv has.
        env={**os.environ, "MLFLOW_TRACKING_URI": tracking_server.uri}
        | {"PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"},
        stdout=stock_log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    ours = None
    try:
        reader = load_registered(tracking_server.uri, ENSEMBLE, version.version)
        assert reader.meta["members"] == 2
        assert reader.meta["combine"] in ("max_confidence", "vote")
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=client.get_model_version_download_uri(ENSEMBLE, version.version),
            dst_path=str(tmp_path / "version"),
            tracking_uri=tracking_server.uri,
        )
        [graph] = Path(local).rglob("*.onnx")
        model = onnx.load(str(graph))  # one graph: one input, an output per member
        assert len(model.graph.input) == 1 and len(model.graph.output) == 2
        images = [p.read_bytes() for p in sorted(folder.iterdir())[:8]]
        want = reader.predict_images(images)
        body = {
            "dataframe_split": {
                "columns": ["image"],
                "data": [[base64.b64encode(i).decode("ascii")] for i in images],
            }
        }
        ours = start_model_server(tracking_server.uri, "staging", tmp_path / "ours", ENSEMBLE)
        ours.wait_version(version.version)
        wait_http(f"http://127.0.0.1:{port}/ping", timeout=180, proc=stock)
        for url in (ours.url, f"http://127.0.0.1:{port}"):
            resp = httpx.post(f"{url}/invocations", json=body, timeout=60)
            assert resp.status_code == 200, (url, resp.text)
            got = resp.json()["predictions"]
            assert [g["text"] for g in got] == [w["text"] for w in want], url
            assert [g["confidence"] for g in got] == pytest.approx(
                [w["confidence"] for w in want], abs=1e-5
            ), url
    finally:
        if ours is not None:
            stop_process(ours.proc)
        stop_process(stock)


@dataclass
class Sharded:
    """The in-process `cv` runs on a folder cut into small shards: streamed, then tampered."""

    streamed: Any  # CvResult
    tampered: Any  # CvResult
    client: MlflowClient


@pytest.fixture(scope="module")
def sharded(
    cv_run: subprocess.CompletedProcess[str],
    tune_run: subprocess.CompletedProcess[str],
    ensemble_run: subprocess.CompletedProcess[str],
    cluster: str,
    folder: Path,
    tracking_server: Tracking,
    tmp_path_factory: pytest.TempPathFactory,
) -> Sharded:
    """`cv` (the driver in this process, the folds on the two-node cluster once the module's
    commands are done) on the folder cut into 16-image shards, in an experiment of its own:
    every fold streams its training images (threshold 0 bytes); then one shard is changed in
    the artifact store (same size) and dropped from the workers' cache, and `cv` runs again."""
    from captchaops.scaleout import shipping
    from captchaops.scaleout.board import Board
    from captchaops.scaleout.cv import cross_validate
    from captchaops.scaleout.feed import cache_dir
    from captchaops.settings import Settings
    from captchaops.training.config import from_options

    settings = Settings(
        home=tmp_path_factory.mktemp("sharded"),
        tracking_uri=tracking_server.uri,
        experiment_name="sharded-folder",
    )
    config = from_options(None, folder, max_steps=4, max_minutes=3)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(shipping, "SHARD_IMAGES", 16)
        streamed = cross_validate(config, settings, 2, cluster, Board("cv"), stream_above=0)
        client = MlflowClient(tracking_server.uri)
        _, manifest = _manifest_of(client, client.get_run(streamed.parent_run_id))
        first = manifest.shards[0].sha256
        [stored] = tracking_server.home.rglob(f"{first}.tar")
        raw = bytearray(stored.read_bytes())
        raw[700] ^= 1
        stored.write_bytes(bytes(raw))
        (cache_dir() / f"{first}.tar").unlink(missing_ok=True)
        tampered = cross_validate(config, settings, 2, cluster, Board("cv"))
    return Sharded(streamed, tampered, client)


def test_a_folder_in_shards_streams_each_folds_training_images_through_ray(
    sharded: Sharded, folder: Path
) -> None:
    result, client = sharded.streamed, sharded.client
    assert [f.accuracy is not None for f in result.folds] == [True, True], result.folds
    top = client.get_run(result.parent_run_id)
    _, manifest = _manifest_of(client, top)
    assert len(manifest.shards) == 4 and sum(s.images for s in manifest.shards) == 60
    assert top.data.metrics["dataset_shards_uploaded"] == 4
    assert sum(f.n for f in result.folds) == len(list(folder.iterdir()))
    for fold in result.folds:
        run = client.get_run(fold.run_id)
        assert run.data.tags["captchaops.data"].startswith("streamed from 4 shards")
        assert run.data.metrics["steps_run"] >= 1


def test_a_second_run_uploads_nothing_and_a_changed_shard_fails_each_fold_in_one_line(
    sharded: Sharded,
) -> None:
    result, client = sharded.tampered, sharded.client
    top = client.get_run(result.parent_run_id)
    assert top.data.metrics["dataset_shards_uploaded"] == 0
    assert (
        top.data.tags["captchaops.dataset"]
        == client.get_run(sharded.streamed.parent_run_id).data.tags["captchaops.dataset"]
    )
    for fold in result.folds:
        assert fold.accuracy is None
        assert "\n" not in fold.note
        assert fold.note.startswith("ShardError: shard ")
        assert "does not match its sha256" in fold.note and "delete the run 'datasets'" in fold.note
        assert client.get_run(fold.run_id).info.status == "FAILED"
