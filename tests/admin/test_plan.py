"""Hierarchy as code through ApplyPlan: idempotent applies, dry runs, unsafe removals and moves, large plans."""

from __future__ import annotations

import pytest

from spendgate.client import ApplyProgress
from spendgate.domain import (
    DenyReason,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    Window,
)

from .support import FLEET, USD, Fleet, StartFleet

FLEET_TEXT = FLEET.read_text()
# The fleet, edited: a wallet's limit changed, a wallet added, one removed, one moved, and a pool added.
EDITED = (
    FLEET_TEXT.replace(
        "{id: research-agent-01, limits: {day: 50, per_transaction: 1}}",
        "{id: research-agent-01, limits: {day: 60, per_transaction: 1}}",
    )
    .replace(
        "      - {id: sales-agent-02, limits: {day: 30, per_transaction: 1}}\n",
        "      - {id: sales-agent-03, limits: {day: 30, per_transaction: 1}}\n",
    )
    .replace(
        "      - {id: content-agent-02, limits: {day: 20, per_transaction: 1}}\n",
        "      - {id: content-agent-02, limits: {day: 20, per_transaction: 1}}\n"
        "      - {id: sales-agent-02, limits: {day: 30, per_transaction: 1}}\n"
        "  - id: ramp-agents\n"
        "    limits: {month: 100}\n"
        "    shadow: true\n"
        "    breaker: {multiplier: 4, recent_minutes: 5, trailing_minutes: 60}\n",
    )
)
EDITED_CHANGES = [
    ("research-agent-01", "changed"),
    ("sales-agent-03", "added"),
    ("sales-agent-02", "moved"),
    ("ramp-agents", "added"),
]


def apply(fleet: Fleet, text: str, *, dry_run: bool = False, force: bool = False) -> list[ApplyProgress]:
    return list(fleet.admin.apply_plan(text, dry_run=dry_run, force=force))


def test_applying_the_same_plan_again_changes_nothing(any_fleet: Fleet) -> None:
    fleet = any_fleet
    # The server applied examples/fleet.yaml at start.
    [answer] = apply(fleet, FLEET_TEXT)
    assert (answer.done, answer.applied, answer.changes) == (True, False, ())

    updates = apply(fleet, EDITED)
    assert updates[-1].done
    assert updates[-1].applied
    assert [(c.node_id, c.kind) for c in updates[-1].changes] == EDITED_CHANGES
    [again] = apply(fleet, EDITED)
    assert (again.done, again.applied, again.changes) == (True, False, ())


def test_a_dry_run_lists_the_diff_and_changes_nothing(any_fleet: Fleet) -> None:
    fleet = any_fleet
    before = fleet.admin.tree()

    [answer] = apply(fleet, EDITED, dry_run=True)

    assert answer.done
    assert not answer.applied
    assert answer.nodes_done == 0
    assert [(c.node_id, c.kind) for c in answer.changes] == EDITED_CHANGES
    changed, added, moved, pool = answer.changes
    assert changed.before == "wallet in research-agents, per transaction $1.00, day $50.00"
    assert changed.after == "wallet in research-agents, per transaction $1.00, day $60.00"
    assert (added.before, added.after) == ("", "wallet in sales-agents, per transaction $1.00, day $30.00")
    assert moved.before.startswith("wallet in sales-agents")
    assert moved.after.startswith("wallet in content-agents")
    assert pool.after == "pool in acme, month $100.00, shadow, breaker x4/5m"
    assert all(change.unsafe_reason == "" for change in answer.changes)

    assert fleet.admin.tree() == before
    with pytest.raises(NotFoundError):
        fleet.spend.get_budget("sales-agent-03")
    # A second dry run sees the very same diff: the first one left no trace.
    [again] = apply(fleet, EDITED, dry_run=True)
    assert again.changes == answer.changes


def test_a_dry_run_of_a_new_account_lists_every_node_and_creates_none(fleet: Fleet) -> None:
    text = "account: {id: globex, limits: {month: 500}}\nwallets:\n  - {id: globex-bot, limits: {day: 5}}\n"
    [answer] = apply(fleet, text, dry_run=True)
    assert [(c.node_id, c.kind) for c in answer.changes] == [("globex", "added"), ("globex-bot", "added")]
    with pytest.raises(NotFoundError):
        fleet.spend.get_budget("globex")
    apply(fleet, text)
    assert fleet.spend.authorize("globex-bot", USD).approved


def test_removing_a_node_that_carries_money_is_refused_unless_forced(any_fleet: Fleet) -> None:
    fleet = any_fleet
    hold = fleet.spend.authorize("content-agent-02", 500_000)
    assert fleet.spend.authorize("content-agent-01", 200_000, capture=True).approved
    without = FLEET_TEXT.replace(
        "      - {id: content-agent-01, limits: {day: 20, per_transaction: 1}}\n"
        "      - {id: content-agent-02, limits: {day: 20, per_transaction: 1}}\n",
        "",
    ).replace("{id: research-agent-01, limits: {day: 50, ", "{id: research-agent-01, limits: {day: 70, ")

    [preview] = apply(fleet, without, dry_run=True)
    unsafe = {c.node_id: c.unsafe_reason for c in preview.changes if c.kind == "removed"}
    assert unsafe == {
        "content-agent-02": "content-agent-02 holds $0.50 and spent $0.00 in open windows",
        "content-agent-01": "content-agent-01 holds $0.00 and spent $0.20 in open windows",
    }

    before = fleet.admin.tree()
    with pytest.raises(FailedPreconditionError, match=r"content-agent-02 holds \$0\.50.*pass force"):
        apply(fleet, without)
    # Refused as a whole: not even the safe change in the same plan was made.
    assert fleet.admin.tree() == before
    assert fleet.spend.get_budget("research-agent-01").window(Window.DAY).limit_micros == 50 * USD

    last = apply(fleet, without, force=True)[-1]
    assert last.applied
    assert {(c.node_id, c.kind) for c in last.changes} == {
        ("research-agent-01", "changed"),
        ("content-agent-01", "removed"),
        ("content-agent-02", "removed"),
    }
    with pytest.raises(NotFoundError):
        fleet.spend.get_budget("content-agent-02")
    # The hold of the removed wallet still gives its money back to the levels that remain.
    assert fleet.spend.void(hold.authorization_id).released_micros == 500_000
    assert fleet.held("content-agents", Window.MONTH) == 0
    assert fleet.held("acme", Window.MONTH) == 0
    assert fleet.spent("acme", Window.MONTH) == 200_000


