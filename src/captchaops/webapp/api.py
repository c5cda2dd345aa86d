"""The JSON API for scripts: predict in every environment, send corrections, health."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, jsonify, request

from captchaops.webapp.inputs import BadInput, check_image, decode_base64
from captchaops.webapp.limits import Throttled
from captchaops.webapp.service import Demo

_FORMS = 'multipart/form-data with a file field "image", or JSON {"image": "<base64>"}'


def make_blueprint(demo: Demo) -> Blueprint:
    """The API's routes, answering from `demo`."""
    bp = Blueprint("api", __name__)

    @bp.errorhandler(BadInput)
    def _bad_input(exc: BadInput) -> Any:
        resp = jsonify(error=exc.error, detail=exc.detail)
        if isinstance(exc, Throttled):
            resp.headers["Retry-After"] = str(exc.retry_after)
        return resp, exc.status

    @bp.get("/healthz")
    def healthz() -> Any:
        """Liveness of the web app itself (model servers are reported by /api/predict)."""
        return jsonify(status="ok")

    @bp.post("/api/predict")
    def predict() -> Any:
        """Both environments' answers for one image."""
        data = _image()
        check_image(data, demo.settings.max_upload_bytes)
        results = demo.predict(data)
        body = {r.answer.alias: r.to_json() for r in results}
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
        demo.admit_correction(request.remote_addr or "unknown")
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

    return bp


def _image() -> bytes:
    if request.mimetype == "multipart/form-data":
        upload = request.files.get("image")
        return upload.read() if upload else b""
    if request.is_json:
        return decode_base64(_json_body().get("image"))
    raise BadInput(415, "unsupported_media_type", f"Send {_FORMS}.")


def _json_body() -> dict[str, Any]:
    try:
        body = request.get_json(silent=True)
    except RecursionError as exc:
        raise BadInput(
            400, "bad_json", 'The JSON body is nested too deeply; send {"image": "<base64>"}.'
        ) from exc
    if not isinstance(body, dict):
        raise BadInput(
            400, "bad_json", 'The body is not a JSON object; send {"image": "<base64>"}.'
        )
    return body


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None
