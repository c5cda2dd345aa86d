"""What the page and the JSON API both do: predict everywhere, describe models, show the served
scheme, take corrections."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

import httpx

from captchaops import service_auth
from captchaops.data.synthetic import DIGITS_UPPER, generate_one
from captchaops.live import reported as live
from captchaops.settings import Settings
from captchaops.webapp import endpoints
from captchaops.webapp.catalog import Catalog, VersionInfo
from captchaops.webapp.correction_runs import Corrections, Saved
from captchaops.webapp.endpoints import ENVIRONMENTS, Answer, Served
from captchaops.webapp.examples import Example, HeldOutSets, SchemeError
from captchaops.webapp.inputs import BadInput, check_label
from captchaops.webapp.limits import Limiter
from captchaops.webapp.review import ReviewStore
from captchaops.webapp.sampler import ReviewSampler
from captchaops.webapp.tracking_client import Tracking, TrackingError

LIVE_SECONDS = 5.0
"""How long the app reuses what the model servers said about their live estimates."""
SEEN_VERSIONS = 16
"""How many served versions (`name/version` -> alphabet) the app remembers for checking corrections."""


@dataclass(frozen=True)
class Result:
    """One environment's answer joined with what the registry says about the answering version."""

    answer: Answer
    info: VersionInfo | None

    def to_json(self) -> dict[str, object]:
        """The JSON API's view of this answer."""
        a = self.answer
        if not a.available:
            return {"available": False, "error": a.error}
        return {
            "available": True,
            "text": a.text,
            "confidence": a.confidence,
            "latency_ms": round(a.latency_ms or 0.0, 1),
            "model": {
                "name": a.name,
                "alias": a.alias,
                "version": a.version,
                "run_id": self.info.run_id if self.info else None,
                "run_url": self.info.run_url if self.info else None,
                "version_url": self.info.version_url if self.info else None,
            },
        }


