"""The metrics collector stays within its scan budget: past it, it lists no more accounts' nodes (10,000 each)."""

from __future__ import annotations

from typing import Any

from spendgate.domain import NotFoundError, Window, WindowBudget
from spendgate.metrics import Metrics, collect_once
from spendgate.store.protocol import Backlog


class _Store:
    """Three accounts of three nodes each; records whose nodes were listed."""

    def __init__(self) -> None:
        self.listed: list[str] = []

    async def account_ids(self) -> list[str]:
        return ["a1", "a2", "a3"]

    async def backlog(self, account_id: str) -> Backlog:
        return Backlog(holds=1, outbox_entries=2, outbox_oldest_age_ms=0)

    async def node_ids(self, account_id: str) -> list[str]:
        self.listed.append(account_id)
        return [f"{account_id}-n{i}" for i in (2, 0, 1)]  # In no order, as a Redis set's members.

    async def read_plan(self, account_id: str) -> Any:
        raise AssertionError("the collector reads every node of a plan it reads, where it needs their ids")


class _Budget:
    windows: tuple[Any, ...] = ()


async def test_the_scan_stops_listing_nodes_once_its_budget_is_spent_but_every_backlog_is_reported() -> None:
    store = _Store()
    metrics = Metrics(nodes_max=2, nodes_scan_max=4)
    budgets_read: list[str] = []

    async def budgets(node_id: str) -> _Budget:
        budgets_read.append(node_id)
        return _Budget()

    await collect_once(metrics, store, budgets)  # type: ignore[arg-type]

    assert store.listed == ["a1", "a2"]
    assert budgets_read == ["a1-n0", "a1-n1", "a1-n2", "a2-n0"]
    for account in ("a1", "a2", "a3"):
        assert metrics.registry.get_sample_value("spendgate_holds_outstanding", {"account": account}) == 1
        assert metrics.registry.get_sample_value("spendgate_outbox_lag_entries", {"account": account}) == 2


def _window(limit_micros: int, spent_micros: int) -> WindowBudget:
    return WindowBudget(
        window=Window.DAY,
        window_id="2026-11-29",
        limit_micros=limit_micros,
        spent_micros=spent_micros,
        held_micros=0,
        ends_at_ms=0,
    )


class _Budgets:
    """Budgets with one busy node (``busy``, 90 % of its day) among idle ones; records the reads."""

    def __init__(self, busy: str, deleted: frozenset[str] = frozenset()) -> None:
        self.busy = busy
        self.deleted = deleted
        self.read: list[str] = []

    async def __call__(self, node_id: str) -> Any:
        self.read.append(node_id)
        if node_id in self.deleted:
            raise NotFoundError(node_id)
        budget = _Budget()
        budget.windows = (_window(100, 90 if node_id == self.busy else 0),)
        return budget


def _exported(metrics: Metrics) -> set[str]:
    return {
        sample.labels["node"]
        for family in metrics.registry.collect()
        if family.name == "spendgate_node_utilization_ratio"
        for sample in family.samples
    }


async def test_later_refreshes_go_on_round_the_fleet_so_a_busy_node_past_the_budget_is_found() -> None:
    store = _Store()
    metrics = Metrics(nodes_max=1, nodes_scan_max=4)
    budgets = _Budgets(busy="a3-n2")

    await collect_once(metrics, store, budgets)  # type: ignore[arg-type]
    assert budgets.read == ["a1-n0", "a1-n1", "a1-n2", "a2-n0"]
    assert _exported(metrics) == {"a1-n0"}  # All idle: the first by id.

    # The exported node is read again first (at most half the budget), then the round goes on where it stopped.
    budgets.read.clear()
    await collect_once(metrics, store, budgets)  # type: ignore[arg-type]
    assert budgets.read == ["a1-n0", "a2-n1", "a2-n2", "a3-n0"]

    budgets.read.clear()
    await collect_once(metrics, store, budgets)  # type: ignore[arg-type]
    # Round the end of the fleet and back to its start; a node read already in this refresh is not read twice.
    assert budgets.read == ["a1-n0", "a3-n1", "a3-n2", "a1-n1"]
    assert _exported(metrics) == {"a3-n2"}

    # From now on the busy node is read first at every refresh and stays exported.
    budgets.read.clear()
    await collect_once(metrics, store, budgets)  # type: ignore[arg-type]
    assert budgets.read[0] == "a3-n2"
    assert _exported(metrics) == {"a3-n2"}


async def test_a_fleet_within_the_budget_is_read_whole_each_time_and_a_deleted_node_is_skipped() -> None:
    store = _Store()
    metrics = Metrics(nodes_max=2, nodes_scan_max=100)
    budgets = _Budgets(busy="a2-n1", deleted=frozenset({"a1-n2"}))
    everything = [f"a{a}-n{n}" for a in (1, 2, 3) for n in range(3)]

    for _ in range(3):
        budgets.read.clear()
        await collect_once(metrics, store, budgets)  # type: ignore[arg-type]
        # Every node once per refresh (the exported ones first), the deleted one included, and nothing twice.
        assert sorted(budgets.read) == sorted(everything)
        assert "a2-n1" in _exported(metrics)
        assert "a1-n2" not in _exported(metrics)


async def test_the_round_goes_on_in_the_next_account_by_id_when_its_account_is_gone() -> None:
    store = _Store()
    metrics = Metrics(nodes_max=1, nodes_scan_max=4)
    budgets = _Budgets(busy="")
    await collect_once(metrics, store, budgets)  # type: ignore[arg-type]
    assert budgets.read[-1] == "a2-n0"  # The round stopped inside a2.

    store.account_ids = _accounts("a1", "a3")  # type: ignore[method-assign]
    budgets.read.clear()
    await collect_once(metrics, store, budgets)  # type: ignore[arg-type]
    # a2 was removed: the round goes on from the start of a3, the next account by id, skipping none of it.
    assert budgets.read == ["a1-n0", "a3-n0", "a3-n1", "a3-n2"]


async def test_an_exported_node_that_is_deleted_drops_out() -> None:
    store = _Store()
    metrics = Metrics(nodes_max=1, nodes_scan_max=100)
    budgets = _Budgets(busy="a2-n1")
    await collect_once(metrics, store, budgets)  # type: ignore[arg-type]
    assert _exported(metrics) == {"a2-n1"}

    budgets.deleted = frozenset({"a2-n1"})
    await collect_once(metrics, store, budgets)  # type: ignore[arg-type]
    assert "a2-n1" not in _exported(metrics)
    assert len(_exported(metrics)) == 1


def test_the_scan_budget_holds_twice_the_exported_nodes() -> None:
    # The exported nodes are read again at every refresh, in half the budget; the other half goes round.
    assert Metrics(nodes_max=5, nodes_scan_max=4).nodes_scan_max == 10
    assert Metrics(nodes_max=1000, nodes_scan_max=10_000).nodes_scan_max == 10_000


def _accounts(*ids: str) -> Any:
    async def account_ids() -> list[str]:
        return list(ids)

    return account_ids
