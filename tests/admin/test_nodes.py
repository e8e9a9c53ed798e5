"""Single-node edits through AdminService: SetLimits, CreateNode, MoveNode, DeleteNode, and their refusals."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from spendgate.domain import (
    DenyReason,
    FailedPreconditionError,
    InvalidArgumentError,
    Limits,
    NodeBudget,
    NodeKind,
    NodeWindow,
    NotFoundError,
    SpendgateError,
    Window,
)

from .support import DAY_MS, USD, Fleet


def snapshot(fleet: Fleet) -> list[tuple[int, NodeBudget, bool]]:
    """The whole tree with every budget: equal snapshots mean nothing changed."""
    return fleet.admin.tree()


def assert_refused(fleet: Fleet, error: type[SpendgateError], call: Callable[[], object], match: str = "") -> None:
    """The call fails with ``error`` and the tree (configuration and money) is exactly as before."""
    before = snapshot(fleet)
    with pytest.raises(error, match=match):
        call()
    assert snapshot(fleet) == before


def test_set_limits_replaces_every_limit(any_fleet: Fleet) -> None:
    fleet = any_fleet
    limits = Limits(
        per_transaction_micros=2 * USD,
        day_micros=5 * USD,
        velocity_per_minute=3,
        allowed_services=("api.example.com",),
    )
    budget = fleet.admin.set_limits("sales-agent-01", limits)
    assert budget.per_transaction_micros == 2 * USD
    assert budget.window(Window.DAY).limit_micros == 5 * USD
    assert budget.velocity_per_minute == 3
    assert budget.allowed_services == ("api.example.com",)

    # The old $1 per transaction is gone: $1.50 passes now.
    assert fleet.spend.authorize("sales-agent-01", 1_500_000, service="api.example.com").approved
    wrong_service = fleet.spend.authorize("sales-agent-01", 10_000, service="other.example.com")
    assert wrong_service.deny_reason is DenyReason.SERVICE_NOT_ALLOWED
    assert fleet.spend.authorize("sales-agent-01", 10_000, service="api.example.com").approved
    assert fleet.spend.authorize("sales-agent-01", 10_000, service="api.example.com").approved
    too_fast = fleet.spend.authorize("sales-agent-01", 10_000, service="api.example.com")
    assert too_fast.deny_reason is DenyReason.VELOCITY_LIMIT
    assert too_fast.denied_by == NodeWindow("sales-agent-01", Window.MINUTE)

    # A limit left out is removed; the money already held stays counted.
    cleared = fleet.admin.set_limits("sales-agent-01", Limits())
    assert cleared.per_transaction_micros is None
    assert cleared.velocity_per_minute is None
    assert cleared.allowed_services == ()
    assert [w.limit_micros for w in cleared.windows] == [None, None, None, None]
    assert cleared.window(Window.DAY).held_micros == 1_520_000
    assert fleet.spend.authorize("sales-agent-01", 5 * USD).approved


@pytest.mark.parametrize(
    ("node_id", "limits", "error", "match"),
    [
        ("sales-agent-01", Limits(day_micros=-1), InvalidArgumentError, "day_micros"),
        ("sales-agent-01", Limits(total_micros=10**16), InvalidArgumentError, "total_micros"),
        ("sales-agent-01", Limits(velocity_per_minute=0), InvalidArgumentError, "velocity_per_minute"),
        ("sales-agent-01", Limits(allowed_services=("",)), InvalidArgumentError, "empty"),
        ("sales-agent-01", Limits(allowed_services=tuple(f"s{i}" for i in range(65))), InvalidArgumentError, "64"),
        ("sales-agent-01", Limits(allowed_services=("bad\nservice",)), InvalidArgumentError, "control"),
        ("no-such-node", Limits(day_micros=1), NotFoundError, "no-such-node"),
        ("", Limits(day_micros=1), InvalidArgumentError, "node_id"),
        ("bad id", Limits(day_micros=1), InvalidArgumentError, "node_id"),
    ],
)
def test_set_limits_refuses_bad_input_and_changes_nothing(
    fleet: Fleet, node_id: str, limits: Limits, error: type[SpendgateError], match: str
) -> None:
    assert fleet.spend.authorize("sales-agent-01", 100_000).approved
    assert_refused(fleet, error, lambda: fleet.admin.set_limits(node_id, limits), match)


def test_create_a_pool_and_a_wallet_that_spends_under_it(fleet: Fleet) -> None:
    pool = fleet.admin.create_node("support-agents", "acme", NodeKind.POOL, Limits(month_micros=2 * USD))
    assert (pool.kind, pool.parent_id, pool.window(Window.MONTH).limit_micros) == (NodeKind.POOL, "acme", 2 * USD)
    wallet = fleet.admin.create_node(
        "support-agent-01", "support-agents", NodeKind.WALLET, Limits(per_transaction_micros=USD)
    )
    assert (wallet.kind, wallet.parent_id) == (NodeKind.WALLET, "support-agents")

    assert fleet.spend.authorize("support-agent-01", USD, capture=True).approved
    assert fleet.spend.authorize("support-agent-01", USD, capture=True).approved
    denied = fleet.spend.authorize("support-agent-01", 10_000)
    assert denied.denied_by == NodeWindow("support-agents", Window.MONTH)
    assert fleet.spent("acme", Window.MONTH) == 2 * USD
    tree = [(depth, budget.node_id) for depth, budget, _ in fleet.admin.tree("acme")]
    assert (1, "support-agents") in tree
    assert tree[tree.index((1, "support-agents")) + 1] == (2, "support-agent-01")


@pytest.mark.parametrize(
    ("node_id", "parent_id", "kind", "error", "match"),
    [
        ("acme-2", "acme", NodeKind.ACCOUNT, InvalidArgumentError, "kind"),
        ("deep-wallet", "sales-agent-01", NodeKind.WALLET, InvalidArgumentError, "wallets have no children"),
        ("sales-agent-02", "sales-agents", NodeKind.WALLET, InvalidArgumentError, "already exists"),
        ("research-agents", "sales-agents", NodeKind.POOL, InvalidArgumentError, "already exists"),
        ("orphan", "no-such-pool", NodeKind.WALLET, NotFoundError, "no-such-pool"),
        ("Bad Id!", "sales-agents", NodeKind.WALLET, InvalidArgumentError, "node_id"),
        ("x" * 65, "sales-agents", NodeKind.WALLET, InvalidArgumentError, "65 characters"),
    ],
)
def test_create_node_refuses_bad_input_and_changes_nothing(
    fleet: Fleet, node_id: str, parent_id: str, kind: NodeKind, error: type[SpendgateError], match: str
) -> None:
    assert_refused(fleet, error, lambda: fleet.admin.create_node(node_id, parent_id, kind, Limits()), match)


def test_move_a_wallet_to_another_pool(any_fleet: Fleet) -> None:
    fleet = any_fleet
    # A denial resolves and caches the wallet's chain without moving money; the move must not use the stale one.
    assert fleet.spend.authorize("sales-agent-02", 2 * USD).deny_reason is DenyReason.PER_TRANSACTION_LIMIT

    moved = fleet.admin.move_node("sales-agent-02", "research-agents")
    assert moved.parent_id == "research-agents"
    assert fleet.spend.authorize("sales-agent-02", 700_000, capture=True).approved
    assert fleet.spent("research-agents", Window.MONTH) == 700_000
    assert fleet.spent("sales-agents", Window.MONTH) == 0
    assert fleet.spent("acme", Window.MONTH) == 700_000
    parents = {budget.node_id: budget.parent_id for _, budget, _ in fleet.admin.tree("research-agents")}
    assert parents["sales-agent-02"] == "research-agents"


@pytest.mark.parametrize(
    ("node_id", "new_parent_id", "error", "match"),
    [
        ("acme", "research-agents", InvalidArgumentError, "account cannot be moved"),
        ("sales-agent-01", "sales-agent-02", InvalidArgumentError, "wallets have no children"),
        ("sales-agents", "sales-agents", InvalidArgumentError, "under itself"),
        ("sales-agent-01", "no-such-pool", NotFoundError, "no-such-pool"),
        ("no-such-wallet", "sales-agents", NotFoundError, "no-such-wallet"),
        ("sales-agent-01", "", InvalidArgumentError, "new_parent_id"),
    ],
)
def test_move_node_refuses_bad_input_and_changes_nothing(
    fleet: Fleet, node_id: str, new_parent_id: str, error: type[SpendgateError], match: str
) -> None:
    assert_refused(fleet, error, lambda: fleet.admin.move_node(node_id, new_parent_id), match)


def test_a_pool_cannot_move_under_its_own_descendant(fleet: Fleet) -> None:
    fleet.admin.create_node("research-inner", "research-agents", NodeKind.POOL, Limits())
    assert_refused(
        fleet, InvalidArgumentError, lambda: fleet.admin.move_node("research-agents", "research-inner"), "under"
    )


def test_moving_a_node_that_carries_money_is_refused_unless_forced(any_fleet: Fleet) -> None:
    fleet = any_fleet
    hold = fleet.spend.authorize("sales-agent-01", 500_000)
    assert_refused(
        fleet,
        FailedPreconditionError,
        lambda: fleet.admin.move_node("sales-agent-01", "content-agents"),
        r"sales-agent-01 holds \$0\.50",
    )

    assert fleet.admin.move_node("sales-agent-01", "content-agents", force=True).parent_id == "content-agents"
    # The hold was taken on the old chain and gives its money back there, never below zero anywhere.
    assert fleet.spend.void(hold.authorization_id).released_micros == 500_000
    for node in ("sales-agent-01", "sales-agents", "content-agents", "acme"):
        assert fleet.held(node, Window.MONTH) == 0, node


def test_delete_a_wallet_and_a_pool_with_its_subtree(any_fleet: Fleet) -> None:
    fleet = any_fleet
    # Cache the wallet's chain first: a deleted wallet must not keep spending through it.
    assert fleet.spend.authorize("content-agent-02", 2 * USD).deny_reason is DenyReason.PER_TRANSACTION_LIMIT
    assert fleet.admin.delete_node("content-agent-02") == ["content-agent-02"]
    with pytest.raises(NotFoundError):
        fleet.spend.get_budget("content-agent-02")
    with pytest.raises(NotFoundError):
        fleet.spend.authorize("content-agent-02", 10_000)

    assert fleet.admin.delete_node("sales-agents") == ["sales-agents", "sales-agent-01", "sales-agent-02"]
    remaining = {budget.node_id for _, budget, _ in fleet.admin.tree("acme")}
    assert remaining == {"acme", "research-agents", "research-agent-01", "research-agent-02", "research-agent-03"} | {
        "content-agents",
        "content-agent-01",
    }
    # The id is free again.
    fleet.admin.create_node("sales-agent-01", "research-agents", NodeKind.WALLET, Limits())
    assert fleet.spend.authorize("sales-agent-01", 10_000).approved


@pytest.mark.parametrize(
    ("node_id", "error", "match"),
    [
        ("acme", InvalidArgumentError, "account cannot be deleted"),
        ("no-such-wallet", NotFoundError, "no-such-wallet"),
        ("", InvalidArgumentError, "node_id"),
    ],
)
def test_delete_node_refuses_bad_input_and_changes_nothing(
    fleet: Fleet, node_id: str, error: type[SpendgateError], match: str
) -> None:
    assert_refused(fleet, error, lambda: fleet.admin.delete_node(node_id), match)


def test_deleting_a_subtree_with_money_in_open_windows_is_refused_unless_forced(any_fleet: Fleet) -> None:
    fleet = any_fleet
    assert fleet.spend.authorize("sales-agent-02", 300_000, capture=True).approved
    assert_refused(
        fleet,
        FailedPreconditionError,
        lambda: fleet.admin.delete_node("sales-agents"),
        r"sales-agent-02 holds \$0\.00 and spent \$0\.30",
    )
    assert fleet.admin.delete_node("sales-agents", force=True) == ["sales-agents", "sales-agent-01", "sales-agent-02"]
    with pytest.raises(NotFoundError):
        fleet.spend.get_budget("sales-agent-02")


def test_spend_in_windows_that_have_closed_does_not_block_a_delete(fleet: Fleet) -> None:
    assert fleet.spend.authorize("content-agent-01", 300_000, capture=True).approved
    with pytest.raises(FailedPreconditionError):
        fleet.admin.delete_node("content-agent-01")
    # 40 days on, the day, week and month of that spend have all closed.
    fleet.advance_ms(40 * DAY_MS)
    assert fleet.admin.delete_node("content-agent-01") == ["content-agent-01"]
