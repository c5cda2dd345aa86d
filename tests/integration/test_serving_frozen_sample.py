"""The trial and the warm-up run real images of the scheme's frozen evaluation set, read over
REST from a real tracking server once per set and kept in the home: a version that answers NaN
only for real CAPTCHAs is refused, a verdict names the sample it ran, and a restart while the
tracking server is away still tries with the same images."""

from __future__ import annotations

import json
import shutil
import stat
import uuid
from pathlib import Path

import pytest

from captchaops import mlflow_scope
from captchaops.evaluation import evalset
from captchaops.model.version import file_sha256
from captchaops.serving.frozen_sample import FrozenSamples
from captchaops.serving.loader import LoadError, Timeouts, VersionLoader
from captchaops.serving.trial import TrialLimits
from captchaops.serving.verdicts import Verdicts
from captchaops.tracking_rest import TrackingRest
from tests.fixtures.models import make_settings
from tests.fixtures.stack import Tracking
from tests.unit.test_graph_policy import honest, nan_for_captchas, version_dir

pytestmark = pytest.mark.slow
LIMITS = TrialLimits(wall_seconds=60, max_batch=4)


def test_the_trial_runs_a_sample_of_the_frozen_set_read_once_per_set(
    tracking_server: Tracking, tmp_path: Path
) -> None:
    settings = make_settings(tracking_server, tmp_path, model_name=f"fs-{uuid.uuid4().hex[:8]}")
    stored = evalset.create_evalset(mlflow_scope.client(settings), settings, size=6)
    rest = TrackingRest(tracking_server.uri, None, 10.0)
    folder = tmp_path / "home" / "frozen-samples"
    samples = FrozenSamples(rest, folder, LIMITS.max_batch)

    sample = samples.for_model(settings.model_name)
    assert (sample.evalset, sample.images) == (stored.digest, tuple(stored.images[:4]))
    kept = folder / f"{stored.digest}.zip"
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    hoarding = FrozenSamples(rest, tmp_path / "small", LIMITS.max_batch, sample_bytes=2048)
    too_large = hoarding.for_model(settings.model_name)
    assert too_large.images == () and "cannot be read" in too_large.note
    assert "MiB" in too_large.note  # the bound it went past
    nothing = samples.for_model(f"none-{uuid.uuid4().hex[:8]}")
    assert (nothing.images, nothing.key) == ((), "none")
    assert "has no frozen evaluation set" in nothing.note

    verdicts = Verdicts(tmp_path / "home" / "verdicts")
    loader = VersionLoader(rest, tmp_path / "cache", Timeouts(), LIMITS, verdicts, samples)
    with pytest.raises(LoadError, match="frozen evaluation set; versions whose outputs"):
        loader.open_folder(version_dir(tmp_path / "bad", nan_for_captchas()), settings.model_name)
    good = version_dir(tmp_path / "good", honest())
    loader.open_folder(good, settings.model_name)
    onnx_digest = file_sha256(good / "artifacts" / "crnn.onnx")
    verdict = json.loads((verdicts.folder / f"{onnx_digest}.json").read_text())
    assert (verdict["passed"], verdict["frozen"]) == (True, sample.key)

    # the same version of a scheme without a frozen set: another sample, so another trial,
    # whose verdict says it ran without one
    again = Path(shutil.copytree(good, tmp_path / "again"))
    loader.open_folder(again, f"none-{uuid.uuid4().hex[:8]}")
    assert loader.trials["run"] == 3
    assert (
        "tried without frozen-set images"
        in json.loads((verdicts.folder / f"{onnx_digest}.json").read_text())["reason"]
    )

    # a restart while the tracking server is away: the set the scheme last named, from the home
    away = TrackingRest("http://127.0.0.1:1", None, 2.0)
    remembered = FrozenSamples(away, folder, LIMITS.max_batch)
    assert remembered.for_model(settings.model_name) == sample
    restarted = VersionLoader(away, tmp_path / "cache2", Timeouts(), LIMITS, verdicts, remembered)
    with pytest.raises(LoadError, match="frozen evaluation set"):
        restarted.open_folder(
            version_dir(tmp_path / "bad2", nan_for_captchas()), settings.model_name
        )
