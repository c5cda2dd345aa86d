"""`--cluster` across real hosts: network namespaces on one bridge, each with its own address.

The tracking server runs on host `tracking`, a Ray head (no CPUs of its own, token auth) on
`head`, a Ray worker on `worker`, and drivers on the head (`--cluster HEAD:6379`) and on a
`laptop` (`--cluster ray://HEAD:10001`, and `--submit http://HEAD:8265` to the head's
dashboard, the one Ray process here with a dashboard), as docs/gcp.md runs them on a cluster.
Nothing binds
or connects across hosts through 127.0.0.1: each host's loopback is its own. The laptop's
driver runs as another login than the workers, and its runs are credited to that login. The
everyday mistake (the tracking server on the laptop's 127.0.0.1, the cluster elsewhere) and a
worker of another image must each end in one line, before any fold, within 20 s, with exit 1.
"""

from __future__ import annotations

import getpass
import os
import secrets
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from captchaops.data import standin
from captchaops.scaleout.jobs import JOB_HOMES
from harness.hosts import (
    Host,
    HostNet,
    forward,
    host_net,
    required,
    unavailable,
    wait_listening,
)
from harness.processes import VENV_BIN, Tracking, start_tracking_server, stop_process

pytestmark = pytest.mark.slow
STEPS = ["--steps", "4", "--max-minutes", "3"]
GCS, CLIENT, TRACKING, DASHBOARD = 6379, 10001, 5000, 8265
LAPTOP_LOGIN = "lin-laptop"  # who runs `cv` on the laptop host


def require_hosts() -> None:
    """Skip (CI: fail, CAPTCHAOPS_REQUIRE_HOSTS=1) where namespaces cannot be made."""
    reason = unavailable()
    if reason is not None:
        if required():
            pytest.fail(f"CAPTCHAOPS_REQUIRE_HOSTS=1 but no hosts can be made: {reason}")
        pytest.skip(f"no multi-host test bed: {reason}")


@dataclass
class Bed:
    """The hosts, the module's Ray token and the environment every process on them gets."""

    net: HostNet
    env: dict[str, str]
    tracking: Tracking

    @property
    def head(self) -> Host:
        return self.net["head"]


def clean_env(token: Path) -> dict[str, str]:
    """This process's environment without captchaops, MLflow or Ray settings, with the token."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("CAPTCHAOPS_", "MLFLOW_", "RAY_", "AWS_"))
    }
    return env | {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}


def start_ray(host: Host, args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    cmd = [str(VENV_BIN / "ray"), "start", "--block", "--node-ip-address", host.address, *args]
    return host.popen(cmd, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bed]:
    """Four hosts, a tracking server on one, a Ray head and a worker on two others."""
    require_hosts()
    base = tmp_path_factory.mktemp("hosts")
    token = base / "ray-token" / "auth_token"
    token.parent.mkdir(mode=0o700)
    token.touch(mode=0o600)
    token.write_text(secrets.token_hex(32))
    env = clean_env(token)
    # Ray's socket paths must stay short: its session folder under a short /tmp name.
    ray_tmp = tempfile.mkdtemp(prefix="rayh", dir="/tmp")
    with ExitStack() as later:  # undone in reverse: processes, then hosts, then the folder
        later.callback(shutil.rmtree, ray_tmp, True)
        net = later.enter_context(host_net(["tracking", "head", "worker", "laptop", "stale"]))
        head_args = ["--head", "--port", str(GCS), "--ray-client-server-port", str(CLIENT)]
        head_args += ["--num-cpus", "0", "--temp-dir", ray_tmp]
        head_args += ["--object-store-memory", str(100 * 2**20)]
        # The head's dashboard serves the Jobs API (`--submit`); a job's entrypoint finds
        # `captchaops` on the head's PATH, as in the training image.
        head_args += ["--include-dashboard", "true", "--dashboard-host", net["head"].address]
        head_args += ["--dashboard-port", str(DASHBOARD)]
        head_env = env | {"PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"}
        head = start_ray(net["head"], head_args, head_env, base / "head.log")
        later.callback(stop_process, head)
        (base / "tracking").mkdir()
        where = net["tracking"]
        tracking = start_tracking_server(
            base / "tracking", TRACKING, env, host=where.address, inside=where.command([])
        )
        later.callback(stop_process, tracking.proc)
        wait_listening(net["head"], GCS, timeout=120, proc=head)
        worker_args = ["--address", f"{net['head'].address}:{GCS}", "--num-cpus", "2"]
        worker_args += ["--object-store-memory", str(100 * 2**20)]
        worker = start_ray(net["worker"], worker_args, env, base / "worker.log")
        later.callback(stop_process, worker)
        joined(base / "worker.log", worker)
        yield Bed(net, env, tracking)


def joined(log: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Wait until the `ray start` writing `log` has joined its head."""
    deadline = time.monotonic() + timeout
    while "Ray runtime started" not in log.read_text(errors="replace"):
        assert proc.poll() is None, log.read_text()[-2000:]
        assert time.monotonic() < deadline, f"the Ray worker did not join in {timeout:.0f} s"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("hosts-data") / "captchas"
    standin.build(path, count=60, seed=5)
    return path


