"""A command submitted as a Ray job: `cv|tune|train --members ... --submit http://HEAD:8265`.

The sweep runs on the cluster's head through Ray's Jobs API (served by the head's dashboard),
so it goes on when the terminal closes. The job runs the same command with `--cluster auto`
(the job's own cluster): the cluster's check (tracking server, account, versions) runs there
before any fold or trial, and a failed check fails the job. The caller's tracking URI, account
and login travel as the job's environment variables, never on its command line, so the runs
are credited to the person who submitted it; a `--data` folder travels as the job's working
directory (uploaded to the head, at most Ray's package limit).
"""

from __future__ import annotations

import os
import secrets
import shlex
import tempfile
import time
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from captchaops.access import login
from captchaops.scaleout import ScaleoutError
from captchaops.scaleout.preflight import without_credentials
from captchaops.settings import Settings

DASHBOARD_PORT = 8265
MAX_FOLDER_BYTES = 400 * 2**20
"""A `--data` folder's size at most: Ray uploads a job's working directory as one zip through
the head (at most 512 MiB, its gRPC message limit); a bigger folder belongs on a volume the
head mounts (deploy/k8s/rayjob-cv.yaml)."""
STOP_WAIT_SECONDS = 60
"""`ray job stop` sends Ctrl-C (the runs end KILLED), then SIGKILL after this long."""
JOB_HOMES = "/tmp/captchaops-jobs"
"""Each job's captchaops home on the head (its logs), outside the uploaded folder."""
AGENT_WAITS = (1.0, 2.0, 4.0, 8.0, 15.0, None)
"""Pauses between tries while a head that has just started (or is busy) has no job agent yet:
its dashboard answers "No available agent to submit job, please try again later"."""
LOOPBACK = ("127.0.0.1", "localhost", "::1")
SETTINGS_PASSED = (
    "experiment_name",
    "feedback_experiment",
    "model_name",
    "staging_floor",
    "promotions_url",
)
"""The settings a training command reads besides the tracking server's, passed to the job (the
promotion service too: a job that stages without it would sign with a throwaway key)."""


@dataclass(frozen=True)
class Submitted:
    """A submitted job: its id and the dashboard that knows it."""

    job_id: str
    address: str

    def lines(self) -> list[str]:
        """What to tell the person who submitted it: the id and how to follow and stop it."""
        at = f"--address {self.address}"
        return [
            f"submitted job {self.job_id} to {self.address}; it runs on the cluster and goes on "
            "when this terminal closes",
            f"follow it: ray job logs -f {self.job_id} {at}",
            f"its state: ray job status {self.job_id} {at}",
            f"stop it:   ray job stop {self.job_id} {at}  (its runs end KILLED)",
        ]


def dashboard_address(address: str) -> str:
    """`address` (a head's dashboard, http(s)://HOST[:PORT]) without a trailing slash, else a
    one-line ScaleoutError."""
    parts = urlsplit(address)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ScaleoutError(
            f"--submit {address!r} is not a Ray dashboard's address; give "
            f"http://HEAD:{DASHBOARD_PORT} (the head's dashboard, which serves Ray's Jobs API)"
        )
    return address.rstrip("/")


@dataclass(frozen=True)
class Uploaded:
    """A folder uploaded with the job, by name: the job reads it at `$PWD/NAME`, an absolute
    path. Ray re-extracts a working directory when another node on the same machine first
    uses it (the test bed's hosts share one), which leaves a process's old `.` empty."""

    name: str

    def __str__(self) -> str:
        return f'"$PWD"/{shlex.quote(self.name)}'


def entrypoint(command: str, options: Mapping[str, object]) -> str:
    """The job's shell command: `captchaops COMMAND` with `options` (flag -> value; None and
    False left out, True as the bare flag, an `Uploaded` folder by its path in the job) on the
    job's own cluster."""
    words = [shlex.quote(w) for w in ("captchaops", command)]
    for flag, value in options.items():
        if value is None or value is False:
            continue
        words.append(shlex.quote(flag))
        if value is not True:
            words.append(str(value) if isinstance(value, Uploaded) else shlex.quote(str(value)))
    return " ".join([*words, "--cluster", "auto"])


def packed(folder: Path, scratch: Path) -> Path:
    """`folder` as a zip in `scratch` holding one folder of its name (stored: images are
    compressed already), to upload as a job's working directory."""
    archive = scratch / f"{folder.name}.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as out:
        # A link is left out: it could name a file outside the folder (a home's .env).
        files = (p for p in folder.rglob("*") if p.is_file() and not p.is_symlink())
        for path in sorted(files):
            out.write(path, f"{folder.name}/{path.relative_to(folder).as_posix()}")
    return archive


def job_env(settings: Settings, job_id: str) -> dict[str, str]:
    """The job's environment: the caller's tracking server, account (or login) and training
    settings, Ctrl-C for `ray job stop`, and a home of its own on the head."""
    # here, not at the top: the registry's names load MLflow (its errors), which a submit
    # never uses otherwise, nor `train --help`, which imports this module (cli.scaleout)
    from captchaops.registry.names import default_actor

    env = {
        "CAPTCHAOPS_TRACKING_URI": settings.effective_tracking_uri,
        "CAPTCHAOPS_HOME": f"{JOB_HOMES}/{job_id}",
        "RAY_JOB_STOP_SIGNAL": "SIGINT",
        "RAY_JOB_STOP_WAIT_TIME_S": str(STOP_WAIT_SECONDS),
    }
    for name in SETTINGS_PASSED:
        if getattr(settings, name) is not None:
            env[f"CAPTCHAOPS_{name.upper()}"] = str(getattr(settings, name))
    account = login(settings)
    if account is not None:
        env["CAPTCHAOPS_TRACKING_USERNAME"], env["CAPTCHAOPS_TRACKING_PASSWORD"] = account
    else:  # no tracking account: the runs are credited to this login, as they are locally
        env["LOGNAME"] = env["USER"] = default_actor()
    return env


