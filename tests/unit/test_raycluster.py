"""deploy/raycluster.yaml, checked offline: a KubeRay RayCluster of the training image whose
Ray matches the pinned one, token auth on, nothing exposed, credentials from Secrets.

KubeRay's CRD schema is not packaged for any offline validator, so the fields KubeRay
requires are checked here by name."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def manifest() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((DEPLOY / "raycluster.yaml").read_text())
    return loaded


def pods(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = doc["spec"]
    return [spec["headGroupSpec"]["template"]["spec"]] + [
        group["template"]["spec"] for group in spec["workerGroupSpecs"]
    ]


def test_it_is_a_raycluster_with_the_fields_kuberay_requires() -> None:
    doc = manifest()
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayCluster"
    assert doc["metadata"]["name"]
    head = doc["spec"]["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    for group in doc["spec"]["workerGroupSpecs"]:
        assert group["groupName"] and isinstance(group["rayStartParams"], dict)
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    for pod in pods(doc):
        [container] = pod["containers"]
        assert container["name"] and container["image"]
        assert container["resources"]["limits"]["memory"]


def test_its_ray_is_the_pinned_one() -> None:
    project = tomllib.loads((DEPLOY.parent / "pyproject.toml").read_text())["project"]
    [pin] = [d for d in project["optional-dependencies"]["train"] if d.startswith("ray[")]
    low = re.search(r">=([\d.]+)", pin)
    assert low is not None
    assert manifest()["spec"]["rayVersion"].startswith(low[1])


def test_token_auth_is_on_nothing_is_exposed_and_secrets_stay_in_secrets() -> None:
    doc = manifest()
    assert doc["spec"]["headGroupSpec"]["serviceType"] == "ClusterIP"
    for pod in pods(doc):
        assert pod["securityContext"]["runAsNonRoot"] is True
        [container] = pod["containers"]
        env = {e["name"]: e for e in container["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        for secret in ("RAY_AUTH_TOKEN", "MLFLOW_TRACKING_PASSWORD"):
            assert "secretKeyRef" in env[secret]["valueFrom"] and "value" not in env[secret]
        assert container["securityContext"]["allowPrivilegeEscalation"] is False


def probed_clusters() -> dict[str, dict[str, Any]]:
    """The RayCluster spec of each shipped manifest: raycluster.yaml's and the RayJob's."""
    specs = {"raycluster.yaml": manifest()["spec"]}
    for doc in yaml.safe_load_all((DEPLOY / "k8s" / "rayjob-cv.yaml").read_text()):
        if doc and doc.get("kind") == "RayJob":
            specs["k8s/rayjob-cv.yaml"] = doc["spec"]["rayClusterSpec"]
    return specs


def test_every_ray_pod_has_probes_that_need_nothing_in_the_image() -> None:
    """KubeRay adds wget probes to a container that has none, and the images have no wget:
    each Ray container declares its own readiness and liveness probes, TCP checks of the port
    its Ray process listens on (the GCS on the head, the raylet's fixed port on workers)."""
    specs = probed_clusters()
    assert set(specs) == {"raycluster.yaml", "k8s/rayjob-cv.yaml"}
    for name, spec in specs.items():
        groups = [(spec["headGroupSpec"], 6379)] + [
            (group, int(group["rayStartParams"]["node-manager-port"]))
            for group in spec["workerGroupSpecs"]
        ]
        for group, port in groups:
            [container] = group["template"]["spec"]["containers"]
            for kind in ("readinessProbe", "livenessProbe"):
                probe = container.get(kind)
                assert probe is not None, f"{name}: {container['name']} has no {kind}"
                assert "exec" not in probe and "httpGet" not in probe, (name, kind)
                assert probe["tcpSocket"]["port"] == port, (name, container["name"], kind)