def command(
    bed: Bed,
    host: Host,
    args: list[str],
    home: Path,
    tracking_uri: str,
    login: str | None = None,
) -> tuple[subprocess.Popen, Path]:
    """Start `captchaops ARGS` on `host` as a user runs it there (as `login`, if given); its
    process and its home (stdout.txt, stderr.txt inside)."""
    home.mkdir(parents=True, exist_ok=True)
    env = bed.env | {
        "CAPTCHAOPS_TRACKING_URI": tracking_uri,
        "CAPTCHAOPS_HOME": str(home),
        "CAPTCHAOPS_STAGING_FLOOR": "0",
        "COLUMNS": "120",
    }
    env |= {"LOGNAME": login, "USER": login} if login else {}
    out, err = (home / "stdout.txt").open("wb"), (home / "stderr.txt").open("wb")
    proc = host.popen([str(VENV_BIN / "captchaops"), *args], env=env, stdout=out, stderr=err)
    return proc, home


def finished(
    started: tuple[subprocess.Popen, Path], timeout: float
) -> subprocess.CompletedProcess[str]:
    """Wait for a command from `command`; its exit status and output."""
    proc, home = started
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            stop_process(proc)
    out, err = (home / "stdout.txt").read_text(), (home / "stderr.txt").read_text()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.fixture(scope="module")
def cv_runs(bed: Bed, folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """`cv` from the head (`HEAD:6379`) and from the laptop (`ray://HEAD:10001`), both logging
    to the tracking host, started together so that their start-ups overlap."""
    homes = tmp_path_factory.mktemp("cv-homes")
    head, laptop = bed.head, bed.net["laptop"]
    args = ["cv", "--data", str(folder), "--folds", "2", *STEPS]
    started = {
        "head": command(
            bed,
            head,
            [*args, "--cluster", f"{head.address}:{GCS}"],
            homes / "head",
            bed.tracking.uri,
        ),
        "laptop": command(
            bed,
            laptop,
            [*args, "--cluster", f"ray://{head.address}:{CLIENT}"],
            homes / "laptop",
            bed.tracking.uri,
            login=LAPTOP_LOGIN,
        ),
    }
    try:
        yield started
    finally:
        for proc, _ in started.values():
            if proc.poll() is None:
                stop_process(proc)


def check_cv(done: subprocess.CompletedProcess[str], bed: Bed, who: str) -> None:
    """A cv whose check and folds ran on the worker host, logged to the tracking host, its
    runs credited to `who` (the driver's login)."""
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    worker = bed.net["worker"]
    client = MlflowClient(bed.tracking.uri)
    [line] = [x for x in done.stdout.splitlines() if x.startswith("parent run ")]
    parent = client.get_run(line.split()[2])
    assert parent.info.status == "FINISHED"
    # The cluster's check ran on the worker host, and found the driver's versions there.
    assert parent.data.tags["captchaops.cluster.node"] == worker.address
    runs = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
    )
    assert sorted(r.info.run_name for r in runs) == ["fold 1", "fold 2"]
    assert {r.data.tags.get("mlflow.user") for r in [parent, *runs]} == {who}
    for run in runs:
        assert run.info.status == "FINISHED"
        assert run.data.tags["captchaops.node"] == worker.address  # trained on the worker
        assert "test_seq_acc" in run.data.metrics


