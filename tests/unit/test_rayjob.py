"""deploy/k8s/rayjob-cv.yaml and the GPU group of deploy/raycluster.yaml, checked offline.

The RayJob runs `captchaops cv` in the cluster (a sweep that outlives the terminal): its
entrypoint must parse as the real `cv` command, read the folder the head mounts, log in with
the tracking Secret, and use the pinned Ray with token auth. KubeRay's CRD schema is not
packaged for any offline validator, so its required fields are checked by name (as
tests/unit/test_raycluster.py does)."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import yaml

from tests.unit.test_raycluster import manifest as raycluster

RAYJOB = Path(__file__).resolve().parents[2] / "deploy" / "k8s" / "rayjob-cv.yaml"


def documents() -> dict[str, dict[str, Any]]:
    """The file's documents by kind."""
    return {doc["kind"]: doc for doc in yaml.safe_load_all(RAYJOB.read_text())}


def job() -> dict[str, Any]:
    return documents()["RayJob"]


def cluster_pods(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [spec["headGroupSpec"]["template"]["spec"]] + [
        group["template"]["spec"] for group in spec["workerGroupSpecs"]
    ]


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def test_it_is_a_rayjob_with_the_fields_kuberay_requires() -> None:
    doc = job()
    assert doc["apiVersion"] == "ray.io/v1" and doc["metadata"]["name"]
    spec = doc["spec"]
    assert spec["entrypoint"] and spec["shutdownAfterJobFinishes"] is True
    assert spec["suspend"] is True  # it runs once the folder is loaded, not before
    cluster = spec["rayClusterSpec"]
    assert isinstance(cluster["headGroupSpec"]["rayStartParams"], dict)
    assert cluster["headGroupSpec"]["serviceType"] == "ClusterIP"  # nothing exposed
    for group in cluster["workerGroupSpecs"]:
        assert group["groupName"] and isinstance(group["rayStartParams"], dict)
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    submitter = spec["submitterPodTemplate"]["spec"]
    for pod in [*cluster_pods(cluster), submitter]:
        [container] = pod["containers"]
        assert container["name"] and container["image"] == "JOB_IMAGE"
        assert container["resources"]["limits"]["memory"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert container["securityContext"]["allowPrivilegeEscalation"] is False


def test_its_ray_is_the_raycluster_ones_and_every_pod_uses_token_auth() -> None:
    spec = job()["spec"]
    assert spec["rayClusterSpec"]["rayVersion"] == raycluster()["spec"]["rayVersion"]
    pods = [*cluster_pods(spec["rayClusterSpec"]), spec["submitterPodTemplate"]["spec"]]
    for pod in pods:
        env = env_of(pod["containers"][0])
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        token = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
        assert token == {"name": "ray-auth-token", "key": "token"}


def test_the_entrypoint_is_the_real_cv_command_on_the_folder_the_head_mounts() -> None:
    from typer.main import get_command

    from captchaops.cli import app

    spec = job()["spec"]
    args = shlex.split(spec["entrypoint"])
    assert args[:2] == ["captchaops", "cv"]
    assert "--cluster" not in args  # the job supervisor's RAY_ADDRESS names the cluster
    group = get_command(app)
    _, cv, _ = group.resolve_command(group.make_context("captchaops", ["cv"]), ["cv"])  # type: ignore[attr-defined]
    params = cv.make_context("cv", args[2:]).params  # parses as the command does, runs nothing
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    [mount] = head["containers"][0]["volumeMounts"]
    [volume] = [v for v in head["volumes"] if v["name"] == mount["name"]]
    claim = documents()["PersistentVolumeClaim"]["metadata"]["name"]
    assert volume["persistentVolumeClaim"]["claimName"] == claim
    assert params["data"] == mount["mountPath"] and mount["readOnly"] is True
    loader = documents()["Pod"]["spec"]
    assert loader["volumes"][0]["persistentVolumeClaim"]["claimName"] == claim
    assert loader["containers"][0]["volumeMounts"][0]["mountPath"] == mount["mountPath"]


def test_the_job_logs_in_with_the_tracking_secret_and_holds_no_credential() -> None:
    spec = job()["spec"]
    for pod in cluster_pods(spec["rayClusterSpec"]):
        env = env_of(pod["containers"][0])
        assert env["CAPTCHAOPS_TRACKING_URI"]["value"] == "TRACKING_URL"
        # `ray job stop` sends Ctrl-C (Ray's default, SIGTERM, would leave the runs RUNNING).
        assert env["RAY_JOB_STOP_SIGNAL"]["value"] == "SIGINT"
        # The settings' account: runs are credited to it, and workers log with it.
        for name, key in (("USERNAME", "username"), ("PASSWORD", "password")):
            ref = env[f"CAPTCHAOPS_TRACKING_{name}"]["valueFrom"]["secretKeyRef"]
            assert ref == {"name": "captchaops-tracking", "key": key}
            assert "value" not in env[f"CAPTCHAOPS_TRACKING_{name}"]


def test_the_raycluster_has_a_gpu_group_that_declares_its_gpus_and_shares_the_secrets() -> None:
    groups = {g["groupName"]: g for g in raycluster()["spec"]["workerGroupSpecs"]}
    gpu = groups["gpu-trainers"]["template"]["spec"]
    [container] = gpu["containers"]
    # KubeRay declares a pod's nvidia.com/gpu limit to Ray as its GPUs: what
    # --gpus-per-trial asks Ray for.
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert any(t["key"] == "nvidia.com/gpu" for t in gpu["tolerations"])
    assert groups["gpu-trainers"]["minReplicas"] == 0  # no idle GPU unless asked for
    cpu = groups["trainers"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in cpu["resources"]["limits"]
    assert env_of(container)["KERAS_BACKEND"]["value"] == "jax"
    shared = {k: v for k, v in env_of(container).items() if k != "KERAS_BACKEND"}
    assert shared == env_of(cpu)
