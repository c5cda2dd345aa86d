"""How many corrections the app takes: per client a minute and a day, and from everyone a day.

Counts live in the app's memory (one process under waitress): a restart resets them. A client is
the address the request came from (`client_address`), or, from a proxy in `trusted_proxies`, the
client it forwards in X-Forwarded-For."""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable

from flask import Request

from captchaops.service_auth import forwarded_client, trusted_networks
from captchaops.settings import Settings
from captchaops.webapp.inputs import BadInput

MINUTE = 60.0
DAY = 86_400.0


def client_address(request: Request, settings: Settings) -> str:
    """The client a request counts as for limits: its peer's address, or the client a trusted
    proxy forwards (the rightmost X-Forwarded-For hop that is not a trusted proxy)."""
    peer = request.remote_addr or "unknown"
    return forwarded_client(
        peer, request.headers.getlist("X-Forwarded-For"), trusted_networks(settings)
    )


class Throttled(BadInput):
    """HTTP 429: over a correction limit; `retry_after` says in how many seconds to retry."""

    def __init__(self, error: str, detail: str, retry_after: float) -> None:
        super().__init__(429, error, detail)
        self.retry_after = max(1, math.ceil(retry_after))


class Limiter:
    """Admits correction attempts: at most `per_minute` per client in any 60 s, `per_day` per
    client and `total_per_day` from all clients together per UTC day."""

    def __init__(
        self,
        per_minute: int,
        per_day: int,
        total_per_day: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.per_minute = per_minute
        self.per_day = per_day
        self.total_per_day = total_per_day
        self._clock = clock
        self._lock = threading.Lock()
        self._day = int(clock() // DAY)
        # Only admitted clients get entries, so both dicts hold at most total_per_day clients
        # (plus those admitted in the last minute of yesterday).
        self._recent: dict[str, deque[float]] = {}
        self._today: dict[str, int] = {}
        self._total = 0

    def admit(self, client: str) -> None:
        """Count one correction attempt from `client`, or raise Throttled (and count nothing)."""
        with self._lock:
            now = self._clock()
            self._roll_over(now)
            recent = self._recent.get(client)
            while recent and recent[0] <= now - MINUTE:
                recent.popleft()
            if recent is not None and len(recent) >= self.per_minute:
                wait = recent[0] + MINUTE - now
                raise Throttled(
                    "rate_limited",
                    f"Too many corrections: at most {self.per_minute} a minute from one client; "
                    f"retry in {math.ceil(wait)} s.",
                    wait,
                )
            until_tomorrow = DAY - now % DAY
            if self._today.get(client, 0) >= self.per_day:
                raise Throttled(
                    "daily_quota",
                    f"This client has sent its {self.per_day} corrections for today (UTC); "
                    "retry tomorrow.",
                    until_tomorrow,
                )
            if self._total >= self.total_per_day:
                raise Throttled(
                    "daily_quota",
                    f"The app has taken its {self.total_per_day} corrections for today (UTC) "
                    "from all visitors; retry tomorrow.",
                    until_tomorrow,
                )
            self._recent.setdefault(client, deque()).append(now)
            self._today[client] = self._today.get(client, 0) + 1
            self._total += 1

    def _roll_over(self, now: float) -> None:
        """A new UTC day: forget the day's counts and the clients quiet for a minute."""
        day = int(now // DAY)
        if day == self._day:
            return
        self._day = day
        self._today = {}
        self._total = 0
        self._recent = {c: q for c, q in self._recent.items() if q and q[-1] > now - MINUTE}