def test_cv_on_the_head_trains_its_folds_on_the_worker_host(bed: Bed, cv_runs: dict) -> None:
    assert "127.0.0.1" not in bed.tracking.uri
    check_cv(finished(cv_runs["head"], timeout=600), bed, getpass.getuser())


def test_cv_from_a_laptop_through_ray_client_trains_on_the_worker_host(
    bed: Bed, cv_runs: dict
) -> None:
    # The workers run as this process does; the laptop's driver as someone else.
    assert getpass.getuser() != LAPTOP_LOGIN
    check_cv(finished(cv_runs["laptop"], timeout=600), bed, LAPTOP_LOGIN)


def children_on_the_worker(bed: Bed, parent_id: str, who: str, *, tagged: bool = True) -> list[str]:
    """The names of a parent run's child runs, each checked: finished, credited to `who`, and
    (where the run records its node: `tagged`) trained on the worker host."""
    client = MlflowClient(bed.tracking.uri)
    parent = client.get_run(parent_id)
    runs = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'"
    )
    assert parent.data.tags.get("mlflow.user") == who
    for run in runs:
        assert run.info.status == "FINISHED", run.info.run_name
        if tagged:
            assert run.data.tags["captchaops.node"] == bed.net["worker"].address, run.info.run_name
        assert run.data.tags.get("mlflow.user") == who
    return sorted(str(r.info.run_name) for r in runs)


def test_tune_on_the_head_and_through_ray_client_and_members_from_a_laptop(
    bed: Bed, folder: Path, tmp_path: Path
) -> None:
    """`tune` on the head (GCS address), and `tune` and `train --members` from the laptop
    through Ray Client, together: every trial and member trains on the worker host, each
    command registers a version, and the runs are credited to whoever ran each command. Under
    Ray Client Tune runs its driver (and its callbacks) on the head: the laptop's driver still
    writes one child run per trial, with the laptop's login."""
    head, laptop = bed.head, bed.net["laptop"]
    tune = ["tune", "--data", str(folder), "--minutes", "6", *STEPS]
    members = ["train", "--data", str(folder), "--members", "2", *STEPS]
    client = f"ray://{head.address}:{CLIENT}"
    started = {
        "tune": command(
            bed, head, [*tune, "--trials", "2", "--cluster", f"{head.address}:{GCS}"],
            tmp_path / "tune", bed.tracking.uri,
        ),
        "members": command(
            bed, laptop, [*members, "--cluster", client], tmp_path / "members",
            bed.tracking.uri, login=LAPTOP_LOGIN,
        ),
        "client": command(
            bed, laptop, [*tune, "--trials", "1", "--cluster", client], tmp_path / "client",
            bed.tracking.uri, login=LAPTOP_LOGIN,
        ),
    }  # fmt: skip
    done = {name: finished(run, timeout=600) for name, run in started.items()}
    for result in done.values():
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        assert "Traceback" not in result.stdout + result.stderr
    for name in ("tune", "client"):
        assert "registered version" in done[name].stdout, done[name].stdout[-2000:]
    assert "registered models:/" in done["members"].stdout, done["members"].stdout[-2000:]
    # A trial's run does not record its node (Tune places it; the head has no CPUs, so only
    # the worker host can run it).
    for name, who, count in (("tune", getpass.getuser(), 2), ("client", LAPTOP_LOGIN, 1)):
        [line] = [x for x in done[name].stdout.splitlines() if x.startswith("parent run ")]
        trials = children_on_the_worker(bed, line.split()[2], who, tagged=False)
        assert len(trials) == count, (name, trials)
    [line] = [x for x in done["members"].stdout.splitlines() if x.startswith("run ")]
    run_id = line.split()[1].rstrip(";")
    assert len(children_on_the_worker(bed, run_id, LAPTOP_LOGIN)) == 2


