"""Shared fixtures live in tests/fixtures/ (one module per owner) and are loaded here."""

pytest_plugins = [
    "tests.fixtures.signing",
    "tests.fixtures.stack",
    "tests.fixtures.models",
    "tests.fixtures.serving",
]
