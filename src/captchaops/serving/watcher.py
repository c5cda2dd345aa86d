"""The model an alias points to, kept current by two threads: a poller asks the registry where
the alias points, a loader swaps that version in (`captchaops.serving.loader`). A hung or slow
load never stops polling, and `/health` says when either falls behind.

A verified MLflow webhook (`captchaops.serving.webhook`) makes the poller ask at once; while
webhooks arrive the timer only checks every `webhook_poll_seconds`, as a safety net.

The production server also pre-loads, in a third thread, the version a signed move put on
@staging (the one a promotion is likely to name) when it is not the one it serves: downloaded,
tried (or its kept verdict reused) and warmed up in the background while the served version
answers. It is served only once a signed move of the server's own alias names it with the same
ONNX digest; a promotion to it is then a pointer swap. At most one version is pre-loaded."""

from __future__ import annotations

import dataclasses
import gc
import logging
import threading
import time
from datetime import UTC, datetime
from typing import Any, Self

from captchaops.registry.signing import SignedMove
from captchaops.registry.unaudited import MANAGED_ALIASES
from captchaops.serving.audit_gate import AuditGate
from captchaops.serving.frozen_sample import FrozenSamples, samples_dir
from captchaops.serving.loader import (
    Loaded,
    LoadError,
    ServedModel,
    Timeouts,
    VersionLoader,
    cache_dir_for,
    claim_cache_dir,
)
from captchaops.serving.metrics import SWAP_CAUSES, ServingMetrics
from captchaops.serving.poller import TIMER, AliasPoller, SwapMode, one_line
from captchaops.serving.trial import TrialLimits
from captchaops.serving.verdicts import Verdicts, verdicts_dir
from captchaops.settings import Settings
from captchaops.tracking_rest import TrackingRest, VersionRef

log = logging.getLogger(__name__)

POLL_TIMEOUT_S = 10.0
PRELOADS = {"production": "staging"}
"""Which alias's version a server of an alias pre-loads."""


_LAST_GOOD = VersionRef("", "", "")
"""What the loader is asked for when it should open the last-known-good copy."""


