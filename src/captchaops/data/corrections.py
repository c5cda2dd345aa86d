"""User corrections from the web app: fetch them from MLflow into a labelled folder."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from captchaops.settings import Settings

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

FEEDBACK_PATH = "feedback"
DIGEST_TAG = "image_sha256"
"""Run tag holding the SHA-256 of the corrected image: the web app stores an image+label once."""
KIND_TAG = "captchaops.kind"
"""Run tag saying what a run of `settings.feedback_experiment` holds: `correction` or `review`."""
REVIEW_KIND = "review"
"""A review item: an unlabelled low-confidence input (image under `review/`), never fetched here."""


def download_feedback(settings: Settings, dest_dir: Path) -> int:
    """Copy every `feedback/<label>_<uuid>.png` artifact of a FINISHED run into `dest_dir`; return
    how many were new. Runs left RUNNING (an upload in progress or cut off) or FAILED are skipped,
    and so are unlabelled review items (a labelled one is stored again as a correction)."""
    # here, not at the top: the web app imports this module and stays MLflow-free
    from mlflow.tracking import MlflowClient

    uri = settings.effective_tracking_uri
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.get_experiment_by_name(settings.feedback_experiment)
    if experiment is None:
        return 0
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    fetched = 0
    page_token = None
    while True:
        runs = client.search_runs(
            [experiment.experiment_id],
            filter_string="attributes.status = 'FINISHED'",
            max_results=500,
            page_token=page_token,
        )
        for run in runs:
            if run.data.tags.get(KIND_TAG) == REVIEW_KIND:
                continue
            fetched += _fetch_run(client, run.info.run_id, dest_dir)
        page_token = runs.token
        if not page_token:
            return fetched


def _fetch_run(client: MlflowClient, run_id: str, dest_dir: Path) -> int:
    wanted = [
        info.path
        for info in client.list_artifacts(run_id, FEEDBACK_PATH)
        if not info.is_dir and not (dest_dir / Path(info.path).name).exists()
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for path in wanted:
            local = client.download_artifacts(run_id, path, tmp)
            shutil.move(local, dest_dir / Path(path).name)
    return len(wanted)
