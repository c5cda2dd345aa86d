"""The stack an attack runs against, the correction attacks, and what must survive them
(tests/e2e/test_attacks.py, benchmarks/bench_attacks_e2e.py); the request probes are in
harness/attacks.py."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx

from captchaops.data.synthetic import generate_one
from captchaops.settings import Settings
from harness.attacks import (
    JUNK_ANSWERED,
    Outcome,
    Targets,
    answer_of,
    b64,
    captcha,
    csrf_token,
    scoring,
    send,
)
from harness.stack import PrivateStack

# Corrections ----------------------------------------------------------------------------------


def correction(seed: int) -> dict[str, str]:
    """A JSON correction: a generated CAPTCHA with its true label."""
    sample = generate_one(seed)
    return {"image": b64(sample.image), "label": sample.label}


def duplicates(targets: Targets, seed: int) -> Outcome:
    """The same correction twice: 201 then 409."""
    out = Outcome("duplicate correction", "app /api/feedback", frozenset({201, 409, 429}))
    with httpx.Client(timeout=60) as client:
        body = correction(seed)
        out.answers = [
            send(client, "POST", f"{targets.app}/api/feedback", json=body) for _ in range(2)
        ]
    return out


def junk_answered(targets: Targets, seed: int) -> Outcome:
    """The page's correction form with 100,000 junk `answered` entries."""
    sample = generate_one(seed)
    out = Outcome(
        f"answered x {JUNK_ANSWERED:,} junk",
        "app /feedback (form)",
        frozenset({303, 400, 413, 429}),
    )
    with httpx.Client(timeout=120) as client:
        token = csrf_token(client, targets.app)
        form = [("csrf_token", token), ("image", b64(sample.image)), ("label", sample.label)]
        # Short entries, so that 100,000 of them fit the form's size limit and reach the view.
        form += [("answered", f"{i}") for i in range(JUNK_ANSWERED)]
        body = urlencode(form)
        out.answers = [
            send(
                client,
                "POST",
                f"{targets.app}/feedback",
                content=body,
                headers={"Content-Type": "application/x-www-form-urlencoded"},
            )
        ]
    return out


def correction_burst(
    targets: Targets, first_seed: int, count: int = 200
) -> tuple[Outcome, list[str]]:
    """`count` distinct corrections from one client as fast as it can: (the outcome, where each
    accepted one says it was stored)."""
    out = Outcome(
        f"{count} corrections, one client", "app /api/feedback", frozenset({201, 409, 429})
    )
    stored = []
    with httpx.Client(timeout=60) as client:
        for seed in range(first_seed, first_seed + count):
            started = time.monotonic()
            response = client.post(f"{targets.app}/api/feedback", json=correction(seed))
            out.answers.append(answer_of(response, started))
            if response.status_code == 201:
                stored.append(str(response.json()["stored"]))
    return out, stored


def review_from_elsewhere(targets: Targets) -> list[Outcome]:
    """The review queue's API and page, without a token, from a non-loopback address: 403."""
    assert targets.app_remote is not None
    offer = {"image": b64(captcha()), "text": "AB12", "confidence": 0.1}
    out = Outcome("review without token, not loopback", "app /api/review", frozenset({403}))
    page = Outcome("review without token, not loopback", "app /review (page)", frozenset({403}))
    with httpx.Client(timeout=30) as client:
        out.answers = [
            send(client, "POST", f"{targets.app_remote}/api/review", json=offer),
        ]
        page.answers = [send(client, "GET", f"{targets.app_remote}/review")]
    return [out, page]


def foreign_host(targets: Targets) -> list[Outcome]:
    """Requests naming a host the services do not serve (DNS rebinding): 400 from each."""
    rebound = {"Host": "attacker.example"}
    outcomes = []
    with httpx.Client(timeout=30) as client:
        for endpoint, method, url in (
            ("model /reload", "POST", f"{targets.model}/reload"),
            ("model /invocations", "POST", f"{targets.model}/invocations"),
            ("app /api/predict", "POST", f"{targets.app}/api/predict"),
            ("app / (page)", "GET", f"{targets.app}/"),
        ):
            answer = send(client, method, url, headers=rebound, json={"image": b64(captcha())})
            outcomes.append(Outcome("foreign Host header", endpoint, frozenset({400}), [answer]))
    return outcomes


def remote_address() -> str | None:
    """A non-loopback IPv4 address of this machine, or None."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the route
            address = str(s.getsockname()[0])
    except OSError:
        return None
    return None if address.startswith("127.") else address


# The stack and what must survive ----------------------------------------------------------------


@contextmanager
def attacked_stack(home: Path) -> Iterator[tuple[PrivateStack, Targets]]:
    """A whole stack (`captchaops up`) with a tiny model trained, gated to @production and
    @staging, listening on every interface when this machine has a non-loopback address (so
    the review queue's loopback rule can be tried); stopped afterwards."""
    from captchaops.decisions import gate
    from captchaops.training.run import train
    from harness.mlflow_state import mlflow_state_restored
    from harness.training import tiny_config

    remote = remote_address()
    extra = {"CAPTCHAOPS_STAGING_FLOOR": "0"}
    if remote:
        extra["CAPTCHAOPS_HOST"] = "0.0.0.0"
        extra["CAPTCHAOPS_ALLOWED_HOSTS"] = remote  # its services answer to that name
    stack = PrivateStack.create(home, **extra)
    try:
        with mlflow_state_restored():
            stack.up()
            settings = stack.settings()
            version = train(tiny_config(), settings).version
            decision, _ = gate.auto_promote(settings, actor="attacks")
            assert decision.promote, decision.refusals
            stack.wait_version("production", version)
            stack.wait_version("staging", version)
            app_remote = f"http://{remote}:{stack.port('app')}" if remote else None
            yield stack, Targets(stack.url("production"), stack.url("app"), app_remote)
    finally:
        stack.down()


def stored_artifacts(settings: Settings) -> set[str]:
    """The `artifact` tag of every run the tracking server holds (corrections, review items)."""
    from mlflow import MlflowClient

    uri = settings.effective_tracking_uri
    client = MlflowClient(uri, registry_uri=uri)
    ids = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(ids, max_results=5000)
    return {r.data.tags["artifact"] for r in runs if "artifact" in r.data.tags}


def lost(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """What a snapshot taken before holds that one taken after does not (runs may be added)."""
    missing = [f"run {r[0]} ({r[1]})" for r in before["runs"] if r not in after["runs"]]
    for key in ("experiments", "versions", "aliases"):
        if before[key] != after[key]:
            missing.append(f"{key}: {before[key]} became {after[key]}")
    if after["audit"][: len(before["audit"])] != before["audit"]:
        missing.append("the audit trail changed")
    return missing


def still_serving(targets: Targets, version: str) -> list[str]:
    """Why the servers do not answer a normal request correctly (empty when they do)."""
    problems = []
    with httpx.Client(timeout=30) as client:
        model = client.post(f"{targets.model}/invocations", json=scoring(b64(captcha())))
        if model.status_code != 200 or model.headers.get("X-Model-Version") != version:
            problems.append(f"model server: HTTP {model.status_code} {model.text[:200]}")
        app = client.post(f"{targets.app}/api/predict", json={"image": b64(captcha())})
        envs = app.json().get("environments", {}) if app.status_code == 200 else {}
        if not all(envs.get(a, {}).get("available") for a in ("production", "staging")):
            problems.append(f"web app: HTTP {app.status_code} {app.text[:300]}")
        if client.get(f"{targets.app}/").status_code != 200:
            problems.append("web app page is not 200")
    return problems