class AliasWatcher:
    """Holds the served model and swaps in whatever version `models:/<name>@<alias>` points to."""

    def __init__(
        self,
        rest: TrackingRest,
        name: str,
        alias: str,
        poll_seconds: float,
        metrics: ServingMetrics,
        loader: VersionLoader,
        retry_failed_seconds: float = 60.0,
        webhook_poll_seconds: float | None = None,
        gate: AuditGate | None = None,
        preloader: VersionLoader | None = None,
        preload_alias: str | None = None,
    ) -> None:
        self.name = name
        self.alias = alias
        self.metrics = metrics
        self.loader = loader
        self.retry_failed_seconds = retry_failed_seconds
        self.current: ServedModel | None = None
        self.target_version: str | None = None
        self.alias_exists: bool | None = None
        self.last_reload_error: str | None = None
        self.failed_version: str | None = None
        self.dropped_version: str | None = None
        self.loading: VersionRef | None = None
        self._failed_at = 0.0
        self.last_swap: dict[str, Any] | None = None
        self._wanted: VersionRef | None = None
        self._wanted_cause = TIMER
        self._wanted_asked = (0.0, 0.0)
        """When the check that asked for `_wanted` began (monotonic) and its registry read's
        seconds."""
        self._tried_last_good = False
        self._logged_failure: str | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self.preloader = preloader if gate is not None and preload_alias else None
        self.preload_alias = preload_alias if self.preloader is not None else None
        self.preloaded: Loaded | None = None
        self.preload_error: str | None = None
        self._preload_want: SignedMove | None = None
        self._preload_failed: tuple[SignedMove, float] | None = None
        """The move whose version failed to pre-load, and until when it is not tried again."""
        self._preloading: str | None = None
        self._preload_idle = threading.Event()
        self._preload_idle.set()
        self._preload_wake = threading.Event()
        self._preload_thread: threading.Thread | None = None
        self.poller = AliasPoller(
            rest, name, alias, poll_seconds, self._on_answer, self._on_failure, gate
        )
        self.swaps = SwapMode(self.poller, poll_seconds, webhook_poll_seconds)
        self.webhook_delivered = self.swaps.delivered

    @classmethod
    def for_settings(
        cls,
        settings: Settings,
        alias: str,
        metrics: ServingMetrics,
        timeouts: Timeouts | None = None,
    ) -> Self:
        """A watcher for `models:/<settings.model_name>@<alias>`, its copy under the home."""
        rest = TrackingRest.for_settings(settings, POLL_TIMEOUT_S)
        cache = claim_cache_dir(cache_dir_for(settings.home_dir, settings.model_name, alias))
        trial = TrialLimits.for_settings(settings)
        verdicts = Verdicts(verdicts_dir(settings.home_dir))
        samples = FrozenSamples(rest, samples_dir(settings.home_dir), trial.max_batch)
        loader = VersionLoader(rest, cache, timeouts or Timeouts(), trial, verdicts, samples)
        preload = PRELOADS.get(alias)
        preloader = None
        if preload is not None:
            preloader = VersionLoader(
                rest,
                cache.with_name(cache.name + ".next"),
                timeouts or Timeouts(),
                trial,
                verdicts,
                samples,
            )
        return cls(
            rest,
            settings.model_name,
            alias,
            settings.poll_seconds,
            metrics,
            loader,
            webhook_poll_seconds=settings.webhook_poll_seconds,
            gate=AuditGate(
                rest,
                settings.model_name,
                alias,
                key_path=settings.effective_signing_public_key,
                gauge=metrics.unaudited,
                state_dir=cache,
            )
            if alias in MANAGED_ALIASES
            else None,
            preloader=preloader,
            preload_alias=preload,
        )

    @property
    def last_poll_at(self) -> str | None:
        """When the registry was last asked."""
        return self.poller.last_poll_at

    @property
    def last_poll_error(self) -> str | None:
        """Why the last question to the registry failed (None when it answered)."""
        return self.poller.last_error

    def start(self) -> None:
        """Start polling and loading in daemon threads."""
        self._thread = threading.Thread(target=self._loop, name=f"load-{self.alias}", daemon=True)
        self._thread.start()
        if self.preloader is not None:
            self._preload_thread = threading.Thread(
                target=self._preload_loop, name=f"preload-{self.preload_alias}", daemon=True
            )
            self._preload_thread.start()
        self.poller.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop both threads; a load in progress is abandoned with its thread."""
        self._stop.set()
        self._wake.set()
        self._preload_wake.set()
        self.poller.stop(timeout)
        for thread in (self._thread, self._preload_thread):
            if thread is not None:
                thread.join(timeout)

    def poll_soon(self, cause: str = "reload") -> None:
        """Check the alias now instead of at the next tick; `cause` names what asked."""
        self.poller.poll_soon(cause)

    def health(self) -> dict[str, Any]:
        """What `/health` answers (besides process facts): a status and the reason for it."""
        served = self.current
        poll_error = self.poller.last_error
        stale = self.poller.stale()
        gate = self.poller.gate
        held = gate.reason() if gate is not None else None
        status = "degraded"
        if served is None:
            status, reason = "no_model", held or self._no_model_reason()
        elif stale:
            reason = f"no answer from the registry for {self.poller.silent_seconds():.0f} s" + (
                f" ({poll_error})" if poll_error else ""
            )
        elif self.last_reload_error:
            reason = f"keeping version {served.version}: {self.last_reload_error}"
        elif held:
            reason = held
        elif poll_error:
            reason = f"cannot check the alias: {poll_error}"
        else:
            status, reason = "ok", None
        return {
            "status": status,
            "reason": reason,
            "model_loaded": served is not None,
            "name": self.name,
            "alias": self.alias,
            "version": served.version if served else None,
            "alias_version": self.target_version,
            "served_from": (
                None
                if served is None
                else "last_known_good"
                if served.last_known_good
                else "registry"
            ),
            "loaded_at": served.loaded_at if served else None,
            "last_poll_at": self.poller.last_poll_at,
            "last_poll_error": poll_error,
            "poll_stale": stale,
            "last_reload_error": self.last_reload_error,
            "failed_version": self.failed_version,
            **(gate.describe() if gate is not None else {}),
            **self.swaps.describe(),
            "last_swap": self.last_swap,
            **self._describe_preload(),
        }

    def _describe_preload(self) -> dict[str, Any]:
        """The `/health` fields on trials and pre-loading."""
        loaders = [self.loader] + ([self.preloader] if self.preloader is not None else [])
        trials = {key: sum(loader.trials[key] for loader in loaders) for key in self.loader.trials}
        if self.preloader is None:
            return {"trials": trials, "preload_alias": None}
        preloaded = self.preloaded
        return {
            "trials": trials,
            "preload_alias": self.preload_alias,
            "preloaded_version": preloaded.ref.version if preloaded else None,
            "preloading_version": self._preloading,
            "preload_error": self.preload_error,
        }

    def _on_answer(self, ref: VersionRef | None, cause: str = TIMER) -> None:
        self._logged_failure = None
        with self._lock:
            self._follow(ref, cause)
            self._plan_preload()

    def _follow(self, ref: VersionRef | None, cause: str) -> None:
        """Act on where the alias points (under the lock)."""
        if cause == TIMER and self.alias_exists is None:
            cause = "startup"
        elif cause == TIMER and self.swaps.mode == "webhooks":
            self._check_missed_webhook(ref)
        if ref is None:
            self._alias_gone()
            return
        self.alias_exists = True
        self.dropped_version = None
        self.target_version = ref.version
        served = self.current
        if served is not None and served.version == ref.version:
            if served.last_known_good:
                self.current = dataclasses.replace(served, last_known_good=False)
            self._clear_failure()
            return
        if self.loading is not None and self.loading.version == ref.version:
            return
        if ref.version == self.failed_version and (
            time.monotonic() - self._failed_at < self.retry_failed_seconds
        ):
            return
        self._want(ref, cause, (self.poller.asked_at, self.poller.read_seconds))

    def _plan_preload(self) -> None:
        """Pre-load what a signed move put on the pre-load alias, unless it is served, pre-loaded
        or being pre-loaded; drop a pre-loaded version the alias no longer names (under the
        lock)."""
        gate = self.poller.gate
        if self.preloader is None or self.preload_alias is None or gate is None:
            return
        move = gate.signed_at(self.preload_alias)
        served = self.current
        pre = self.preloaded
        wanted = None if move is None or (served and served.version == move.version) else move
        if pre is not None and (wanted is None or not _same(pre, wanted)):
            self.preloaded = None
            log.info(
                "dropped pre-loaded version %s: no signed move puts it on @%s now",
                pre.ref.version,
                self.preload_alias,
            )
        if wanted is None or self.preloaded is not None or self._preloading == wanted.version:
            return
        if wanted.version == self.target_version:
            return  # the main loop loads it (or swaps it in, or has refused it)
        failed = self._preload_failed
        if failed is not None and failed[0] == wanted and time.monotonic() < failed[1]:
            return  # tried and failed: again after `retry_failed_seconds`, as a promoted one
        if self._preload_want != wanted:
            self._preload_want = wanted
            self._preload_wake.set()

    def _preload_loop(self) -> None:
        while not self._stop.is_set():
            self._preload_wake.wait()
            self._preload_wake.clear()
            with self._lock:
                move, self._preload_want = self._preload_want, None
                if move is None or self._stop.is_set():
                    continue
                if self.preloaded is not None and not _same(self.preloaded, move):
                    self.preloaded = None  # one pre-loaded version at most, even while loading
                self._preloading = move.version
                self._preload_idle.clear()
            try:
                self._preload(move)
            except Exception:  # a bug while pre-loading must not end it for good
                log.exception("pre-loading version %s failed", move.version)
            finally:
                with self._lock:
                    self._preloading = None
                    self._preload_idle.set()

    def _preload(self, move: SignedMove) -> None:
        """Load the version `move` names with every check, and keep it ready if it is still
        wanted and its network is the one the move names."""
        assert self.preloader is not None and self.poller.gate is not None
        started = time.monotonic()
        try:
            ref = self.poller.gate.ref(move.version)  # kept: the promotion's check asks none
            loaded = self.preloader.load(ref, keep=False)
        except Exception as exc:
            self.preload_error = f"version {move.version}: {type(exc).__name__}: {one_line(exc)}"
            self._preload_failed = (move, time.monotonic() + self.retry_failed_seconds)
            log.warning("cannot pre-load %s", self.preload_error)
            return
        if not _same(loaded, move):
            self.preload_error = (
                f"version {move.version}'s ONNX network is not the one the signed move to "
                f"@{self.preload_alias} names"
            )
            self._preload_failed = (move, time.monotonic() + self.retry_failed_seconds)
            log.warning("not pre-loading: %s", self.preload_error)
            self.preloader.discard()
            return
        with self._lock:
            served = self.current
            if self._stop.is_set() or (served is not None and served.version == move.version):
                return
            if self._preload_want is not None:
                return  # @staging moved on meanwhile: the next pre-load replaces this one
            self.preloaded = loaded
            self.preload_error = None
            self._preload_failed = None
        log.info(
            "pre-loaded version %s (@%s) in %.2f s; a move of @%s to it is a pointer swap",
            move.version,
            self.preload_alias,
            time.monotonic() - started,
            self.alias,
        )

    def _take_preloaded(self, wanted: VersionRef) -> Loaded | None:
        """The pre-loaded copy of `wanted` (waiting for a pre-load of it in progress), handed to
        the main loop (which adopts its files once it serves it); None when there is none."""
        if self.preloader is None:
            return None
        if self._preloading == wanted.version:
            self._preload_idle.wait(self.loader.trial.wall_seconds + self.loader.timeouts.load)
        with self._lock:
            pre = self.preloaded
            if pre is None or pre.ref.version != wanted.version:
                return None
            self.preloaded = None
        return dataclasses.replace(pre, ref=wanted)

    def _check_missed_webhook(self, ref: VersionRef | None) -> None:
        """The timer found the alias moved (or gone) though no webhook said so: webhooks no longer
        arrive, so check every `poll_seconds` again until the next delivery (under the lock)."""
        moved = (ref.version if ref else None) != self.target_version
        if moved and not (ref is None and self.alias_exists is False):
            self.swaps.fall_back(f"alias {self.alias} moved without a webhook")

    def _alias_gone(self) -> None:
        """The registry says the alias does not exist (any more): serve nothing, keep nothing."""
        if self.alias_exists is not False:
            self.loader.forget()
        self.alias_exists = False
        self.target_version = None
        self._wanted = None
        self._clear_failure()
        dropped = self.current
        if dropped is not None:
            self.current = None
            self.dropped_version = dropped.version
            self.metrics.model_version.set(0)
            self.metrics.record_swap("deleted_alias")
            log.warning(
                "alias %s of %s no longer exists: stopped serving version %s",
                self.alias,
                self.name,
                dropped.version,
            )

    def _on_failure(self, message: str) -> None:
        self.metrics.poll_errors.inc()
        if message != self._logged_failure:
            self._logged_failure = message
            log.warning(
                "cannot check alias %s (still %s): %s", self.alias, self._serving_text(), message
            )
        with self._lock:
            if self.current is None and self.alias_exists is None and not self._tried_last_good:
                self._tried_last_good = True
                self._want(_LAST_GOOD, "last_known_good", (time.monotonic(), 0.0))

    def _want(self, ref: VersionRef, cause: str, asked: tuple[float, float]) -> None:
        self._wanted = ref
        self._wanted_cause = cause
        self._wanted_asked = asked
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait()
            self._wake.clear()
            with self._lock:
                wanted, self._wanted = self._wanted, None
                cause, asked = self._wanted_cause, self._wanted_asked
                self.loading = wanted
            if wanted is not None and not self._stop.is_set():
                try:
                    self._load(wanted, cause, asked)
                except Exception:  # a bug while swapping must not end loading for good
                    log.exception("loading for alias %s failed", self.alias)
                finally:
                    self.loading = None

    def _load(self, wanted: VersionRef, cause: str, asked: tuple[float, float]) -> None:
        """Load (or take the pre-loaded copy of) `wanted` and serve it if the alias still points
        there; `asked` is when the check that found it began and how long it read the registry."""
        started = time.monotonic()
        last_good = wanted is _LAST_GOOD
        what = "the last-known-good copy" if last_good else f"version {wanted.version}"
        log.info("loading %s of %s for alias %s", what, self.name, self.alias)
        preloaded = None if last_good else self._take_preloaded(wanted)
        refused = self._unsigned(preloaded) if preloaded is not None else None
        if refused is not None:  # e.g. the version's files changed since: load it afresh
            log.warning("not serving pre-loaded version %s: %s", wanted.version, refused)
            preloaded = None
        try:
            loaded = preloaded
            if loaded is None:
                loaded = self.loader.load_last_good() if last_good else self.loader.load(wanted)
        except Exception as exc:
            self._failed(None if last_good else wanted.version, exc)
            return
        if loaded is None:
            log.warning("cannot reach the registry and there is no last-known-good copy")
            return
        refusal = self._unsigned(loaded)
        if refusal is not None:
            self._failed(None if last_good else wanted.version, LoadError(refusal))
            return
        swap_seconds = time.monotonic() - started
        with self._lock:
            if not self._still_wanted(loaded):
                log.info("not serving version %s: the alias moved meanwhile", loaded.ref.version)
                if self.alias_exists is False:
                    self.loader.forget()
                self.poller.poll_soon("recheck")
                return
            self.current = ServedModel(
                name=self.name,
                alias=self.alias,
                version=loaded.ref.version,
                run_id=loaded.ref.run_id,
                loaded_at=_now(),
                load_seconds=swap_seconds,
                model=loaded.model,
                last_known_good=loaded.last_known_good,
                preload_seconds=preloaded.seconds if preloaded is not None else None,
            )
            after = time.monotonic() - asked[0]
            self.last_swap = {
                "version": loaded.ref.version,
                "cause": cause,
                "at": _now(),
                "preloaded": preloaded is not None,
                "seconds": round(after, 3),
                "registry_read_seconds": round(asked[1], 3),
                "load_seconds": round(swap_seconds, 3),
            }
            self._clear_failure()
        if preloaded is not None:
            self.loader.adopt(preloaded)
        gc.freeze()
        self.metrics.reloads.labels("success").inc()
        # `reload` (POST /reload) and `recheck` (the alias moved during a load) are registry
        # checks like the timer's: the counter keeps the metric's own five causes.
        self.metrics.record_swap(cause if cause in SWAP_CAUSES else "poll", loaded.ref.version)
        self.metrics.model_version.set(_as_number(loaded.ref.version))
        if loaded.last_known_good:
            log.warning(
                "cannot reach the registry: serving the last-known-good copy of %s version %s",
                self.name,
                loaded.ref.version,
            )
        else:
            log.info(
                "now serving %s version %s (%s): %.3f s after the check was asked for (its "
                "registry read %.3f s), %s %.3f s",
                self.name,
                loaded.ref.version,
                cause,
                after,
                asked[1],
                "pre-loaded, swapped in" if preloaded is not None else "loaded in",
                swap_seconds,
            )

    def _unsigned(self, loaded: Loaded) -> str | None:
        """Why a loaded version of a managed alias is not the network a signed move names."""
        gate = self.poller.gate
        if gate is None:
            return None
        return gate.refusal(loaded.ref.version, str(loaded.model.meta.get("onnx_sha256", "")))

    def _still_wanted(self, loaded: Loaded) -> bool:
        """Whether the alias still points where this load began (called under the lock)."""
        if self._stop.is_set():
            return False
        if loaded.last_known_good:
            return self.alias_exists is None or self.target_version == loaded.ref.version
        return self.target_version == loaded.ref.version

    def _failed(self, version: str | None, exc: Exception) -> None:
        """Record a failed load; `version` None for the last-known-good copy, which is not
        marked failed, so the same version from the registry is still tried at once."""
        what = f"version {version}" if version else "the last-known-good copy"
        with self._lock:
            if version is not None:
                self.failed_version = version
                self._failed_at = time.monotonic()
            self.last_reload_error = f"{what}: {type(exc).__name__}: {one_line(exc)}"
        self.metrics.reloads.labels("failure").inc()
        self.metrics.reload_failing.set(1)
        log.error("keeping %s: %s", self._serving_text(), self.last_reload_error)

    def _no_model_reason(self) -> str:
        loading = self.loading
        if loading is not None:
            return f"loading version {loading.version or '(last-known-good copy)'}"
        if self.alias_exists is False:
            if self.dropped_version is not None:
                return (
                    f"the alias {self.alias!r} was deleted; version "
                    f"{self.dropped_version} is no longer served"
                )
            return f"no version of {self.name!r} has the alias {self.alias!r}"
        if self.last_reload_error:
            return self.last_reload_error
        if self.poller.last_error:
            return (
                "cannot reach the registry and there is no last-known-good copy: "
                f"{self.poller.last_error}"
            )
        return "waiting for the registry's first answer"

    def _clear_failure(self) -> None:
        self.failed_version = None
        self.last_reload_error = None
        self.metrics.reload_failing.set(0)

    def _serving_text(self) -> str:
        return f"serving version {self.current.version}" if self.current else "serving nothing"


def _same(loaded: Loaded, move: SignedMove) -> bool:
    """Whether `loaded` is the version and network `move` names."""
    digest = loaded.model.meta.get("onnx_sha256")
    return loaded.ref.version == move.version and digest == move.onnx_sha256


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _as_number(version: str) -> float:
    try:
        return float(version)
    except ValueError:
        return 0.0
