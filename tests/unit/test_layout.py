"""docs/layout.md names every module of the package, and every module it names exists."""

from __future__ import annotations

import re
from pathlib import Path

import captchaops

ROOT = Path(captchaops.__file__).parent
LAYOUT = ROOT.parents[1] / "docs" / "layout.md"


def described(text: str) -> set[str]:
    """The module paths in the first column of the layout's tables."""
    return set(re.findall(r"^\| `([\w/]+\.py)` \|", text, flags=re.M))


def test_the_layout_describes_exactly_the_tree() -> None:
    tree = {str(p.relative_to(ROOT)) for p in ROOT.rglob("*.py")}
    documented = described(LAYOUT.read_text())
    assert len(tree) > 50
    assert sorted(tree - documented) == [], "modules docs/layout.md does not describe"
    assert sorted(documented - tree) == [], "modules docs/layout.md names that do not exist"


def test_every_module_says_what_it_is_for() -> None:
    empty = [
        str(p.relative_to(ROOT))
        for p in ROOT.rglob("*.py")
        if not re.match(r'\s*"""\S', p.read_text())
    ]
    assert empty == []


def test_no_two_modules_share_a_name_across_packages() -> None:
    """Same-named modules doing different jobs send a newcomer to the wrong file; the app
    factories (`serving/app.py`, `webapp/app.py`) and package files are the exceptions."""
    seen: dict[str, list[str]] = {}
    for path in ROOT.rglob("*.py"):
        seen.setdefault(path.name, []).append(str(path.relative_to(ROOT)))
    shared = {
        name: sorted(paths)
        for name, paths in seen.items()
        if len(paths) > 1 and name not in ("__init__.py", "app.py")
    }
    assert shared == {}


def test_the_scan_reads_table_rows_only() -> None:
    text = "| `a/b.py` | x |\n| `c.py` | y |\nsee `d.py` in prose\n"
    assert described(text) == {"a/b.py", "c.py"}
