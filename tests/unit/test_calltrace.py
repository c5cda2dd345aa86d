"""The call-path tracer (harness.calltrace) counts climb-backs, and only climb-backs."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

from harness.calltrace import CallTrace, count

A, B, C = ("a.py", "f"), ("b.py", "g"), ("c.py", "h")


def outside() -> int:
    """A function outside the traced files (as MlflowClient.__init__ is)."""
    return 3


def test_count_finds_a_planted_climb_back_and_nothing_else() -> None:
    one_way = count([((), A), ((A,), B), ((A, B), C), ((A, B), ("b.py", "inner"))])
    assert (one_way.stops, len(one_way.crossings), one_way.climbs) == (3, 2, {})

    planted = count([((A, B), ("a.py", "back"))])
    assert planted.lines() == ["b.py:g -> a.py:back (1 calls)"]


def test_trace_sees_a_callback_into_a_file_still_on_the_stack(tmp_path: Path) -> None:
    package = tmp_path / "planted"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "top.py").write_text(
        "from planted import low\n"
        "def back():\n    return 1\n"
        "def down():\n    return low.call(back)\n"
        "def handed_down():\n    return low.call(low.leaf)\n"
    )
    (package / "low.py").write_text("def call(f):\n    return f()\ndef leaf():\n    return 2\n")
    sys.path.insert(0, str(tmp_path))
    try:
        top = importlib.import_module("planted.top")
        trace = CallTrace(package)
        with trace.running():
            top.handed_down()
        assert trace.summary().climbs == {}  # low -> low: inside one file

        trace = CallTrace(package)
        with trace.running():
            top.down()
        assert trace.summary().lines() == ["low.py:call -> top.py:back (1 calls)"]

        low = importlib.import_module("planted.low")
        trace = CallTrace(package, watch=(outside.__code__,))
        with trace.running():
            low.call(outside)
        assert trace.watched == {("low.py", "call"): 1}  # e.g. MlflowClient made here
    finally:
        sys.path.remove(str(tmp_path))
        for name in ("planted", "planted.top", "planted.low"):
            sys.modules.pop(name, None)