def test_moving_a_node_that_carries_money_by_plan_is_refused_unless_forced(fleet: Fleet) -> None:
    assert fleet.spend.authorize("sales-agent-02", 400_000, capture=True).approved
    [preview] = apply(fleet, EDITED, dry_run=True)
    [moved] = [c for c in preview.changes if c.kind == "moved"]
    assert moved.unsafe_reason == "sales-agent-02 holds $0.00 and spent $0.40 in open windows"

    with pytest.raises(FailedPreconditionError, match="sales-agent-02"):
        apply(fleet, EDITED)
    assert fleet.spend.get_budget("sales-agent-02").parent_id == "sales-agents"

    apply(fleet, EDITED, force=True)
    assert fleet.spend.get_budget("sales-agent-02").parent_id == "content-agents"
    assert fleet.spend.authorize("sales-agent-02", 100_000, capture=True).approved
    assert fleet.spent("content-agents", Window.MONTH) == 100_000


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("account: [unclosed", "not valid YAML"),
        (
            FLEET_TEXT.replace("limits: {day: 20, per_transaction: 1}}", "limits: {dya: 20}}", 1),
            r"unknown key\(s\) dya",
        ),
        (FLEET_TEXT.replace("{month: 1000}", "{month: -5}"), "pools\\[2\\].limits.month"),
        (FLEET_TEXT.replace("currency: USD", "currency: EUR"), "cannot change its currency"),
        (FLEET_TEXT.replace("sales-agent-02", "sales-agent-01"), "more than once"),
        (
            FLEET_TEXT.replace("      - {id: sales-agent-01, limits: {day: 30, per_transaction: 1}}\n", "").replace(
                "  - id: content-agents\n", "  - id: sales-agent-01\n"
            ),
            "is a wallet and cannot become a pool",
        ),
        (FLEET_TEXT.replace("breaker", "x") + "  - {id: p9, breaker: {multiplier: 0}}\n", "multiplier"),
        ("", "expected a mapping|account"),
    ],
    ids=["yaml", "unknown-key", "negative", "currency", "duplicate", "kind", "breaker", "empty"],
)
def test_an_invalid_plan_is_refused_and_changes_nothing(fleet: Fleet, text: str, match: str) -> None:
    before = fleet.admin.tree()
    with pytest.raises(InvalidArgumentError, match=match):
        apply(fleet, text)
    with pytest.raises(InvalidArgumentError, match=match):
        apply(fleet, text, dry_run=True)
    assert fleet.admin.tree() == before


def test_a_plan_s_shadow_and_breaker_settings_take_effect(fleet: Fleet) -> None:
    apply(fleet, EDITED.replace("  - id: ramp-agents\n", "  - id: ramp-agents\n    wallets: [{id: ramp-01}]\n"))
    # The pool is in shadow mode: its $100 month is reported, not enforced.
    for _ in range(101):
        assert fleet.spend.authorize("ramp-01", USD, capture=True).approved
    result = fleet.spend.authorize("ramp-01", USD)
    assert result.approved
    assert result.would_deny_reason is DenyReason.WINDOW_LIMIT


def large_plan(wallets: int) -> str:
    lines = ["account: {id: mega, limits: {month: 1000000}}", "pools:"]
    for pool in range(10):
        lines += [f"  - id: mega-pool-{pool}", "    limits: {month: 100000}", "    wallets:"]
        lines += [
            f"      - {{id: mega-{pool}-{index:04d}, limits: {{day: 5, per_transaction: 1}}}}"
            for index in range(wallets // 10)
        ]
    return "\n".join(lines) + "\n"


@pytest.mark.slow
@pytest.mark.redis
def test_a_plan_of_ten_thousand_wallets_applies_with_progress(start_fleet: StartFleet) -> None:
    # The default request cap (64 KiB) is too small for this plan; see test_a_large_plan_fits_the_default_cap.
    fleet = start_fleet("redis", plan=None, message_size_max_bytes=4 * 1024 * 1024)
    text = large_plan(10_000)
    total = 1 + 10 + 10_000

    updates = apply(fleet, text)

    *progress, last = updates
    assert len(progress) >= 10
    assert all(not update.done and update.nodes_total == total for update in progress)
    done = [update.nodes_done for update in progress]
    assert done == sorted(set(done))
    assert done[-1] == total
    assert (last.done, last.applied, last.nodes_done, last.nodes_total) == (True, True, total, total)
    assert len(last.changes) == total
    assert fleet.spend.authorize("mega-9-0999", USD).approved
    assert fleet.spend.get_budget("mega-9-0999").parent_id == "mega-pool-9"


def test_a_large_plan_fits_the_default_cap(start_fleet: StartFleet) -> None:
    fleet = start_fleet(plan=None)
    assert apply(fleet, large_plan(2_000))[-1].applied
