"""The web page in real headless Chromium, served by `captchaops app` over real model servers."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from captchaops.data.synthetic import generate_one
from tests.integration.test_webapp import WebappStack, app_url, webapp_stack

pytestmark = [pytest.mark.slow, pytest.mark.browser]
CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
__all__ = ["app_url", "webapp_stack"]


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    """Headless Debian Chromium driven by Playwright."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing; install it with `apt-get install -y chromium`")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        try:
            yield chromium
        finally:
            chromium.close()


def test_visitor_flow_in_chromium(
    browser: object, app_url: str, webapp_stack: WebappStack, tmp_path: Path
) -> None:
    from playwright.sync_api import Browser, expect

    assert isinstance(browser, Browser)
    prod, stag = webapp_stack.versions
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.on("requestfailed", lambda r: problems.append(f"failed: {r.url}"))
    page.on(
        "console",
        lambda m: (
            problems.append(m.text)
            if m.type == "error" and not m.text.startswith("Failed to load resource")
            else None
        ),
    )
    page.on(
        "response",
        lambda r: problems.append(f"{r.status}: {r.url}") if r.status in (404, 500) else None,
    )

    page.goto(app_url)
    expect(page.locator('.env-status[data-env="production"]')).to_contain_text(f"v{prod}")
    expect(page.locator('.env-status[data-env="staging"]')).to_contain_text(f"v{stag}")
    live = page.locator('.env-status[data-env="production"] .live')
    expect(live).to_contain_text(re.compile(r"live estimate (\d+\.\d %|after more answers)"))
    report = page.locator('.env-status[data-env="production"] a.report-link')
    expect(report).to_have_attribute(
        "href",
        re.compile(
            rf"^{re.escape(webapp_stack.tracking_uri)}/#/experiments/\d+/runs/\w+/artifactPath/report$"
        ),
    )
    # The link opens the version's report in the MLflow UI: its files are listed there, and
    # a figure opens in the preview.
    ui = context.new_page()
    ui.goto(str(report.get_attribute("href")))
    for name in ("report.json", "worst_read.png", "reliability.png"):
        expect(ui.get_by_text(name, exact=True).first).to_be_visible(timeout=60_000)
    ui.get_by_text("reliability.png", exact=True).first.click()
    shown = ui.locator("img[src*='reliability'], img[src^='blob:'], img[alt*='reliability']")
    expect(shown.first).to_be_visible(timeout=30_000)
    ARTIFACTS.mkdir(exist_ok=True)
    ui.screenshot(path=str(ARTIFACTS / "report-in-mlflow-ui.png"))
    ui.close()
    background = page.evaluate("getComputedStyle(document.documentElement).backgroundColor")
    assert background == "rgb(245, 246, 248)", "the stylesheet did not load"

    # Upload a PNG file through the form.
    upload = tmp_path / "my captcha.png"
    upload.write_bytes(generate_one(11).image)
    page.set_input_files("#image", str(upload))
    page.click("#predict")
    production = page.locator("#answer-production")
    expect(production.locator(".prediction .text")).to_have_count(1)
    expect(production.locator(".version")).to_have_text(f"v{prod}")
    expect(page.locator("#answer-staging .version")).to_have_text(f"v{stag}")
    expect(production.locator(".confidence")).to_have_text(re.compile(r"\d+\.\d %"))
    expect(production.locator("a", has_text="run in MLflow")).to_have_attribute(
        "href", re.compile(rf"^{re.escape(webapp_stack.tracking_uri)}/#/experiments/\d+/runs/\w+$")
    )

    # Generate a sample with a known label.
    page.click("#generate")
    truth = page.locator("#truth").inner_text()
    assert re.fullmatch(r"[0-9A-Z]{4}", truth)
    expect(page.locator(".answer .prediction")).to_have_count(2)

    # Move the production alias; the next prediction names the new version.
    webapp_stack.move("production", stag)
    try:
        page.set_input_files("#image", str(upload))
        page.click("#predict")
        expect(page.locator("#answer-production .version")).to_have_text(f"v{stag}")
    finally:
        webapp_stack.move("production", prod)

    # Correct the answer; the waiting count rises.
    page.click("#generate")
    truth = page.locator("#truth").inner_text()
    before = int(page.locator("#waiting-count").inner_text())
    page.fill("#label", "bad label!")
    page.click("#send-correction")
    expect(page.locator("#label-error")).to_contain_text("which the model cannot read")
    assert int(page.locator("#waiting-count").inner_text()) == before
    page.fill("#label", truth)
    page.click("#send-correction")
    expect(page.locator(".notice.ok")).to_contain_text(f"saved as '{truth}'")
    expect(page.locator("#waiting-count")).to_have_text(str(before + 1))

    # A non-image named .png is refused with a message, not a crash.
    fake = tmp_path / "fake.png"
    fake.write_bytes(b"this is not an image")
    page.set_input_files("#image", str(fake))
    page.click("#predict")
    expect(page.locator("#error")).to_contain_text("Not a PNG, JPEG, GIF or BMP image")

    page.click("#generate")
    expect(page.locator(".answer .prediction")).to_have_count(2)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "webapp-desktop.png"), full_page=True)
    phone = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True)
    small = phone.new_page()
    small.goto(app_url)
    small.click("#generate")
    expect(small.locator(".answer .prediction")).to_have_count(2)
    width = small.evaluate("document.documentElement.scrollWidth")
    assert width <= 390, f"the page scrolls sideways on a phone ({width}px)"
    small.screenshot(path=str(ARTIFACTS / "webapp-phone.png"), full_page=True)
    phone.close()
    context.close()
    assert not problems, problems
