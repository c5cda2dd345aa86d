"""Registry errors a user can fix, and the one place tracking-server failures become one line."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from mlflow.exceptions import MlflowException

from captchaops.access import explain
from captchaops.settings import Settings, mask_credentials


class RegistryError(Exception):
    """A registry problem a user can fix; the message is one line with the fix. Nothing changed."""


@contextmanager
def one_line_errors(settings: Settings) -> Iterator[None]:
    """Turn tracking-server failures into one-line `RegistryError`s."""
    try:
        yield
    except MlflowException as exc:
        first = mask_credentials((str(exc).strip().splitlines() or ["unknown error"])[0])[:300]
        where = mask_credentials(settings.effective_tracking_uri)
        named = explain(settings, first)
        if named:
            raise RegistryError(named) from exc
        if "503" in first:
            raise RegistryError(
                f"tracking server {where} answers 503 (unavailable): "
                "its disk may be full or its database locked; check free space under its home "
                "and `captchaops logs tracking`"
            ) from exc
        raise RegistryError(
            f"tracking server {where} failed: {first}; check it is up with `captchaops status`"
        ) from exc
