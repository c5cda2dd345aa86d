"""Before any work starts on a cluster: a small task on each worker node says whether the work
can run there.

It checks, from where the folds and trials will run, that the tracking server answers at the
URI the driver will hand the workers, that the account they log with may write runs (it
creates one, then deletes it where the account may, else ends it KILLED), and that the
worker's Python, Ray and captchaops are the driver's.
A set-up that would fail every fold (the tracking server on the driver's 127.0.0.1, a reader
account, another image) ends the command in one line naming the fix, within seconds.

The check ships by value (`cloudpickle.register_pickle_by_value`), so it runs and reports
versions even on a worker whose captchaops differs or is missing: what it runs there imports
its own third-party modules, inside the check, so a missing one is reported, not a task that
cannot be unpickled. Ray itself loads only when the check runs: the refusals and messages
here run before a cluster is joined, in `train` too, which must not pay for Ray.
"""

from __future__ import annotations

import contextlib
import os
import platform
import socket
import sys
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import captchaops
from captchaops.scaleout import ScaleoutError

# The cluster's answer, at most: a worker process start and two short HTTP calls take seconds
# (a set-up that cannot work fails fast inside them); this bound is for a cluster that cannot
# start a task at all, and leaves room for a busy one.
SECONDS = 60.0
HTTP_SECONDS = 5.0


def versions() -> dict[str, str]:
    """Python, Ray and captchaops versions of this process."""
    import ray  # here, not at the top: Ray loads with the check (see the module's docstring)

    return {
        "python": ".".join(map(str, sys.version_info[:3])),
        "ray": ray.__version__,
        "captchaops": captchaops.__version__,
    }


def probe(tracking_uri: str, experiment_id: str) -> dict[str, str]:
    """Runs on a worker: its versions, its address, and why it cannot log runs (if it cannot)."""
    found = {"python": ".".join(map(str, sys.version_info[:3])), "host": platform.node()}
    for name in ("ray", "captchaops"):
        try:
            found[name] = __import__(name).__version__
        except ImportError:
            found[name] = "not installed"
    try:
        import ray  # here, not at the top: runs on a worker of any image (shipped by value)

        found["node"] = ray.util.get_node_ip_address()
    except Exception:  # informative only
        found["node"] = "?"
    # One try each, a few seconds each: this check must answer fast, not retry for minutes.
    saved = {
        k: os.environ.get(k)
        for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")
    }
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(int(HTTP_SECONDS))
    try:
        found |= _write_check(tracking_uri, experiment_id)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return found


def _write_check(tracking_uri: str, experiment_id: str) -> dict[str, str]:
    """Whether this process reaches `tracking_uri` and may create a run there. The run is then
    deleted where the account may (MLflow lets only MANAGE delete runs), else ended KILLED,
    named "cluster check": an editor's check leaves that one run behind."""
    import httpx  # here, not at the top: runs on a worker of any image (shipped by value)

    base = tracking_uri.rstrip("/")
    try:
        httpx.get(f"{base}/health", timeout=HTTP_SECONDS)
    except httpx.HTTPError as exc:
        return {"unreachable": f"{type(exc).__name__}: {exc}"}
    try:
        # here, not at the top: runs on a worker of any image (shipped by value), where a
        # missing MLflow is reported as the worker's answer
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri, tracking_uri)
        run = client.create_run(
            experiment_id, run_name="cluster check", tags={"captchaops.kind": "preflight"}
        )
    except MlflowException as exc:
        return {"refused": str(exc.error_code), "refused_detail": str(exc.message)[:200]}
    except Exception as exc:  # reported as one line
        return {"unreachable": f"{type(exc).__name__}: {str(exc)[:200]}"}
    try:  # the account may write runs: the check passed, whatever becomes of its own run
        client.delete_run(run.info.run_id)
    except MlflowException:  # an editor's: EDIT creates runs, only MANAGE deletes them
        with contextlib.suppress(MlflowException):
            client.set_terminated(run.info.run_id, "KILLED")
    return {}