def test_tracking_on_the_laptops_loopback_fails_in_one_line_before_any_fold(
    bed: Bed, folder: Path, tmp_path: Path
) -> None:
    """The everyday laptop set-up: `captchaops up` on the laptop (tracking on its 127.0.0.1)
    and a cluster elsewhere. The workers' 127.0.0.1 is their own: one line, exit 1, no fold,
    said on the laptop before it joins the cluster (a tracking server the workers cannot reach
    at a routable address is the workers' check's: the submitted `tune` below)."""
    laptop, head = bed.net["laptop"], bed.head
    # The laptop's tracking server: the tracking host's, answering on the laptop's loopback.
    tracking_port = int(bed.tracking.uri.rsplit(":", 1)[1])
    local = forward(laptop, "127.0.0.1", TRACKING, f"{bed.net['tracking'].address}:{tracking_port}")
    try:
        args = ["cv", "--data", str(folder), "--folds", "2"]
        args += ["--cluster", f"ray://{head.address}:{CLIENT}", *STEPS]
        started = time.monotonic()
        uri = f"http://127.0.0.1:{TRACKING}"
        done = finished(command(bed, laptop, args, tmp_path / "home", uri), timeout=120)
        seconds = time.monotonic() - started
    finally:
        local.kill()
        local.wait()
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    errors = [x for x in done.stderr.splitlines() if x.strip()]
    assert len(errors) == 1 and "Traceback" not in done.stdout + done.stderr, done.stderr
    # Refused on the laptop before joining: a head on another machine cannot reach its loopback.
    assert (
        f"the tracking server at {uri} is this machine's loopback, which the Ray cluster at "
        f"ray://{head.address}:{CLIENT} cannot reach" in errors[0]
    )
    assert "CAPTCHAOPS_TRACKING_URI" in errors[0]
    assert "fold 1:" not in done.stdout
    assert seconds <= 20 or pytest.fail(f"took {seconds:.1f} s")


def test_a_worker_with_other_versions_is_named_in_one_line_before_any_fold(
    bed: Bed, folder: Path, tmp_path: Path
) -> None:
    """A node built from another image (here: an older captchaops first on its path) joins the
    cluster: the check finds it among the workers and names both sets of versions."""
    import ray

    import captchaops as ours

    stale, head = bed.net["stale"], bed.head
    old = tmp_path / "old-image" / "captchaops"
    old.mkdir(parents=True)
    (old / "__init__.py").write_text('__version__ = "0.0.9"\n')
    args = ["--address", f"{head.address}:{GCS}", "--num-cpus", "1"]
    args += ["--object-store-memory", str(100 * 2**20)]
    log = tmp_path / "stale.log"
    node = start_ray(stale, args, bed.env | {"PYTHONPATH": str(old.parent)}, log)
    try:
        joined(log, node)
        cv = ["cv", "--data", str(folder), "--folds", "2", "--cluster", f"{head.address}:{GCS}"]
        started = time.monotonic()
        done = finished(
            command(bed, head, [*cv, *STEPS], tmp_path / "home", bed.tracking.uri), timeout=120
        )
        seconds = time.monotonic() - started
    finally:
        stop_process(node)
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    errors = [x for x in done.stderr.splitlines() if x.strip()]
    assert len(errors) == 1 and "Traceback" not in done.stdout + done.stderr, done.stderr
    python = ".".join(map(str, sys.version_info[:3]))
    mine = f"Python {python}, Ray {ray.__version__}, captchaops {ours.__version__}"
    assert (
        f"the worker at {stale.address} runs Python {python}, Ray {ray.__version__}, "
        "captchaops 0.0.9" in errors[0]
    )
    assert f"this machine runs {mine}" in errors[0]
    assert "fold 1:" not in done.stdout
    assert seconds <= 20 or pytest.fail(f"took {seconds:.1f} s")


