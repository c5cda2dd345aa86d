"""`captchaops models` prints whatever the registry holds as text: a tag with `[/x]`, terminal
escape sequences or a bidi override neither breaks the command nor reaches the terminal raw;
`models` and `status` report an alias moved around the CLI, in 80 columns."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from captchaops import mlflow_scope
from tests.fixtures.models import TrainedModel
from tests.fixtures.stack import VENV_BIN, Tracking
from tests.integration.test_gate import copy_version, isolated

pytestmark = pytest.mark.slow


def test_models_prints_hostile_tags_literally(
    tracking_server: Tracking, tiny_model: TrainedModel, tmp_path: Path
) -> None:
    settings = isolated(tracking_server, tmp_path)
    version = copy_version(settings, tiny_model)
    client = mlflow_scope.client(settings)
    name = settings.model_name
    client.set_model_version_tag(name, version, "validation_status", "[/x]")
    client.set_model_version_tag(name, version, "rejection_reason", "\x1b[2J\x1b[31mwiped[/red]")
    client.set_registered_model_tag(name, "last_move_production", "[bold]\x07\u202eevil")
    client.set_registered_model_alias(name, "production", version)  # around captchaops
    env = {
        **os.environ,
        "CAPTCHAOPS_HOME": str(tmp_path / "cli"),
        "CAPTCHAOPS_TRACKING_URI": tracking_server.uri,
        "COLUMNS": "250",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    done, status = (
        subprocess.run(
            [str(VENV_BIN / "captchaops"), command, *(["--model-name", name] if models else [])],
            env=env | ({} if models else {"CAPTCHAOPS_MODEL_NAME": name, "COLUMNS": "80"}),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        for command, models in (("models", True), ("status", False))
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "Traceback" not in output and "MarkupError" not in output
    assert "[/x]" in done.stdout
    assert "\\x1b[2J\\x1b[31mwiped[/red]" in done.stdout
    assert "last production move: [bold]\\x07\\u202eevil" in done.stdout
    assert "\x1b" not in done.stdout and "\x07" not in done.stdout and "\u202e" not in done.stdout
    unaudited = f"UNAUDITED: @production -> v{version}: no audit record (moved around the CLI)"
    for shown in (done, status):
        assert shown.returncode == 0, shown.stdout + shown.stderr
        assert unaudited in shown.stdout.splitlines()  # whole: status draws in 80 columns
    assert "audit it with `captchaops promote` or move it back" in status.stdout