class Demo:
    """The web app's view of the platform: two model servers and one tracking server."""

    def __init__(self, settings: Settings, timeout: float | None = None) -> None:
        self.settings = settings
        self.timeout = timeout or settings.model_timeout_seconds
        self.http = httpx.Client(headers=service_auth.bearer_headers(settings))
        self.tracking = Tracking(settings, self.timeout)
        self.catalog = Catalog(self.tracking)
        self.held_out = HeldOutSets(self.tracking)
        self.urls = {alias: settings.server_url(alias) for alias in ENVIRONMENTS}
        self.corrections = Corrections(self.tracking, settings.feedback_experiment)
        self.limiter = Limiter(
            settings.feedback_per_minute,
            settings.feedback_per_day,
            settings.feedback_total_per_day,
        )
        self.review = ReviewStore(self.corrections)
        self.sampler = ReviewSampler(self.review, settings)
        self._seen: OrderedDict[str, str] = OrderedDict()
        self._seen_lock = threading.Lock()
        self._waiting: tuple[float, int | None] | None = None
        self._counting = threading.Lock()
        self._live: tuple[float, dict[str, live.LiveState]] | None = None

    def predict(self, image: bytes) -> list[Result]:
        """Every environment's answer for one checked image."""
        answers = endpoints.predict_all(self.http, self.urls, image, self.timeout)
        results = [Result(a, self._info(a.name, a.version)) for a in answers]
        for r in results:
            self._remember(r.answer.name, r.answer.version, r.info.alphabet if r.info else None)
        return results

    def offer_for_review(self, image: bytes, fmt: str, results: list[Result], source: str) -> None:
        """Offer a visitor's image to the review queue when production (staging when production
        did not answer) read it with less than `review_below_confidence`; never waits on storage."""
        answer = next((r.answer for r in results if r.answer.available), None)
        if answer is None or answer.text is None or not self.sampler.wants(answer.confidence):
            return
        model = self.answered_key(answer.name, answer.version) if answer.version else None
        self.sampler.offer(image, fmt, answer.text, answer.confidence or 0.0, model, source)

    def served(self) -> list[Served]:
        """What every environment serves right now."""
        served = endpoints.describe_all(self.http, self.urls, self.timeout)
        for s in served:
            self._remember(s.name, s.version, s.alphabet)
        return served

    def versions(self, served: list[Served]) -> dict[str, VersionInfo]:
        """Alias -> what the tracking server says about the version it serves (for the report
        links); aliases whose version it cannot describe are absent."""
        found = {s.alias: self._info(s.name, s.version) for s in served if not s.error}
        return {alias: info for alias, info in found.items() if info is not None}

    def live(self) -> dict[str, live.LiveState]:
        """Alias -> the live estimate of the version its server serves now (servers that are
        down or serve an uncalibrated version are absent); asked at most every LIVE_SECONDS."""
        cached = self._live
        if cached is not None and time.monotonic() - cached[0] < LIVE_SECONDS:
            return cached[1]
        states = live.read(self.urls, self.timeout, self.http)
        found = {state.alias: state for state in states}
        self._live = (time.monotonic(), found)
        return found

    def answered_key(self, name: str | None, version: str) -> str:
        """How a page form and the `answered` field name a version: `name/version`."""
        return f"{name or self.settings.model_name}/{version}"

    def generate(self) -> Example:
        """An image of the served scheme (production first) with its true label: a held-out
        example for a folder scheme, a generated one for a synthetic scheme."""
        try:
            serving = self._serving()
        except TrackingError as exc:
            return _drawn(note=f"{exc} Until then Generate draws in the default alphabet.")
        if serving is None:
            return _drawn()
        name, version, alphabet = serving
        model = f"{name} v{version}"
        info = self._info(name, version)
        if info is None:
            note = (
                f"Could not tell which scheme {model} belongs to (the tracking server did not "
                "answer or has no run for it), so this CAPTCHA is generated in its alphabet."
            )
            return _drawn(model, alphabet=alphabet, note=note)
        if info.data_kind != "folder":
            return _drawn(model, info, alphabet)
        try:
            image, label = self.held_out.example(name)
        except SchemeError as exc:
            note = f"No held-out example of {model} to show ({exc}); this one is generated."
            return _drawn(model, info, alphabet, note)
        return Example(image, label, held_out=True, model=model, kind=info.data_kind)

    def admit_correction(self, client: str) -> None:
        """Count a correction attempt from `client` (its address); Throttled (429) when over a limit."""
        self.limiter.admit(client)

    def known_versions(self, answered: Iterable[str]) -> list[str]:
        """The entries of a form's `answered` that name versions this app has seen served; the
        rest are dropped by a dictionary look-up each, so a long list costs no tracking call."""
        kept: list[str] = []
        with self._seen_lock:
            for item in answered:
                if item in self._seen and item not in kept:
                    kept.append(item)
                    if len(kept) == len(ENVIRONMENTS):
                        break
        return kept

    def check_correction(self, label: str | None, answered: list[str]) -> str:
        """The label, if the models that answered (known `name/version` entries) could have
        produced it; without any, the versions served now decide."""
        with self._seen_lock:
            alphabets = [self._seen[a] for a in answered if a in self._seen]
        if not alphabets:
            alphabets = [s.alphabet for s in self.served() if s.alphabet]
        return check_label(label, alphabets)

    def correct(
        self, image: bytes, fmt: str, label: str, answered: list[str], source: str
    ) -> Saved:
        """Store a checked image under its checked label, unless already stored with it."""
        try:
            saved = self.corrections.save(
                image, fmt, label, model_version=",".join(answered) or None, source=source
            )
        except TrackingError as exc:
            raise BadInput(503, "feedback_unavailable", str(exc)) from exc
        if not saved.duplicate:
            self._waiting = None  # count again on the next page, which then shows this one
        return saved

    def forget_waiting(self) -> None:
        """A correction was stored elsewhere (the review page): count again on the next page."""
        self._waiting = None

    def waiting(self) -> int | None:
        """How many corrections wait for the next training run (counted at most once per
        `feedback_count_seconds`); None when nobody can tell."""
        cached = self._waiting
        if self._fresh(cached):
            return cached[1] if cached else None
        # One thread counts; the others show the previous count meanwhile, if there is one.
        if not self._counting.acquire(blocking=cached is None):
            return cached[1] if cached else None
        try:
            cached = self._waiting
            if self._fresh(cached):  # counted by another thread while this one waited
                return cached[1] if cached else None
            try:
                count: int | None = self.corrections.count()
            except TrackingError:
                count = None
            self._waiting = (time.monotonic(), count)
            return count
        finally:
            self._counting.release()

    def _fresh(self, cached: tuple[float, int | None] | None) -> bool:
        ttl = self.settings.feedback_count_seconds
        return cached is not None and time.monotonic() - cached[0] < ttl

    def _remember(self, name: str | None, version: str | None, alphabet: str | None) -> None:
        if not version or not alphabet:
            return
        key = self.answered_key(name, version)
        with self._seen_lock:
            self._seen[key] = alphabet
            self._seen.move_to_end(key)
            while len(self._seen) > SEEN_VERSIONS:
                self._seen.popitem(last=False)

    def _serving(self) -> tuple[str, str, str | None] | None:
        """Name, version and alphabet of what production (else staging) serves: the model
        servers say, else the registry's aliases do; TrackingError when neither can tell."""
        for served in self.served():
            if served.version and not served.error:
                return served.name or self.settings.model_name, served.version, served.alphabet
        aliases = self.catalog.aliases(self.settings.model_name)
        for alias in ENVIRONMENTS:
            if alias in aliases:
                return self.settings.model_name, aliases[alias], None
        return None

    def _info(self, name: str | None, version: str | None) -> VersionInfo | None:
        if not version or version == "none":
            return None
        return self.catalog.version(name or self.settings.model_name, version)


def _drawn(
    model: str | None = None,
    info: VersionInfo | None = None,
    alphabet: str | None = None,
    note: str | None = None,
) -> Example:
    """A generated CAPTCHA in the version's alphabet and label lengths (defaults: 0-9A-Z, 4)."""
    length = (4, 4)
    if info and info.min_length and info.max_length:
        length = (info.min_length, info.max_length)
    sample = generate_one(
        alphabet=alphabet or (info.alphabet if info else None) or DIGITS_UPPER, length=length
    )
    kind = info.data_kind if info else None
    return Example(sample.image, sample.label, held_out=False, model=model, kind=kind, note=note)
