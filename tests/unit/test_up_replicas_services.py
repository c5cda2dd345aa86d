"""What `up --replicas N` supervises: N loopback replicas per served alias, each relaying
webhooks to the others and trusting the balancer, and HAProxy on the alias's own address."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from captchaops.serving.connections import HEAD_TIMEOUT_S
from captchaops.serving.verdicts import verdicts_dir
from captchaops.settings import load_settings
from captchaops.stack import balancer
from captchaops.stack.control import replicas_conflict
from captchaops.stack.services import VERDICTS, Service, build_services
from captchaops.stack.store import Store
from harness import hosts

STORE = Store(kind="local", destination="/tmp/artifacts")


def services(tmp_path: Path, replicas: int, **overrides: object) -> dict[str, Service]:
    values: dict[str, object] = {"trusted_proxies": None, **overrides}
    settings = load_settings(home=tmp_path, production_port=7100, staging_port=7101, **values)
    built = build_services(settings, STORE, ("production", "staging", "app"), replicas)
    return {svc.name: svc for svc in built}


def test_one_replica_is_the_plain_server_with_no_balancer(tmp_path: Path) -> None:
    built = services(tmp_path, 1)
    assert list(built) == ["production", "staging", "app"]
    assert built["production"].command[1:] == ["serve", "--alias", "production", "--port", "7100"]


def test_replicas_on_loopback_then_the_balancer_on_the_alias_address(tmp_path: Path) -> None:
    built = services(tmp_path, 3, host="0.0.0.0", trusted_proxies="10.0.0.0/8")
    names = list(built)
    assert names[:4] == ["production-1", "production-2", "production-3", "production"]
    assert names[4:] == ["staging-1", "staging-2", "staging-3", "staging", "app"]
    second = built["production-2"]
    assert second.command[1:] == [
        *("serve", "--alias", "production", "--port", "7300", "--host", "127.0.0.1")
    ]
    assert second.env["CAPTCHAOPS_WEBHOOK_PEERS"] == "http://127.0.0.1:7200,http://127.0.0.1:7400"
    assert second.env["CAPTCHAOPS_TRUSTED_PROXIES"] == "10.0.0.0/8,127.0.0.1"
    assert built["staging-1"].port == 7201
    assert "127.0.0.1" in second.env["CAPTCHAOPS_ALLOWED_HOSTS"].split(",")  # all interfaces
    # each its own home (a server sweeps its alias's download folder), sharing secrets and verdicts
    home = tmp_path.resolve()
    assert second.env["CAPTCHAOPS_HOME"] == str(home / "replicas" / "production-2")
    mine = home / "replicas" / "production-2"
    assert second.links == {
        mine / ".env": home / ".env",
        mine / VERDICTS: verdicts_dir(home),
    }
    assert second.folders == (verdicts_dir(home),)

    proxy = built["production"]
    assert Path(proxy.command[0]).name == "haproxy" and proxy.port == 7100
    assert proxy.url == "http://127.0.0.1:7100" and proxy.health_url.endswith("/ping")
    ((path, text),) = proxy.files.items()
    assert path == tmp_path.resolve() / "run" / "balancer-production.cfg"
    assert "    bind :7100\n" in text  # 0.0.0.0: every interface
    servers = [line.split()[1:] for line in text.splitlines() if line.startswith("    server ")]
    replicas = [[f"production-{k}", f"127.0.0.1:7{k + 1}00"] for k in (1, 2, 3)]
    assert servers == replicas * 2  # scoring: those with a version; the rest: those alive
    assert "use_backend production-ready if { path /invocations }" in text
    assert "    bind 127.0.0.1:7100\n" in services(tmp_path, 2)["production"].files[path]


def test_the_balancer_waits_for_a_head_as_long_as_a_replica_would() -> None:
    assert balancer.HEAD_TIMEOUT_S == HEAD_TIMEOUT_S


def test_haproxy_accepts_the_balancer_config(tmp_path: Path) -> None:
    if shutil.which("haproxy") is None:  # CI installs it (.ci/run) and must not skip
        assert not hosts.required(), "no haproxy on PATH: apt-get install haproxy"
        pytest.skip("no haproxy on PATH (apt-get install haproxy)")
    for bind in ("127.0.0.1", "0.0.0.0", "::"):
        config = tmp_path / "haproxy.cfg"
        config.write_text(
            balancer.config("production", bind, 7100, ["127.0.0.1:7200"], "127.0.0.1")
        )
        done = subprocess.run(
            ["haproxy", "-c", "-f", str(config)], capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0 and "WARNING" not in done.stdout + done.stderr, (
            bind,
            done.stderr,
        )


def test_the_balancer_listens_where_the_stack_binds() -> None:
    def bind_line(bind: str) -> str:
        config = balancer.config("production", bind, 7100, ["127.0.0.1:7200"], "127.0.0.1")
        return next(line.strip() for line in config.splitlines() if "bind " in line)

    assert bind_line("127.0.0.1") == "bind 127.0.0.1:7100"
    assert bind_line("0.0.0.0") == "bind :7100"
    assert bind_line("::") == "bind :::7100 v4v6"  # IPv6 and IPv4, as the servers' "::" does


def test_a_changed_replica_count_is_refused_only_while_aliases_are_served() -> None:
    core = {"tracking": {}, "artifacts": {}}
    assert replicas_conflict(core, 2) is None  # `up --core` first: nothing served yet
    plain = core | {"production": {}, "staging": {}}
    assert replicas_conflict(plain, 2) == 1
    assert replicas_conflict(plain, 1) is None
    two = core | {f"{alias}-{k}": {} for alias in ("production", "staging") for k in (1, 2)}
    assert replicas_conflict(two, 3) == 2
    assert replicas_conflict(two, 2) is None
