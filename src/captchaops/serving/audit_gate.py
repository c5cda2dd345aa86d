"""Whether a model server follows an alias move that has no audit record (made around captchaops).

In team mode it does not: it keeps serving the version the alias's last audited move put there
until the move is audited (made again with the CLI) or reverted, and says so in `/health`, its
log and `captchaops_unaudited_alias`. Locally it follows the move and says so the same way.
The audited move writes its record just after the alias, so a move seen without one is checked
again every second for a while before the server settles on the slower timer.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from prometheus_client import Gauge

from captchaops.registry.unaudited import LAST_MOVE, audited_version
from captchaops.tracking_rest import TrackingRest, VersionRef

log = logging.getLogger(__name__)

RECHECK_S = 1.0
PENDING_S = 20.0
"""For this long after an unaudited move is first seen, the alias is checked every RECHECK_S."""


class AuditGate:
    """Judges each answer about an alias against its last audited move."""

    def __init__(
        self, rest: TrackingRest, name: str, alias: str, *, follow: bool, gauge: Gauge
    ) -> None:
        self.rest = rest
        self.name = name
        self.alias = alias
        self.follow = follow
        self.gauge = gauge
        self.unaudited: str | None = None
        """What the alias holds without an audit record ("" when it was deleted), else None."""
        self.audited: str | None = None
        self._since = 0.0
        self._held: VersionRef | None = None

    def judge(self, ref: VersionRef | None) -> VersionRef | None:
        """The answer to act on: `ref`, or in team mode the last audited version instead."""
        _, tags = self.rest.registered_model(self.name)
        audited = audited_version(tags.get(LAST_MOVE + self.alias, ""))
        seen = ref.version if ref is not None else None
        if seen == audited:
            if self.unaudited is not None:
                log.info("@%s v%s is audited now", self.alias, seen)
            self.unaudited, self.audited = None, audited
            self.gauge.set(0)
            return ref
        if self.unaudited != (seen or "") or self.audited != audited:
            self._since = time.monotonic()
            log.warning("%s", self.reason_for(seen or "", audited))
        self.unaudited, self.audited = seen or "", audited
        self.gauge.set(1)
        if self.follow:
            return ref
        if audited is None:
            return None
        if self._held is None or self._held.version != audited:
            self._held = self.rest.version_ref(self.name, audited)
        return self._held

    def pending(self) -> bool:
        """Whether an unaudited move seen in team mode is recent enough to check again soon."""
        recent = time.monotonic() - self._since < PENDING_S
        return self.unaudited is not None and not self.follow and recent

    def reason(self) -> str | None:
        """Why the server serves what it serves, while the alias has an unaudited move."""
        if self.unaudited is None:
            return None
        return self.reason_for(self.unaudited, self.audited)

    def reason_for(self, seen: str, audited: str | None) -> str:
        """One line on an unaudited move of the alias and what the server does about it."""
        moved = f"moved to v{seen}" if seen else "deleted"
        then = f"v{audited}" if audited else "nothing"
        doing = (
            "following it (local mode)"
            if self.follow
            else f"keeping {then} until the move is audited with the CLI or reverted"
        )
        return f"@{self.alias} was {moved} with no audit record (around captchaops): {doing}"

    def describe(self) -> dict[str, Any]:
        """The `/health` fields: the unaudited version (if any) and whether it is followed."""
        return {"unaudited_version": self.unaudited, "follows_unaudited": self.follow}
