"""The metrics collector stays within its scan budget: past it, it reads no more plans (they can be 10,000 nodes)."""

from __future__ import annotations

from typing import Any

from spendgate.domain import AccountPlan, NodeKind, NodeSpec
from spendgate.metrics import Metrics, collect_once
from spendgate.store.protocol import Backlog


class _Store:
    """Three accounts of three nodes each; records which plans were read."""

    def __init__(self) -> None:
        self.plans_read: list[str] = []

    async def account_ids(self) -> list[str]:
        return ["a1", "a2", "a3"]

    async def backlog(self, account_id: str) -> Backlog:
        return Backlog(holds=1, outbox_entries=2, outbox_oldest_age_ms=0)

    async def read_plan(self, account_id: str) -> AccountPlan:
        self.plans_read.append(account_id)
        nodes = [NodeSpec(node_id=f"{account_id}-n{i}", kind=NodeKind.WALLET, parent_id=account_id) for i in range(3)]
        return AccountPlan(account_id=account_id, currency="USD", time_zone="UTC", nodes=tuple(nodes))


class _Budget:
    windows: tuple[Any, ...] = ()


async def test_the_scan_stops_reading_plans_once_its_budget_is_spent_but_every_backlog_is_reported() -> None:
    store = _Store()
    metrics = Metrics(nodes_scan_max=4)
    budgets_read: list[str] = []

    async def budgets(node_id: str) -> _Budget:
        budgets_read.append(node_id)
        return _Budget()

    await collect_once(metrics, store, budgets)  # type: ignore[arg-type]

    assert store.plans_read == ["a1", "a2"]
    assert budgets_read == ["a1-n0", "a1-n1", "a1-n2", "a2-n0"]
    for account in ("a1", "a2", "a3"):
        assert metrics.registry.get_sample_value("spendgate_holds_outstanding", {"account": account}) == 1
        assert metrics.registry.get_sample_value("spendgate_outbox_lag_entries", {"account": account}) == 2
