"""The team deployment's hardening, checked in the files themselves: the CD workflow (pinned
actions, per-step secrets, inputs through the environment, a protected environment), the
PostgreSQL roles, SeaweedFS's signing keys and networks, and backups that are encrypted (run
for real with gpg, Docker replaced by a stand-in)."""

from __future__ import annotations

import json
import re
import shutil
import stat
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.unit.test_compose import DEPLOY, deploy_copy

__all__ = ["deploy_copy"]

WORKFLOWS = DEPLOY.parent / ".github" / "workflows"
CD = WORKFLOWS / "continuous-deployment.yml"
NEEDS_TRACKING = ("captchaops train", "captchaops promote", "captchaops models")


def steps() -> list[dict[str, Any]]:
    """The CD job's steps."""
    workflow = yaml.safe_load(CD.read_text())
    job: dict[str, Any] = workflow["jobs"]["train-and-gate"]
    result: list[dict[str, Any]] = job["steps"]
    return result


def test_every_action_is_pinned_to_a_commit() -> None:
    for path in WORKFLOWS.glob("*.y*ml"):
        uses = re.findall(r"uses:\s*(\S+)(.*)", path.read_text())
        assert uses, path
        for ref, comment in uses:
            assert re.fullmatch(r"[\w.-]+/[\w./-]+@[0-9a-f]{40}", ref), f"{path.name}: {ref}"
            assert re.search(r"#\s*v\d", comment), f"{path.name}: {ref} needs its tag as a comment"


def test_inputs_reach_the_shell_only_through_the_environment() -> None:
    for step in steps():
        assert "${{" not in step.get("run", ""), f"{step.get('name')}: expression inside run"
    text = CD.read_text()
    assert "${{ inputs." in text, "the inputs are still used (through env:)"


def test_secrets_only_in_the_steps_that_use_them() -> None:
    workflow = yaml.safe_load(CD.read_text())
    job = workflow["jobs"]["train-and-gate"]
    assert "secrets." not in yaml.safe_dump(workflow.get("env", {}))
    assert "secrets." not in yaml.safe_dump(job.get("env", {}))
    assert job["environment"] == "production"
    assert workflow["permissions"] == {"contents": "read"}
    with_secrets = set()
    for step in steps():
        env = step.get("env", {})
        secret_vars = {k for k, v in env.items() if "secrets." in str(v)}
        assert "secrets." not in yaml.safe_dump({k: v for k, v in step.items() if k != "env"})
        run = step.get("run", "")
        if any(command in run for command in NEEDS_TRACKING):
            assert secret_vars == {
                "CAPTCHAOPS_TRACKING_URI",
                "CAPTCHAOPS_TRACKING_USERNAME",
                "CAPTCHAOPS_TRACKING_PASSWORD",
            }, step["name"]
            with_secrets.add(step["name"])
        elif secret_vars:
            assert secret_vars == {"CAPTCHAOPS_TRACKING_URI"}, step.get("name")
    assert len(with_secrets) == 3
    checkout = next(s for s in steps() if s.get("uses", "").startswith("actions/checkout@"))
    assert checkout["with"]["persist-credentials"] is False


@pytest.mark.parametrize(
    ("epochs", "margin", "ok"),
    [
        ("12", "0.0", True),
        ("3", "-0.05", True),
        ("12; touch pwned", "0.0", False),
        ("12", "$(touch pwned)", False),
        ("", "0.0", False),
    ],
)
def test_the_check_step_refuses_inputs_that_are_not_numbers(
    epochs: str, margin: str, ok: bool, tmp_path: Path
) -> None:
    check = next(s for s in steps() if s.get("name", "").startswith("Check"))
    env = {
        "PATH": "/usr/bin:/bin",
        "CAPTCHAOPS_TRACKING_URI": "https://mlflow.test",
        "EPOCHS": epochs,
        "MARGIN": margin,
    }
    result = subprocess.run(
        ["bash", "-e", "-c", check["run"]], env=env, cwd=tmp_path, capture_output=True, text=True
    )
    assert (result.returncode == 0) == ok, result.stdout
    assert not (tmp_path / "pwned").exists()


