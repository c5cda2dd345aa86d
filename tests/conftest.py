"""Shared fixtures live in tests/fixtures/ (one module per owner) and are loaded here."""

pytest_plugins = ["tests.fixtures.stack", "tests.fixtures.models"]


def pytest_collection_modifyitems(items: list) -> None:
    """Run the team-mode test last: it trains in-process against a server it then stops, and
    MLflow keeps process-wide client state (URIs, credentials) that later tests would inherit."""
    items.sort(key=lambda item: "test_team.py" in item.nodeid)
