"""Incident response through the gRPC API: freeze, freeze with --void-holds, unfreeze, on every replica."""

from __future__ import annotations

import pathlib
import uuid

import pytest

from spendgate.client import AdminClient, Client
from spendgate.domain import (
    DenyReason,
    FailedPreconditionError,
    InvalidArgumentError,
    NodeWindow,
    NotFoundError,
    Window,
)

from .support import FLEET, USD, Fleet, ServeProcess, StartFleet

RESEARCH = ("research-agent-01", "research-agent-02", "research-agent-03")
ALL_WALLETS = (*RESEARCH, "sales-agent-01", "sales-agent-02", "content-agent-01", "content-agent-02")


def test_freeze_denies_the_very_next_authorize_and_unfreeze_lifts_it(any_fleet: Fleet) -> None:
    fleet = any_fleet
    # The first call resolves and caches the wallet's chain; the freeze must not depend on that cache going stale.
    assert fleet.spend.authorize("sales-agent-01", 100_000).approved

    assert fleet.admin.freeze("sales-agent-01", "runaway loop") == (0, 0)

    denied = fleet.spend.authorize("sales-agent-01", 100_000)
    assert denied.deny_reason is DenyReason.FROZEN
    assert denied.denied_by == NodeWindow("sales-agent-01", Window.NONE)
    assert denied.authorization_id == ""
    assert "sales-agent-01 is frozen" in denied.message
    budget = fleet.spend.get_budget("sales-agent-01")
    assert budget.frozen
    assert budget.frozen_reason == "runaway loop"
    # A denial holds nothing, and a freeze without --void-holds keeps the hold already granted.
    assert fleet.held("sales-agent-01") == 100_000
    # The sibling under the same pool is untouched.
    assert fleet.spend.authorize("sales-agent-02", 100_000).approved

    assert fleet.admin.unfreeze("sales-agent-01") is True
    assert fleet.spend.authorize("sales-agent-01", 100_000).approved
    assert not fleet.spend.get_budget("sales-agent-01").frozen
    assert fleet.admin.unfreeze("sales-agent-01") is False


def test_freeze_with_void_holds_releases_the_money_at_every_level(any_fleet: Fleet) -> None:
    fleet = any_fleet
    first = fleet.spend.authorize("research-agent-01", 400_000)
    second = fleet.spend.authorize("research-agent-01", 300_000)
    sibling = fleet.spend.authorize("research-agent-02", 200_000)
    settled = fleet.spend.authorize("research-agent-01", 100_000, capture=True)
    assert all(result.approved for result in (first, second, sibling, settled))
    assert fleet.held("research-agents", Window.MONTH) == 900_000
    assert fleet.held("acme", Window.MONTH) == 900_000

    voided, released = fleet.admin.freeze("research-agent-01", "incident 42", void_holds=True)

    assert (voided, released) == (2, 700_000)
    wallet = fleet.spend.get_budget("research-agent-01")
    assert [w.held_micros for w in wallet.windows] == [0, 0, 0, 0]
    assert wallet.window(Window.DAY).spent_micros == 100_000
    for node in ("research-agents", "acme"):
        budget = fleet.spend.get_budget(node)
        # Only the sibling's hold is still held; what was settled stays spent.
        assert [w.held_micros for w in budget.windows] == [200_000] * 4, node
        assert [w.spent_micros for w in budget.windows] == [100_000] * 4, node
    with pytest.raises(FailedPreconditionError, match="voided"):
        fleet.spend.capture(first.authorization_id, 400_000)
    # The sibling's hold was not under the frozen node and can still be captured.
    assert fleet.spend.capture(sibling.authorization_id, 150_000).captured_micros == 150_000
    # Lifting the freeze lets the wallet spend again.
    fleet.admin.unfreeze("research-agent-01")
    assert fleet.spend.authorize("research-agent-01", USD).approved


@pytest.mark.parametrize(
    ("frozen", "denied", "approved"),
    [
        ("research-agents", RESEARCH, ("sales-agent-01", "content-agent-02")),
        ("acme", ALL_WALLETS, ()),
    ],
    ids=["pool", "account"],
)
def test_freezing_a_pool_or_the_account_denies_every_wallet_under_it(
    any_fleet: Fleet, frozen: str, denied: tuple[str, ...], approved: tuple[str, ...]
) -> None:
    fleet = any_fleet
    held = fleet.spend.authorize("research-agent-03", 250_000)

    assert fleet.admin.freeze(frozen, "budget review", void_holds=True) == (1, 250_000)

    for wallet in denied:
        result = fleet.spend.authorize(wallet, 10_000)
        assert result.deny_reason is DenyReason.FROZEN, wallet
        assert result.denied_by == NodeWindow(frozen, Window.NONE), wallet
    for wallet in approved:
        assert fleet.spend.authorize(wallet, 10_000).approved, wallet
    with pytest.raises(FailedPreconditionError):
        fleet.spend.capture(held.authorization_id, 250_000)
    assert fleet.spend.get_budget(frozen).frozen_reason == "budget review"
    # The wallets themselves are not frozen: lifting the freeze where it was set lets them all spend.
    assert not fleet.spend.get_budget(denied[0]).frozen
    assert fleet.admin.unfreeze(frozen) is True
    assert all(fleet.spend.authorize(wallet, 10_000).approved for wallet in denied)


