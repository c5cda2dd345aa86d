"""A scheme: the kind of CAPTCHA a version reads (alphabet, lengths, kind of data), and when
two versions or a version and a frozen set do not belong to the same one."""

from __future__ import annotations

from dataclasses import dataclass

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException


@dataclass(frozen=True)
class Scheme:
    """The kind of CAPTCHA a version reads, from its training run's parameters."""

    alphabet: str
    min_length: int
    max_length: int
    data_kind: str = "synthetic"

    def describe(self) -> str:
        """The alphabet and where the training images came from, for refusals."""
        return f"alphabet {self.alphabet!r} ({self.data_kind})"


def scheme_of(client: MlflowClient, name: str, version: str) -> Scheme | None:
    """The scheme a version was trained on; None when its run is gone or logged no alphabet."""
    run_id = client.get_model_version(name, version).run_id
    if not run_id:
        return None
    try:
        params = client.get_run(run_id).data.params
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    low, high = params.get("min_length", ""), params.get("max_length", "")
    if not params.get("alphabet") or not low.isdigit() or not high.isdigit():
        return None
    return Scheme(params["alphabet"], int(low), int(high), params.get("data_kind") or "synthetic")


def scheme_refusals(
    candidate_version: str,
    candidate: Scheme | None,
    champion_version: str | None,
    champion: Scheme | None,
    labels: list[str],
) -> list[str]:
    """Why the candidate cannot be judged against this champion on this frozen set; empty if it can."""
    if candidate is None:
        return []
    if champion is not None and (
        set(candidate.alphabet) != set(champion.alphabet)
        or candidate.data_kind != champion.data_kind
    ):
        return [
            f"candidate v{candidate_version} reads {candidate.describe()} but champion "
            f"v{champion_version} reads {champion.describe()}: different schemes; "
            "register it under its own --model-name"
        ]
    unreadable = "".join(sorted(set("".join(labels)) - set(candidate.alphabet)))
    if not unreadable:
        return []
    if candidate.data_kind == "folder":
        fix = "captchaops evalset --replace --folder HELD_OUT_DIR --size 0"
    else:
        fix = (
            f"captchaops evalset --replace --alphabet '{candidate.alphabet}' "
            f"--length {candidate.min_length}-{candidate.max_length}"
        )
    return [
        f"the frozen evaluation set has characters {unreadable!r} that candidate "
        f"v{candidate_version} ({candidate.describe()}) can never read; make a matching set "
        f"with `{fix}` or register it under its own --model-name"
    ]
