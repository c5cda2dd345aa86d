"""What the tracking server knows about a model version: its run, its alphabet, its scheme, UI links."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from urllib.parse import quote

from captchaops.webapp.tracking_client import Tracking, TrackingError


@dataclass(frozen=True)
class VersionInfo:
    """A registered model version as the page shows it."""

    name: str
    version: str
    run_id: str
    experiment_id: str
    alphabet: str | None
    min_length: int | None
    max_length: int | None
    run_url: str
    version_url: str
    data_kind: str = "synthetic"
    """What the version was trained on: "folder" (a labelled folder) or "synthetic"."""
    report_url: str = ""
    """The MLflow UI page of the run's `report/` artifacts (the version's visual report)."""


class Catalog:
    """Cached look-ups of model versions; a version never changes, so entries never expire."""

    def __init__(self, tracking: Tracking) -> None:
        self.tracking = tracking
        self._cache: dict[tuple[str, str], VersionInfo] = {}
        self._lock = threading.Lock()

    def version(self, name: str, version: str) -> VersionInfo | None:
        """Describe one model version, or None when the tracking server cannot say."""
        key = (name, version)
        with self._lock:
            if key in self._cache:
                return self._cache[key]
        try:
            mv = self.tracking.call(
                "GET", "model-versions/get", params={"name": name, "version": version}
            ).get("model_version", {})
            run_id = mv.get("run_id")
            run = self.tracking.call("GET", "runs/get", params={"run_id": run_id}) if run_id else {}
        except TrackingError:
            return None
        if not run:
            return None
        experiment_id = run["run"]["info"]["experiment_id"]
        params = {p["key"]: p["value"] for p in run["run"].get("data", {}).get("params", [])}
        uri = self.tracking.settings.public_tracking_url
        info = VersionInfo(
            name=name,
            version=version,
            run_id=run_id,
            experiment_id=experiment_id,
            alphabet=params.get("alphabet"),
            min_length=_int(params.get("min_length")),
            max_length=_int(params.get("max_length")),
            run_url=f"{uri}/#/experiments/{experiment_id}/runs/{run_id}",
            version_url=f"{uri}/#/models/{name}/versions/{version}",
            data_kind=params.get("data_kind") or "synthetic",
            report_url=(
                f"{uri}/#/experiments/{quote(str(experiment_id), safe='')}/runs/"
                f"{quote(str(run_id), safe='')}/artifactPath/report"
            ),
        )
        with self._lock:
            self._cache[key] = info
        return info

    def aliases(self, name: str) -> dict[str, str]:
        """Alias -> version of a registered model now (never cached: aliases move).

        Raises TrackingError when the tracking server does not answer."""
        model = self.tracking.call("GET", "registered-models/get", params={"name": name})
        found = model.get("registered_model", {}).get("aliases", [])
        return {
            str(a["alias"]): str(a["version"]) for a in found if "alias" in a and "version" in a
        }


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None
