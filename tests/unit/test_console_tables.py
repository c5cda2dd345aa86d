"""`models` and `status` at 80 columns: short columns, notes and long values on lines of their
own, no cell cut to `…`; a served version the gate never scored says so."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from captchaops.console import print_settings, services_table, version_notes, versions_table
from captchaops.live.reported import NO_CALIBRATION, LiveState
from captchaops.registry.listing import Listing, VersionRow
from captchaops.settings import load_settings
from captchaops.stack.control import ServiceStatus

NOTE = (
    "promoted by the gate: candidate accuracy 0.9312 beats champion 0.9120 by more than the "
    "margin 0.0000, CER 0.0212 within tolerance, p95 latency 3.1 ms within budget 9.6 ms"
)


def listing() -> Listing:
    forced = VersionRow(
        "2",
        ["production", "staging"],
        "Production",
        "validated",
        "2026-12-03 13:40",
        0.93125,
        None,
        None,
        "forced by ed: hotfix",
        calibrated=False,
    )
    scored = VersionRow(
        "1",
        [],
        "Archived",
        "rejected",
        "2026-12-02 09:05",
        0.912,
        0.9120,
        0.0212,
        NOTE,
        calibrated=True,
    )
    live = [LiveState("staging", "text-captcha", "1", 0.615, 200, 0.912, None)]
    return Listing("text-captcha", [forced, scored], {}, live)


def render(width: int, *things: object) -> list[str]:
    console = Console(width=width, record=True, color_system=None)
    for thing in things:
        console.print(thing)
    return console.export_text().splitlines()


def assert_fits(lines: list[str], width: int = 80) -> None:
    assert lines and all(len(line) <= width for line in lines), "\n".join(lines)
    assert not any("…" in line for line in lines), "\n".join(lines)


def test_models_fits_80_columns_with_notes_on_their_own_lines() -> None:
    rows = listing()
    lines = render(80, versions_table(rows, 80), *version_notes(rows))
    assert_fits(lines)
    header = next(line for line in lines if "aliases" in line)
    for column in ("ver", "aliases", "status", "test", "frozen", "CER", "live", "created"):
        assert column in header.split()
    assert "stage" not in header  # wide terminals only
    row = next(line for line in lines if line.strip().startswith("2 "))
    assert "@production" in row and "none" in row and "12-03 13:40" in row
    assert len([line for line in lines if line.strip()]) <= 12
    assert f"v2: {NO_CALIBRATION}" in lines
    text = " ".join(lines)
    assert "beats champion 0.9120" in text and "v1: promoted by the gate" in text


def test_a_wide_terminal_shows_more() -> None:
    rows = listing()
    lines = render(140, versions_table(rows, 140))
    assert_fits(lines, 140)
    assert "stage" in next(line for line in lines if "aliases" in line)
    assert any("2026-12-03 13:40" in line for line in lines)


def test_status_fits_80_columns_with_long_values_on_their_own_lines(tmp_path: Path) -> None:
    services = [
        ServiceStatus("production", 12345, "RUNNING", "http://127.0.0.1:8888", True, 151.2),
        ServiceStatus("tracking", 12001, "RUNNING", "http://127.0.0.1:8000", True, 402.9),
    ]
    settings = load_settings(home=tmp_path / "a-rather-long-home-directory-name" / "deeper")
    console = Console(width=80, record=True, color_system=None)
    console.print(services_table(services))
    print_settings(console, settings.masked())
    served = LiveState("production", "text-captcha", "2", None, 0, None, None)
    console.print(f"live production v2: {served.line()}")
    lines = console.export_text().splitlines()
    assert_fits(lines)
    assert any(line.startswith("    sqlite:///") for line in lines)  # a long value, own line
    assert f"live production v2: {NO_CALIBRATION}" in lines
    header = next(line for line in lines if " pid " in line)
    assert "health" in header and "RSS MB" in header