def follow(bed: Bed, printed: str, what: str) -> subprocess.CompletedProcess[str]:
    """Run the `ray job ...` command that `--submit` printed after `what` on the laptop."""
    [line] = [x for x in printed.splitlines() if x.startswith(what)]
    args = shlex.split(line.removeprefix(what).split("  (")[0])
    assert args[0] == "ray"
    return bed.net["laptop"].run([str(VENV_BIN / "ray"), *args[1:]], env=bed.env, timeout=600)


def test_a_cv_submitted_from_the_laptop_runs_on_the_cluster_after_the_laptop_exits(
    bed: Bed, folder: Path, tmp_path: Path
) -> None:
    """`cv --submit http://HEAD:8265` from the laptop returns with the job's id while the job
    runs on the cluster; the job's parent and fold runs are credited to the laptop's login. A
    `tune` job whose tracking server the cluster cannot reach fails its check: the job FAILS."""
    laptop = bed.net["laptop"]
    dashboard = f"http://{bed.head.address}:{DASHBOARD}"
    args = ["cv", "--data", str(folder), "--folds", "2", *STEPS, "--submit", dashboard]
    # Nothing listens on the laptop's address: routable, so only the job's check can refuse it.
    unreachable = f"http://{laptop.address}:{TRACKING}"
    started = time.monotonic()
    tune = ["tune", "--synthetic", "40", "--trials", "1", *STEPS, "--submit", dashboard]
    runs = {
        "good": command(bed, laptop, args, tmp_path / "good", bed.tracking.uri, LAPTOP_LOGIN),
        "bad": command(bed, laptop, tune, tmp_path / "bad", unreachable, LAPTOP_LOGIN),
    }
    submitted = {name: finished(run, timeout=120) for name, run in runs.items()}
    returned = time.monotonic() - started
    for done in submitted.values():
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        assert done.stdout.startswith("submitted job captchaops-"), done.stdout
    assert returned < 60 or pytest.fail(f"submitting took {returned:.1f} s")
    with ThreadPoolExecutor(2) as pool:  # both jobs followed at once, as two terminals would
        names, printed = list(submitted), [done.stdout for done in submitted.values()]
        seen = pool.map(lambda out: follow(bed, out, "follow it: "), printed)
        logs = dict(zip(names, seen, strict=True))
        seen = pool.map(lambda out: follow(bed, out, "its state: "), printed)
        states = dict(zip(names, seen, strict=True))
    jobs = {name: done.stdout.split()[2] for name, done in submitted.items()}
    for job in jobs.values():  # each job's home on the head (its library log)
        shutil.rmtree(f"{JOB_HOMES}/{job}", ignore_errors=True)
    assert f"Job '{jobs['good']}' succeeded" in states["good"].stdout, logs["good"].stdout
    check_cv(subprocess.CompletedProcess([], 0, logs["good"].stdout, ""), bed, LAPTOP_LOGIN)
    assert f"Job '{jobs['bad']}' failed" in states["bad"].stdout, states["bad"].stdout
    assert f"cannot reach the tracking server at {unreachable}" in logs["bad"].stdout
    assert "tune: 1 trials" not in logs["bad"].stdout  # no board: it failed before any trial
    assert "Traceback" not in logs["bad"].stdout
