"""The score cache: a version's score on the frozen set, remembered in its tags (written through
the registry) so later moves reuse it instead of scoring again."""

from __future__ import annotations

from mlflow import MlflowClient

from captchaops.evaluation.evalset import SCORE_TAGS, EvalSet, Score, ensure_evalset, score
from captchaops.live.estimate import Calibration
from captchaops.registry.aliases import set_version_tags
from captchaops.settings import Settings


def record_score(mlflow_client: MlflowClient, name: str, result: Score) -> None:
    """Remember a successful score on the version (tags `eval_*`)."""
    if not result.ok:
        return
    tags = {"eval_digest": result.digest}
    tags |= {f"eval_{key}": f"{getattr(result, key):.6g}" for key in SCORE_TAGS}
    tags |= result.calibration.tags() if result.calibration else {}
    set_version_tags(mlflow_client, name, {result.version: tags})


def cached_score(
    mlflow_client: MlflowClient, settings: Settings, version: str, evalset: EvalSet
) -> Score:
    """The version's recorded score on this frozen set, scoring it now when there is none."""
    tags = mlflow_client.get_model_version(settings.model_name, version).tags
    if tags.get("eval_digest") == evalset.digest and all(f"eval_{k}" in tags for k in SCORE_TAGS):
        seq_acc, cer, p50_ms, p95_ms = (float(tags[f"eval_{k}"]) for k in SCORE_TAGS)
        calibration = Calibration.from_tags(tags)
        return Score(
            version, evalset.digest, seq_acc, cer, p50_ms, p95_ms, len(evalset), None, calibration
        )
    result = score(settings, version, evalset, client=mlflow_client)
    record_score(mlflow_client, settings.model_name, result)
    return result


def scores(
    mlflow_client: MlflowClient, settings: Settings, to_version: str, from_version: str | None
) -> tuple[Score, Score | None]:
    """The target's and the current holder's scores on the model's frozen set."""
    evalset = ensure_evalset(mlflow_client, settings)
    candidate = cached_score(mlflow_client, settings, to_version, evalset)
    champion = (
        cached_score(mlflow_client, settings, from_version, evalset) if from_version else None
    )
    return candidate, champion
