"""End to end: the gate and rollback move @production and a running production server follows."""

from __future__ import annotations

from pathlib import Path

import pytest

from captchaops.decisions import gate, promotion
from tests.fixtures.models import TrainedModel
from tests.fixtures.serving import model_server
from tests.fixtures.stack import Tracking
from tests.integration.test_gate import copy_version, damaged_version, isolated, stage

pytestmark = pytest.mark.slow


def test_running_server_follows_gate_and_rollback_without_restart(
    tracking_server: Tracking,
    tiny_model: TrainedModel,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = isolated(tracking_server, tmp_path)
    first = copy_version(settings, tiny_model)
    stage(settings, first)
    assert gate.auto_promote(settings, actor="pytest")[0].promote
    monkeypatch.setenv("CAPTCHAOPS_MODEL_NAME", settings.model_name)

    with model_server(tracking_server.uri, "production", tmp_path / "serve") as server:
        server.wait_version(first)
        pid = server.proc.pid

        stage(settings, damaged_version(settings, tiny_model, "junk"))
        decision, _ = gate.auto_promote(settings, actor="pytest")
        assert not decision.promote
        second = copy_version(settings, tiny_model)
        stage(settings, second)
        decision, _ = gate.auto_promote(settings, actor="pytest")
        assert decision.promote, decision.refusals
        server.wait_version(second)

        promotion.rollback(settings, reason="back to the first", actor="pytest")
        server.wait_version(first)
        assert server.proc.poll() is None and server.proc.pid == pid
