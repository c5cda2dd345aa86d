"""`POST /invocations`: admission, parsing off the event loop, decoding in bounded worker
processes, fair batching, a deadline."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor

from starlette.background import BackgroundTask
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from captchaops import service_auth
from captchaops.canary import slot as canary_slot  # a module: it may be importing serving now
from captchaops.model.preprocess import InvalidImage
from captchaops.serving import protocol
from captchaops.serving.admission import (
    SMALL_BODY_BYTES,
    Admission,
    Busy,
    disconnected,
    read_body,
)
from captchaops.serving.batching import Answer, MicroBatcher, NoModel, Overloaded, Prediction
from captchaops.serving.decoding import (
    DecodeLimits,
    Decoders,
    geometry_of,
    read_decoded,
    reads_pixels,
)
from captchaops.serving.metrics import ServingMetrics
from captchaops.serving.review_offers import ReviewOffers
from captchaops.serving.shadow import HEADER as SHADOW_HEADER
from captchaops.serving.shadow import Copy, Shadow
from captchaops.serving.trial import NonFiniteOutput
from captchaops.serving.watcher import AliasWatcher, ServedModel
from captchaops.settings import Settings

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
DEFAULT_MAX_WAIT_S = 0.002
DEFAULT_DEADLINE_S = 10.0
"""A request not answered by then is dropped (503): its client has long given up."""
MODEL_BATCH_IMAGES = 16
"""Images per model call: larger batches gain little speed and cost ~1 MB RSS per image."""
MODEL_BATCH_PIXELS = 1_000_000
"""Input pixels per model call (a version's height x width for each decoded image)."""
TURN_IMAGES = 4
"""Images one request may put into a model call before the next waiting request's turn."""
PENDING_BATCHES = 16
MAX_REQUESTS = 256
MAX_HELD_BYTES = 48 * 1024 * 1024
"""Large request bodies held at once (being read, parsed or waiting), about 6 full ones."""
RETRY_AFTER_S = 1


class ClientGone(Exception):
    """The client closed the connection before its answer was ready."""


def _trusted(request: Request) -> bool:
    """Whether the request counts for the live estimate (set by `serving.guard.Guard`)."""
    return bool(request.scope.get("state", {}).get("trusted", True))


def error_response(
    status: int, error: str, detail: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    """The JSON body every refusal carries."""
    return JSONResponse({"error": error, "detail": detail}, status_code=status, headers=headers)


class Invocations:
    """`POST /invocations`: admitted within limits, parsed off the event loop, decoded in worker
    processes the kernel bounds, batched fairly, answered within a deadline, and dropped when
    its client leaves."""

    def __init__(
        self,
        settings: Settings,
        alias: str,
        watcher: AliasWatcher,
        metrics: ServingMetrics,
        *,
        max_body_bytes: int,
        max_wait_s: float,
        deadline_s: float,
    ) -> None:
        self.settings = settings
        self.alias = alias
        self.watcher = watcher
        self.metrics = metrics
        self.deadline_s = deadline_s
        self.max_body_bytes = max_body_bytes
        self.limits = protocol.Limits(
            max_body_bytes=max_body_bytes,
            max_image_bytes=settings.max_upload_bytes,
            max_images=settings.max_batch_images,
        )
        self.admission = Admission(MAX_REQUESTS, MAX_HELD_BYTES)
        self.decoders = Decoders(
            DecodeLimits(
                workers=settings.decode_workers,
                cpu_seconds=settings.decode_cpu_seconds,
                memory_bytes=settings.decode_memory_bytes,
                max_pixels=settings.max_image_pixels,
            )
        )
        self.batcher = MicroBatcher(
            current=lambda: watcher.current,
            max_images=min(MODEL_BATCH_IMAGES, settings.max_batch_images),
            max_wait_s=max_wait_s,
            max_pending_images=settings.max_batch_images * PENDING_BATCHES,
            observe_batch=metrics.batch_size.observe,
            max_pixels=MODEL_BATCH_PIXELS,
            quantum=TURN_IMAGES,
            observe_queue=metrics.queue_time.observe,
            observe_compute=metrics.compute_time.observe,
            read=read_decoded,
        )
        self.shadow: Shadow | None = None
        if settings.shadow_url:
            self.shadow = Shadow(
                settings.shadow_url,
                metrics,
                queue_size=settings.shadow_queue,
                timeout_s=settings.shadow_timeout_seconds,
                per_second=settings.shadow_per_second,
                headers=service_auth.bearer_headers(settings),
            )
        self.canary: canary_slot.Canary | None = None
        self.review: ReviewOffers | None = None
        if settings.review_url:
            token = settings.review_token
            self.review = ReviewOffers(
                settings.review_url,
                settings.model_name,
                metrics,
                token=token.get_secret_value() if token else None,
                below=settings.review_below_confidence,
                per_hour=settings.review_per_hour,
                queue_size=settings.review_queue_size,
            )
        self._parser: ThreadPoolExecutor | None = None
        self._decoding = 0
        """Images of admitted requests being decoded (or waiting for a worker)."""

    async def start(self) -> None:
        """Start the parsing thread, the decoding workers and the batching loop."""
        self._parser = ThreadPoolExecutor(max_workers=1, thread_name_prefix="parse")
        await self.decoders.start()
        await self.batcher.start()
        if self.shadow is not None:
            await self.shadow.start()
        if self.review is not None:
            self.review.start()

    async def stop(self) -> None:
        """Stop batching, decoding, parsing and shadowing; waiting requests are cancelled."""
        if self.shadow is not None:
            await self.shadow.stop()
        if self.review is not None:
            self.review.stop()
        await self.batcher.stop()
        await self.decoders.stop()
        if self._parser is not None:
            self._parser.shutdown(wait=False, cancel_futures=True)

    async def handle(self, request: Request) -> Response:
        """Answer one scoring request and record it in the metrics."""
        started = time.perf_counter()
        with self.metrics.in_flight.track_inprogress():
            response = await self._answer(request)
        self.metrics.requests.labels(str(response.status_code)).inc()
        elapsed = time.perf_counter() - started
        self.metrics.latency.observe(elapsed)
        if self.canary is not None and response.status_code == 200 and _trusted(request):
            self.canary.observe(response.headers.get("x-model-version"), elapsed)
        self.metrics.pending_images.set(self.batcher.pending_images)
        self.metrics.held_bytes.set(self.admission.held_bytes)
        return response

    async def _answer(self, request: Request) -> Response:
        try:
            protocol.check_content_type(request.headers.get("content-type", ""))
            with self.admission.holding() as ticket:
                body = await read_body(
                    request, self.max_body_bytes, ticket, self.settings.body_timeout_seconds
                )
                with self.admission.request():
                    async with asyncio.timeout(self.deadline_s):
                        with self.batcher.arriving():
                            images = await self._parse(body)
                            kept = body if self._shadowed(request, body) else None
                            del body
                        served, predictions = await self._routed(request, images)
        except protocol.ProtocolError as exc:
            return self._refuse(exc.status, exc.error, exc.detail)
        except InvalidImage as exc:
            return self._refuse(400, "invalid_image", str(exc))
        except NoModel:
            return self._refuse(
                503,
                "no_model",
                f"no version of {self.settings.model_name!r} has the alias {self.alias!r} yet; "
                "promote a version to it and retry",
            )
        except (Overloaded, Busy):
            return self._refuse(503, "overloaded", "too many images are waiting; retry shortly")
        except TimeoutError:
            return self._refuse(
                503,
                "deadline_exceeded",
                f"the request was not answered within {self.deadline_s:g} s; retry shortly",
            )
        except (ClientDisconnect, ClientGone):
            return self._refuse(400, "client_disconnect", "the client went away mid-request")
        except NonFiniteOutput:
            log.exception("the served version answered a non-finite number")
            return self._refuse(
                503,
                "version_unusable",
                "the served version answered a number that is not finite; "
                "promote another version and retry",
            )
        except Exception:
            log.exception("prediction failed")  # the detail stays in the server's log
            return self._refuse(
                500,
                "prediction_failed",
                "the model failed on this request; the server log has the detail",
            )
        self.metrics.images.inc(len(images))
        if _trusted(request):  # anonymous noise feeds no estimate, breaker or shadow
            self.metrics.record_predictions(served.version, predictions)
        if self.review is not None and SHADOW_HEADER.lower() not in request.headers:
            self.review.offer(images, predictions, served.version)
        copy = None
        if (
            self.shadow is not None
            and kept is not None
            and served.alias == self.alias
            and self.shadow.admit(served.version)  # most requests stop here: no task at all
        ):
            content_type = request.headers.get("content-type", protocol.JSON_TYPE)
            copy = BackgroundTask(
                self.shadow.enqueue, Copy(kept, content_type, served.version, predictions)
            )
        headers = {"X-Model-Version": served.version}
        if served.alias != self.alias:
            headers["X-Model-Alias"] = served.alias
        return Response(
            json.dumps({"predictions": predictions}),
            media_type=protocol.JSON_TYPE,
            headers=headers,
            background=copy,
        )

    def _shadowed(self, request: Request, body: bytes) -> bool:
        """Whether to copy this request to the shadow server once answered (never a copy)."""
        return (
            self.shadow is not None
            and _trusted(request)
            and SHADOW_HEADER.lower() not in request.headers
            and self.shadow.accepts(len(body))
        )

    async def _parse(self, body: bytes) -> list[bytes]:
        """The images' bytes; large bodies are parsed in a thread of their own."""
        if len(body) <= SMALL_BODY_BYTES:
            return protocol.parse_body(body, self.limits)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._parser, protocol.parse_body, body, self.limits)

    async def _routed(
        self, request: Request, images: list[bytes]
    ) -> tuple[ServedModel, list[Prediction]]:
        """The canary's answer when this request is its turn, else production's. A canary whose
        model fails trips its breaker at once, and production answers the request instead."""
        canary = self.canary.pick() if self.canary is not None else None
        if canary is None or self.canary is None:
            return await self._predict(request, images)
        try:
            return await self._predict(request, images, canary)
        except (InvalidImage, protocol.ProtocolError, Overloaded, ClientGone):
            raise
        except Exception as exc:
            self.canary.failed(canary.version, exc)
        return await self._predict(request, images)

    async def _predict(
        self, request: Request, images: list[bytes], served: ServedModel | None = None
    ) -> tuple[ServedModel, list[Prediction]]:
        """The answer of `served` (default: the current version), or ClientGone (and the work
        dropped) if the client leaves first."""
        predicting = asyncio.ensure_future(self._decoded(images, served))
        watching = asyncio.ensure_future(disconnected(request.receive))
        try:
            await asyncio.wait({predicting, watching}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watching.cancel()
            predicting.cancel()
        if not predicting.done() or predicting.cancelled():
            self.metrics.abandoned.inc()
            raise ClientGone
        return predicting.result()

    async def _decoded(self, images: list[bytes], served: ServedModel | None) -> Answer:
        """Decode the images in the workers at the size `served` reads, then queue them for it."""
        served = served or self.watcher.current
        if served is None:
            raise NoModel
        if not reads_pixels(served.model):
            return await self.batcher.predict(images, None, served)
        waiting = self.batcher.pending_images + self._decoding
        if waiting + len(images) > self.batcher.max_pending_images:
            raise Overloaded  # images being decoded count as waiting: they are queued next
        geometry = geometry_of(served.model.meta)
        self._decoding += len(images)
        try:
            pixels = await self.decoders.decode(images, geometry)
        finally:
            self._decoding -= len(images)
        size = geometry.height * geometry.width
        return await self.batcher.predict(list(pixels), [size] * len(images), served)

    def _refuse(self, status: int, error: str, detail: str) -> JSONResponse:
        self.metrics.errors.labels(error).inc()
        retry = {"Retry-After": str(RETRY_AFTER_S)} if status == 503 else None
        return error_response(status, error, detail, retry)
