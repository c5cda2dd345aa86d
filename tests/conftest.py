"""Shared fixtures live in tests/fixtures/ (one module per owner) and are loaded here."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

pytest_plugins = [
    "tests.fixtures.signing",
    "tests.fixtures.stack",
    "tests.fixtures.models",
    "tests.fixtures.serving",
]

_LEAKY = ("MLFLOW_TRACKING_URI",)
_AT_START = {name: os.environ.get(name) for name in _LEAKY}


@pytest.fixture(autouse=True)
def _no_tracking_uri_from_earlier_tests() -> Iterator[None]:
    """`mlflow.set_tracking_uri` also writes MLFLOW_TRACKING_URI into this process's
    environment, which settings honour: one test's server would become the next test's
    "external tracking server" (CI found `build_services` without a tracking service).
    Each test starts with the environment the session started with."""
    for name, value in _AT_START.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    yield