def test_a_plan_re_apply_never_lifts_a_freeze(any_fleet: Fleet, tmp_path: pathlib.Path) -> None:
    fleet = any_fleet
    fleet.admin.freeze("sales-agent-01", "incident 7")
    fleet.admin.freeze("content-agents", "incident 8")

    *_, last = fleet.admin.apply_plan(FLEET.read_text())
    assert last.done
    assert last.changes == ()
    assert not last.applied

    # A plan that changes the frozen wallet's limits changes them, and keeps the freeze.
    changed = FLEET.read_text().replace(
        "{id: sales-agent-01, limits: {day: 30, per_transaction: 1}}",
        "{id: sales-agent-01, limits: {day: 40, per_transaction: 1}}",
    )
    *_, last = fleet.admin.apply_plan(changed)
    assert [(c.node_id, c.kind) for c in last.changes] == [("sales-agent-01", "changed")]
    assert "FROZEN (incident 7)" in last.changes[0].after
    wallet = fleet.spend.get_budget("sales-agent-01")
    assert wallet.frozen_reason == "incident 7"
    assert wallet.window(Window.DAY).limit_micros == 40 * USD
    assert fleet.spend.get_budget("content-agents").frozen_reason == "incident 8"
    assert fleet.spend.authorize("sales-agent-01", 10_000).deny_reason is DenyReason.FROZEN
    assert fleet.spend.authorize("content-agent-01", 10_000).deny_reason is DenyReason.FROZEN


def test_a_plan_may_freeze_a_node(fleet: Fleet) -> None:
    frozen = FLEET.read_text().replace(
        "{id: content-agent-02, limits: {day: 20, per_transaction: 1}}",
        '{id: content-agent-02, limits: {day: 20, per_transaction: 1}, frozen: "retired"}',
    )
    *_, last = fleet.admin.apply_plan(frozen)
    assert [(c.node_id, c.kind) for c in last.changes] == [("content-agent-02", "changed")]
    result = fleet.spend.authorize("content-agent-02", 10_000)
    assert result.deny_reason is DenyReason.FROZEN


def test_freeze_refuses_bad_input_and_changes_nothing(fleet: Fleet) -> None:
    with pytest.raises(InvalidArgumentError, match="reason"):
        fleet.admin.freeze("sales-agent-01", "   ")
    with pytest.raises(NotFoundError):
        fleet.admin.freeze("no-such-wallet", "typo")
    with pytest.raises(InvalidArgumentError):
        fleet.admin.freeze("bad id!", "typo")
    with pytest.raises(NotFoundError):
        fleet.admin.unfreeze("no-such-wallet")
    assert not fleet.spend.get_budget("sales-agent-01").frozen
    assert fleet.spend.authorize("sales-agent-01", 10_000).approved


@pytest.mark.redis
def test_a_freeze_on_one_replica_denies_the_next_authorize_on_another(start_fleet: StartFleet) -> None:
    prefix = f"sgadm{uuid.uuid4().hex[:10]}"
    one = start_fleet("redis", prefix=prefix, system_clock=True)
    two = start_fleet("redis", prefix=prefix, system_clock=True)
    # Each replica has resolved and cached the wallet's chain before the freeze.
    assert one.spend.authorize("sales-agent-01", 10_000).approved
    assert two.spend.authorize("sales-agent-01", 10_000).approved

    one.admin.freeze("sales-agent-01", "stop it")
    assert two.spend.authorize("sales-agent-01", 10_000).deny_reason is DenyReason.FROZEN

    two.admin.unfreeze("sales-agent-01")
    assert one.spend.authorize("sales-agent-01", 10_000).approved


@pytest.mark.redis
def test_a_freeze_reaches_a_replica_in_another_process(
    start_fleet: StartFleet, redis_url: str, tmp_path: pathlib.Path
) -> None:
    prefix = f"sgadm{uuid.uuid4().hex[:10]}"
    local = start_fleet("redis", prefix=prefix, system_clock=True)
    remote = ServeProcess(
        tmp_path,
        "--plan",
        str(FLEET),
        "--redis-url",
        redis_url,
        env={"SPENDGATE_KEY_PREFIX": prefix, "SPENDGATE_AUTH": "off"},
    )
    try:
        remote.wait_ready("sales-agent-02")
        with Client(remote.target) as remote_spend, AdminClient(remote.target) as remote_admin:
            assert remote_spend.authorize("sales-agent-02", 10_000).approved
            local.admin.freeze("sales-agent-02", "seen on the dashboard", void_holds=True)
            assert remote_spend.authorize("sales-agent-02", 10_000).deny_reason is DenyReason.FROZEN
            assert remote_spend.get_budget("sales-agent-02").window(Window.DAY).held_micros == 0
            assert remote_admin.unfreeze("sales-agent-02") is True
            assert local.spend.authorize("sales-agent-02", 10_000).approved
    finally:
        remote.stop()
