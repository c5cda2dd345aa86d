"""A registered version is data: a booby-trapped pickle or a tampered network is refused, never run."""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

import httpx
import mlflow
import pytest

from captchaops.model.pyfunc import SIGNATURE
from captchaops.registry.aliases import resolve_alias
from captchaops.registry.names import PRODUCTION
from captchaops.settings import Settings
from tests.fixtures.models import TrainedModel
from tests.fixtures.serving import staging_server, wait_refusal
from tests.fixtures.signing import signed_stage
from tests.fixtures.stack import VENV_BIN, Tracking
from tests.integration.test_gate import copy_version, isolated

pytestmark = pytest.mark.slow


class Trap(mlflow.pyfunc.PythonModel):
    """A pyfunc whose pickle creates `marker` the moment anyone unpickles it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[Path]]:
        return (Path.touch, (self.marker,))

    def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]
        return model_input


def booby_trapped(settings: Settings, base: TrainedModel, marker: Path) -> str:
    """Register a pickled pyfunc that carries the real network and meta.json beside its trap."""
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(mlflow.artifacts.download_artifacts(base.uri, dst_path=tmp))
        mlflow.set_experiment("registry-tests")
        with mlflow.start_run(run_name="booby trap"):
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=Trap(marker),
                artifacts={
                    "onnx_model": str(next(local.glob("artifacts/*.onnx"))),
                    "meta": str(local / "artifacts" / "meta.json"),
                },
                signature=SIGNATURE,
                pip_requirements=["mlflow"],  # inferring them would load (unpickle) the model
            )
    assert not marker.exists(), "logging must not have unpickled the trap"
    return str(mlflow.register_model(info.model_uri, settings.model_name).version)


def tampered(settings: Settings, base: TrainedModel) -> str:
    """Register a copy whose ONNX bytes no longer match the digest in its meta.json."""
    client = mlflow.MlflowClient()
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(mlflow.artifacts.download_artifacts(base.uri, dst_path=tmp))
        network = next(local.glob("artifacts/*.onnx"))
        network.write_bytes(network.read_bytes() + b"\0")
        experiment = mlflow.set_experiment("registry-tests")
        run = client.create_run(experiment.experiment_id, run_name="tampered copy")
        client.log_artifacts(run.info.run_id, str(local), "model")
        client.set_terminated(run.info.run_id)
    return str(mlflow.register_model(f"runs:/{run.info.run_id}/model", settings.model_name).version)


def promote_auto(settings: Settings, home: Path) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "CAPTCHAOPS_HOME": str(home),
        "CAPTCHAOPS_TRACKING_URI": settings.effective_tracking_uri,
        "COLUMNS": "200",
    }
    return subprocess.run(
        [str(VENV_BIN / "captchaops"), "promote", "--auto", "--model-name", settings.model_name],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.mark.parametrize("kind", ["pickle", "digest"])
def test_refused_version_never_runs_and_staging_keeps_serving(
    kind: str,
    tracking_server: Tracking,
    tiny_model: TrainedModel,
    tmp_path: Path,
    mlflow_client_env: str,
) -> None:
    settings = isolated(tracking_server, tmp_path)
    good = copy_version(settings, tiny_model)
    with staging_server(
        tracking_server.uri, settings.model_name, good, tmp_path / "serve"
    ) as server:
        marker = tmp_path / "trap-sprung"
        bad = (
            booby_trapped(settings, tiny_model, marker)
            if kind == "pickle"
            else tampered(settings, tiny_model)
        )
        signed_stage(settings, bad)

        health = wait_refusal(server, bad)
        done = promote_auto(settings, tmp_path / "cli")

        expected = "pickled python_model" if kind == "pickle" else "does not match the digest"
        assert expected in str(health["last_reload_error"])
        assert httpx.get(f"{server.url}/version", timeout=5).json()["version"] == good
        image = {"dataframe_split": {"columns": ["image"], "data": [[_png_b64()]]}}
        answer = server.invoke(image)
        assert answer.status_code == 200 and answer.headers["x-model-version"] == good
        assert done.returncode == 3, done.stdout + done.stderr
        [rejected] = [line for line in done.stdout.splitlines() if line.startswith("rejected")]
        assert f"v{bad}" in rejected and expected in rejected
        assert "Traceback" not in done.stdout + done.stderr
        assert resolve_alias(settings, PRODUCTION) is None
        assert not marker.exists(), "something unpickled the booby-trapped version"


def _png_b64() -> str:
    import base64

    from captchaops.data import synthetic

    return base64.b64encode(synthetic.generate_one(5).image).decode()
