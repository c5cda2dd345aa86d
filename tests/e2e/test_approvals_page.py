"""The web app's approvals page in real headless Chromium, in team mode (issue 37): `captchaops app`
and `captchaops promotions serve` as processes on a real basic-auth tracking server with editors
ed and alice and reader rita. ed asks for a production move through the service, with markup in
its reason; the page lists it as text; rita's and ed's own approvals get the service's refusal as
a line; alice's approval makes the signed move. Without a service URL the page says so."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from mlflow import MlflowClient

from captchaops import mlflow_scope
from captchaops.evaluation.evalset import create_evalset
from captchaops.registry.aliases import adopt_aliases, alias_version, assign_alias
from captchaops.registry.requests import pending_requests
from captchaops.settings import load_settings
from captchaops.team_accounts import add_user
from captchaops.webapp.app import create_app
from harness.processes import VENV_BIN, start_http_process
from tests.e2e.test_browser import browser
from tests.fixtures.models import TrainedModel
from tests.fixtures.stack import Tracking, basic_auth_tracking, free_port, stop_process
from tests.integration.test_approvals import _cheap_password_checks, _copy_tiny_model
from tests.integration.test_promotion_service import start_service

pytestmark = [pytest.mark.slow, pytest.mark.browser]
__all__ = ["browser"]
NAME = "text-captcha"
PASSWORDS = {
    "admin": "admin-password-for-tests",
    "ed": "ed-password-for-tests",
    "alice": "alice-password-for-tests",
}
MARKUP = "<script>document.title='owned'</script><b>bold</b> new fonts"


@dataclass
class Stack:
    uri: str
    app: str
    service: str
    passwords: dict[str, str]
    versions: list[str]

    def client(self, user: str = "admin") -> MlflowClient:
        settings = load_settings(
            tracking_uri=self.uri, tracking_username=user, tracking_password=self.passwords[user]
        )
        return mlflow_scope.client(settings)

    def production(self) -> str | None:
        return alias_version(self.client(), NAME, "production")


@pytest.fixture(scope="module")
def stack(
    tracking_server: Tracking, tiny_model: TrainedModel, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """A basic-auth tracking server, two versions (@production at the first, signed with the
    service's key), a 20-image frozen set, the promotion service (approval on, as team mode's
    default) and the web app in team mode pointing at it."""
    home = tmp_path_factory.mktemp("approvals-page")
    procs: list[subprocess.Popen] = []
    with basic_auth_tracking(home, PASSWORDS["admin"]) as admin:
        uri = admin.tracking_uri
        assert uri is not None
        try:
            add_user(admin, "ed", "editor", PASSWORDS["ed"])
            add_user(admin, "alice", "editor", PASSWORDS["alice"])
            reader = add_user(admin, "rita", "reader")
            assert reader.password
            passwords = PASSWORDS | {"rita": reader.password}
            _cheap_password_checks(home / "basic_auth.db", passwords)
            keys = home / "service" / "keys"
            ed_settings = load_settings(
                home=home / "service", tracking_uri=uri, tracking_username="ed",
                tracking_password=passwords["ed"], signing_key_dir=keys,
            )  # fmt: skip
            ed = mlflow_scope.client(ed_settings)
            versions = _copy_tiny_model(tracking_server.uri, tiny_model, ed, home / "model", 2)
            create_evalset(ed, ed_settings, size=20)
            assign_alias(ed, NAME, "production", versions[0], reason="first", actor="ed")
            adopt_aliases(ed, NAME, actor="ed", key_dir=keys)
            service, proc = start_service(
                home / "service", uri, CAPTCHAOPS_AUTH="true",
                CAPTCHAOPS_TRACKING_USERNAME="admin",
                CAPTCHAOPS_TRACKING_PASSWORD=PASSWORDS["admin"],
            )  # fmt: skip
            procs.append(proc)
            closed = f"http://127.0.0.1:{free_port()}"
            port = free_port()
            env = {
                **os.environ,
                "CAPTCHAOPS_HOME": str(home / "app"),
                "CAPTCHAOPS_TRACKING_URI": uri,
                "CAPTCHAOPS_AUTH": "true",
                "CAPTCHAOPS_TRACKING_USERNAME": "admin",
                "CAPTCHAOPS_TRACKING_PASSWORD": PASSWORDS["admin"],
                "CAPTCHAOPS_MODEL_NAME": NAME,
                "CAPTCHAOPS_PROMOTIONS_URL": service,
                "CAPTCHAOPS_PRODUCTION_URL": closed,
                "CAPTCHAOPS_STAGING_URL": closed,
            }
            env.pop("MLFLOW_TRACKING_URI", None)
            app = f"http://127.0.0.1:{port}"
            cmd = [str(VENV_BIN / "captchaops"), "app", "--port", str(port)]
            procs.append(
                start_http_process(cmd, f"{app}/healthz", env=env, log=home / "app.log", timeout=60)
            )
            yield Stack(uri, app, service, passwords, versions)
        finally:
            for proc in reversed(procs):
                stop_process(proc)


def test_approvers_see_requests_as_text_and_the_service_decides(
    browser: object, stack: Stack
) -> None:
    from playwright.sync_api import Browser, Page, expect

    assert isinstance(browser, Browser)
    first, second = stack.versions
    asked = httpx.post(
        f"{stack.service}/promote",
        json={"model": NAME, "version": second, "reason": MARKUP},
        auth=("ed", stack.passwords["ed"]),
        timeout=120,
    )
    assert asked.status_code == 200 and asked.json()["result"] == "waiting", asked.text
    short = asked.json()["request"]["short_id"]

    def page_as(user: str) -> Page:
        context = browser.new_context(
            http_credentials={"username": user, "password": stack.passwords[user]}
        )
        page = context.new_page()
        page.goto(f"{stack.app}/approvals")
        return page

    def approve(page: Page) -> None:
        page.locator(f'[data-scheme="{NAME}"] [data-request="{short}"] button').click()

    rita = page_as("rita")
    request = rita.locator(f'[data-scheme="{NAME}"] [data-request="{short}"]')
    expect(request.locator(".line")).to_contain_text(
        f"{short} @production v{first} -> v{second} (manual) requested by ed at"
    )
    expect(request.locator(".line")).to_contain_text(MARKUP)  # the markup is text, not elements
    assert rita.locator("main script, main b").count() == 0
    assert rita.title() == "captchaops · approvals"
    expect(rita.locator("#signed-in")).to_have_text("Signed in as rita.")

    approve(rita)
    expect(rita.locator("#error")).to_contain_text(f"user 'rita' may not approve {NAME}")
    ed = page_as("ed")
    approve(ed)
    expect(ed.locator("#error")).to_have_text(
        f"ed requested {short}; another account must approve it (ask someone else to run "
        f"`captchaops approve {short}`)"
    )
    assert stack.production() == first

    alice = page_as("alice")
    approve(alice)
    expect(alice.locator('[role="status"]')).to_contain_text(
        f"Approved {short}: @production v{first} -> v{second} (promoted) by ed, approved by "
        "alice at"
    )
    expect(alice.locator(f'[data-scheme="{NAME}"] .none-waiting')).to_be_visible()
    assert stack.production() == second
    assert pending_requests(stack.client(), NAME) == []


def test_the_raw_page_escapes_markup_and_forms_need_their_token(stack: Stack) -> None:
    first, second = stack.versions
    other = first if stack.production() == second else second
    asked = httpx.post(
        f"{stack.service}/promote",
        json={"model": NAME, "version": other, "reason": MARKUP},
        auth=("ed", stack.passwords["ed"]),
        timeout=120,
    )
    assert asked.status_code == 200 and asked.json()["result"] == "waiting", asked.text
    short = asked.json()["request"]["short_id"]
    alice = ("alice", stack.passwords["alice"])
    page = httpx.get(f"{stack.app}/approvals", auth=alice, timeout=60)
    assert page.status_code == 200
    assert "&lt;script&gt;document.title=" in page.text and "<script>" not in page.text
    forged = httpx.post(
        f"{stack.app}/approvals/approve",
        data={"model": NAME, "request": short},
        auth=alice,
        timeout=60,
    )
    assert forged.status_code == 400 and "The form expired" in forged.text
    assert short in [r.short_id for r in pending_requests(stack.client(), NAME)]


def test_without_a_service_url_the_page_says_so_in_one_line(tmp_path: Path) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    settings = load_settings(
        home=tmp_path, tracking_uri=closed, production_url=closed, staging_url=closed
    )
    page = create_app(settings.model_copy(update={"promotions_url": None}), timeout=1.0)
    answer = page.test_client().get("/approvals")
    assert answer.status_code == 200
    assert (
        "The promotion service is not configured: set <code>CAPTCHAOPS_PROMOTIONS_URL</code>"
        in (answer.text)
    )


def test_local_mode_lists_and_points_at_the_command(tmp_path: Path) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    settings = load_settings(
        home=tmp_path, tracking_uri=closed, production_url=closed, staging_url=closed
    )
    app = create_app(settings.model_copy(update={"promotions_url": closed}), timeout=1.0)
    with app.test_client() as client:
        page = client.get("/approvals")
        assert page.status_code == 200
        assert 'id="local-mode"' in page.text and "<form" not in page.text.split("<footer>")[0]
        assert "The promotion service does not answer (ConnectError); start it with" in page.text
        token = re.search(r'name="csrf_token" value="([^"]+)"', client.get("/").text)
        assert token is not None
        done = client.post(
            "/approvals/approve",
            data={"csrf_token": token[1], "model": NAME, "request": "5a65386a"},
        )
    assert done.status_code == 403
    assert (
        "Approving here needs team mode (each approver&#39;s own tracking-server login); run "
        f"`captchaops approve 5a65386a --model-name {NAME}` instead." in done.text
    )
