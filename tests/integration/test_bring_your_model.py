"""Bring your model: a network in another contract goes through `register`, `promote --auto`,
our model server and stock `mlflow models serve`, and answers exactly like the original.

The "outside" model is the shared tiny model re-exported NCHW with the blank first
(`tests.fixtures.foreign.reexport`, onnx.helper nodes around our graph), registered under its
own scheme. The refusals are shown on a small random network (`tiny_ctc`, which reads varied
texts where the seconds-trained tiny model may read nothing) re-exported the same way, judged
on a frozen set labelled with its own readings: under the right contract it scores 1.0, under a
wrong one about 0. Everything runs through the real CLI (its typer app, in this process: a
fresh `captchaops` process per command spent most of this module's time importing) against
the session's tracking server; the refusals and the right contract share one frozen set.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import mlflow
import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from captchaops import mlflow_scope
from captchaops.cli import app
from captchaops.data.synthetic import generate
from captchaops.evaluation import report
from captchaops.model.version import check_model_dir, load_registered
from harness.mlflow_state import mlflow_state_restored
from tests.fixtures.foreign import ALPHABET, HEIGHT, WIDTH, reexport, tiny_ctc
from tests.fixtures.models import TrainedModel
from tests.fixtures.serving import start_model_server
from tests.fixtures.stack import VENV_BIN, Tracking, free_port, start_http_process, stop_process

pytestmark = pytest.mark.slow

NAME = "byom-nchw"
WRONG = "byom-wrong"


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("byom_home")


@dataclass(frozen=True)
class Done:
    """What a command left: its exit status and what it printed."""

    returncode: int
    stdout: str
    stderr: str


def cli(tracking: Tracking, home: Path, *args: str) -> Done:
    """`captchaops ARGS` as a user would run it, against the test tracking server: the CLI's
    own app in this process, with only the environment below; an unexpected error fails."""
    env: dict[str, str | None] = {  # the session's promotion key stays: its servers trust it
        k: None
        for k in os.environ
        if k.startswith(("CAPTCHAOPS_", "MLFLOW_")) and k != "CAPTCHAOPS_SIGNING_KEY_DIR"
    }
    env |= {
        "CAPTCHAOPS_HOME": str(home),
        "CAPTCHAOPS_TRACKING_URI": tracking.uri,
        "CAPTCHAOPS_STAGING_FLOOR": "0",  # the seconds-trained tiny model may read nothing
    }
    with mlflow_state_restored():
        result = CliRunner().invoke(app, list(args), env=env)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return Done(result.exit_code, result.stdout, result.stderr)


@pytest.fixture(scope="module")
def original(
    tracking_server: Tracking, tiny_model: TrainedModel, tmp_path_factory: pytest.TempPathFactory
) -> tuple[dict[str, Any], Path]:
    """The tiny version's checked meta.json and ONNX network, downloaded."""
    client = MlflowClient(tracking_server.uri, tracking_server.uri)
    source = client.get_model_version_download_uri(tiny_model.model_name, tiny_model.version)
    local = mlflow.artifacts.download_artifacts(
        artifact_uri=source,
        dst_path=str(tmp_path_factory.mktemp("original")),
        tracking_uri=tracking_server.uri,
    )
    meta, onnx_path = check_model_dir(Path(local))
    return meta.model_dump(), onnx_path


