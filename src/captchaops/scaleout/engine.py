"""Ray for one command: a local Ray on 127.0.0.1 started and stopped around the work, or a cluster.

A local Ray binds its node and (when asked for) its dashboard to loopback like every other
service here, gets the machine's cores, and lives only while the command runs; `--cluster
ADDRESS` (or `RAY_ADDRESS`) joins an existing one (a `ray start --head`, KubeRay, Vertex AI).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from captchaops.scaleout import ScaleoutError


@dataclass(frozen=True)
class Engine:
    """The Ray this command runs on."""

    address: str | None  # None: a local Ray started for this command
    cpus: float  # CPUs the cluster offers
    dashboard_url: str | None


@contextmanager
def ray_session(
    cluster: str | None, *, cpus: int | None = None, dashboard: bool = False
) -> Iterator[Engine]:
    """Join `cluster`, or start a local Ray on 127.0.0.1 with `cpus` cores; shut down after."""
    import ray
    from ray._private import ray_constants

    quiet = {"logging_level": logging.WARNING, "log_to_driver": False, "configure_logging": True}
    try:
        if cluster:
            local = {}
            if _reachable(cluster) in LOOPBACK:
                # Ray swaps a loopback address for this machine's outward IP before connecting
                # (`services.resolve_ip_for_localhost`), which a head bound to 127.0.0.1 never
                # answers; with this switch off it keeps loopback, and the driver joins as it.
                ray_constants.ENABLE_RAY_CLUSTER = False
                local = {"_node_ip_address": "127.0.0.1"}
            context = ray.init(address=cluster, **quiet, **local)  # type: ignore[arg-type]
        else:
            context = ray.init(
                address="local",  # a new Ray for this command, never one found on the machine
                num_cpus=cpus or os.cpu_count() or 1,
                include_dashboard=dashboard,
                dashboard_host="127.0.0.1",
                _node_ip_address="127.0.0.1",
                **quiet,  # type: ignore[arg-type]
            )
    except (ConnectionError, ValueError, RuntimeError) as exc:
        where = f"the Ray cluster at {cluster}" if cluster else "a local Ray"
        raise ScaleoutError(
            f"cannot start or reach {where} ({exc}); check --cluster / RAY_ADDRESS "
            "(e.g. 127.0.0.1:6379 from `ray start --head`) or leave it out to run locally"
        ) from exc
    try:
        url = context.dashboard_url
        yield Engine(
            address=cluster,
            cpus=float(ray.cluster_resources().get("CPU", 0.0)),
            dashboard_url=f"http://{url}" if url and not url.startswith("http") else url or None,
        )
    finally:
        ray.shutdown()


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _reachable(address: str, timeout: float = 10.0) -> str:
    """The host of a `HOST:PORT` Ray address that accepts connections, else a one-line error
    (Ray itself would retry for minutes)."""
    import socket

    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ScaleoutError(
            f"--cluster {address!r} is not HOST:PORT; give the head's address, e.g. 127.0.0.1:6379"
        )
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise ScaleoutError(
            f"no Ray head answers at {address} ({exc.strerror or exc}); start one with "
            "`ray start --head --node-ip-address 127.0.0.1` or fix --cluster / RAY_ADDRESS"
        ) from exc
    return host.strip("[]")


def cpus_per_run(engine: Engine, runs: int) -> float:
    """CPUs each of `runs` parallel trainings asks for: one core each up to the cluster's size,
    two on a machine that has cores to spare, so 2 cores run two runs side by side."""
    if engine.cpus <= 0:
        return 1.0
    return max(1.0, min(2.0, engine.cpus / max(runs, 1)))
