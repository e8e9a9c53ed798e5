"""Shadow mode: a shadow node's limits are evaluated and reported ("would have denied"), not enforced."""

from __future__ import annotations

import pathlib

import pytest

from spendgate.domain import DenyReason, Limits, NodeWindow, Window

from .support import USD, Fleet, StartFleet, write_plan

RAMP = """
account:
  id: acme
  limits: {month: 10000}
pools:
  - id: ramp
    limits: {month: 3}
    shadow: true
    wallets:
      - id: new-agent
        limits: {day: 2, per_transaction: 1, allowed_services: [api.example.com]}
        shadow: true
      - {id: enforced-agent, limits: {day: 2, per_transaction: 1}}
  - id: strict
    limits: {month: 3}
    wallets:
      - {id: shadow-under-strict, limits: {day: 10}, shadow: true}
"""


@pytest.fixture
def ramp(start_fleet: StartFleet, backend_kind: str, tmp_path: pathlib.Path) -> Fleet:
    return start_fleet(backend_kind, plan=write_plan(tmp_path, RAMP))


def test_a_shadow_node_reports_what_it_would_deny_and_approves(ramp: Fleet) -> None:
    over_per_transaction = ramp.spend.authorize("new-agent", 1_500_000, service="api.example.com", capture=True)
    assert over_per_transaction.approved
    assert over_per_transaction.would_deny_reason is DenyReason.PER_TRANSACTION_LIMIT
    assert over_per_transaction.would_deny_by == NodeWindow("new-agent", Window.NONE)

    other_service = ramp.spend.authorize("new-agent", 800_000, service="other.example.com", capture=True)
    assert other_service.approved
    assert other_service.would_deny_reason is DenyReason.SERVICE_NOT_ALLOWED

    # $2.30 of the $2 day spent: the next call would be over the day limit, and is still approved.
    over_day = ramp.spend.authorize("new-agent", 500_000, service="api.example.com")
    assert over_day.approved
    assert over_day.would_deny_reason is DenyReason.WINDOW_LIMIT
    assert over_day.would_deny_by == NodeWindow("new-agent", Window.DAY)
    assert ramp.spent("new-agent") + ramp.held("new-agent") == 2_800_000

    within = ramp.spend.authorize("enforced-agent", 100_000)
    assert within.approved
    assert within.would_deny_reason is DenyReason.NONE
    assert within.would_deny_by is None


def test_a_shadow_pool_does_not_exempt_an_enforced_wallet_and_a_shadow_wallet_not_its_pool(ramp: Fleet) -> None:
    # The shadow pool's $3 month is passed; its enforced wallet still stops at its own $2 day.
    assert ramp.spend.authorize("new-agent", USD, service="api.example.com", capture=True).approved
    assert ramp.spend.authorize("new-agent", USD, service="api.example.com", capture=True).approved
    at_limit = ramp.spend.authorize("enforced-agent", USD, capture=True)
    assert (at_limit.approved, at_limit.would_deny_reason) == (True, DenyReason.NONE)
    past_limit = ramp.spend.authorize("enforced-agent", USD, capture=True)
    assert past_limit.approved
    assert past_limit.would_deny_reason is DenyReason.WINDOW_LIMIT
    assert past_limit.would_deny_by == NodeWindow("ramp", Window.MONTH)
    assert ramp.spent("ramp", Window.MONTH) == 4 * USD
    denied = ramp.spend.authorize("enforced-agent", 10_000)
    assert denied.deny_reason is DenyReason.WINDOW_LIMIT
    assert denied.denied_by == NodeWindow("enforced-agent", Window.DAY)

    # A shadow wallet under an enforced pool: the pool's $3 month holds.
    assert ramp.spend.authorize("shadow-under-strict", 3 * USD, capture=True).approved
    denied = ramp.spend.authorize("shadow-under-strict", 10_000)
    assert denied.deny_reason is DenyReason.WINDOW_LIMIT
    assert denied.denied_by == NodeWindow("strict", Window.MONTH)
    assert ramp.spent("strict", Window.MONTH) == 3 * USD


def test_a_freeze_is_enforced_on_a_shadow_node(ramp: Fleet) -> None:
    ramp.admin.freeze("new-agent", "shadow or not")
    result = ramp.spend.authorize("new-agent", 10_000, service="api.example.com")
    assert result.deny_reason is DenyReason.FROZEN


def test_set_limits_turns_shadow_mode_on_and_off(ramp: Fleet) -> None:
    limits = Limits(day_micros=2 * USD, per_transaction_micros=USD, allowed_services=("api.example.com",))
    ramp.admin.set_limits("new-agent", limits, shadow=False)
    enforced = ramp.spend.authorize("new-agent", 1_500_000, service="api.example.com")
    assert enforced.deny_reason is DenyReason.PER_TRANSACTION_LIMIT
    assert enforced.denied_by == NodeWindow("new-agent", Window.NONE)

    ramp.admin.set_limits("enforced-agent", Limits(day_micros=2 * USD, per_transaction_micros=USD), shadow=True)
    shadowed = ramp.spend.authorize("enforced-agent", 1_500_000)
    assert shadowed.approved
    assert shadowed.would_deny_reason is DenyReason.PER_TRANSACTION_LIMIT

    shadow = {budget.node_id: flag for _, budget, flag in ramp.admin.tree("acme")}
    assert shadow == {
        "acme": False,
        "ramp": True,
        "new-agent": False,
        "enforced-agent": True,
        "strict": False,
        "shadow-under-strict": True,
    }
