"""How much memory a service uses: resident memory of a process tree, for `captchaops status`."""

from __future__ import annotations

from contextlib import suppress

import psutil


def process_tree(pid: int) -> list[psutil.Process]:
    """A process and all its descendants (empty when it is gone)."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def rss_mb(pid: int | None, children: bool = True) -> float:
    """Resident memory of a process and (unless `children` is false) its descendants, in MB;
    0 when it is gone."""
    procs = process_tree(pid) if pid else []
    total = 0
    for proc in procs if children else procs[:1]:
        with suppress(psutil.Error):
            total += proc.memory_info().rss
    return total / 1e6