def test_postgres_init_makes_mlflow_no_superuser() -> None:
    sql = (DEPLOY / "postgres-init.sql").read_text()
    statements = re.sub(r"--[^\n]*", "", sql)
    assert re.search(r"CREATE ROLE mlflow LOGIN", statements)
    assert not re.search(r"(?<!NO)SUPERUSER", statements)
    for attribute in ("NOSUPERUSER", "NOCREATEDB", "NOCREATEROLE", "NOREPLICATION"):
        assert attribute in statements
    assert "OWNER mlflow" in statements and "/run/secrets/postgres_password" in statements
    postgres = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]["postgres"]
    assert postgres["environment"]["POSTGRES_USER"] == "postgres"
    assert postgres["environment"]["POSTGRES_PASSWORD_FILE"].endswith("superuser_password")
    others = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]
    for name, service in others.items():
        refs = [r if isinstance(r, str) else r["source"] for r in service.get("secrets", [])]
        assert name == "postgres" or "postgres_superuser_password" not in refs, name


def test_seaweedfs_signs_its_internal_requests(deploy_copy: Path) -> None:
    security = tomllib.loads((deploy_copy / "secrets" / "seaweedfs_security.toml").read_text())
    keys = [
        security["jwt"]["signing"]["key"],
        security["jwt"]["filer_signing"]["key"],
        security["jwt"]["filer_signing"]["read"]["key"],
    ]
    assert len(set(keys)) == 3 and all(re.fullmatch(r"[0-9a-f]{48}", k) for k in keys)
    assert "read" not in security["jwt"]["signing"], "the filer cannot sign volume reads"
    other = deploy_copy.parent / "other"
    shutil.copytree(DEPLOY, other, ignore=shutil.ignore_patterns("secrets", ".env"))
    subprocess.run(["sh", str(other / "make-secrets.sh")], check=True, capture_output=True)
    theirs = (other / "secrets" / "seaweedfs_security.toml").read_text()
    assert not set(keys) & set(re.findall(r"[0-9a-f]{48}", theirs)), "keys are per installation"
    assert "secrets/" in (DEPLOY / ".gitignore").read_text().split()
    spec = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    mounts = {
        r["source"]: r["target"] for r in spec["services"]["seaweedfs"]["secrets"] if "target" in r
    }
    assert mounts["seaweedfs_security"] == "/etc/seaweedfs/security.toml"
    assert spec["secrets"]["seaweedfs_security"]["file"] == "./secrets/seaweedfs_security.toml"


def test_storage_and_database_are_reachable_only_by_who_needs_them() -> None:
    spec = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    assert spec["networks"]["storage"]["internal"] and spec["networks"]["database"]["internal"]
    members = {
        net: {n for n, s in spec["services"].items() if net in s.get("networks", ["default"])}
        for net in ("storage", "database")
    }
    assert members == {
        "storage": {"seaweedfs", "bucket", "tracking"},
        "database": {"postgres", "tracking"},
    }
    assert spec["services"]["app"]["environment"]["CAPTCHAOPS_AUTH"] == "true"


FAKE_DOCKER = r"""#!/bin/sh
# Stand-in for docker: pg_dump prints a dump, rclone writes one object into the mounted folder.
case "$*" in
  *"pg_dump"*)
    [ -z "${FAIL_DUMP:-}" ] || exit 1
    for last; do :; done
    echo "PGDMP plaintext dump of $last" ;;
  *"rclone"*)
    dir=$(printf '%s\n' "$@" | sed -n 's/^\(.*\):\/backup$/\1/p')
    mkdir -p "$dir/mlflow/1"
    echo "model bytes" > "$dir/mlflow/1/model.onnx" ;;
  *) exit 2 ;;
esac
"""


