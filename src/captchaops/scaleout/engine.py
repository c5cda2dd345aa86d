"""Ray for one command: a local Ray on 127.0.0.1 started and stopped around the work, or a cluster.

A local Ray binds its node and (when asked for) its dashboard to loopback like every other
service here, gets the machine's cores, and lives only while the command runs; its auth token
is a 0600 file in a 0700 folder of the captchaops home, never a readable ~/.ray/auth_token.
`--cluster ADDRESS` (or `RAY_ADDRESS`) joins an existing one as Ray itself joins it: a head's
routable `HOST:PORT` on a node of the cluster, `ray://HOST:10001` from outside it,
`vertex_ray://...` for Ray on Vertex AI (KubeRay, `ray start --head`). Only a head on this
machine's loopback (a test's, or one a developer started with `--node-ip-address 127.0.0.1`)
needs Ray's loopback switch, which is set for it alone.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray
from ray._private import ray_constants

from captchaops.scaleout import ScaleoutError
from captchaops.scaleout.preflight import as_tags, check_cluster

if TYPE_CHECKING:
    from captchaops.scaleout.runner import ParentRun


@dataclass
class Engine:
    """The Ray this command runs on."""

    address: str | None  # None: a local Ray started for this command
    cpus: float  # CPUs the cluster offers
    dashboard_url: str | None
    checked: dict[str, str] | None = None  # what the cluster's check found, once it ran
    gpus: float = 0.0  # GPUs the cluster offers
    node_gpus: float = 0.0  # the most GPUs one node offers (a run's GPUs are on one node)


_open: Engine | None = None  # the session a command opened early (to check the cluster first)


@contextmanager
def ray_session(
    cluster: str | None,
    *,
    home: Path,
    cpus: int | None = None,
    dashboard: bool = False,
) -> Iterator[Engine]:
    """Join `cluster`, or start a local Ray on 127.0.0.1 with `cpus` cores (its token kept in
    `home`); shut down after. Inside a session already open for the same cluster (the command
    opened it to check the cluster before its heavy imports), that session is used as it is."""
    global _open
    if _open is not None and _open.address == cluster:
        yield _open
        return
    quiet: dict[str, Any] = {
        "logging_level": logging.WARNING,
        "log_to_driver": False,
        "configure_logging": True,
    }
    if not (cluster or "").startswith(CLIENT_SCHEMES):
        quiet["runtime_env"] = {"worker_process_setup_hook": lean_worker()}
    try:
        if cluster:
            local = {}
            host = _reachable(cluster)
            if host in LOOPBACK and not cluster.startswith("ray://"):
                # A head on this machine's loopback, joined directly (Ray Client needs nothing):
                # Ray swaps a loopback address for this machine's outward IP before connecting
                # (`services.resolve_ip_for_localhost`), which a head bound to 127.0.0.1 never
                # answers; with this switch off it keeps loopback, and the driver joins as it.
                ray_constants.ENABLE_RAY_CLUSTER = False
                local = {"_node_ip_address": "127.0.0.1"}
            context = _join(ray, cluster, {**quiet, **local})
        else:
            private_token(home)
            context = ray.init(
                address="local",  # a new Ray for this command, never one found on the machine
                num_cpus=cpus or os.cpu_count() or 1,
                include_dashboard=dashboard,
                dashboard_host="127.0.0.1",
                _node_ip_address="127.0.0.1",
                **quiet,  # type: ignore[arg-type]
            )
    except (ConnectionError, ValueError, RuntimeError, ImportError) as exc:
        where = f"the Ray cluster at {cluster}" if cluster else "a local Ray"
        raise ScaleoutError(
            f"cannot start or reach {where} ({exc}); check --cluster / RAY_ADDRESS "
            "(e.g. 127.0.0.1:6379 from `ray start --head`) or leave it out to run locally"
        ) from exc
    try:
        url = context.dashboard_url
        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
        _open = Engine(
            address=cluster,
            cpus=float(ray.cluster_resources().get("CPU", 0.0)),
            dashboard_url=f"http://{url}" if url and not url.startswith("http") else url or None,
            gpus=float(sum(n.get("GPU", 0.0) for n in nodes)),
            node_gpus=float(max((n.get("GPU", 0.0) for n in nodes), default=0.0)),
        )
        yield _open
    finally:
        _open = None
        ray.shutdown()


KERAS_EXTRAS = ("sklearn", "matplotlib", "scipy", "h5py")
"""Modules Keras imports when they are installed (its scikit-learn wrappers, its plotting, sparse
arrays, .h5 files) and no fold, trial or member uses. Kept out of Ray's workers, a worker's
imports take about 100 MiB less (TensorFlow 2.21, Keras 3.15: 722 -> 624 MiB), and the peak
of a `cv --cluster` fold on 1,000 images fell from 1,628 to 1,537 MiB (`benchmarks/
bench_shards.py`, shared 2-core box, 2026-12-08). Ray Tune needs pandas, so it stays."""


def lean_worker() -> Callable[[], None]:
    """The setup hook of this command's Ray workers: Keras's optional extras (`KERAS_EXTRAS`)
    count as not installed there. Made inside this function so that Ray ships it by value: it
    runs on a worker of another captchaops (or none) too, whose versions the cluster's check
    must still be able to report. Ray Client sends a job's settings as JSON, where a function
    cannot go: a command through `ray://` (or `vertex_ray://`) leaves its workers as they are."""
    extras = KERAS_EXTRAS

    def keep_keras_extras_out() -> None:
        # here, not at the top: shipped by value to workers of any image, the hook carries
        # its own imports and takes nothing from this module
        import sys

        for name in extras:
            sys.modules.setdefault(name, None)  # type: ignore[arg-type]  # import fails: absent

    return keep_keras_extras_out


LOOPBACK = ("127.0.0.1", "localhost", "::1")
CLIENT_SCHEMES = ("ray://", "vertex_ray://")  # Ray Client addresses
CLIENT_SERVER_TRIES = 3
"""Ray Client starts a server process on the head for each driver; on a busy head that start
fails now and then ("Starting Ray client server failed", seen in CI), and the next one works."""


def _join(ray: Any, cluster: str, options: dict[str, Any]) -> Any:
    """`ray.init(address=cluster)`, trying a `ray://` address again when the head failed to
    start its per-driver client server (a transient failure of the head, not a wrong address)."""
    for attempt in range(1, CLIENT_SERVER_TRIES + 1):
        try:
            return ray.init(address=cluster, **options)
        except (ConnectionError, RuntimeError) as exc:
            transient = cluster.startswith("ray://") and "client server failed" in str(exc)
            if not transient or attempt == CLIENT_SERVER_TRIES:
                raise
            ray.shutdown()
            time.sleep(2.0 * attempt)
    raise AssertionError("unreachable")


def private_token(home: Path) -> Path | None:
    """Point the local Ray at `<home>/ray/auth_token`, created 0600 in a 0700 folder (and made
    so if it exists), unless the caller chose a token (RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH).
    Ray would otherwise write ~/.ray/auth_token readable by every local account, and with it
    anyone on the machine could join the command's Ray and run code with its credentials."""
    folder = home / "ray"
    token = folder / "auth_token"
    chosen = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if os.environ.get("RAY_AUTH_TOKEN") or (chosen and chosen != str(token)):
        return None
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    folder.chmod(0o700)
    if not token.exists():
        fd = os.open(token, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_hex(32))
    token.chmod(0o600)
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(token)  # read by Ray's token loader at ray.init
    return token


