"""Utilization alerts on the live feed: each threshold once per window, and again in the next window."""

from __future__ import annotations

import pathlib

import pytest

from spendgate.client import Event
from spendgate.domain import DenyReason

from .support import DAY_MS, USD, Fleet, OpenWatcher, StartFleet, Watcher, write_plan

OPS = """
account:
  id: acme
  limits: {month: 10000}
pools:
  - id: ops
    limits: {month: 1000}
    wallets:
      - {id: ops-01, limits: {day: 10, per_transaction: 10}}
      - {id: ops-02, limits: {day: 10, per_transaction: 10}}
"""


@pytest.fixture
def ops(start_fleet: StartFleet, backend_kind: str, tmp_path: pathlib.Path) -> Fleet:
    return start_fleet(backend_kind, plan=write_plan(tmp_path, OPS))


def is_marker(event: Event) -> bool:
    return event.kind == "unfreeze" and event.node_id == "ops-01"


def alerts_until_marker(fleet: Fleet, watcher: Watcher) -> list[tuple[str, str, int, int]]:
    """Close a stretch with the marker and return the alerts seen in it: (node, window, percent, amount)."""
    fleet.admin.unfreeze("ops-01")
    events = watcher.until(is_marker)
    assert all(e.kind == "alert" for e in events[:-1]), events
    return [(e.node_id, e.window, e.threshold_percent, e.amount_micros) for e in events[:-1]]


def test_each_threshold_alerts_once_per_window_and_again_in_the_next(ops: Fleet, watch: OpenWatcher) -> None:
    watcher = watch(ops.address, "ops-01", ("alert", "unfreeze"))
    # Unfreezing a node that is not frozen changes nothing but shows on the feed: a harmless marker.
    watcher.sync(lambda: ops.admin.unfreeze("ops-01"), is_marker)

    def spend(amount_micros: int) -> None:
        assert ops.spend.authorize("ops-01", amount_micros, capture=True).approved

    spend(4 * USD)  # 40 %
    assert alerts_until_marker(ops, watcher) == []
    spend(1_500_000)  # 55 %: crosses 50
    spend(1 * USD)  # 65 %
    assert alerts_until_marker(ops, watcher) == [("ops-01", "day", 50, 5_500_000)]

    # Held money counts. Dropping back under a threshold and crossing it again does not alert twice.
    hold = ops.spend.authorize("ops-01", 2 * USD)  # 85 %: crosses 80
    ops.spend.void(hold.authorization_id)  # 65 %
    hold = ops.spend.authorize("ops-01", 2 * USD)  # 85 % again
    ops.spend.void(hold.authorization_id)
    assert alerts_until_marker(ops, watcher) == [("ops-01", "day", 80, 8_500_000)]

    spend(3 * USD)  # 95 %
    spend(500_000)  # exactly 100 %
    denied = ops.spend.authorize("ops-01", 10_000)
    assert denied.deny_reason is DenyReason.WINDOW_LIMIT
    # Another wallet crossing its own thresholds is outside the watched subtree.
    assert ops.spend.authorize("ops-02", 9 * USD, capture=True).approved
    assert alerts_until_marker(ops, watcher) == [("ops-01", "day", 100, 10 * USD)]

    # The next day is a new window: one call from 0 to 100 % crosses every threshold, each alerting once.
    ops.advance_ms(DAY_MS)
    spend(10 * USD)
    assert alerts_until_marker(ops, watcher) == [
        ("ops-01", "day", 50, 10 * USD),
        ("ops-01", "day", 80, 10 * USD),
        ("ops-01", "day", 100, 10 * USD),
    ]


def test_thresholds_are_configurable(start_fleet: StartFleet, tmp_path: pathlib.Path, watch: OpenWatcher) -> None:
    ops = start_fleet(plan=write_plan(tmp_path, OPS), alert_percents="25,75")
    watcher = watch(ops.address, "ops-01", ("alert", "unfreeze"))
    watcher.sync(lambda: ops.admin.unfreeze("ops-01"), is_marker)
    assert ops.spend.authorize("ops-01", 8 * USD).approved
    assert alerts_until_marker(ops, watcher) == [("ops-01", "day", 25, 8 * USD), ("ops-01", "day", 75, 8 * USD)]