def run_backup(deploy: Path, tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """deploy/backup.sh with Docker replaced and gpg's home in a temporary folder."""
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    (fake / "docker").write_text(FAKE_DOCKER)
    (fake / "docker").chmod(0o755)
    gnupg = tmp_path / "gnupg"
    gnupg.mkdir(mode=0o700, exist_ok=True)
    base = {"PATH": f"{fake}:/usr/bin:/bin", "GNUPGHOME": str(gnupg), "HOME": str(tmp_path)}
    return subprocess.run(
        ["sh", str(deploy / "backup.sh")], env=base | env, capture_output=True, text=True
    )


def decrypt(archive: Path, passphrase: Path, tmp_path: Path) -> subprocess.CompletedProcess[bytes]:
    gnupg = tmp_path / "gnupg"
    cmd = [
        "gpg", "--batch", "--quiet", "--pinentry-mode", "loopback",
        "--passphrase-file", str(passphrase), "--decrypt", str(archive),
    ]  # fmt: skip
    return subprocess.run(
        cmd,
        env={"PATH": "/usr/bin:/bin", "GNUPGHOME": str(gnupg)},
        capture_output=True,
    )


@pytest.mark.skipif(shutil.which("gpg") is None, reason="needs gpg (gnupg)")
def test_backup_is_one_encrypted_file_without_its_passphrase(
    deploy_copy: Path, tmp_path: Path
) -> None:
    (deploy_copy / ".env").write_text("APP_HOST=captcha.test\n")
    result = run_backup(deploy_copy, tmp_path)
    assert result.returncode == 0, result.stderr
    written = list((deploy_copy / "backups").iterdir())
    assert len(written) == 1 and written[0].name.endswith(".tar.gpg"), written
    archive = written[0]
    assert stat.S_IMODE(archive.stat().st_mode) == 0o600
    data = archive.read_bytes()
    secrets = deploy_copy / "secrets"
    for plain in (b"PGDMP", b"model bytes", (secrets / "postgres_password").read_bytes()):
        assert plain not in data
    opened = decrypt(archive, secrets / "backup_passphrase", tmp_path)
    assert opened.returncode == 0, opened.stderr
    (tmp_path / "backup.tar").write_bytes(opened.stdout)
    restore = tmp_path / "restore"
    restore.mkdir()
    subprocess.run(["tar", "-xf", str(tmp_path / "backup.tar"), "-C", str(restore)], check=True)
    assert (restore / "mlflow.dump").read_text() == "PGDMP plaintext dump of mlflow\n"
    assert (restore / "mlflow_auth.dump").read_text() == "PGDMP plaintext dump of mlflow_auth\n"
    assert (restore / "bucket" / "mlflow" / "1" / "model.onnx").read_text() == "model bytes\n"
    assert (restore / ".env").read_text() == "APP_HOST=captcha.test\n"
    kept = {p.name for p in (restore / "secrets").iterdir()}
    assert "backup_passphrase" not in kept
    assert kept == {p.name for p in secrets.iterdir()} - {"backup_passphrase"}
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-passphrase")
    assert decrypt(archive, wrong, tmp_path).returncode != 0


@pytest.mark.skipif(shutil.which("gpg") is None, reason="needs gpg (gnupg)")
def test_a_failed_backup_leaves_nothing_behind(deploy_copy: Path, tmp_path: Path) -> None:
    failed = run_backup(deploy_copy, tmp_path, FAIL_DUMP="1")
    assert failed.returncode != 0
    assert list((deploy_copy / "backups").iterdir()) == []
    (deploy_copy / "secrets" / "backup_passphrase").unlink()
    missing = run_backup(deploy_copy, tmp_path)
    assert missing.returncode != 0 and "make-secrets.sh" in missing.stderr
    assert not any((deploy_copy / "backups").iterdir())


# Observability and Kubernetes files for the model servers, checked offline. No Kubernetes
# schema package is installed here (no kubeconform, no `kubernetes` client), so the manifests'
# required fields are checked by name.

K8S_SERVING = DEPLOY / "k8s" / "serving.yaml"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "captchaops.json"
PROMETHEUS_OWN = frozenset({"up"})
"""Series Prometheus makes itself for every target, not exported by the servers."""
_CLAUSE = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_NAME = re.compile(r"(?<![\w.:$])([a-zA-Z_:][\w:]*)\s*(\()?")
_KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset", "inf", "nan"})


def metric_names(expr: str) -> set[str]:
    """The series a PromQL expression reads: identifiers not called as functions, outside label
    matchers, ranges, strings and grouping clauses."""
    text = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)
    text = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", text)
    text = _CLAUSE.sub(" ", text)
    return {
        name
        for name, call in _NAME.findall(text)
        if not call and name.lower() not in _KEYWORDS and not re.fullmatch(r"\d", name[0])
    }


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> frozenset[str]:
    """Every series name a production and a staging server register (built, never started)."""
    from captchaops.serving import create_app
    from captchaops.settings import Settings

    names: set[str] = set()
    for alias in ("production", "staging"):
        home = tmp_path_factory.mktemp(alias)
        settings = Settings(home=home, tracking_uri="http://127.0.0.1:9")
        registry = create_app(settings, alias).state.metrics.registry
        names.update(registry._names_to_collectors)  # every declared series, sampled or not
        names.update(s.name for family in registry.collect() for s in family.samples)
    return frozenset(names)


