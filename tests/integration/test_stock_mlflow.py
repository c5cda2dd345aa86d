"""Stock MLflow serves a registered version outside our venv, and builds an image without us.

`mlflow models serve --env-manager uv` creates a FRESH virtual environment (under a temporary
MLFLOW_ENV_ROOT) from the version's own python_env.yaml and requirements.txt, installs them
from the package registry pip is configured with, and serves the models-from-code pyfunc.
Its answers must equal our own loader's for the same images, and that environment must hold
neither captchaops nor TensorFlow. `mlflow models generate-dockerfile` must give a build
context that installs only the version's requirements.

A first environment downloads about 90 packages (mlflow and its dependencies): about 12 s to
the first /ping on the 2-core dev VM with an empty uv cache. Only a package registry is needed:
the Python interpreter the version records must already be on this machine
(UV_PYTHON_DOWNLOADS=never makes uv refuse to fetch one).
"""

from __future__ import annotations

import ast
import base64
import contextlib
import io
import os
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import mlflow
import psutil
import pytest
import yaml
from mlflow import MlflowClient
from PIL import Image

from captchaops.data.synthetic import generate
from captchaops.model.pyfunc import pip_requirements
from captchaops.model.version import load_registered
from tests.fixtures.models import TrainedModel
from tests.fixtures.stack import VENV_BIN, Tracking, free_port

pytestmark = pytest.mark.slow

MODEL_NAME = "stock-serve"
ALIAS = "production"
MODEL_URI = f"models:/{MODEL_NAME}@{ALIAS}"
ENV_TIMEOUT_S = 1200  # a first environment downloads mlflow and its dependencies
SLOW_START_S = 240  # above this, the start-up is reported as a warning
FORBIDDEN = ("captchaops", "tensorflow")


@dataclass
class StockServer:
    """A running `mlflow models serve --env-manager uv` and its fresh environment."""

    url: str
    proc: subprocess.Popen
    env_dir: Path
    python: str
    start_seconds: float
    log: Path


def pip_index_as_uv_env() -> dict[str, str]:
    """pip's index settings (config files and PIP_* variables) as the variables uv reads.

    uv ignores pip's configuration; without this a machine whose pip uses a mirror or extra
    indexes would resolve the model's requirements elsewhere than pip does.
    """
    listed = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rank = {"global": 0, "install": 1, ":env:": 2}  # later wins, as in pip
    values: dict[str, tuple[int, str]] = {}
    for line in listed.splitlines():
        key, sep, raw = line.partition("=")
        section, _, option = key.rpartition(".")
        if not sep or section not in rank:
            continue
        value = ast.literal_eval(raw)
        if option not in values or rank[section] >= values[option][0]:
            values[option] = (rank[section], value)
    mapping = {  # pip option -> (uv variable, uv's separator)
        "index-url": ("UV_INDEX_URL", " "),
        "extra-index-url": ("UV_EXTRA_INDEX_URL", " "),
        "find-links": ("UV_FIND_LINKS", ","),
        "constraint": ("UV_CONSTRAINT", " "),
        "cert": ("SSL_CERT_FILE", " "),
    }
    env: dict[str, str] = {}
    for option, (_, value) in values.items():
        if option in mapping:
            name, separator = mapping[option]
            env[name] = separator.join(value.split())
    if "UV_EXTRA_INDEX_URL" in env or "UV_FIND_LINKS" in env:
        # pip takes the best version across all indexes; uv's default stops at the first
        # index that has the package.
        env["UV_INDEX_STRATEGY"] = "unsafe-best-match"
    return env


def stock_env(tracking_uri: str, env_root: Path, tool_bin: Path) -> dict[str, str]:
    """The environment `mlflow models` runs in: none of our venv on PATH, only uv from it.

    The interpreter our venv is based on comes next on PATH, so uv finds the version the model
    recorded (it was logged by that interpreter); UV_PYTHON_DOWNLOADS=never forbids a download.
    """
    tool_bin.mkdir(parents=True, exist_ok=True)
    uv = VENV_BIN / "uv"
    if not uv.exists():
        pytest.fail(f"{uv} is missing: `pip install -e .[dev]` installs uv")
    if not (tool_bin / "uv").exists():
        (tool_bin / "uv").symlink_to(uv)
    path = [
        p
        for p in os.environ.get("PATH", "").split(os.pathsep)
        if p and Path(p).resolve() != VENV_BIN.resolve()
    ]
    base_bin = Path(sys.base_prefix) / "bin"
    env = {
        k: v for k, v in os.environ.items() if k not in {"VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME"}
    }
    env |= pip_index_as_uv_env()
    env |= {
        "PATH": os.pathsep.join([str(tool_bin), str(base_bin), *path]),
        "MLFLOW_TRACKING_URI": tracking_uri,
        "MLFLOW_ENV_ROOT": str(env_root),
        "UV_PYTHON_DOWNLOADS": "never",
        "PYTHONNOUSERSITE": "1",
    }
    return env


