"""The review page: label the low-confidence inputs the app kept, or discard what nobody can read."""

from __future__ import annotations

import base64
from typing import Any

from flask import Blueprint, flash, redirect, render_template, request, session, url_for

from captchaops.model.preprocess import MIME_TYPES, InvalidImage, sniff_format
from captchaops.webapp import reviewers
from captchaops.webapp.inputs import BadInput
from captchaops.webapp.limits import Throttled, client_address
from captchaops.webapp.review import Item, ReviewGone
from captchaops.webapp.service import Demo
from captchaops.webapp.tracking_client import TrackingError

SHOWN = 12
"""How many pending items one page shows (oldest first); each costs one artifact download."""
_GONE = "That item was labelled or discarded already; here are the ones still waiting."


def make_blueprint(demo: Demo) -> Blueprint:
    """The review page's routes, answering from `demo`."""
    bp = Blueprint("review", __name__)
    settings = demo.settings

    @bp.get("/review")
    def queue() -> Any:
        """The oldest pending items with their images, readings and confidences."""
        if not reviewers.allowed(settings, request, session):
            return _locked()
        try:
            items = [_shown(demo, item) for item in demo.review.pending(SHOWN)]
            pending: int | None = demo.review.count_pending(settings.review_max_pending)
        except TrackingError as exc:
            return _render(503, error=str(exc))
        return _render(200, items=items, pending=pending, stats=demo.sampler.stats())

    @bp.post("/review/login")
    def login() -> Any:
        """Remember in the session that this visitor presented the review token (attempts are
        metered like corrections)."""
        try:
            demo.admit_correction(client_address(request, demo.settings))
        except Throttled as exc:
            page, _ = _locked(exc.detail)
            return page, exc.status, {"Retry-After": str(exc.retry_after)}
        if not reviewers.token_matches(settings, request.form.get("token")):
            return _locked("That is not the review token.")
        session[reviewers.SESSION_KEY] = reviewers.marker(settings)
        return redirect(url_for("review.queue"), code=303)

    @bp.post("/review/<run_id>/label")
    def label(run_id: str) -> Any:
        """Store the item's image under the typed (or confirmed) label as a correction."""
        if not reviewers.allowed(settings, request, session):
            return _locked()
        typed = request.form.get("label", "")
        try:
            item = demo.review.get(run_id)
            image = demo.review.image(item, settings.max_upload_bytes)
            checked = demo.check_correction(typed, demo.known_versions([item.model or ""]))
            saved = demo.review.label(item, image, checked)
        except ReviewGone:
            flash(_GONE)
            return redirect(url_for("review.queue"), code=303)
        except BadInput as exc:
            return _render(exc.status, items=[_shown(demo, item)], label_error=exc.detail)
        except TrackingError as exc:
            return _render(503, error=str(exc))
        demo.sampler.changed()
        demo.forget_waiting()
        flash(f"Saved as {checked!r} ({saved.path.rsplit('/', 1)[-1]}); it is now a correction.")
        return redirect(url_for("review.queue"), code=303)

    @bp.post("/review/<run_id>/discard")
    def discard(run_id: str) -> Any:
        """Take an item nobody can read out of the queue, for good."""
        if not reviewers.allowed(settings, request, session):
            return _locked()
        try:
            demo.review.discard(demo.review.get(run_id))
        except ReviewGone:
            flash(_GONE)
            return redirect(url_for("review.queue"), code=303)
        except TrackingError as exc:
            return _render(503, error=str(exc))
        demo.sampler.changed()
        flash("Discarded; that image will not be offered again.")
        return redirect(url_for("review.queue"), code=303)

    def _locked(error: str | None = None) -> tuple[str, int]:
        return _render(403, locked=True, token_set=settings.review_token is not None, error=error)

    return bp


def _render(status: int, **context: Any) -> tuple[str, int]:
    return render_template("review.html", **context), status


def _shown(demo: Demo, item: Item) -> dict[str, Any]:
    """An item as the page shows it: its image as a data: URI (empty when it cannot be fetched)."""
    try:
        image = demo.review.image(item, demo.settings.max_upload_bytes)
        src = f"data:{MIME_TYPES[sniff_format(image)]};base64,{base64.b64encode(image).decode()}"
    except (TrackingError, InvalidImage):
        src = ""
    return {"item": item, "src": src}