def test_metric_names_parse_out_of_promql() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le, alias) (rate(a_bucket{x="y(z)"}[5m]) '
        "* on(instance) group_left(model) b_info)) > 1e-9 and c"
    )
    assert metric_names(expr) == {"a_bucket", "b_info", "c"}


def test_the_servers_export_process_figures_and_their_identity(exported: frozenset[str]) -> None:
    assert {"process_resident_memory_bytes", "process_cpu_seconds_total"} <= exported
    assert {"captchaops_server_info", "captchaops_requests_total"} <= exported


def test_alert_rules_parse_and_name_only_exported_metrics(exported: frozenset[str]) -> None:
    rules = [
        rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]
    ]
    assert len(rules) >= 8
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
        assert rule["alert"] and rule["annotations"]["summary"], rule
        names = metric_names(rule["expr"])
        assert names, rule["alert"]
        assert names <= exported | PROMETHEUS_OWN, (rule["alert"], names - exported)


def test_the_dashboard_queries_only_exported_metrics(exported: frozenset[str]) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    targets = [t for panel in dashboard["panels"] for t in panel["targets"]]
    assert len(dashboard["panels"]) >= 8 and dashboard["uid"]
    covered = set()
    for target in targets:
        names = metric_names(target["expr"])
        assert names and names <= exported, (target["expr"], names - exported)
        covered |= names
    assert {"process_resident_memory_bytes", "process_cpu_seconds_total"} <= covered
    assert "captchaops_server_info" in covered


def serving_manifests() -> dict[tuple[str, str], dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(K8S_SERVING.read_text()) if d]
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


def test_every_manifest_has_the_fields_kubernetes_requires() -> None:
    api = {
        "ConfigMap": "v1",
        "Service": "v1",
        "Deployment": "apps/v1",
        "PodDisruptionBudget": "policy/v1",
    }
    for (kind, name), doc in serving_manifests().items():
        assert doc["apiVersion"] == api[kind], (kind, name)
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name), name
        if kind == "Service":
            assert doc["spec"]["selector"] and all(p["port"] for p in doc["spec"]["ports"])


def test_serving_deployments_probe_over_http_with_limits_and_replicas() -> None:
    manifests = serving_manifests()
    services = {name: doc for (kind, name), doc in manifests.items() if kind == "Service"}
    deployments = {n: d for (kind, n), d in manifests.items() if kind == "Deployment"}
    assert set(deployments) == {"production", "staging"} == set(services)
    assert deployments["production"]["spec"]["replicas"] >= 2
    for name, deployment in deployments.items():
        spec = deployment["spec"]
        template = spec["template"]
        labels = template["metadata"]["labels"]
        assert spec["selector"]["matchLabels"].items() <= labels.items()
        assert services[name]["spec"]["selector"].items() <= labels.items()
        (container,) = template["spec"]["containers"]
        args = container["args"]
        assert args[:4] == ["captchaops", "serve", "--alias", name]
        port = int(args[args.index("--port") + 1])
        assert args[args.index("--host") + 1] == "0.0.0.0"
        assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"http": port}
        probes = {key: container[key] for key in container if key.endswith("Probe")}
        assert probes["readinessProbe"]["httpGet"]["path"] == "/health"
        assert probes["livenessProbe"]["httpGet"]["path"] == "/ping"
        for probe in probes.values():  # the image has no wget or curl: the kubelet asks itself
            assert set(probe) & {"httpGet", "exec", "tcpSocket"} == {"httpGet"}
            assert probe["httpGet"]["port"] == "http"
        limits = container["resources"]["limits"]
        assert limits["memory"] and limits["cpu"] and container["resources"]["requests"]
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert template["spec"]["securityContext"]["runAsNonRoot"] is True
        assert services[name]["spec"]["ports"][0]["targetPort"] == "http"
        # only the promotion key's public half, read-only: what the server checks moves with
        env = {e["name"]: e.get("value") for e in container["env"]}
        mounts = {m["name"]: m for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        assert "CAPTCHAOPS_SIGNING_KEY_DIR" not in env
        key = mounts["promotion-key"]
        assert key["readOnly"] is True
        assert env["CAPTCHAOPS_SIGNING_PUBLIC_KEY"] == f"{key['mountPath']}/moves.pub"
        assert volumes["promotion-key"]["configMap"]["name"] == "captchaops-promotion-key"