def kill_group(proc: subprocess.Popen) -> None:
    """Stop a process started with start_new_session=True and everything it started."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=20)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # whatever of the group is still there
    proc.wait(timeout=10)


def sample_images() -> list[bytes]:
    """A generated PNG, the same as RGB JPEG at another size, and an RGBA PNG."""
    png = generate(1, seed=11)[0].image
    other = generate(1, seed=12)[0].image
    jpeg = io.BytesIO()
    Image.open(io.BytesIO(other)).convert("RGB").resize((200, 50)).save(jpeg, "JPEG", quality=85)
    rgba = io.BytesIO()
    image = Image.open(io.BytesIO(generate(1, seed=13)[0].image)).convert("RGBA")
    image.putalpha(200)
    image.save(rgba, "PNG")
    return [png, jpeg.getvalue(), rgba.getvalue()]


@pytest.fixture(scope="module", autouse=True)
def pointed_at_tracking(tracking_server: Tracking) -> Iterator[None]:
    """Point this process's MLflow at the test server for the module, then restore.

    `models:/` downloads resolve the name through the process-wide registry URI even when
    `tracking_uri`/`registry_uri` are passed (MLflow 3.17's ModelsArtifactRepository), so
    without this they would look in a default ./mlflow.db.
    """
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils

    names = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")  # set_*_uri also exports these
    saved_env = {name: os.environ.get(name) for name in names}
    saved = (utils._tracking_uri, registry_utils._registry_uri)
    mlflow.set_tracking_uri(tracking_server.uri)
    mlflow.set_registry_uri(tracking_server.uri)
    try:
        yield
    finally:
        utils._tracking_uri, registry_utils._registry_uri = saved
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture(scope="module")
def stock_version(tracking_server: Tracking, tiny_model: TrainedModel) -> str:
    """A copy of the tiny model registered as `stock-serve`, with @production on it.

    (The tiny `text-captcha` version is moved between aliases by other tests.)
    """
    client = MlflowClient(tracking_server.uri, registry_uri=tracking_server.uri)
    base = client.get_model_version(tiny_model.model_name, tiny_model.version)
    if not client.search_registered_models(f"name = '{MODEL_NAME}'"):
        client.create_registered_model(MODEL_NAME)
    source = str(base.source)
    model_id = source.removeprefix("models:/") if source.startswith("models:/m-") else None
    copy = client.create_model_version(MODEL_NAME, source, base.run_id, model_id=model_id)
    client.set_registered_model_alias(MODEL_NAME, ALIAS, copy.version)
    return str(copy.version)


@pytest.fixture(scope="module")
def recorded_python(
    tracking_server: Tracking, stock_version: str, tmp_path_factory: pytest.TempPathFactory
) -> str:
    """The Python version the version's python_env.yaml asks for."""
    local = mlflow.artifacts.download_artifacts(
        artifact_uri=f"models:/{MODEL_NAME}/{stock_version}/python_env.yaml",
        dst_path=str(tmp_path_factory.mktemp("python_env")),
        tracking_uri=tracking_server.uri,
        registry_uri=tracking_server.uri,
    )
    return str(yaml.safe_load(Path(local).read_text())["python"])


@pytest.fixture(scope="module")
def stock_server(
    tracking_server: Tracking,
    stock_version: str,
    recorded_python: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[StockServer]:
    """`mlflow models serve -m models:/stock-serve@production --env-manager uv`, fresh env."""
    work = tmp_path_factory.mktemp("stock_serve")
    env_root = work / "envs"
    env = stock_env(tracking_server.uri, env_root, work / "bin")

    # No download of an interpreter: the recorded version must be here already.
    found = subprocess.run(
        ["uv", "python", "find", recorded_python],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=work,
    )
    assert found.returncode == 0, (
        f"Python {recorded_python} (from python_env.yaml) is not on this machine and must not "
        f"be downloaded: {found.stderr.strip()}"
    )

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = work / "mlflow-serve.log"
    cmd = [
        str(VENV_BIN / "mlflow"), "models", "serve", "-m", MODEL_URI,
        "--env-manager", "uv", "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
    started = time.monotonic()
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd, env=env, cwd=work, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = started + ENV_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(
                    f"mlflow models serve exited {proc.returncode}:\n{log.read_text()[-4000:]}"
                )
            try:
                if httpx.get(f"{url}/ping", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"no /ping after {ENV_TIMEOUT_S}s:\n{log.read_text()[-4000:]}")
            time.sleep(1)
        seconds = time.monotonic() - started
        envs = [p for p in env_root.iterdir() if (p / "pyvenv.cfg").exists()]
        assert len(envs) == 1, f"expected one environment under {env_root}: {envs}"
        print(f"\nstock mlflow: environment created and server up in {seconds:.1f}s ({envs[0]})")
        if seconds > SLOW_START_S:
            warnings.warn(
                f"mlflow models serve --env-manager uv took {seconds:.0f}s to answer /ping",
                stacklevel=1,
            )
        yield StockServer(url, proc, envs[0], recorded_python, seconds, log)
    finally:
        kill_group(proc)


@pytest.mark.timeout(ENV_TIMEOUT_S + 300)
def test_stock_mlflow_in_a_fresh_env_answers_like_our_loader(
    stock_server: StockServer, tracking_server: Tracking, stock_version: str
) -> None:
    images = sample_images()
    body = {
        "dataframe_split": {
            "columns": ["image"],
            "data": [[base64.b64encode(image).decode("ascii")] for image in images],
        }
    }
    resp = httpx.post(f"{stock_server.url}/invocations", json=body, timeout=120)
    assert resp.status_code == 200, resp.text
    theirs = resp.json()["predictions"]

    ours = load_registered(tracking_server.uri, MODEL_NAME, stock_version).predict_images(images)
    assert len(theirs) == len(ours) == len(images)
    for got, want in zip(theirs, ours, strict=True):
        assert set(got) == {"text", "confidence"}
        assert got["text"] == want["text"]
        assert got["confidence"] == pytest.approx(want["confidence"], abs=1e-5)


@pytest.mark.timeout(ENV_TIMEOUT_S + 300)
def test_the_fresh_env_has_neither_captchaops_nor_tensorflow(stock_server: StockServer) -> None:
    env_dir = stock_server.env_dir
    assert env_dir.resolve() != Path(sys.prefix).resolve()
    (site,) = env_dir.glob("lib/python*/site-packages")
    installed = [p.name.lower() for p in site.iterdir()]
    for name in FORBIDDEN:
        assert not [p for p in installed if p.startswith(name)], f"{name} in {site}"
    assert any(p.startswith("onnxruntime") for p in installed)

    # Ask the environment's own interpreter, as the server's imports would.
    python = env_dir / "bin" / "python"
    probe = (
        "import importlib.util, platform, sys\n"
        "print(platform.python_version())\n"
        "for m in ('captchaops', 'tensorflow', 'keras', 'tf2onnx', 'mlflow', 'onnxruntime'):\n"
        "    print(m, importlib.util.find_spec(m) is not None)\n"
    )
    out = subprocess.run(
        [str(python), "-I", "-c", probe], capture_output=True, text=True, check=True, timeout=60
    ).stdout.split("\n")
    assert out[0] == stock_server.python
    found = dict(line.split() for line in out[1:] if line)
    assert found == {
        "captchaops": "False",
        "tensorflow": "False",
        "keras": "False",
        "tf2onnx": "False",
        "mlflow": "True",
        "onnxruntime": "True",
    }

    # The process answering is that environment's, not ours.
    commands = [
        " ".join(child.cmdline())
        for child in psutil.Process(stock_server.proc.pid).children(recursive=True)
    ]
    assert any(str(env_dir) in command for command in commands), commands
    assert not any(str(VENV_BIN) in command for command in commands), commands


@pytest.mark.timeout(600)
def test_generated_dockerfile_installs_only_the_models_requirements(
    tracking_server: Tracking, stock_version: str, recorded_python: str, tmp_path: Path
) -> None:
    out = tmp_path / "context"
    env = stock_env(tracking_server.uri, tmp_path / "envs", tmp_path / "bin")
    cmd = [str(VENV_BIN / "mlflow"), "models", "generate-dockerfile", "-m", MODEL_URI]
    done = subprocess.run(
        [*cmd, "-d", str(out)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-4000:]
    dockerfile = (out / "Dockerfile").read_text()
    (model_dir,) = (p.parent for p in out.rglob("MLmodel"))
    in_image = "/opt/ml/model"
    requirements = [
        line.strip()
        for line in (model_dir / "requirements.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]

    # The image installs exactly the version's requirements, from the copied model folder.
    assert sorted(requirements) == sorted(pip_requirements())
    assert f"FROM python:{recorded_python}-slim" in dockerfile
    assert f"COPY {model_dir.relative_to(out)} {in_image}" in dockerfile
    assert f"C._install_pyfunc_deps('{in_image}'" in dockerfile
    python_env = yaml.safe_load((model_dir / "python_env.yaml").read_text())
    assert python_env["dependencies"] == ["-r requirements.txt"]

    # Neither TensorFlow nor captchaops anywhere it could be installed from ...
    for text in (
        dockerfile,
        (model_dir / "requirements.txt").read_text(),
        (model_dir / "conda.yaml").read_text(),
        (model_dir / "python_env.yaml").read_text(),
    ):
        for name in FORBIDDEN:
            assert name not in text.lower()
    # ... nor imported by any code the image would run.
    for source in out.rglob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                modules = [node.module or ""]
            else:
                continue
            for module in modules:
                assert module.split(".")[0] not in FORBIDDEN, f"{source} imports {module}"