def check_reachable(settings: Settings, address: str) -> None:
    """A one-line ScaleoutError for a tracking server the cluster cannot reach for certain: not
    http(s), or this machine's loopback while the head is elsewhere."""
    uri = settings.effective_tracking_uri
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https"):
        raise ScaleoutError(
            "a submitted job logs through a tracking server; set CAPTCHAOPS_TRACKING_URI to an "
            "http(s) URL the cluster reaches"
        )
    if parts.hostname in LOOPBACK and urlsplit(address).hostname not in LOOPBACK:
        raise ScaleoutError(
            f"the tracking server at {without_credentials(uri)} is this machine's loopback, which "
            "the cluster cannot reach; set CAPTCHAOPS_TRACKING_URI to an address its head and "
            "workers reach (a routable host or the team's HTTPS URL)"
        )


def folder_size(folder: Path) -> int:
    """The bytes of the files under `folder`, or a one-line ScaleoutError if it is too big to
    upload with the job (or is not a folder)."""
    if not folder.is_dir():
        raise ScaleoutError(f"--data {folder} is not a folder; name the folder of images")
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    if size > MAX_FOLDER_BYTES:
        raise ScaleoutError(
            f"--data {folder} holds {size / 2**20:.0f} MiB, more than a job uploads "
            f"({MAX_FOLDER_BYTES // 2**20} MiB); put it on a volume the head mounts and run the "
            "RayJob of deploy/k8s/rayjob-cv.yaml, or drive with --cluster"
        )
    return size


def ray_token_given() -> bool:
    """Whether this process gives Ray a cluster token (Ray's token authentication), so the
    dashboard answers only those who hold it."""
    return bool(
        os.environ.get("RAY_AUTH_TOKEN")
        or os.environ.get("RAY_AUTH_TOKEN_PATH")
        or (Path.home() / ".ray" / "auth_token").is_file()
    )


def check_private(env: Mapping[str, str]) -> None:
    """A one-line ScaleoutError when the job would carry a tracking password to a cluster that
    checks no token: Ray shows a job's environment to anyone who can read its dashboard."""
    if "CAPTCHAOPS_TRACKING_PASSWORD" in env and not ray_token_given():
        raise ScaleoutError(
            "a submitted job carries your tracking login in its environment, which Ray shows to "
            "anyone who can read the dashboard; run the cluster with Ray's token authentication "
            "(RAY_AUTH_MODE=token) and point RAY_AUTH_TOKEN_PATH at its token here, or submit "
            "without a tracking account so the head's own account logs"
        )


def submit(
    address: str, command: str, options: Mapping[str, object], settings: Settings
) -> Submitted:
    """Submit `captchaops COMMAND OPTIONS` as a Ray job to the head's dashboard at `address`
    (`options["--data"]`, a folder, is uploaded in the job's working directory); returns at
    once. A one-line ScaleoutError when the job cannot be submitted."""
    address = dashboard_address(address)
    check_reachable(settings, address)
    options = dict(options)
    job_id = f"captchaops-{command}-{secrets.token_hex(6)}"
    env = job_env(settings, job_id)
    check_private(env)
    runtime_env: dict[str, object] = {"env_vars": env}
    with tempfile.TemporaryDirectory(prefix="captchaops-job-") as scratch:
        data = options.get("--data")
        if data is not None:
            folder = Path(str(data)).expanduser().resolve()
            folder_size(folder)
            runtime_env["working_dir"] = str(packed(folder, Path(scratch)))
            options["--data"] = Uploaded(folder.name)
        send(address, job_id, entrypoint(command, options), runtime_env, command)
    return Submitted(job_id, address)


def send(
    address: str, job_id: str, line: str, runtime_env: dict[str, object], command: str
) -> None:
    """Hand the job to the dashboard at `address` (trying again while the head has no job
    agent yet); a one-line ScaleoutError if it cannot take it."""
    try:
        # here, not at the top: Ray is the train extra's; without it this is one line, and a
        # submit refused before sending (folder, loopback, token) never loads it
        from ray.job_submission import JobSubmissionClient

        client = JobSubmissionClient(address)
        for wait in AGENT_WAITS:
            try:
                client.submit_job(
                    entrypoint=line,
                    submission_id=job_id,
                    runtime_env=runtime_env,
                    metadata={"captchaops.command": command},
                )
                break
            except RuntimeError as exc:
                if "No available agent" not in str(exc) or wait is None:
                    raise
                time.sleep(wait)
    except ImportError as exc:
        raise ScaleoutError(
            f"--submit needs Ray's job client ({exc}); reinstall captchaops with its train extra"
        ) from exc
    except Exception as exc:  # Ray raises ConnectionError, RuntimeError or its own; one line
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ScaleoutError(
            f"cannot submit a job to the Ray dashboard at {address} ({first}); start the head "
            f"with `ray start --head --dashboard-host HOST` (KubeRay: `kubectl port-forward "
            f"HEAD {DASHBOARD_PORT}`), and with token auth set RAY_AUTH_MODE=token and its token"
        ) from exc