def _reachable(address: str, timeout: float = 10.0) -> str | None:
    """The host of a `HOST:PORT` or `ray://HOST:PORT` Ray address that accepts connections,
    else a one-line error (Ray itself would retry for minutes); None for addresses Ray
    resolves itself (`vertex_ray://...`, `auto`)."""
    if address.startswith("vertex_ray://") or address == "auto":
        return None
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ScaleoutError(
            f"--cluster {address!r} is not HOST:PORT; give the head's address (HOST:6379 on a "
            "node of the cluster, ray://HOST:10001 from outside it, vertex_ray://... on Vertex AI)"
        )
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise ScaleoutError(
            f"no Ray head answers at {address} ({exc.strerror or exc}); start one with "
            "`ray start --head --node-ip-address HOST` or fix --cluster / RAY_ADDRESS"
        ) from exc
    return host.strip("[]")


def check(engine: Engine, tracking_uri: str, experiment_id: str, gpus: float = 0.0) -> None:
    """Before any work: a one-line ScaleoutError if no node has the `gpus` one run asks for,
    then, on a cluster, a worker's check (`preflight`). No worker check on a local Ray (its
    workers are this machine, with the driver's versions and its view of the tracking server)."""
    need_gpus(engine, gpus)
    if engine.address is None or engine.checked is not None:
        return
    engine.checked = check_cluster(tracking_uri, experiment_id, engine.address)


def checked(engine: Engine, parent: ParentRun, tracking_uri: str, gpus: float = 0.0) -> None:
    """`check` (unless the command ran it already), its findings tagged on the parent run."""
    check(engine, tracking_uri, parent.experiment, gpus)
    for key, value in as_tags(engine.checked or {}).items():
        parent.client.set_tag(parent.run_id, key, value)


def need_gpus(engine: Engine, gpus: float) -> None:
    """A one-line ScaleoutError unless some node of the Ray offers the `gpus` one run asks for
    (Ray would otherwise hold every fold or trial pending for ever)."""
    if gpus <= 0 or gpus <= engine.node_gpus:
        return
    where = f"the Ray cluster at {engine.address}" if engine.address else "this machine's Ray"
    has = f"the most on one node is {engine.node_gpus:g}" if engine.gpus else "it has none"
    raise ScaleoutError(
        f"--gpus-per-trial {gpus:g} asks for more GPUs than any node of {where} offers ({has}); "
        "ask for fewer, or start GPU nodes first (deploy/raycluster.yaml: raise the "
        "gpu-trainers group's minReplicas)"
    )


def parallel_runs(engine: Engine, cpus: float, gpus: float) -> int:
    """How many runs of `cpus` CPUs and `gpus` GPUs the Ray runs side by side (at least one)."""
    fit = engine.cpus // cpus if cpus > 0 else float("inf")
    if gpus > 0:
        fit = min(fit, engine.gpus // gpus)
    return max(1, int(min(fit, 1_000_000)))


def cpus_per_run(engine: Engine, runs: int) -> float:
    """CPUs each of `runs` parallel trainings asks for: one core each up to the cluster's size,
    two on a machine that has cores to spare, so 2 cores run two runs side by side."""
    if engine.cpus <= 0:
        return 1.0
    return max(1.0, min(2.0, engine.cpus / max(runs, 1)))
