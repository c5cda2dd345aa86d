"""The frozen evaluation set: made once, stored on the tracking server, loaded back by digest."""

from __future__ import annotations

import resource
import uuid
from pathlib import Path

import pytest

from captchaops import mlflow_scope
from captchaops.data.synthetic import generate
from captchaops.evaluation import evalset
from captchaops.evaluation.evalset import EVAL_SEED, EvalSetError
from captchaops.registry.versions import evalset_problem
from captchaops.training.run import TrainConfig
from harness.training import tiny_config
from tests.fixtures.models import make_settings
from tests.fixtures.stack import Tracking
from tests.unit.test_frozen import amplified


def test_frozen_set_is_stored_once_and_loaded_by_digest(
    tracking_server: Tracking, tmp_path: Path
) -> None:
    settings = make_settings(  # its own promotion key, not the session's
        tracking_server,
        tmp_path,
        model_name=f"evalset-{uuid.uuid4().hex[:8]}",
        signing_key_dir=tmp_path / "keys",
    )
    folder = tmp_path / "team"
    folder.mkdir()
    for sample in generate(3, seed=5):
        (folder / f"{sample.label}.png").write_bytes(sample.image)
    (folder / "notes.txt").write_text("not an image")

    made = evalset.create_evalset(mlflow_scope.client(settings), settings, size=40, folder=folder)

    assert len(made) == 43 and made.seed == EVAL_SEED
    assert made.digest == evalset.digest_of(made.images, made.labels)
    assert evalset.current_digest(mlflow_scope.client(settings), settings) == made.digest
    pinned = mlflow_scope.client(settings).get_registered_model(settings.model_name).tags
    key = settings.effective_signing_public_key  # the pin is signed with the settings' key
    assert evalset_problem(pinned, settings.model_name, key) is None
    loaded = evalset.load_evalset(mlflow_scope.client(settings), made.digest)
    assert loaded.images == made.images and loaded.labels == made.labels
    assert evalset.ensure_evalset(mlflow_scope.client(settings), settings).digest == made.digest
    again = evalset.create_evalset(
        mlflow_scope.client(settings),
        settings.model_copy(update={"model_name": "other-" + settings.model_name}),
        size=40,
        folder=folder,
    )
    assert again.digest == made.digest

    with pytest.raises(EvalSetError, match="already has a frozen evaluation set"):
        evalset.create_evalset(mlflow_scope.client(settings), settings, size=40)
    with pytest.raises(EvalSetError, match="no stored frozen evaluation set"):
        evalset.load_evalset(mlflow_scope.client(settings), "0" * 64)
    replaced = evalset.create_evalset(
        mlflow_scope.client(settings), settings, size=30, replace=True
    )
    assert (
        evalset.current_digest(mlflow_scope.client(settings), settings)
        == replaced.digest
        != made.digest
    )


def test_an_amplified_set_is_refused_in_one_line_without_unpacking_it(
    tracking_server: Tracking, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = make_settings(tracking_server, tmp_path)
    client = mlflow_scope.client(settings)
    experiment = client.get_experiment_by_name(evalset.EVAL_EXPERIMENT)
    experiment_id = (
        experiment.experiment_id
        if experiment
        else client.create_experiment(evalset.EVAL_EXPERIMENT)
    )
    digest = uuid.uuid4().hex
    run = client.create_run(experiment_id, tags={evalset.DIGEST_TAG: digest})
    (tmp_path / evalset.ARTIFACT).write_bytes(amplified())
    client.log_artifact(run.info.run_id, str(tmp_path / evalset.ARTIFACT))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    with pytest.raises(EvalSetError) as refused:
        evalset.load_evalset(client, digest)

    assert str(refused.value) == (
        f"the stored frozen set {digest[:12]} is refused: its labels.json names one image more "
        "than once; make a new one with `captchaops evalset --replace`"
    )
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 64 * 2**10  # KiB
    monkeypatch.setattr(evalset, "MAX_SET_BYTES", 2**15)  # the download stops at the cap
    with pytest.raises(EvalSetError, match=r"is larger than 0\.03125 MiB; make a new one"):
        evalset.load_evalset(client, digest)


def test_training_never_uses_the_evaluation_seed() -> None:
    assert TrainConfig().seed != EVAL_SEED and tiny_config().seed != EVAL_SEED
    frozen = {s.label for s in generate(200, EVAL_SEED)}
    training = generate(200, TrainConfig().seed)
    assert {s.image for s in training}.isdisjoint(s.image for s in generate(200, EVAL_SEED))
    assert len(frozen) > 150
