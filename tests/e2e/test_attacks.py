"""Hostile traffic against one whole stack started by `captchaops up` (issue 14, item 7).

Every input issue 14 lists, sent to the model server (`/invocations`), the web app's API and its
upload and correction forms: PNG bombs, 64 bombs at once, JSON nested 200,000 deep, an 8 MB body,
wrong content types, bad base64, slow clients, a flood, 200 corrections from one client,
duplicates, 100,000 junk `answered` entries, the review queue from another address. Each must
get a refusal (4xx, or 503 with Retry-After), never a server error, and afterwards the runs,
versions, aliases, audit trail and corrections held before are all still there and both servers
answer a normal request. benchmarks/bench_attacks_e2e.py times the same inputs.
Team mode (basic auth) is not started here: tests/integration/test_webapp_login.py covers it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from captchaops.registry.aliases import resolve_alias
from captchaops.registry.names import PRODUCTION
from captchaops.settings import Settings
from harness import attack_stack, attacks
from harness.attacks import Outcome, Targets
from harness.mlflow_state import mlflow_state_restored
from harness.stack import PrivateStack, snapshot

pytestmark = pytest.mark.slow


@dataclass
class Attacked:
    """The stack under attack, and what it held before the attack."""

    stack: PrivateStack
    settings: Settings
    targets: Targets
    version: str
    before: dict[str, Any]
    stored: set[str]


@pytest.fixture(autouse=True)
def _own_mlflow_uris() -> Iterator[None]:
    with mlflow_state_restored():
        yield


@pytest.fixture(scope="module")
def attacked(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Attacked]:
    """A whole stack with a tiny model at @production and @staging and one correction stored."""
    home = tmp_path_factory.mktemp("attacks") / "home"
    with attack_stack.attacked_stack(home) as (stack, targets):
        settings = stack.settings()
        first = attack_stack.duplicates(targets, seed=1)
        assert [a.status for a in first.answers] == [201, 409], first.answers
        version = resolve_alias(settings, PRODUCTION)
        assert version is not None
        stored = attack_stack.stored_artifacts(settings)
        assert stored, "the correction made before the attack is not stored"
        yield Attacked(stack, settings, targets, version, snapshot(settings), stored)


def table(outcomes: list[Outcome]) -> str:
    return "\n".join(
        f"{o.name:36} {o.endpoint:22} {o.by_status()} refused in "
        f"{o.median_refusal_ms() or 0:.0f} ms"
        for o in outcomes
    )


def failures(outcomes: list[Outcome]) -> list[str]:
    return [f for o in outcomes for f in o.failures()]


def test_bad_inputs_are_refused_with_a_4xx(attacked: Attacked) -> None:
    outcomes = attacks.probe_all(attacked.targets)
    print(table(outcomes))
    assert failures(outcomes) == []
    assert all(a.status in {400, 413, 415} for o in outcomes for a in o.answers), table(outcomes)


def test_bombs_behind_one_unknown_byte_are_refused_fast_while_others_are_answered(
    attacked: Attacked,
) -> None:
    bombs, normal, idle = attacks.during_decode_bombs(attacked.targets)
    print(table([*bombs, normal, idle]))
    print(
        f"normal p99 {attacks.p99_ms(normal):.0f} ms under attack, {attacks.p99_ms(idle):.0f} idle"
    )
    assert failures([*bombs, normal, idle]) == []
    for outcome in bombs:
        assert outcome.answers, "no bomb was sent"
        assert {a.status for a in outcome.answers} == {400}, table(bombs)
        assert all(json.loads(a.body)["error"] == "invalid_image" for a in outcome.answers)
        assert (outcome.median_refusal_ms() or 0) < 1000, table(bombs)
    assert normal.answers and {a.status for a in normal.answers} == {200}, table([normal])


def test_slow_clients_do_not_hold_up_normal_ones(attacked: Attacked) -> None:
    slow_model, slow_app, normal = attacks.during_slowloris(attacked.targets)
    print(table([slow_model, slow_app, *normal]))
    assert failures([slow_model, slow_app, *normal]) == []
    assert len(slow_model.answers) == len(slow_app.answers) == 8
    for outcome in normal:
        assert outcome.answers, "no normal request was sent while the slow clients were sending"
        assert {a.status for a in outcome.answers} == {200}, table(normal)


def test_a_flood_gets_200_or_503_with_retry_after(attacked: Attacked) -> None:
    outcomes = attacks.flood(attacked.targets)
    print(table(outcomes))
    assert failures(outcomes) == []
    for outcome in outcomes:
        assert 200 in outcome.by_status(), table(outcomes)
        assert all(a.retry_after for a in outcome.answers if a.status == 503)


def test_a_duplicate_correction_is_409(attacked: Attacked) -> None:
    outcome = attack_stack.duplicates(attacked.targets, seed=2)
    assert [a.status for a in outcome.answers] == [201, 409], outcome.answers
    assert '"duplicate"' in outcome.answers[1].body


def test_junk_answered_entries_are_dropped(attacked: Attacked) -> None:
    outcome = attack_stack.junk_answered(attacked.targets, seed=3)
    print(f"{outcome.name}: HTTP {outcome.answers[0].status} in {outcome.answers[0].seconds:.2f}s")
    assert failures([outcome]) == []
    # Stored, with the junk dropped unread: the page redirects to itself with its thanks.
    assert outcome.answers[0].status == 303, outcome.answers[0].body


def test_corrections_from_one_client_are_throttled_and_kept(attacked: Attacked) -> None:
    limit = attacked.settings.feedback_per_minute
    outcome, stored = attack_stack.correction_burst(attacked.targets, first_seed=1000)
    print(table([outcome]))
    assert failures([outcome]) == []
    statuses = [a.status for a in outcome.answers]
    accepted = statuses.count(201)
    assert 1 <= accepted <= limit, statuses
    assert statuses == [201] * accepted + [429] * (len(statuses) - accepted), statuses
    assert all(a.retry_after for a in outcome.answers if a.status == 429)
    assert set(stored) <= attack_stack.stored_artifacts(attacked.settings)


def test_the_review_queue_refuses_another_address_without_the_token(attacked: Attacked) -> None:
    if attacked.targets.app_remote is None:
        pytest.skip("this machine has no non-loopback address to send from")
    outcomes = attack_stack.review_from_elsewhere(attacked.targets)
    print(table(outcomes))
    assert failures(outcomes) == []


def test_a_foreign_host_header_is_refused_by_every_service(attacked: Attacked) -> None:
    outcomes = attack_stack.foreign_host(attacked.targets)
    print(table(outcomes))
    assert failures(outcomes) == []
    assert all('"bad_host"' in a.body for o in outcomes for a in o.answers), table(outcomes)


def test_nothing_was_lost_and_the_servers_still_answer(attacked: Attacked) -> None:
    after = snapshot(attacked.settings)
    assert attack_stack.lost(attacked.before, after) == []
    assert attacked.stored <= attack_stack.stored_artifacts(attacked.settings)
    assert attack_stack.still_serving(attacked.targets, attacked.version) == []
    log = (attacked.stack.home / "logs" / "app.log").read_text()
    assert "Traceback" not in log, log[-3000:]
