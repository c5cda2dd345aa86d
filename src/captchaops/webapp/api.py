"""The JSON API for scripts: predict in every environment, send corrections, offer review items,
health."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from flask import Blueprint, Request, jsonify, request, session

from captchaops import bounded_json
from captchaops.webapp import reviewers
from captchaops.webapp.inputs import MAX_LABEL_LENGTH, BadInput, check_image, decode_base64
from captchaops.webapp.limits import Throttled, client_address
from captchaops.webapp.service import Demo
from captchaops.webapp.tracking_client import TrackingError

_FORMS = 'multipart/form-data with a file field "image", or JSON {"image": "<base64>"}'
_OFFER = '{"image": "<base64>", "text": "7KQ2", "confidence": 0.41, "model": "text-captcha/3"}'


def make_blueprint(demo: Demo) -> Blueprint:
    """The API's routes, answering from `demo`."""
    bp = Blueprint("api", __name__)

    @bp.errorhandler(BadInput)
    def _bad_input(exc: BadInput) -> Any:
        resp = jsonify(error=exc.error, detail=exc.detail)
        if isinstance(exc, Throttled):
            resp.headers["Retry-After"] = str(exc.retry_after)
        return resp, exc.status

    @bp.before_request
    def _same_site_only() -> Any:
        if request.method == "POST" and cross_site(request):
            return jsonify(
                error="cross_site",
                detail="The API takes posts from scripts and from this app's own pages only, "
                "not from another site's page; call it from your script or from this app.",
            ), 403
        return None

    @bp.get("/healthz")
    def healthz() -> Any:
        """Liveness of the web app itself (model servers are reported by /api/predict)."""
        return jsonify(status="ok")

    @bp.post("/api/predict")
    def predict() -> Any:
        """Both environments' answers for one image."""
        data = _image()
        fmt = check_image(data, demo.settings.max_upload_bytes)
        results = demo.predict(data)
        demo.offer_for_review(data, fmt, results, "api")
        body = {r.answer.alias: r.to_json() for r in results}
        refused = [r.answer.refused_input for r in results]
        if refused and all(refused):  # every server read the image and refused it
            return jsonify(
                error="image_refused",
                detail="The model servers cannot read this image; send an intact PNG, JPEG, "
                "GIF or BMP.",
                environments=body,
            ), max(s for s in refused if s is not None)
        if not any(r.answer.available for r in results):
            return jsonify(
                error="no_model_server",
                detail="No environment answered; start the model servers with `captchaops up` and retry.",
                environments=body,
            ), 503
        return jsonify(environments=body)

    @bp.get("/api/feedback")
    def waiting() -> Any:
        """How many corrections wait for the next training run."""
        count = demo.waiting()
        if count is None:
            raise BadInput(503, "feedback_unavailable", demo.tracking.unreachable())
        return jsonify(waiting=count)

    @bp.post("/api/feedback")
    def correct() -> Any:
        """Store one image with its corrected label (JSON only, so browsers cannot forge it
        cross-site); a correction stored before is not stored again (409)."""
        demo.admit_correction(client_address(request, demo.settings))
        if not request.is_json:
            raise BadInput(
                415, "unsupported_media_type", 'Send JSON {"image": "<base64>", "label": "..."}.'
            )
        body = _json_body()
        data = decode_base64(body.get("image"))
        fmt = check_image(data, demo.settings.max_upload_bytes)
        answered = demo.known_versions([str(body["model"])] if body.get("model") else [])
        label = demo.check_correction(_text(body.get("label")), answered)
        saved = demo.correct(data, fmt, label, answered, source="api")
        if saved.duplicate:
            return jsonify(
                error="duplicate",
                detail=f"This image is already stored with the label {label!r}; nothing was added.",
                stored=saved.path,
                label=label,
            ), 409
        return jsonify(stored=saved.path, label=label, waiting=demo.waiting()), 201

    @bp.post("/api/review")
    def offer() -> Any:
        """Offer one image a model server read with low confidence to the review queue (JSON
        only; loopback or the review token); stored in the background, within the caps."""
        reviewers.require(demo.settings, request, session)
        if not request.is_json:
            raise BadInput(415, "unsupported_media_type", f"Send JSON {_OFFER}.")
        body = _json_body()
        data = decode_base64(body.get("image"))
        fmt = check_image(data, demo.settings.max_upload_bytes)
        text, confidence, model = (
            body.get("text"),
            _fraction(body.get("confidence")),
            body.get("model"),
        )
        if not isinstance(text, str) or len(text) > MAX_LABEL_LENGTH:
            raise BadInput(400, "bad_text", f"Send the model's reading as a string: {_OFFER}.")
        if confidence is None:
            raise BadInput(400, "bad_confidence", f"Send a confidence from 0 to 1: {_OFFER}.")
        if model is not None and (not isinstance(model, str) or len(model) > 200):
            raise BadInput(400, "bad_model", f"Name the version as name/version: {_OFFER}.")
        reason = demo.sampler.offer(data, fmt, text, confidence, model or None, "server")
        if reason is None:
            return jsonify(queued=True), 202
        return jsonify(queued=False, reason=reason)

    @bp.get("/api/review")
    def review_counts() -> Any:
        """How many review items wait for a label, and what the sampler kept and dropped."""
        try:
            pending: int | None = demo.review.count_pending(demo.settings.review_max_pending)
        except TrackingError:
            pending = None
        return jsonify(pending=pending, **demo.sampler.stats())

    return bp


def cross_site(req: Request) -> bool:
    """Whether a browser sent this request from another site's page (a form post riding on the
    visitor's login or session): `Sec-Fetch-Site` says so, or else an `Origin` that is not
    this app's own host. Scripts send neither header and are not refused."""
    site = req.headers.get("Sec-Fetch-Site")
    if site is not None:
        return site.strip().lower() not in ("same-origin", "none")
    origin = req.headers.get("Origin")
    if origin is None:
        return False
    parts = urlsplit(origin.strip())
    return parts.scheme not in ("http", "https") or parts.netloc.lower() != req.host.lower()


def _fraction(value: object) -> float | None:
    """A JSON number from 0 to 1, else None (booleans, strings, NaN and infinities included)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if 0.0 <= value <= 1.0 else None


def _image() -> bytes:
    if request.mimetype == "multipart/form-data":
        upload = request.files.get("image")
        return upload.read() if upload else b""
    if request.is_json:
        return decode_base64(_json_body().get("image"))
    raise BadInput(415, "unsupported_media_type", f"Send {_FORMS}.")


def _json_body() -> dict[str, Any]:
    """The JSON object sent, parsed within the model servers' shape limits (counted first)."""
    try:
        body = bounded_json.loads(request.get_data(cache=True))
    except bounded_json.JsonShapeError as exc:
        what = {
            "depth": "The JSON body is nested too deeply",
            "shape": "The JSON body holds too many arrays, objects or values",
        }.get(exc.reason, "The body is not a JSON object")
        raise BadInput(400, "bad_json", f'{what}; send {{"image": "<base64>"}}.') from exc
    if not isinstance(body, dict):
        raise BadInput(
            400, "bad_json", 'The body is not a JSON object; send {"image": "<base64>"}.'
        )
    return body


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None
