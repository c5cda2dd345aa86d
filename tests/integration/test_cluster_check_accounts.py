"""The cluster check's account case (issue 38) on a real basic-auth tracking server: the probe a
worker runs before any fold creates and deletes a run as the account the work logs with. A
reader's is refused, and `judge` turns that into the one line naming the fix; an editor's passes
(EDIT may create runs but not delete them, so its check run is left ended KILLED) and an
admin's leaves no run behind. (The test bed in test_hosts_scaleout runs the same probe through Ray
on other hosts; the account is what this module varies.)"""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow import MlflowClient

from captchaops.scaleout.preflight import judge, probe, versions
from captchaops.team_accounts import add_user
from tests.fixtures.stack import basic_auth_tracking

pytestmark = pytest.mark.slow
ADMIN = "admin-password-for-tests"


def test_a_reader_is_refused_in_one_line_and_an_editor_passes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with basic_auth_tracking(tmp_path, ADMIN) as admin:
        uri = admin.tracking_uri
        assert uri is not None
        reader = add_user(admin, "rita", "reader")
        add_user(admin, "ed", "editor", "ed-password-for-tests")
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN)
        client = MlflowClient(uri, uri)
        experiment = client.get_experiment_by_name(admin.experiment_name)
        assert experiment is not None
        mine = versions()

        assert reader.password
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "rita")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", reader.password)
        found = probe(uri, experiment.experiment_id)
        assert found.get("refused") == "PERMISSION_DENIED", found
        line = judge(found, mine, uri)
        assert line is not None and "\n" not in line
        assert line.startswith(f"the tracking server at {uri} refused to let the worker at ")
        assert "log in as an editor (CAPTCHAOPS_TRACKING_USERNAME/PASSWORD)" in line
        assert "rita" not in line and reader.password not in line

        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "ed")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "ed-password-for-tests")
        found = probe(uri, experiment.experiment_id)
        assert judge(found, mine, uri) is None, str(found)
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN)
        [left] = client.search_runs([experiment.experiment_id])
        assert (left.info.run_name, left.info.status) == ("cluster check", "KILLED")
        assert left.data.tags["captchaops.kind"] == "preflight"
        client.delete_run(left.info.run_id)
        assert judge(probe(uri, experiment.experiment_id), mine, uri) is None
        assert client.search_runs([experiment.experiment_id]) == []  # an admin's is deleted
