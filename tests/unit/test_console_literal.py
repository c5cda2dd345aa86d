"""Registry text is data: tags, names and notes print as themselves, never as markup, with
control characters escaped; the CLI's own styles still show."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from captchaops.console import literal, live_lines, services_table, version_notes, versions_table
from captchaops.live.reported import LiveState
from captchaops.registry.listing import Listing, VersionRow
from captchaops.stack.control import ServiceStatus

HOSTILE = [
    "[/x]",
    "[bold red]shout[/]",
    "\x1b[2J\x1b[31mcleared",
    "bell\x07 back\x08 cr\r",
    "line\nbreak",
    "\u202eevil",
    "[link=http://attacker.example]click[/link]",
]


def rendered(*things: object, terminal: bool = False) -> str:
    """What a CLI console (markup off, as in cli/base.py) prints for `things`."""
    out = io.StringIO()
    console = Console(
        file=out, width=400, markup=False, force_terminal=terminal, color_system="standard"
    )
    for thing in things:
        console.print(thing)
    return out.getvalue()


@pytest.mark.parametrize("text", HOSTILE)
def test_literal_escapes_controls_and_keeps_brackets(text: str) -> None:
    plain = literal(text).plain
    assert not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in plain)
    assert "\u202e" not in plain
    assert plain.replace("\\x1b", "\x1b").count("[") == text.count("[")


def row(note: str, status: str = "ok") -> VersionRow:
    return VersionRow("3", ["production"], "None", status, "2026-12-03 10:00", 0.9, 0.8, 0.1, note)


@pytest.mark.parametrize("text", HOSTILE)
def test_the_versions_table_prints_any_tag_as_itself(text: str) -> None:
    listing = Listing(f"scheme{text}", [row(text, status=text)], {"production": text})
    output = rendered(versions_table(listing), terminal=True)
    assert "\x1b[2J" not in output and "\x07" not in output and "\u202e" not in output
    shown = literal(text).plain
    assert shown[:20] in output


def test_a_closing_tag_in_a_tag_no_longer_breaks_the_table() -> None:
    listing = Listing("text-captcha", [row("[/x] rejected")], {})
    output = rendered(versions_table(listing), *version_notes(listing))
    assert "v3: [/x] rejected" in output


def test_live_lines_and_services_keep_their_own_styles_only() -> None:
    state = LiveState("production", "[/x]", "7", 0.5, 10, 0.9, "\x1b]0;title\x07")
    output = rendered(*live_lines([state]), terminal=True)
    assert "\x1b[31mALERT" in output  # the CLI's own red
    assert "\\x1b]0;title\\x07" in output and "\x07" not in output
    status = ServiceStatus("app[/x]", 1, "RUNNING", "http://127.0.0.1:8080", True, 70.0)
    output = rendered(services_table([status]), terminal=True)
    assert "app[/x]" in output and "\x1b[32mok" in output
