"""The one page: upload or generate, see every environment's answer, correct it."""

from __future__ import annotations

import base64
from typing import Any

from flask import Blueprint, flash, redirect, render_template, request, url_for

from captchaops.model.preprocess import MIME_TYPES
from captchaops.webapp.examples import Example
from captchaops.webapp.inputs import BadInput, check_image, decode_base64
from captchaops.webapp.limits import Throttled, client_address
from captchaops.webapp.service import Demo, Result


def make_blueprint(demo: Demo) -> Blueprint:
    """The page's routes, answering from `demo`."""
    bp = Blueprint("pages", __name__)

    @bp.get("/")
    def index() -> Any:
        """The page before any image: what each environment serves, how many corrections wait."""
        served = demo.served()
        return render_template(
            "index.html",
            served=served,
            versions=demo.versions(served),
            live=demo.live(),
            waiting=demo.waiting(),
        )

    @bp.post("/predict")
    def predict() -> Any:
        """Predict an uploaded image in every environment."""
        upload = request.files.get("image")
        data = upload.read() if upload else b""
        return _show(demo, data, source="upload")

    @bp.post("/generate")
    def generate() -> Any:
        """Show an image of the served scheme with its true label (held out or generated) and
        predict it."""
        example = demo.generate()
        return _show(demo, example.image, source="generate", truth=example.label, example=example)

    @bp.post("/feedback")
    def correct() -> Any:
        """Store the shown image under the label the visitor typed."""
        try:
            demo.admit_correction(client_address(request, demo.settings))
        except Throttled as exc:
            page, status = _page(demo, exc.status, error=exc.detail)
            return page, status, {"Retry-After": str(exc.retry_after)}
        # Only versions this app served count; the rest of a forged list is dropped unread.
        answered = demo.known_versions(request.form.getlist("answered"))
        source = request.form.get("source", "upload")
        label = request.form.get("label", "")
        try:
            data = decode_base64(request.form.get("image"))
            fmt = check_image(data, demo.settings.max_upload_bytes)
        except BadInput as exc:
            return _page(demo, exc.status, error=exc.detail)
        try:
            checked = demo.check_correction(label, answered)
            saved = demo.correct(data, fmt, checked, answered, source)
        except BadInput as exc:
            return _page(
                demo,
                exc.status,
                image=_view(data, fmt),
                source=source,
                answered=answered,
                label_value=label,
                label_error=exc.detail,
            )
        name = saved.path.rsplit("/", 1)[-1]
        if saved.duplicate:
            flash(f"Already saved as {checked!r} ({name}); nothing was added.")
        else:
            flash(f"Thanks: saved as {checked!r} ({name}).")
        return redirect(url_for("pages.index"), code=303)

    return bp


def _show(
    demo: Demo, data: bytes, source: str, truth: str | None = None, example: Example | None = None
) -> Any:
    try:
        fmt = check_image(data, demo.settings.max_upload_bytes)
    except BadInput as exc:
        return _page(demo, exc.status, error=exc.detail)
    results = demo.predict(data)
    if source == "upload":  # a generated image has its true label already
        demo.offer_for_review(data, fmt, results, source)
    answered = [
        demo.answered_key(r.answer.name, r.answer.version)
        for r in results
        if r.answer.available and r.answer.version
    ]
    return _page(
        demo,
        200,
        image=_view(data, fmt),
        source=source,
        truth=truth,
        example=example,
        results=results,
        live=demo.live(),
        answered=answered,
        label_value=truth or _best_text(results),
    )


def _page(demo: Demo, status: int, **context: Any) -> tuple[str, int]:
    return render_template("index.html", waiting=demo.waiting(), **context), status


def _view(data: bytes, fmt: str) -> dict[str, str]:
    encoded = base64.b64encode(data).decode()
    return {"b64": encoded, "src": f"data:{MIME_TYPES[fmt]};base64,{encoded}"}


def _best_text(results: list[Result]) -> str:
    for r in results:
        if r.answer.available and r.answer.text:
            return r.answer.text
    return ""
