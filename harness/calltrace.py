"""A call trace between captchaops source files: stops and climb-backs of one CLI command.

`CallTrace` records, under `sys.setprofile` (and `threading.setprofile`), every Python call
whose callee is a function in one of the traced files, together with the traced files on the
call stack below it. Module bodies (`<module>`, code run by an import) are not calls: they are
skipped as callees and as callers.

A *climb-back* is a call from file B into file A (A != B) while A is already lower on the
call stack (A -> ... -> B -> A): the path went back up into a file it had left. A callback
defined in a file that is not on the stack (a progress bar handed down by the CLI) is not one.
`count` is the pure counting logic, so a test can plant a climb-back without tracing anything.
"""

from __future__ import annotations

import sys
import threading
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import CodeType, FrameType
from typing import Any

Site = tuple[str, str]
"""(file relative to the traced root, function name)."""


@dataclass
class Summary:
    """What a trace found: files visited, calls between files, and the climb-backs."""

    files: set[str] = field(default_factory=set)
    crossings: Counter[tuple[Site, Site]] = field(default_factory=Counter)
    climbs: Counter[tuple[Site, Site]] = field(default_factory=Counter)

    @property
    def stops(self) -> int:
        """Distinct files the command passed through."""
        return len(self.files)

    def lines(self) -> list[str]:
        """Each distinct climb-back as `caller file:function -> callee file:function (n calls)`."""
        return [
            f"{a[0]}:{a[1]} -> {b[0]}:{b[1]} ({n} calls)"
            for (a, b), n in sorted(self.climbs.items())
        ]


def count(calls: Sequence[tuple[Sequence[Site], Site]]) -> Summary:
    """Count stops, crossings and climb-backs from (traced stack below the call, callee) pairs.

    The stack lists the traced sites below the call, innermost last; its last entry is the
    caller. A call inside one file is neither a crossing nor a climb-back.
    """
    summary = Summary()
    for stack, callee in calls:
        summary.files.add(callee[0])
        if not stack:
            continue
        caller = stack[-1]
        summary.files.add(caller[0])
        if caller[0] == callee[0]:
            continue
        summary.crossings[(caller, callee)] += 1
        if any(site[0] == callee[0] for site in stack[:-1]):
            summary.climbs[(caller, callee)] += 1
    return summary


class CallTrace:
    """Records calls into files under `root` while it is entered (this thread and new ones).

    `watch` names outside functions (their code objects) whose calls made directly from a
    traced file are counted by caller in `watched`, e.g. `MlflowClient.__init__`: clients made.
    """

    def __init__(self, root: Path, watch: tuple[CodeType, ...] = ()) -> None:
        self.root = str(root.resolve()) + "/"
        self.calls: list[tuple[tuple[Site, ...], Site]] = []
        self.watch = watch
        self.watched: Counter[Site] = Counter()
        self._known: dict[Any, Site | None] = {}

    def _site(self, frame: FrameType) -> Site | None:
        code = frame.f_code
        site = self._known.get(code, False)
        if site is False:
            name = code.co_filename
            traced = name.startswith(self.root) and code.co_name != "<module>"
            site = (name[len(self.root) :], code.co_qualname) if traced else None
            self._known[code] = site
        return site  # type: ignore[return-value]

    def _profile(self, frame: FrameType, event: str, arg: object) -> None:
        if event != "call":
            return
        callee = self._site(frame)
        if callee is None:
            if frame.f_code in self.watch and frame.f_back is not None:
                caller = self._site(frame.f_back)
                if caller is not None:
                    self.watched[caller] += 1
            return
        stack: list[Site] = []
        below = frame.f_back
        while below is not None:
            site = self._site(below)
            if site is not None:
                stack.append(site)
            below = below.f_back
        stack.reverse()
        self.calls.append((tuple(stack), callee))

    @contextmanager
    def running(self) -> Iterator[CallTrace]:
        """Trace calls for the duration of a `with` block."""
        sys.setprofile(self._profile)
        threading.setprofile(self._profile)
        try:
            yield self
        finally:
            threading.setprofile(None)  # type: ignore[arg-type]
            sys.setprofile(None)

    def summary(self) -> Summary:
        """The counts of everything recorded so far."""
        return count(self.calls)
