"""Checks on what visitors send: image bytes and label corrections. Nothing is stored here."""

from __future__ import annotations

from captchaops.model.preprocess import (
    BadBase64,
    InvalidImage,
    TooCostly,
    b64decode_image,
    check_size,
    sniff_format,
)

MAX_LABEL_LENGTH = 64


class BadInput(ValueError):
    """Input a visitor can fix: an HTTP status, a short error code and one sentence with the fix."""

    def __init__(self, status: int, error: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.error = error
        self.detail = detail


def check_image(data: bytes | None, max_bytes: int) -> str:
    """Accept image bytes by size and content (never by file name); return the sniffed format.

    The structure is walked to its end and the size read from the header, failing closed, but
    no pixel is decoded here: the model servers decode each image once, in worker processes the
    kernel bounds, and their refusal is shown as their answer."""
    if not data:
        raise BadInput(400, "empty", "No image was sent; choose a PNG, JPEG, GIF or BMP file.")
    if len(data) > max_bytes:
        raise BadInput(
            413,
            "too_large",
            f"The image is {len(data) / 1024:.0f} KiB; send one of at most {max_bytes // 1024} KiB.",
        )
    try:
        check_size(data)  # the walk and the header: no pixel decoded
        fmt = sniff_format(data)
    except TooCostly as exc:
        raise BadInput(400, "too_costly", _sentence(str(exc))) from exc
    except InvalidImage as exc:
        raise BadInput(415, "invalid_image", _sentence(str(exc))) from exc
    return fmt


def _sentence(message: str) -> str:
    return message[:1].upper() + message[1:] + "."


def decode_base64(text: object) -> bytes:
    """Decode a base64 image field with the decoder the model servers use (a data: URL is fine)."""
    if not isinstance(text, str) or not text:
        raise BadInput(400, "empty", 'Send the image as a base64 string in the field "image".')
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    try:
        return b64decode_image(text, 0)
    except BadBase64 as exc:
        raise BadInput(
            400, "bad_base64", 'The field "image" is not valid base64; encode the file bytes.'
        ) from exc


def check_label(label: str | None, alphabets: list[str]) -> str:
    """Accept a corrected label only when every answering model could have produced it."""
    text = (label or "").strip()
    if not text:
        raise BadInput(400, "empty_label", "The correction is empty; type the characters you see.")
    if len(text) > MAX_LABEL_LENGTH:
        raise BadInput(
            400,
            "bad_label",
            f"The correction is too long; type at most {MAX_LABEL_LENGTH} characters.",
        )
    if not alphabets:
        raise BadInput(
            503,
            "no_alphabet",
            "No model alphabet is known to check the correction against; start a model server and retry.",
        )
    allowed = set.intersection(*(set(a) for a in alphabets))
    bad = sorted({ch for ch in text if ch not in allowed})
    if bad:
        if text.upper() != text and not [c for c in text.upper() if c not in allowed]:
            hint = "use upper case"
        else:
            hint = f"use only {''.join(sorted(allowed))}"
        raise BadInput(
            400,
            "bad_label",
            f"The correction contains {''.join(bad)!r}, which the model cannot read; {hint}.",
        )
    return text
