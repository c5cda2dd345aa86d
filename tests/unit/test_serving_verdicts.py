"""The trial runs once per ONNX network: its verdict is kept by digest in the home, reused by a
restart or another server of that home, and never stands for other bytes or other limits."""

from __future__ import annotations

import json
import shutil
import stat
from pathlib import Path

import pytest

from captchaops.model.version import file_sha256
from captchaops.serving.frozen_sample import FrozenSample
from captchaops.serving.loader import LoadError, Timeouts, VersionLoader
from captchaops.serving.trial import TrialLimits
from captchaops.serving.verdicts import Verdicts, limits_key
from tests.unit.test_graph_policy import honest, nan_when_dark, version_dir

LIMITS = TrialLimits(wall_seconds=60, max_batch=2)


def server(home: Path, limits: TrialLimits = LIMITS) -> VersionLoader:
    """A model server's loader (no registry needed to open a folder) with the home's verdicts."""
    verdicts = Verdicts(home / "verdicts")
    return VersionLoader(None, home / "cache", Timeouts(), limits, verdicts)  # type: ignore[arg-type]


def test_a_network_is_tried_once_per_digest_and_limits(tmp_path: Path) -> None:
    folder = version_dir(tmp_path / "v1", honest())
    first = server(tmp_path)
    assert first.open_folder(folder).predict_images  # opened and warmed up
    assert first.trials == {"run": 1, "passed_cached": 0, "refused_cached": 0}
    kept = tmp_path / "verdicts" / f"{file_sha256(folder / 'artifacts' / 'crnn.onnx')}.json"
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600
    assert stat.S_IMODE(kept.parent.stat().st_mode) == 0o700
    assert json.loads(kept.read_text())["passed"] is True

    # a restart, or the other alias's server of the same home: the same bytes, no new trial
    restarted = server(tmp_path)
    restarted.open_folder(shutil.copytree(folder, tmp_path / "again"))
    assert restarted.trials == {"run": 0, "passed_cached": 1, "refused_cached": 0}

    # other bytes (here the same graph with another doc string): tried again
    other = honest()
    other.doc_string = "retrained"
    restarted.open_folder(version_dir(tmp_path / "v2", other))
    # the same bytes under a larger batch than the verdict was made on: tried again
    larger = server(tmp_path, TrialLimits(wall_seconds=60, max_batch=4))
    larger.open_folder(folder)
    assert (restarted.trials["run"], larger.trials["run"]) == (1, 1)


def test_a_failed_verdict_is_refused_at_once(tmp_path: Path) -> None:
    folder = version_dir(tmp_path / "v", nan_when_dark())
    with pytest.raises(LoadError, match="not finite numbers are refused"):
        server(tmp_path).open_folder(folder)
    again = server(tmp_path)
    with pytest.raises(LoadError, match=r"not finite numbers are refused .*its trial's verdict"):
        again.open_folder(folder)
    assert again.trials == {"run": 0, "passed_cached": 0, "refused_cached": 1}


def test_a_pass_never_stands_for_other_bytes_under_the_same_version(tmp_path: Path) -> None:
    folder = version_dir(tmp_path / "v", honest())
    loader = server(tmp_path)
    loader.open_folder(folder)
    # the network swapped for one that answers NaN, meta.json (and its digest) left as they were
    shutil.copy(
        version_dir(tmp_path / "bad", nan_when_dark()) / "artifacts" / "crnn.onnx",
        folder / "artifacts" / "crnn.onnx",
    )
    with pytest.raises(LoadError, match="does not match the digest"):
        loader.open_folder(folder)
    assert loader.trials["run"] == 2  # no verdict could be looked up: the trial said why
    # the version rebuilt in place (a new network, meta.json naming its digest): tried afresh
    meta = json.loads((folder / "artifacts" / "meta.json").read_text())
    meta["onnx_sha256"] = file_sha256(folder / "artifacts" / "crnn.onnx")
    (folder / "artifacts" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(LoadError, match="not finite numbers are refused"):
        loader.open_folder(folder)
    assert loader.trials["run"] == 3


def test_verdicts_are_bounded_and_bound_to_what_they_judged(tmp_path: Path) -> None:
    verdicts = Verdicts(tmp_path / "verdicts", limit=2)
    digests = [f"{n:064x}" for n in range(3)]
    for digest in digests:
        verdicts.keep(digest, "meta", "none", LIMITS, passed=True, reason="")
    assert len(list((tmp_path / "verdicts").glob("*.json"))) == 2
    assert verdicts.find(digests[2], "meta", "none", LIMITS) is not None
    assert verdicts.find(digests[2], "other meta", "none", LIMITS) is None
    # made without frozen-set images, it does not stand for a trial with them (or other ones)
    sample = FrozenSample((b"captcha",), "e" * 64)
    assert sample.key != FrozenSample((b"other",), "e" * 64).key
    assert verdicts.find(digests[2], "meta", sample.key, LIMITS) is None
    assert verdicts.find("../../etc/passwd", "meta", "none", LIMITS) is None
    # a file claiming another digest than its name is not believed
    (tmp_path / "verdicts" / f"{digests[2]}.json").write_text(
        json.dumps(
            {
                "onnx_sha256": digests[1],
                "meta_sha256": "meta",
                "frozen": "none",
                "limits": limits_key(LIMITS),
                "policy": "x",
                "passed": True,
                "reason": "",
                "at": "",
            }
        )
    )
    assert verdicts.find(digests[2], "meta", "none", LIMITS) is None