def check_cluster(tracking_uri: str, experiment_id: str, cluster: str) -> dict[str, str]:
    """Run `probe` on each worker node of the connected cluster at once (the nodes with CPUs
    other than the driver's, or any node where there is none); raise a one-line ScaleoutError
    naming the fix if the work cannot run on one of them. Returns what the first reported,
    with `nodes`: every checked node's address."""
    # here, not at the top: Ray loads with the check (see the module's docstring)
    import ray
    from ray import cloudpickle
    from ray.exceptions import GetTimeoutError, RayError
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        task = ray.remote(probe)
        once = {"num_cpus": 0, "max_retries": 0}
        refs = [
            task.options(
                **once, scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=True)
            ).remote(tracking_uri, experiment_id)
            for node in _worker_nodes()
        ] or [task.options(**once).remote(tracking_uri, experiment_id)]
        try:
            reports: list[dict[str, str]] = ray.get(refs, timeout=SECONDS)
        except GetTimeoutError:
            for ref in refs:
                ray.cancel(ref, force=True)
            raise ScaleoutError(
                f"no worker of the Ray cluster at {cluster} ran a check task in {SECONDS:.0f} s; "
                "make sure it has live worker nodes (`ray status` on the head)"
            ) from None
        except RayError as exc:
            first = (str(exc).strip().splitlines() or [""])[-1][:200]
            raise ScaleoutError(
                f"the Ray cluster at {cluster} could not run captchaops's check task ({first}); "
                f"its workers need the driver's versions ({described(versions())})"
            ) from None
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    mine = versions()
    for found in reports:
        problem = judge(found, mine, tracking_uri)
        if problem is not None:
            raise ScaleoutError(problem)
    return reports[0] | {"nodes": ",".join(sorted({r.get("node", "?") for r in reports}))}


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def refuse_loopback(tracking_uri: str, cluster: str) -> None:
    """Before joining `cluster`: a one-line ScaleoutError when `tracking_uri` is this machine's
    loopback and the cluster certainly runs its work elsewhere (Ray Client to a head that is
    not this machine, Ray on Vertex AI). A head joined by its GCS address makes this machine a
    node that may run work itself, so that case is left to the workers' check (`check_cluster`),
    which takes a Ray connection and a worker's start: seconds more, and tens on a busy head."""
    host = urlsplit(tracking_uri).hostname
    if host not in LOOPBACK:
        return
    if cluster.startswith("ray://"):
        head = urlsplit(cluster).hostname or ""
        if _this_machine(head):
            return
    elif not cluster.startswith("vertex_ray://"):
        return
    raise ScaleoutError(
        f"the tracking server at {without_credentials(tracking_uri)} is this machine's "
        f"loopback, which the Ray cluster at {cluster} cannot reach; set CAPTCHAOPS_TRACKING_URI "
        "to an address its workers reach (a routable host or the team's HTTPS URL)"
    )


def _this_machine(host: str) -> bool:
    """Whether `host` names an address of this machine (one a socket can bind to); a name
    that does not resolve counts as this machine, since nothing is certain about it."""
    if host in LOOPBACK:
        return True
    try:
        found = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError:
        return True
    for family, _, _, _, address in found:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((address[0], 0))
            except OSError:
                continue
            return True
    return False


def _worker_nodes() -> list[str]:
    """The live nodes with CPUs other than the driver's, or all live nodes with CPUs."""
    import ray  # here, not at the top: Ray loads with the check (see the module's docstring)

    here = ray.get_runtime_context().get_node_id()
    nodes = [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0]
    others = [n for n in nodes if n["NodeID"] != here]
    return [str(n["NodeID"]) for n in others or nodes]


def judge(found: dict[str, str], mine: dict[str, str], tracking_uri: str) -> str | None:
    """The one line that says why work cannot run on the worker that reported `found` (None
    when it can): versions first (a different image breaks everything), then the tracking
    server, then the account."""
    where = f"the worker at {found.get('node', '?')}"
    differ = [k for k in ("ray", "captchaops") if found.get(k) != mine[k]]
    if _minor(found.get("python", "")) != _minor(mine["python"]):
        differ.append("python")  # Ray's own rule: the same Python 3.X on driver and workers
    if differ:
        return (
            f"{where} runs {described(found)} but this machine runs {described(mine)}; "
            "run the command with the cluster's versions, or rebuild the cluster's image from "
            "this checkout (deploy/Dockerfile.train)"
        )
    shown = without_credentials(tracking_uri)
    if "unreachable" in found:
        host = urlsplit(tracking_uri).hostname or ""
        hint = (
            f"{host} is the worker's own loopback there, not this machine; "
            if host in ("127.0.0.1", "localhost", "::1")
            else ""
        )
        return (
            f"{where} cannot reach the tracking server at {shown} ({found['unreachable'][:120]}); "
            f"{hint}set CAPTCHAOPS_TRACKING_URI to an address the cluster's workers reach "
            "(a routable host or the team's HTTPS URL)"
        )
    if "refused" in found:
        code = found["refused"]
        if code in ("UNAUTHENTICATED", "PERMISSION_DENIED") or "401" in code or "403" in code:
            return (
                f"the tracking server at {shown} refused to let {where} write runs ({code}); "
                "the account the work logs with needs edit rights on the experiment: log in "
                "as an editor (CAPTCHAOPS_TRACKING_USERNAME/PASSWORD) or ask an admin for them"
            )
        return (
            f"the tracking server at {shown} refused a run from {where} "
            f"({code}: {found.get('refused_detail', '')[:120]}); check the server's log"
        )
    return None


def _minor(version: str) -> str:
    return ".".join(version.split(".")[:2])


def described(found: dict[str, str]) -> str:
    """`Python X, Ray Y, captchaops Z`."""
    return ", ".join(
        f"{label} {found.get(k, '?')}"
        for k, label in (("python", "Python"), ("ray", "Ray"), ("captchaops", "captchaops"))
    )


def without_credentials(uri: str) -> str:
    """`uri` without a user:password@ part (for messages)."""
    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def as_tags(found: dict[str, Any]) -> dict[str, str]:
    """What the check found, as parent-run tags (`cluster.*`)."""
    return {f"captchaops.cluster.{k}": str(v)[:250] for k, v in found.items()}
