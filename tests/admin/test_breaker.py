"""The spend-rate breaker: a runaway loop freezes its wallet, with the reason recorded; normal traffic does not."""

from __future__ import annotations

import pathlib

import pytest

from spendgate.domain import AuthorizeResult, DenyReason, NodeWindow, Window

from .support import USD, Fleet, OpenWatcher, StartFleet, write_plan

BOTS = """
account:
  id: acme
  limits: {month: 10000}
pools:
  - id: bots
    limits: {month: 3000}
    wallets:
      - id: bot-01
        limits: {day: 500, per_transaction: 5}
        breaker: {multiplier: 5, recent_minutes: 5, trailing_minutes: 30, min_spend: 1}
      - id: bot-02
        limits: {day: 500, per_transaction: 5}
      - id: bot-03
        limits: {day: 500, per_transaction: 5}
        breaker: {multiplier: 5, recent_minutes: 5, trailing_minutes: 30, min_spend: 100}
"""
HALF = USD // 2


@pytest.fixture
def bots(start_fleet: StartFleet, backend_kind: str, tmp_path: pathlib.Path) -> Fleet:
    return start_fleet(backend_kind, plan=write_plan(tmp_path, BOTS))


def trickle(fleet: Fleet, wallet: str, minutes: int) -> None:
    """A well-behaved agent: $1 a minute in two calls, then the clock moves to the next minute."""
    for minute in range(minutes):
        for amount in (HALF - 50_000, HALF + 50_000) if minute % 2 else (HALF, HALF):
            result = fleet.spend.authorize(wallet, amount, capture=True)
            assert result.approved, (minute, result)
        fleet.advance_minutes(1)


def burst(fleet: Fleet, wallet: str, calls_max: int) -> tuple[int, list[AuthorizeResult]]:
    """A runaway loop in one minute: $0.50 calls until one is denied; return (approved, denials)."""
    for count in range(calls_max):
        result = fleet.spend.authorize(wallet, HALF, capture=True)
        if not result.approved:
            return count, [result]
    return calls_max, []


def test_a_runaway_loop_trips_the_breaker_with_the_reason_recorded(bots: Fleet, watch: OpenWatcher) -> None:
    watcher = watch(bots.address, "bots", ("freeze", "unfreeze"))
    # An unfreeze of a node that is not frozen changes nothing but shows on the feed: a harmless marker.
    watcher.sync(lambda: bots.admin.unfreeze("bot-02"), lambda e: e.kind == "unfreeze")

    # 35 minutes of $1 a minute fill the trailing 30 minutes and the recent 5, then the loop starts.
    trickle(bots, "bot-01", 35)
    assert not bots.spend.get_budget("bot-01").frozen
    approved, denials = burst(bots, "bot-01", 200)

    # Recent 5 minutes: $4 of trickle + $0.50 x k; trailing average for 5 minutes: $30 / 30 x 5 = $5. The
    # call that takes the recent spend past 5 x $5 trips it: k = 43, and the next call is the first denied.
    assert approved == 43
    [denied] = denials
    assert denied.deny_reason is DenyReason.FROZEN
    assert denied.denied_by == NodeWindow("bot-01", Window.NONE)
    reason = bots.spend.get_budget("bot-01").frozen_reason
    assert reason.startswith("breaker: spent 25500000 micros in 5 min")
    assert "trailing average of 5000000" in reason
    # The breaker froze the wallet only; its siblings and the pool keep spending.
    assert not bots.spend.get_budget("bots").frozen
    assert bots.spend.authorize("bot-02", HALF).approved

    bots.admin.unfreeze("bot-02")
    events = watcher.until(lambda e: e.kind == "unfreeze" and e.node_id == "bot-02")
    freezes = [(e.kind, e.node_id, e.message) for e in events[:-1]]
    assert freezes == [("freeze", "bot-01", reason)]

    # The freeze stays until an operator lifts it.
    bots.advance_minutes(1)
    assert bots.spend.authorize("bot-01", HALF).deny_reason is DenyReason.FROZEN
    assert bots.admin.unfreeze("bot-01") is True
    assert bots.spend.authorize("bot-01", HALF).approved


def test_steady_normal_traffic_never_trips_the_breaker(bots: Fleet) -> None:
    # From the node's first minute, through the warm-up and twice over the breaker's 35-minute ring.
    trickle(bots, "bot-01", 80)
    budget = bots.spend.get_budget("bot-01")
    assert not budget.frozen, budget.frozen_reason
    assert budget.window(Window.DAY).spent_micros == 80 * USD


def test_the_breaker_is_off_unless_a_node_has_one(bots: Fleet) -> None:
    trickle(bots, "bot-02", 35)
    approved, denials = burst(bots, "bot-02", 100)
    assert (approved, denials) == (100, [])
    assert not bots.spend.get_budget("bot-02").frozen


def test_the_breaker_ignores_bursts_below_its_minimum_spend(bots: Fleet) -> None:
    trickle(bots, "bot-03", 35)
    # $4 + 60 x $0.50 = $34 in the recent minutes: over 5 x the trailing average, under min_spend ($100).
    approved, denials = burst(bots, "bot-03", 60)
    assert (approved, denials) == (60, [])
    assert not bots.spend.get_budget("bot-03").frozen
