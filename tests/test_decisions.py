"""Table-driven decisions: one row is a tree with limits, some prior spending, a request and the decision.

The tree is always the same three levels::

    account A
    └── pool P
        ├── wallet W    (the requests spend from W)
        └── wallet W2   (a sibling, to use up the pool's and the account's budgets)

Each row says which limits each node has, which nodes are frozen, what was spent before (approved one-shots
or holds), and the expected decision, reason, denying node and denying window. The rows cover every
DenyReason at every level and the precedence between them: frozen, then service, then per-transaction, then
velocity, then windows; within windows the node nearest the wallet first, then day, week, month, total.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pytest

from helpers import USD, command, plan_from
from spendgate.clock import ManualClock
from spendgate.core import SpendCore
from spendgate.domain import MONEY_WINDOWS, Decision, DenyReason, NodeWindow, Window

APPROVED, DENIED = Decision.APPROVED, Decision.DENIED
FROZEN = DenyReason.FROZEN
SERVICE = DenyReason.SERVICE_NOT_ALLOWED
PER_TX = DenyReason.PER_TRANSACTION_LIMIT
VELOCITY = DenyReason.VELOCITY_LIMIT
WINDOW = DenyReason.WINDOW_LIMIT
DAY, WEEK, MONTH, TOTAL, MINUTE, NONE = (
    Window.DAY,
    Window.WEEK,
    Window.MONTH,
    Window.TOTAL,
    Window.MINUTE,
    Window.NONE,
)


@dataclasses.dataclass(frozen=True)
class Spend:
    """A spend made before the request: approved unless ``expect_approved`` says otherwise."""

    wallet: str
    dollars: float
    hold: bool = False
    service: str = ""
    expect_approved: bool = True


@dataclasses.dataclass(frozen=True)
class Row:
    """One decision: tree, state, request, and the expected answer."""

    name: str
    limits: dict[str, dict[str, Any]]
    amount: float
    decision: Decision
    reason: DenyReason = DenyReason.NONE
    node: str = ""
    window: Window = Window.NONE
    before: tuple[Spend, ...] = ()
    frozen: tuple[str, ...] = ()
    service: str = ""


def spends(wallet: str, count: int, dollars: float = 1, **options: Any) -> tuple[Spend, ...]:
    return tuple(Spend(wallet, dollars, **options) for _ in range(count))


ROWS = [
    # --- Approvals at the edge of every kind of limit.
    Row("no limits", {}, 1_000_000, APPROVED),
    Row("exactly the per-transaction limit", {"W": {"per_transaction": 1}}, 1, APPROVED),
    Row("exactly what is left of the day", {"W": {"day": 10}}, 4, APPROVED, before=(Spend("W", 6),)),
    Row("exactly the velocity", {"W": {"velocity_per_minute": 3}}, 1, APPROVED, before=spends("W", 2)),
    Row("an allowed service", {"W": {"allowed_services": ["api.a", "api.b"]}}, 1, APPROVED, service="api.b"),
    Row(
        "services allowed at every level",
        {
            "W": {"allowed_services": ["api.a"]},
            "P": {"allowed_services": ["api.a", "api.b"]},
            "A": {"allowed_services": ["api.a"]},
        },
        1,
        APPROVED,
        service="api.a",
    ),
    Row("a sibling's spend does not count on W", {"W": {"day": 5}}, 5, APPROVED, before=(Spend("W2", 50),)),
    Row(
        "denials do not count toward velocity",
        {"W": {"velocity_per_minute": 1, "per_transaction": 1}},
        1,
        APPROVED,
        before=(Spend("W", 2, expect_approved=False), Spend("W", 2, expect_approved=False)),
    ),
    Row(
        "denials do not count toward windows",
        {"W": {"day": 2}},
        2,
        APPROVED,
        before=(Spend("W", 3, expect_approved=False),),
    ),
    # --- FROZEN at every level.
    Row("wallet frozen", {}, 1, DENIED, FROZEN, "W", NONE, frozen=("W",)),
    Row("pool frozen", {}, 1, DENIED, FROZEN, "P", NONE, frozen=("P",)),
    Row("account frozen", {}, 1, DENIED, FROZEN, "A", NONE, frozen=("A",)),
    Row("a frozen sibling does not matter", {}, 1, APPROVED, frozen=("W2",)),
    # --- SERVICE_NOT_ALLOWED at every level.
    Row("wallet service", {"W": {"allowed_services": ["api.a"]}}, 1, DENIED, SERVICE, "W", NONE, service="api.b"),
    Row("pool service", {"P": {"allowed_services": ["api.a"]}}, 1, DENIED, SERVICE, "P", NONE, service="api.b"),
    Row("account service", {"A": {"allowed_services": ["api.a"]}}, 1, DENIED, SERVICE, "A", NONE, service="api.b"),
    Row(
        "an unnamed service under an allow-list",
        {"W": {"allowed_services": ["api.a"]}},
        1,
        DENIED,
        SERVICE,
        "W",
        NONE,
        service="",
    ),
    Row(
        "service names match exactly",
        {"P": {"allowed_services": ["api.a"]}},
        1,
        DENIED,
        SERVICE,
        "P",
        NONE,
        service="API.A",
    ),
    Row(
        "wallet allows, pool does not",
        {
            "W": {"allowed_services": ["api.a", "api.b"]},
            "P": {"allowed_services": ["api.a"]},
        },
        1,
        DENIED,
        SERVICE,
        "P",
        NONE,
        service="api.b",
    ),
    # --- PER_TRANSACTION_LIMIT at every level.
    Row("wallet per-transaction", {"W": {"per_transaction": 1}}, 1.000001, DENIED, PER_TX, "W", NONE),
    Row("pool per-transaction", {"P": {"per_transaction": 1}}, 2, DENIED, PER_TX, "P", NONE),
    Row("account per-transaction", {"A": {"per_transaction": 1}}, 2, DENIED, PER_TX, "A", NONE),
    Row(
        "the nearer per-transaction limit first",
        {"W": {"per_transaction": 5}, "P": {"per_transaction": 1}},
        6,
        DENIED,
        PER_TX,
        "W",
        NONE,
    ),
    Row(
        "a pool limit tighter than the wallet's",
        {"W": {"per_transaction": 5}, "P": {"per_transaction": 1}},
        2,
        DENIED,
        PER_TX,
        "P",
        NONE,
    ),
    # --- VELOCITY_LIMIT at every level (denied in the minute window).
    Row("wallet velocity", {"W": {"velocity_per_minute": 2}}, 1, DENIED, VELOCITY, "W", MINUTE, before=spends("W", 2)),
    Row("pool velocity", {"P": {"velocity_per_minute": 2}}, 1, DENIED, VELOCITY, "P", MINUTE, before=spends("W2", 2)),
    Row(
        "account velocity",
        {"A": {"velocity_per_minute": 3}},
        1,
        DENIED,
        VELOCITY,
        "A",
        MINUTE,
        before=(*spends("W2", 2), Spend("W", 1, hold=True)),
    ),
    Row(
        "holds count toward velocity",
        {"W": {"velocity_per_minute": 1}},
        1,
        DENIED,
        VELOCITY,
        "W",
        MINUTE,
        before=(Spend("W", 1, hold=True),),
    ),
    # --- WINDOW_LIMIT for every window at every level, held money counting like spent money.
    Row("wallet day", {"W": {"day": 10}}, 1, DENIED, WINDOW, "W", DAY, before=(Spend("W", 10),)),
    Row("wallet week", {"W": {"week": 10}}, 1, DENIED, WINDOW, "W", WEEK, before=(Spend("W", 10),)),
    Row("wallet month", {"W": {"month": 10}}, 1, DENIED, WINDOW, "W", MONTH, before=(Spend("W", 10),)),
    Row("wallet total", {"W": {"total": 10}}, 1, DENIED, WINDOW, "W", TOTAL, before=(Spend("W", 10),)),
    Row("wallet day, by a hold", {"W": {"day": 10}}, 1, DENIED, WINDOW, "W", DAY, before=(Spend("W", 10, hold=True),)),
    Row("pool day", {"P": {"day": 10}}, 1, DENIED, WINDOW, "P", DAY, before=(Spend("W2", 10),)),
    Row("pool week", {"P": {"week": 10}}, 1, DENIED, WINDOW, "P", WEEK, before=(Spend("W2", 10),)),
    Row("pool month", {"P": {"month": 10}}, 1, DENIED, WINDOW, "P", MONTH, before=(Spend("W2", 10),)),
    Row("pool total", {"P": {"total": 10}}, 1, DENIED, WINDOW, "P", TOTAL, before=(Spend("W2", 10),)),
    Row(
        "pool month, by a sibling's hold",
        {"P": {"month": 10}},
        1,
        DENIED,
        WINDOW,
        "P",
        MONTH,
        before=(Spend("W2", 10, hold=True),),
    ),
    Row("account day", {"A": {"day": 10}}, 1, DENIED, WINDOW, "A", DAY, before=(Spend("W2", 10),)),
    Row("account week", {"A": {"week": 10}}, 1, DENIED, WINDOW, "A", WEEK, before=(Spend("W2", 10),)),
    Row(
        "account month (the credit line)",
        {"A": {"month": 10}},
        1,
        DENIED,
        WINDOW,
        "A",
        MONTH,
        before=(Spend("W2", 10),),
    ),
    Row("account total", {"A": {"total": 10}}, 1, DENIED, WINDOW, "A", TOTAL, before=(Spend("W2", 10),)),
    Row("a request alone larger than a window", {"A": {"month": 10}}, 10.000001, DENIED, WINDOW, "A", MONTH),
    # --- Precedence between reasons: a lower reason anywhere on the chain wins.
    Row(
        "frozen account beats everything on the wallet",
        {
            "W": {"allowed_services": ["api.a"], "per_transaction": 1, "velocity_per_minute": 1, "day": 1},
        },
        2,
        DENIED,
        FROZEN,
        "A",
        NONE,
        frozen=("A",),
        service="api.b",
        before=(Spend("W", 1, service="api.a"),),
    ),
    Row("the frozen node nearest the wallet", {}, 1, DENIED, FROZEN, "W", NONE, frozen=("A", "P", "W")),
    Row(
        "frozen pool beats a service refused by the wallet",
        {"W": {"allowed_services": ["api.a"]}},
        1,
        DENIED,
        FROZEN,
        "P",
        NONE,
        frozen=("P",),
        service="api.b",
    ),
    Row(
        "service at the account beats per-transaction at the wallet",
        {
            "W": {"per_transaction": 1},
            "A": {"allowed_services": ["api.a"]},
        },
        2,
        DENIED,
        SERVICE,
        "A",
        NONE,
        service="api.b",
    ),
    Row(
        "service at the pool beats velocity and window at the wallet",
        {
            "W": {"velocity_per_minute": 1, "day": 1},
            "P": {"allowed_services": ["api.a"]},
        },
        1,
        DENIED,
        SERVICE,
        "P",
        NONE,
        service="api.b",
        before=(Spend("W", 1, service="api.a"),),
    ),
    Row(
        "per-transaction at the account beats velocity at the wallet",
        {
            "W": {"velocity_per_minute": 1},
            "A": {"per_transaction": 2},
        },
        3,
        DENIED,
        PER_TX,
        "A",
        NONE,
        before=(Spend("W", 1),),
    ),
    Row(
        "per-transaction at the pool beats a window at the wallet",
        {
            "W": {"day": 1},
            "P": {"per_transaction": 2},
        },
        3,
        DENIED,
        PER_TX,
        "P",
        NONE,
    ),
    Row(
        "velocity at the account beats a window at the wallet",
        {
            "W": {"day": 2},
            "A": {"velocity_per_minute": 2},
        },
        1,
        DENIED,
        VELOCITY,
        "A",
        MINUTE,
        before=spends("W", 2),
    ),
    Row(
        "the velocity nearest the wallet",
        {
            "W": {"velocity_per_minute": 2},
            "P": {"velocity_per_minute": 2},
        },
        1,
        DENIED,
        VELOCITY,
        "W",
        MINUTE,
        before=spends("W", 2),
    ),
    # --- Precedence within windows: the node nearest the wallet, then day, week, month, total.
    Row(
        "wallet total beats pool day",
        {"W": {"total": 5}, "P": {"day": 5}},
        1,
        DENIED,
        WINDOW,
        "W",
        TOTAL,
        before=(Spend("W", 5),),
    ),
    Row(
        "pool month beats account day",
        {"P": {"month": 5}, "A": {"day": 5}},
        1,
        DENIED,
        WINDOW,
        "P",
        MONTH,
        before=(Spend("W2", 5),),
    ),
    Row(
        "wallet day beats wallet total",
        {"W": {"day": 5, "total": 5}},
        1,
        DENIED,
        WINDOW,
        "W",
        DAY,
        before=(Spend("W", 5),),
    ),
    Row(
        "wallet week beats wallet month",
        {"W": {"week": 5, "month": 5, "total": 5}},
        1,
        DENIED,
        WINDOW,
        "W",
        WEEK,
        before=(Spend("W", 5),),
    ),
    Row(
        "wallet month beats wallet total",
        {"W": {"day": 9, "month": 5, "total": 5}},
        1,
        DENIED,
        WINDOW,
        "W",
        MONTH,
        before=(Spend("W", 5),),
    ),
    Row(
        "account day beats account total",
        {"A": {"day": 5, "total": 5}},
        1,
        DENIED,
        WINDOW,
        "A",
        DAY,
        before=(Spend("W2", 5),),
    ),
]


def plan_for(row: Row, *, frozen_in_plan: bool = False) -> dict[str, Any]:
    def node(name: str) -> dict[str, Any]:
        spec: dict[str, Any] = {"id": name, "limits": row.limits.get(name, {})}
        if frozen_in_plan and name in row.frozen:
            spec["frozen"] = f"{name} frozen by the plan"
        return spec

    return {
        "account": node("A"),
        "pools": [{**node("P"), "wallets": [node("W"), node("W2")]}],
    }


def dollars(amount: float) -> int:
    return round(amount * USD)


async def counters(core: SpendCore) -> dict[tuple[str, Window], tuple[int, int]]:
    out = {}
    for node in ("A", "P", "W", "W2"):
        budget = await core.get_budget(node)
        for window in MONEY_WINDOWS:
            entry = budget.window(window)
            out[node, window] = (entry.spent_micros, entry.held_micros)
    return out


@pytest.mark.parametrize("row", ROWS, ids=[row.name for row in ROWS])
async def test_decision(make_store: Callable[..., Any], clock: ManualClock, row: Row) -> None:
    store = make_store()
    core = SpendCore(store, clock)
    await core.apply_plan(plan_from(plan_for(row)))
    for spend in row.before:
        result = await core.authorize(
            command(spend.wallet, dollars(spend.dollars), capture=not spend.hold, service=spend.service)
        )
        assert result.approved is spend.expect_approved, (spend, result.message)
    # Freezes come after the earlier spending, as an operator's freeze in an incident would.
    for node in row.frozen:
        await store.freeze("A", node, f"{node} frozen by the table", void_holds=False, now_ms=clock.now_ms())
    before = await counters(core)

    result = await core.authorize(command("W", dollars(row.amount), service=row.service))

    assert result.decision is row.decision, result.message
    assert result.deny_reason is row.reason, result.message
    after = await counters(core)
    if row.decision is DENIED:
        assert result.denied_by == NodeWindow(row.node, row.window)
        assert result.authorization_id == ""
        assert row.node in result.message
        assert after == before, "a denial must change no counter"
    else:
        assert result.denied_by is None
        assert result.authorization_id
        for node in ("W", "P", "A"):
            for window in MONEY_WINDOWS:
                spent, held = before[node, window]
                assert after[node, window] == (spent, held + dollars(row.amount)), (node, window)
        assert {key: value for key, value in after.items() if key[0] == "W2"} == {
            key: value for key, value in before.items() if key[0] == "W2"
        }


def test_the_table_covers_every_reason_at_every_level() -> None:
    covered = {(row.reason, row.node) for row in ROWS if row.decision is DENIED}
    for reason in (FROZEN, SERVICE, PER_TX, VELOCITY, WINDOW):
        for node in ("W", "P", "A"):
            assert (reason, node) in covered, (reason, node)
    windows = {(row.node, row.window) for row in ROWS if row.reason is WINDOW}
    assert windows >= {(node, window) for node in ("W", "P", "A") for window in MONEY_WINDOWS}


# ---------------------------------------------------------------------------------------------------------
# Velocity over time, and messages.


async def test_velocity_resets_at_the_next_minute(make_store: Callable[..., Any], clock: ManualClock) -> None:
    core = SpendCore(make_store(), clock)
    await core.apply_plan(plan_from(plan_for(Row("", {"P": {"velocity_per_minute": 2}}, 1, APPROVED))))
    clock.advance(30_000)  # 10:00:30: the minute started at 10:00:00.
    assert (await core.authorize(command("W", USD))).approved
    assert (await core.authorize(command("W2", USD, capture=True))).approved

    clock.set(clock.now_ms() + 29_999)  # 10:00:59.999, still the same minute.
    denied = await core.authorize(command("W", USD))
    assert (denied.deny_reason, denied.denied_by) == (VELOCITY, NodeWindow("P", MINUTE))
    assert denied.message == "denied: P already approved 2 of its 2 transactions this minute"
    assert (await core.get_budget("P")).velocity_used == 2

    clock.advance(1)  # 10:01:00: a new minute, whatever happened 30 seconds ago.
    assert (await core.get_budget("P")).velocity_used == 0
    assert (await core.authorize(command("W", USD))).approved
    assert (await core.authorize(command("W", USD))).approved
    assert (await core.authorize(command("W", USD))).denied_by == NodeWindow("P", MINUTE)


@pytest.mark.parametrize("level", ["P", "A"])
async def test_a_node_frozen_in_the_plan_denies_until_unfrozen(
    make_store: Callable[..., Any], clock: ManualClock, level: str
) -> None:
    store = make_store()
    core = SpendCore(store, clock)
    await core.apply_plan(plan_from(plan_for(Row("", {}, 1, APPROVED, frozen=(level,)), frozen_in_plan=True)))
    assert (await core.get_budget(level)).frozen_reason == f"{level} frozen by the plan"
    assert (await core.authorize(command("W", USD))).denied_by == NodeWindow(level, NONE)
    # Re-applying the plan without the freeze does not lift it (only an unfreeze does).
    await core.apply_plan(plan_from(plan_for(Row("", {}, 1, APPROVED))))
    assert (await core.authorize(command("W", USD))).deny_reason is FROZEN

    await store.freeze("A", level, "", void_holds=False, now_ms=clock.now_ms())

    assert (await core.authorize(command("W", USD))).approved


async def test_denial_messages_say_what_denied_and_why(make_store: Callable[..., Any], clock: ManualClock) -> None:
    core = SpendCore(make_store(), clock)
    limits = {"W": {"allowed_services": ["api.a"], "per_transaction": 5, "day": 8}}
    await core.apply_plan(plan_from(plan_for(Row("", limits, 1, APPROVED, frozen=("W2",)), frozen_in_plan=True)))

    assert (await core.authorize(command("W", USD, service="api.b"))).message == (
        "denied: W does not allow this service"
    )
    assert (await core.authorize(command("W", 6 * USD, service="api.a"))).message == (
        "denied: $6.00 is above the per-transaction limit of W ($5.00)"
    )
    assert (await core.authorize(command("W", 5 * USD, service="api.a"))).approved
    assert (await core.authorize(command("W", 4 * USD, service="api.a"))).message == (
        "denied: $4.00 would take W past its day limit of $8.00 ($5.00 spent or held)"
    )
    assert (await core.authorize(command("W2", USD))).message == "denied: W2 is frozen"