@pytest.fixture(scope="module")
def theirs(original: tuple[dict[str, Any], Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The original re-exported as a PyTorch export often is: NCHW input, blank first."""
    path = tmp_path_factory.mktemp("theirs") / "crnn_nchw_blank_first.onnx"
    reexport(original[1], path, input_layout="NCHW", blank="first")
    return path


@pytest.fixture(scope="module")
def random_theirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A random network NCHW with the blank first, and a folder of generated images named by
    what it reads in them."""
    from captchaops.model.reader import OnnxReader

    work = tmp_path_factory.mktemp("random_theirs")
    ours = tiny_ctc(work / "ours.onnx", seed=3)
    reexport(ours, work / "theirs.onnx", input_layout="NCHW", blank="first")
    meta = {"alphabet": ALPHABET, "height": HEIGHT, "width": WIDTH}
    samples = generate(120, seed=424242)
    readings = OnnxReader(ours, meta).read_all([s.image for s in samples])
    for i, (sample, out) in enumerate(zip(samples, readings, strict=True)):
        if out["text"] and len(out["text"]) <= 64:
            (work / "read" / f"{i:04d}").mkdir(parents=True)
            (work / "read" / f"{i:04d}" / f"{out['text']}.png").write_bytes(sample.image)
    return work / "theirs.onnx", work / "read"


@pytest.fixture(scope="module")
def registered(
    tracking_server: Tracking, home: Path, original: tuple[dict[str, Any], Path], theirs: Path
) -> str:
    """The re-export registered under its own scheme and promoted by the gate."""
    made = cli(tracking_server, home, "evalset", "--size", "100", "--model-name", NAME)
    assert made.returncode == 0, made.stderr
    done = cli(
        tracking_server, home, "register", "--onnx", str(theirs), "--model-name", NAME,
        "--alphabet", original[0]["alphabet"], "--layout", "NCHW", "--blank", "first",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"registered {NAME} v1 from {theirs.name}: frozen-set accuracy" in done.stdout
    assert "staged as @staging" in done.stdout
    gate = cli(tracking_server, home, "promote", "--auto", "--model-name", NAME, "--floor", "0")
    assert gate.returncode == 0, gate.stdout + gate.stderr
    return "1"


def test_the_registered_version_carries_its_contract_and_source_digest(
    tracking_server: Tracking, registered: str, theirs: Path
) -> None:
    client = MlflowClient(tracking_server.uri, tracking_server.uri)
    version = client.get_model_version(NAME, registered)
    assert set(version.aliases) >= {"production"}
    params = client.get_run(version.run_id).data.params
    assert params["source_sha256"] == hashlib.sha256(theirs.read_bytes()).hexdigest()
    assert (params["input_layout"], params["blank"], params["origin"]) == (
        "NCHW",
        "first",
        "external",
    )
    reader = load_registered(tracking_server.uri, NAME, registered)
    assert reader.contract["input_layout"] == "NCHW" and reader.contract["blank"] == "first"


def test_register_logs_the_visual_report_and_models_names_it(
    tracking_server: Tracking, registered: str, home: Path, tmp_path: Path
) -> None:
    client = MlflowClient(tracking_server.uri, tracking_server.uri)
    run_id = client.get_model_version(NAME, registered).run_id
    files = {f.path for f in client.list_artifacts(run_id, "report")}
    assert files == {f"report/{name}" for name in ("report.json", *report.PNG_FILES)}
    local = client.download_artifacts(run_id, "report/report.json", str(tmp_path))
    found = json.loads(Path(local).read_text())
    metrics = client.get_run(run_id).data.metrics
    assert (found["model_name"], found["version"], found["n"]) == (NAME, registered, 100)
    assert found["seq_acc"] == pytest.approx(metrics["test_seq_acc"])
    assert set(found["by_length"]) == {"4"} and len(found["reliability"]) == report.BINS

    shown = cli(tracking_server, home, "models", "--version", registered, "--model-name", NAME)
    assert shown.returncode == 0, shown.stderr
    experiment = client.get_run(run_id).info.experiment_id
    assert f"report: {client.get_run(run_id).info.artifact_uri}/report" in shown.stdout
    assert (
        f"MLflow UI: {tracking_server.uri}/#/experiments/{experiment}/runs/{run_id}"
        "/artifactPath/report"
    ) in shown.stdout
    assert f"accuracy {found['seq_acc']:.4f}" in shown.stdout


def answers(url: str, images: list[bytes]) -> list[dict[str, Any]]:
    body = {"inputs": {"image": [base64.b64encode(i).decode("ascii") for i in images]}}
    resp = httpx.post(f"{url}/invocations", json=body, timeout=60)
    assert resp.status_code == 200, resp.text
    return list(resp.json()["predictions"])


def same(got: list[dict[str, Any]], want: list[dict[str, Any]]) -> None:
    assert [o["text"] for o in got] == [o["text"] for o in want]
    for a, b in zip(got, want, strict=True):
        assert a["confidence"] == pytest.approx(b["confidence"], rel=1e-5, abs=1e-7)


@pytest.fixture(scope="module")
def images() -> list[bytes]:
    return [s.image for s in generate(12, seed=99)]


@pytest.fixture(scope="module")
def want(
    tracking_server: Tracking, tiny_model: TrainedModel, images: list[bytes]
) -> list[dict[str, Any]]:
    """What the original version answers."""
    original = load_registered(tracking_server.uri, tiny_model.model_name, tiny_model.version)
    return original.predict_images(images)


def test_on_the_frozen_set_the_version_reads_exactly_like_the_original(
    tracking_server: Tracking, registered: str, tiny_model: TrainedModel, home: Path
) -> None:
    from captchaops.evaluation.evalset import current_digest, load_evalset
    from captchaops.settings import load_settings

    settings = load_settings(home=home, tracking_uri=tracking_server.uri, model_name=NAME)
    frozen = load_evalset(
        mlflow_scope.client(settings), str(current_digest(mlflow_scope.client(settings), settings))
    )
    version = load_registered(tracking_server.uri, NAME, registered)
    original = load_registered(tracking_server.uri, tiny_model.model_name, tiny_model.version)
    same(version.read_all(frozen.images), original.read_all(frozen.images))


def test_our_model_server_answers_like_the_original(
    tracking_server: Tracking,
    registered: str,
    home: Path,
    images: list[bytes],
    want: list[dict[str, Any]],
) -> None:
    server = start_model_server(tracking_server.uri, "production", home / "serve", NAME)
    try:
        server.wait_version(registered)
        same(answers(server.url, images), want)
    finally:
        stop_process(server.proc)


@pytest.fixture(scope="module")
def stock_server(tracking_server: Tracking, registered: str, home: Path) -> Iterator[str]:
    """Stock `mlflow models serve` of the version (the same models-from-code wrapper)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_TRACKING_URI"] = tracking_server.uri
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"  # its uvicorn
    cmd = [
        str(VENV_BIN / "mlflow"), "models", "serve", "-m", f"models:/{NAME}@production",
        "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    proc = start_http_process(cmd, f"{url}/ping", env=env, log=home / "stock.log", timeout=180)
    try:
        yield url
    finally:
        stop_process(proc)


def test_stock_mlflow_answers_like_the_original(
    stock_server: str, images: list[bytes], want: list[dict[str, Any]]
) -> None:
    same(answers(stock_server, images), want)


def count_runs(client: MlflowClient) -> int:
    ids = [e.experiment_id for e in client.search_experiments()]
    return len(client.search_runs(ids, max_results=10_000))


REFUSED = [
    (["--layout", "NCHW"], "the blank looks like index 0; pass --blank first"),
    (["--blank", "first"], "pass --layout NCHW"),
    (["--layout", "NCHW", "--blank", "first", "--output", "logits"], "--output probabilities"),
]


def test_a_contract_that_does_not_fit_is_refused_in_one_line_and_the_right_one_reads_perfectly(
    tracking_server: Tracking, home: Path, random_theirs: tuple[Path, Path]
) -> None:
    """Each wrong contract (blank, layout, output kind) is refused in one line and nothing is
    registered or logged; declared right, the same network is taken and reads its frozen set
    perfectly, so the refusals are about the contract."""
    network, read = random_theirs
    client = MlflowClient(tracking_server.uri, tracking_server.uri)
    made = cli(
        tracking_server, home, "evalset", "--folder", str(read), "--size", "0",
        "--model-name", WRONG,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    for options, fix in REFUSED:
        runs_before = count_runs(client)

        done = cli(
            tracking_server, home, "register", "--onnx", str(network), "--model-name", WRONG,
            "--alphabet", ALPHABET, *options,
        )  # fmt: skip

        assert done.returncode == 1, (options, done.stdout)
        assert fix in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert "Traceback" not in done.stderr + done.stdout
        assert client.search_model_versions(f"name = '{WRONG}'") == []
        assert count_runs(client) == runs_before  # nothing logged either

    done = cli(
        tracking_server, home, "register", "--onnx", str(network), "--model-name", WRONG,
        "--alphabet", ALPHABET, "--layout", "NCHW", "--blank", "first",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "frozen-set accuracy 1.0000, CER 0.0000" in done.stdout


def test_options_out_of_range_are_refused_before_anything_is_read(
    tracking_server: Tracking, home: Path, tmp_path: Path
) -> None:
    bad_meta = tmp_path / "contract.json"
    bad_meta.write_text('{"alphabet": "0123", "loader": "os.system"}')
    for args, message in (
        (["--layout", "NWHC"], "--layout 'NWHC' is not one of NHWC, NCHW"),
        (["--meta", str(bad_meta)], "unknown fields ['loader']"),
        (["--scaling", "mean_std", "--mean", "half"], "not comma-separated numbers"),
    ):
        done = cli(tracking_server, home, "register", "--onnx", "missing.onnx", *args)
        assert done.returncode == 1 and message in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
