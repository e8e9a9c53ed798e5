"""The contract of the spend core: SpendCore over RedisStore and the Lua scripts, on fakeredis and real Redis.

Every test runs on both backends (the ``backend`` fixture), so the embedded default and a production Redis
are held to the same behaviour: holds, captures, voids, expiry, windows, the ledger outbox, idempotency, tree
changes, and bad input that changes nothing.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import datetime
import json
from collections.abc import Awaitable, Callable
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from helpers import (
    FLEET_YAML,
    START,
    START_MS,
    USD,
    Usage,
    command,
    ms,
    nested_plan,
    plan_from,
    snapshot,
)
from spendgate.admin import AdminCore
from spendgate.clock import ManualClock
from spendgate.core import SpendCore
from spendgate.domain import (
    MONEY_WINDOWS,
    AlreadyExistsError,
    AuthorizeCommand,
    CaptureResult,
    Decision,
    DenyReason,
    FailedPreconditionError,
    HoldState,
    InvalidArgumentError,
    Limits,
    NodeKind,
    NodeWindow,
    NotFoundError,
    PermissionDeniedError,
    RemainingBudget,
    ResourceExhaustedError,
    VoidResult,
    Window,
)
from spendgate.money import MONEY_MICROS_MAX
from spendgate.plan import PlanError
from spendgate.store.protocol import Chain, TokenRecord
from spendgate.store.redis_store import RedisStore
from spendgate.windows import windows_at

ApplyPlan = Callable[[Any], Awaitable[Any]]

PLAN: dict[str, Any] = {
    "account": {"id": "acme", "limits": {"month": 1000}},
    "pools": [
        {
            "id": "research",
            "limits": {"month": 300},
            "wallets": [
                {"id": "r1", "limits": {"day": 50, "per_transaction": 10}},
                {"id": "r2", "limits": {"day": 50}},
            ],
        },
        {"id": "sales", "limits": {"month": 200}, "wallets": [{"id": "s1", "limits": {"day": 20}}]},
    ],
    "wallets": [{"id": "direct"}],
}
R1_CHAIN = ("r1", "research", "acme")


@pytest.fixture
async def acme(core: SpendCore, apply_plan: ApplyPlan) -> SpendCore:
    """The core with PLAN applied."""
    await apply_plan(PLAN)
    return core


async def usage(core: SpendCore, node_id: str) -> dict[Window, Usage]:
    budget = await core.get_budget(node_id)
    return {window.window: Usage(window.spent_micros, window.held_micros) for window in budget.windows}


async def assert_usage(core: SpendCore, nodes: tuple[str, ...], *, spent: int, held: int) -> None:
    """Every money window of every node in ``nodes`` shows exactly ``spent`` and ``held``."""
    for node in nodes:
        assert await usage(core, node) == dict.fromkeys(MONEY_WINDOWS, Usage(spent, held)), node


async def outbox(store: RedisStore, account: str = "acme") -> list[dict[str, str]]:
    return [fields for _, fields in await store.client.xrange(store.keys.outbox(account))]


# ---------------------------------------------------------------------------------------------------------
# Hold, capture, void.


async def test_authorize_holds_the_amount_on_every_level_of_the_chain(acme: SpendCore, store: RedisStore) -> None:
    result = await acme.authorize(command("r1", 3 * USD))

    assert result.decision is Decision.APPROVED
    assert result.approved
    assert result.deny_reason is DenyReason.NONE
    assert result.denied_by is None
    assert result.authorization_id.startswith("acme:")
    assert result.hold_state is HoldState.HELD
    assert result.captured_micros == 0
    assert result.hold_expires_at_ms == START_MS + store.hold_ttl_ms
    assert result.message == "approved: $3.00 held"
    await assert_usage(acme, R1_CHAIN, spent=0, held=3 * USD)
    await assert_usage(acme, ("r2", "sales", "s1", "direct"), spent=0, held=0)
    assert await outbox(store) == []


async def test_full_capture_turns_the_hold_into_spend(acme: SpendCore, store: RedisStore) -> None:
    hold = await acme.authorize(command("r1", 3 * USD))

    captured = await acme.capture(hold.authorization_id, 3 * USD, "cap-1")

    assert captured == CaptureResult(hold.authorization_id, 3 * USD, 0, HoldState.CAPTURED)
    await assert_usage(acme, R1_CHAIN, spent=3 * USD, held=0)
    assert await store.client.zcard(store.keys.holds("acme")) == 0


async def test_partial_capture_settles_part_and_releases_the_rest(acme: SpendCore) -> None:
    hold = await acme.authorize(command("r1", 5 * USD))

    captured = await acme.capture(hold.authorization_id, 2 * USD + 1, "cap-1")

    assert captured.captured_micros == 2 * USD + 1
    assert captured.released_micros == 3 * USD - 1
    await assert_usage(acme, R1_CHAIN, spent=2 * USD + 1, held=0)


async def test_void_releases_the_hold_and_a_second_void_answers_the_same(acme: SpendCore, store: RedisStore) -> None:
    hold = await acme.authorize(command("r1", 5 * USD))

    first = await acme.void(hold.authorization_id)
    again = await acme.void(hold.authorization_id)

    assert first == VoidResult(hold.authorization_id, 5 * USD, HoldState.VOIDED)
    assert again == first
    await assert_usage(acme, R1_CHAIN, spent=0, held=0)
    assert await store.client.zcard(store.keys.holds("acme")) == 0
    assert await outbox(store) == []


async def test_one_shot_capture_settles_at_once(acme: SpendCore, store: RedisStore) -> None:
    result = await acme.authorize(command("r1", 4 * USD, capture=True))

    assert result.approved
    assert result.hold_state is HoldState.CAPTURED
    assert result.captured_micros == 4 * USD
    assert result.hold_expires_at_ms == 0
    assert result.message == "approved: $4.00 settled"
    await assert_usage(acme, R1_CHAIN, spent=4 * USD, held=0)
    assert await store.client.zcard(store.keys.holds("acme")) == 0
    with pytest.raises(FailedPreconditionError, match="already captured"):
        await acme.capture(result.authorization_id, USD, "cap-1")
    with pytest.raises(FailedPreconditionError, match="already captured"):
        await acme.void(result.authorization_id)
    await assert_usage(acme, R1_CHAIN, spent=4 * USD, held=0)


async def test_remaining_budget_names_the_tightest_window_after_approvals_and_denials(acme: SpendCore) -> None:
    first = await acme.authorize(command("r1", 8 * USD, capture=True))
    # r1's day (50 - 8 = 42) is tighter than research's month (300 - 8) and acme's month (1000 - 8).
    assert first.remaining == RemainingBudget("r1", Window.DAY, 50 * USD, 42 * USD)

    for _ in range(5):
        assert (await acme.authorize(command("r1", 8 * USD))).approved
    denied = await acme.authorize(command("r1", 3 * USD))

    assert denied.decision is Decision.DENIED
    assert denied.authorization_id == ""
    assert denied.deny_reason is DenyReason.WINDOW_LIMIT
    assert denied.denied_by == NodeWindow("r1", Window.DAY)
    assert denied.remaining == RemainingBudget("r1", Window.DAY, 50 * USD, 2 * USD)
    assert denied.message == "denied: $3.00 would take r1 past its day limit of $50.00 ($48.00 spent or held)"

    # On a wallet without limits of its own the tightest window is up the chain.
    direct = await acme.authorize(command("direct", USD))
    assert direct.remaining == RemainingBudget("acme", Window.MONTH, 1000 * USD, (1000 - 48 - 1) * USD)


async def test_budget_reports_configuration_windows_and_remaining(acme: SpendCore) -> None:
    await acme.authorize(command("r1", 2 * USD, capture=True))
    await acme.authorize(command("r1", 3 * USD))

    budget = await acme.get_budget("r1")

    assert (budget.node_id, budget.kind, budget.parent_id, budget.account_id) == (
        "r1",
        NodeKind.WALLET,
        "research",
        "acme",
    )
    assert (budget.currency, budget.time_zone, budget.frozen_reason, budget.frozen) == ("USD", "UTC", "", False)
    assert budget.per_transaction_micros == 10 * USD
    assert budget.velocity_per_minute is None
    assert budget.allowed_services == ()
    day = budget.window(Window.DAY)
    assert (day.window_id, day.limit_micros, day.spent_micros, day.held_micros) == (
        "2026-11-30",
        50 * USD,
        2 * USD,
        3 * USD,
    )
    assert day.remaining_micros == 45 * USD
    assert day.ends_at_ms == ms(datetime.datetime(2026, 12, 1, tzinfo=datetime.UTC))
    week = budget.window(Window.WEEK)
    assert (week.window_id, week.limit_micros, week.remaining_micros) == ("2026-W49", None, None)
    assert week.ends_at_ms == ms(datetime.datetime(2026, 12, 7, tzinfo=datetime.UTC))
    assert budget.window(Window.MONTH).window_id == "2026-11"
    total = budget.window(Window.TOTAL)
    assert (total.window_id, total.ends_at_ms, total.spent_micros, total.held_micros) == ("all", 0, 2 * USD, 3 * USD)

    account = await acme.get_budget("acme")
    assert (account.kind, account.parent_id) == (NodeKind.ACCOUNT, None)
    assert account.window(Window.MONTH).remaining_micros == 995 * USD
    with pytest.raises(NotFoundError, match="no node 'ghost'"):
        await acme.get_budget("ghost")


async def test_open_holds_per_wallet_are_bounded(
    make_store: Callable[..., RedisStore], clock: ManualClock, key_prefix: str
) -> None:
    store = make_store(key_prefix, holds_per_wallet_max=2)
    core = SpendCore(store, clock)
    await core.apply_plan(plan_from(PLAN))
    first = await core.authorize(command("r1", USD))
    await core.authorize(command("r1", USD))
    before = await snapshot(store.client, key_prefix)

    with pytest.raises(ResourceExhaustedError, match="already has 2 open holds"):
        await core.authorize(command("r1", USD))

    assert await snapshot(store.client, key_prefix) == before
    assert (await core.authorize(command("r1", USD, capture=True))).approved  # one-shots hold nothing
    await core.void(first.authorization_id)
    assert (await core.authorize(command("r1", USD))).approved


# ---------------------------------------------------------------------------------------------------------
# Expiry.


async def test_a_hold_expires_on_sweep_and_gives_its_money_back_to_every_level(
    acme: SpendCore, store: RedisStore, clock: ManualClock
) -> None:
    hold = await acme.authorize(command("r1", 5 * USD))

    clock.advance(store.hold_ttl_ms - 1)
    assert await acme.sweep() == 0
    await assert_usage(acme, R1_CHAIN, spent=0, held=5 * USD)

    clock.advance(1)
    assert await acme.sweep() == 1
    assert await acme.sweep() == 0
    await assert_usage(acme, R1_CHAIN, spent=0, held=0)
    with pytest.raises(FailedPreconditionError, match="expired"):
        await acme.capture(hold.authorization_id, USD, "late-capture")
    with pytest.raises(FailedPreconditionError, match="expired"):
        await acme.void(hold.authorization_id)
    await assert_usage(acme, R1_CHAIN, spent=0, held=0)
    assert await outbox(store) == []


async def test_an_expired_hold_never_blocks_a_new_authorization_even_without_sweep(
    acme: SpendCore, store: RedisStore, clock: ManualClock
) -> None:
    old = await acme.authorize(command("r2", 50 * USD))
    blocked = await acme.authorize(command("r2", USD))
    assert blocked.denied_by == NodeWindow("r2", Window.DAY)

    clock.advance(store.hold_ttl_ms)
    result = await acme.authorize(command("r2", 50 * USD, capture=True))

    assert result.approved, result.message
    assert result.remaining == RemainingBudget("r2", Window.DAY, 50 * USD, 0)
    await assert_usage(acme, ("r2", "research", "acme"), spent=50 * USD, held=0)
    assert await acme.sweep() == 0  # The authorization already released it.
    with pytest.raises(FailedPreconditionError, match="expired"):
        await acme.capture(old.authorization_id, USD, "late")


async def test_a_budget_read_does_not_count_expired_holds(
    acme: SpendCore, store: RedisStore, clock: ManualClock
) -> None:
    await acme.authorize(command("r1", 5 * USD))
    clock.advance(store.hold_ttl_ms)

    await assert_usage(acme, R1_CHAIN, spent=0, held=0)


async def test_capture_just_before_expiry_succeeds_and_at_expiry_fails(
    acme: SpendCore, store: RedisStore, clock: ManualClock
) -> None:
    early = await acme.authorize(command("r1", 2 * USD))
    late = await acme.authorize(command("r1", 3 * USD))
    clock.advance(store.hold_ttl_ms - 1)
    assert (await acme.capture(early.authorization_id, 2 * USD, "c-early")).captured_micros == 2 * USD

    clock.advance(1)
    with pytest.raises(FailedPreconditionError, match="expired"):
        await acme.capture(late.authorization_id, 3 * USD, "c-late")

    # The late hold was released by the failed capture itself, exactly as the sweeper would have.
    await assert_usage(acme, R1_CHAIN, spent=2 * USD, held=0)
    assert await acme.sweep() == 0


# ---------------------------------------------------------------------------------------------------------
# Calendar windows in the account's time zone.

ZONES = ["America/New_York", "Asia/Kolkata", "Pacific/Auckland"]


def next_local_midnight(tz: str, days: int = 1) -> datetime.datetime:
    local = START.astimezone(ZoneInfo(tz))
    return datetime.datetime.combine(local.date() + datetime.timedelta(days=days), datetime.time(), ZoneInfo(tz))


@pytest.mark.parametrize("tz", ZONES)
async def test_the_day_window_rolls_over_at_local_midnight(
    core: SpendCore, apply_plan: ApplyPlan, clock: ManualClock, tz: str
) -> None:
    await apply_plan({"account": {"id": "acme", "time_zone": tz}, "wallets": [{"id": "w", "limits": {"day": 10}}]})
    boundary = next_local_midnight(tz)
    assert ms(boundary) % 86_400_000 != 0, "the boundary must not be a UTC midnight"
    assert (await core.authorize(command("w", 10 * USD, capture=True))).approved

    clock.set(ms(boundary) - 1)
    denied = await core.authorize(command("w", USD))
    assert (denied.deny_reason, denied.denied_by) == (DenyReason.WINDOW_LIMIT, NodeWindow("w", Window.DAY))

    clock.set(ms(boundary))
    assert (await core.authorize(command("w", USD, capture=True))).approved
    budget = await core.get_budget("w")
    day = budget.window(Window.DAY)
    assert (day.window_id, day.spent_micros) == (boundary.date().isoformat(), USD)
    assert day.ends_at_ms == ms(boundary + datetime.timedelta(days=1))
    assert budget.window(Window.TOTAL).spent_micros == 11 * USD


@pytest.mark.parametrize("tz", ZONES)
async def test_the_week_window_rolls_over_at_local_monday_midnight(
    core: SpendCore, apply_plan: ApplyPlan, clock: ManualClock, tz: str
) -> None:
    await apply_plan({"account": {"id": "acme", "time_zone": tz}, "wallets": [{"id": "w", "limits": {"week": 10}}]})
    local = START.astimezone(ZoneInfo(tz))
    boundary = next_local_midnight(tz, days=7 - local.weekday())
    assert boundary.weekday() == 0
    assert (await core.authorize(command("w", 10 * USD, capture=True))).approved

    clock.set(ms(boundary) - 1)
    denied = await core.authorize(command("w", USD))
    assert denied.denied_by == NodeWindow("w", Window.WEEK)

    clock.set(ms(boundary))
    assert (await core.authorize(command("w", 10 * USD, capture=True))).approved
    week = (await core.get_budget("w")).window(Window.WEEK)
    iso = boundary.date().isocalendar()
    assert (week.window_id, week.spent_micros) == (f"{iso.year}-W{iso.week:02d}", 10 * USD)


@pytest.mark.parametrize("tz", ZONES)
async def test_the_credit_line_month_rolls_over_at_the_local_first_of_the_month(
    core: SpendCore, apply_plan: ApplyPlan, clock: ManualClock, tz: str
) -> None:
    await apply_plan({"account": {"id": "acme", "time_zone": tz, "limits": {"month": 10}}, "wallets": [{"id": "w"}]})
    local = START.astimezone(ZoneInfo(tz))
    boundary = datetime.datetime(local.year, local.month + 1, 1, tzinfo=ZoneInfo(tz))
    assert (await core.authorize(command("w", 10 * USD, capture=True))).approved

    clock.set(ms(boundary) - 1)
    denied = await core.authorize(command("w", USD))
    assert denied.denied_by == NodeWindow("acme", Window.MONTH)

    clock.set(ms(boundary))
    assert (await core.authorize(command("w", 10 * USD, capture=True))).approved
    month = (await core.get_budget("acme")).window(Window.MONTH)
    assert (month.window_id, month.spent_micros) == ("2026-12", 10 * USD)


async def test_a_day_with_a_daylight_saving_change_lasts_25_hours(store: RedisStore) -> None:
    # New York leaves daylight saving time on Sunday 2026-11-01: that local day is 25 hours long.
    start = datetime.datetime(2026, 11, 1, tzinfo=ZoneInfo("America/New_York"))
    clock = ManualClock(ms(start))
    core = SpendCore(store, clock)
    await core.apply_plan(
        plan_from(
            {"account": {"id": "acme", "time_zone": "America/New_York"}, "wallets": [{"id": "w", "limits": {"day": 1}}]}
        )
    )
    assert (await core.authorize(command("w", USD, capture=True))).approved

    clock.set(ms(start) + 25 * 3_600_000 - 1)
    assert (await core.authorize(command("w", USD))).denied_by == NodeWindow("w", Window.DAY)
    clock.set(ms(start) + 25 * 3_600_000)
    assert (await core.authorize(command("w", USD))).approved
    assert (await core.get_budget("w")).window(Window.DAY).window_id == "2026-11-02"


async def test_a_hold_from_yesterday_is_settled_into_yesterday(
    acme: SpendCore, store: RedisStore, clock: ManualClock
) -> None:
    store.hold_ttl_ms = 2 * 86_400_000  # A hold that outlives its day.
    hold = await acme.authorize(command("r2", 40 * USD))
    clock.set(ms(datetime.datetime(2026, 12, 1, 9, tzinfo=datetime.UTC)))

    # Yesterday's hold does not count against today's day window, but still against the month and total.
    today = await usage(acme, "r2")
    assert today[Window.DAY] == Usage(0, 0)
    assert today[Window.TOTAL] == Usage(0, 40 * USD)
    assert (await acme.authorize(command("r2", 50 * USD, capture=True))).approved

    await acme.capture(hold.authorization_id, 30 * USD, "cap")
    after = await usage(acme, "r2")
    assert after[Window.DAY] == Usage(50 * USD, 0)
    assert after[Window.TOTAL] == Usage(80 * USD, 0)
    entry = (await outbox(store))[-1]
    assert (entry["txn_id"], entry["day"], entry["month"]) == (hold.authorization_id, "2026-11-30", "2026-11")


# ---------------------------------------------------------------------------------------------------------
# Capture and void errors.


async def test_capture_after_void_is_refused(acme: SpendCore) -> None:
    hold = await acme.authorize(command("r1", 5 * USD))
    await acme.void(hold.authorization_id)

    with pytest.raises(FailedPreconditionError, match="it was voided"):
        await acme.capture(hold.authorization_id, 5 * USD, "cap")
    await assert_usage(acme, R1_CHAIN, spent=0, held=0)


async def test_a_second_capture_is_refused_and_a_retry_of_the_first_answers_the_same(
    acme: SpendCore, store: RedisStore
) -> None:
    hold = await acme.authorize(command("r1", 5 * USD))
    first = await acme.capture(hold.authorization_id, 4 * USD, "cap-1")

    assert await acme.capture(hold.authorization_id, 4 * USD, "cap-1") == first
    with pytest.raises(FailedPreconditionError, match=r"already captured \(4000000 micros\)"):
        await acme.capture(hold.authorization_id, 4 * USD, "cap-2")
    with pytest.raises(FailedPreconditionError, match="already captured"):
        await acme.capture(hold.authorization_id, 3 * USD, "cap-1")
    with pytest.raises(FailedPreconditionError, match="already captured"):
        await acme.void(hold.authorization_id)
    await assert_usage(acme, R1_CHAIN, spent=4 * USD, held=0)
    assert len(await outbox(store)) == 1


async def test_capture_above_the_hold_is_invalid_and_changes_nothing(
    acme: SpendCore, store: RedisStore, key_prefix: str
) -> None:
    hold = await acme.authorize(command("r1", 3 * USD))
    before = await snapshot(store.client, key_prefix)

    with pytest.raises(InvalidArgumentError, match="only 3000000 micros are held"):
        await acme.capture(hold.authorization_id, 3 * USD + 1, "cap")

    assert await snapshot(store.client, key_prefix) == before
    assert (await acme.capture(hold.authorization_id, 3 * USD, "cap")).captured_micros == 3 * USD


BAD_HOLD_CALLS = [
    pytest.param("acme:" + "0" * 32, USD, "cap", NotFoundError, "no authorization", id="unknown-id"),
    pytest.param("nobody:" + "a" * 32, USD, "cap", NotFoundError, "no authorization", id="unknown-account"),
    pytest.param("", USD, "cap", InvalidArgumentError, "authorization_id is required", id="empty-id"),
    pytest.param("not-an-id", USD, "cap", InvalidArgumentError, "is malformed", id="malformed-id"),
    pytest.param("acme:" + "A" * 32, USD, "cap", InvalidArgumentError, "is malformed", id="uppercase-token"),
    pytest.param("bad id:" + "a" * 32, USD, "cap", InvalidArgumentError, "may only hold", id="bad-account"),
    pytest.param(None, 0, "cap", InvalidArgumentError, "must be positive", id="zero-amount"),
    pytest.param(None, -USD, "cap", InvalidArgumentError, "must be positive", id="negative-amount"),
    pytest.param(None, 2**63, "cap", InvalidArgumentError, "above the largest amount", id="over-int64"),
    pytest.param(None, USD, "", InvalidArgumentError, "idempotency_key is required", id="empty-key"),
    pytest.param(None, USD, "a key", InvalidArgumentError, "printable ASCII", id="key-with-space"),
]


@pytest.mark.parametrize(("authorization_id", "amount", "key", "error", "message"), BAD_HOLD_CALLS)
async def test_bad_captures_and_voids_raise_and_change_nothing(
    acme: SpendCore,
    store: RedisStore,
    key_prefix: str,
    authorization_id: str | None,
    amount: int,
    key: str,
    error: type[Exception],
    message: str,
) -> None:
    hold = await acme.authorize(command("r1", 3 * USD))
    await acme.authorize(command("r2", 2 * USD, capture=True))
    before = await snapshot(store.client, key_prefix)

    with pytest.raises(error, match=message):
        await acme.capture(authorization_id if authorization_id is not None else hold.authorization_id, amount, key)
    if authorization_id is not None:
        with pytest.raises(error, match=message):
            await acme.void(authorization_id)

    assert await snapshot(store.client, key_prefix) == before


# ---------------------------------------------------------------------------------------------------------
# The ledger outbox.


async def test_the_outbox_carries_every_settlement_with_what_billing_needs_and_nothing_else(
    acme: SpendCore, store: RedisStore, clock: ManualClock
) -> None:
    metadata = {"task": "t-1", "run": "7"}
    hold_command = command("r1", 3 * USD, key="auth-1", service="api.example.com", metadata=metadata)
    hold = await acme.authorize(hold_command)
    voided = await acme.authorize(command("r1", USD))
    await acme.authorize(command("r1", 20 * USD))  # Denied by the per-transaction limit: no settlement.
    await acme.void(voided.authorization_id)
    expiring = await acme.authorize(command("r2", USD))
    assert await outbox(store) == []

    clock.advance(5_000)
    await acme.capture(hold.authorization_id, 2 * USD, "cap-1")
    clock.advance(1_000)
    one_shot = await acme.authorize(command("s1", 7 * USD, key="auth-2", capture=True))
    clock.advance(store.hold_ttl_ms)
    await acme.sweep()
    with pytest.raises(FailedPreconditionError):
        await acme.capture(expiring.authorization_id, USD, "cap-late")

    entries = await outbox(store)
    assert entries == [
        {
            "txn_id": hold.authorization_id,
            "account_id": "acme",
            "wallet_id": "r1",
            "chain": "r1,research,acme",
            "amount_micros": str(2 * USD),
            "authorized_micros": str(3 * USD),
            "currency": "USD",
            "service": "api.example.com",
            "metadata": json.dumps(metadata, sort_keys=True, separators=(",", ":")),
            "authorized_at_ms": str(START_MS),
            "captured_at_ms": str(START_MS + 5_000),
            "day": "2026-11-30",
            "week": "2026-W49",
            "month": "2026-11",
            "idempotency_key": "auth-1",
            "capture_idempotency_key": "cap-1",
        },
        {
            "txn_id": one_shot.authorization_id,
            "account_id": "acme",
            "wallet_id": "s1",
            "chain": "s1,sales,acme",
            "amount_micros": str(7 * USD),
            "authorized_micros": str(7 * USD),
            "currency": "USD",
            "service": "",
            "metadata": "{}",
            "authorized_at_ms": str(START_MS + 6_000),
            "captured_at_ms": str(START_MS + 6_000),
            "day": "2026-11-30",
            "week": "2026-W49",
            "month": "2026-11",
            "idempotency_key": "auth-2",
            "capture_idempotency_key": "auth-2",
        },
    ]
    # The outbox and the counters agree: what was settled is what is spent.
    assert (await usage(acme, "acme"))[Window.TOTAL] == Usage(9 * USD, 0)


# ---------------------------------------------------------------------------------------------------------
# Idempotency.


@pytest.mark.parametrize("capture", [False, True], ids=["hold", "one-shot"])
async def test_a_replay_returns_the_first_answer_and_charges_once(
    acme: SpendCore, store: RedisStore, clock: ManualClock, capture: bool
) -> None:
    request = command("r1", 3 * USD, key="same", capture=capture, metadata={"a": "b"})
    first, first_replayed = await acme.authorize_with_replay(request)
    clock.advance(1_000)
    again, again_replayed = await acme.authorize_with_replay(request)

    assert (first_replayed, again_replayed) == (False, True)
    assert again == first
    assert first.approved
    await assert_usage(acme, R1_CHAIN, spent=3 * USD if capture else 0, held=0 if capture else 3 * USD)
    assert len(await outbox(store)) == (1 if capture else 0)
    assert await store.client.zcard(store.keys.holds("acme")) == (0 if capture else 1)


async def test_a_replay_answers_the_first_decision_even_after_the_budget_changed(acme: SpendCore) -> None:
    big = await acme.authorize(command("r2", 45 * USD))
    denied = await acme.authorize(command("r2", 10 * USD, key="retry-me"))
    assert denied.denied_by == NodeWindow("r2", Window.DAY)
    await acme.void(big.authorization_id)

    assert await acme.authorize(command("r2", 10 * USD, key="retry-me")) == denied
    assert (await acme.authorize(command("r2", 10 * USD, key="a-new-request"))).approved


async def test_fifty_concurrent_replays_charge_once(acme: SpendCore, store: RedisStore) -> None:
    request = command("r1", 3 * USD, key="burst", capture=True)

    answers = await asyncio.gather(*(acme.authorize_with_replay(request) for _ in range(50)))

    results = {result for result, _ in answers}
    assert len(results) == 1
    assert next(iter(results)).approved
    assert sorted(replayed for _, replayed in answers) == [False] + [True] * 49
    await assert_usage(acme, R1_CHAIN, spent=3 * USD, held=0)
    assert len(await outbox(store)) == 1


@pytest.mark.parametrize(
    "change",
    [
        {"amount_micros": 4 * USD},
        {"service": "other"},
        {"metadata": {"a": "c"}},
        {"metadata": {}},
        {"capture": True},
        {"currency": "EUR"},
    ],
    ids=["amount", "service", "metadata", "no-metadata", "capture", "currency"],
)
async def test_a_key_reused_for_another_request_is_refused_and_changes_nothing(
    acme: SpendCore, store: RedisStore, key_prefix: str, change: dict[str, Any]
) -> None:
    original = command("r1", 3 * USD, key="once", service="api", metadata={"a": "b"})
    await acme.authorize(original)
    before = await snapshot(store.client, key_prefix)

    with pytest.raises(AlreadyExistsError, match="idempotency_key 'once' was already used"):
        await acme.authorize(dataclasses.replace(original, **change))

    assert await snapshot(store.client, key_prefix) == before


async def test_an_idempotency_key_is_scoped_to_its_wallet(acme: SpendCore) -> None:
    on_r1 = await acme.authorize(command("r1", USD, key="shared"))
    on_r2 = await acme.authorize(command("r2", USD, key="shared"))

    assert on_r1.approved
    assert on_r2.approved
    assert on_r1.authorization_id != on_r2.authorization_id
    await assert_usage(acme, ("research", "acme"), spent=0, held=2 * USD)


# ---------------------------------------------------------------------------------------------------------
# Tree changes.


class SpyStore:
    """Passes every call to a store, recording the hot path's calls to Redis and the chains authorize walked."""

    LOOKUPS = ("account_of", "account_info", "account_ids", "node_ids", "resolve_wallet", "budget")

    def __init__(self, inner: RedisStore) -> None:
        self.inner = inner
        self.calls: list[str] = []
        self.given: list[Chain] = []  # the chain each authorize was handed
        self.walked: list[Chain] = []  # the chains authorize.lua walked

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self.inner, name)
        if name not in self.LOOKUPS:
            return attribute

        async def recorded(*args: Any, **kwargs: Any) -> Any:
            self.calls.append(name)
            return await attribute(*args, **kwargs)

        return recorded

    async def authorize(self, chain: Chain, *args: Any, **kwargs: Any) -> Any:
        self.calls.append("authorize")
        self.given.append(chain)
        outcome = await self.inner.authorize(chain, *args, **kwargs)
        if outcome.chain is not None:
            self.walked.append(outcome.chain)
        return outcome

    def take(self) -> list[str]:
        """The calls recorded since the last take."""
        calls, self.calls = self.calls, []
        return calls


@pytest.fixture
def spy(store: RedisStore) -> SpyStore:
    """A spy on the test's store."""
    return SpyStore(store)


@pytest.fixture
def replica(spy: SpyStore, clock: ManualClock) -> SpendCore:
    """Another server over the same Redis, with caches of its own, its store spied on."""
    return SpendCore(spy, clock)  # type: ignore[arg-type]


async def test_a_wallets_first_call_is_one_round_trip_once_its_account_is_known(
    acme: SpendCore, replica: SpendCore, spy: SpyStore
) -> None:
    assert await replica.load_account_hints() == 7  # acme, its two pools and its four wallets
    spy.take()

    first = await replica.authorize(command("r1", 2 * USD))
    second = await replica.authorize(command("r1", USD))

    assert first.approved
    assert second.approved
    # One script call each: the first walked the chain it was handed unresolved, the second used that chain.
    assert spy.take() == ["authorize", "authorize"]
    assert [chain.node_ids for chain in spy.given] == [("r1",), R1_CHAIN]
    assert [chain.topo for chain in spy.given] == ["", spy.walked[0].topo]
    assert [chain.node_ids for chain in spy.walked] == [R1_CHAIN]
    assert (await usage(acme, "research"))[Window.MONTH] == Usage(0, 3 * USD)
    assert (await usage(acme, "acme"))[Window.MONTH] == Usage(0, 3 * USD)


async def test_a_replay_on_a_wallets_first_call_here_answers_as_before_and_caches_the_chain(
    acme: SpendCore, replica: SpendCore, spy: SpyStore
) -> None:
    request = command("r1", 2 * USD, key="retried")
    original, _ = await acme.authorize_with_replay(request)

    replayed, was_replay = await replica.authorize_with_replay(request)
    again, _ = await replica.authorize_with_replay(request)

    assert was_replay
    assert replayed == original
    assert again == original
    assert [chain.node_ids for chain in spy.walked] == [R1_CHAIN]
    assert [chain.node_ids for chain in spy.given] == [("r1",), R1_CHAIN]
    assert (await usage(acme, "research"))[Window.MONTH] == Usage(0, 2 * USD)


async def test_without_hints_a_wallets_first_call_looks_up_its_account_then_decides(
    acme: SpendCore, replica: SpendCore, spy: SpyStore
) -> None:
    await replica.authorize(command("r1", USD))
    await replica.authorize(command("r2", USD))
    await replica.authorize(command("r2", USD))

    # The account's time zone is looked up once; each wallet's account once; the chain is walked by the script.
    assert spy.take() == ["account_of", "account_info", "authorize", "account_of", "authorize", "authorize"]
    assert [chain.node_ids for chain in spy.walked] == [R1_CHAIN, ("r2", "research", "acme")]


async def test_a_burst_of_first_calls_looks_up_each_account_once(
    acme: SpendCore, replica: SpendCore, spy: SpyStore
) -> None:
    results = await asyncio.gather(*(replica.authorize(command(f"r{1 + i % 2}", USD)) for i in range(40)))

    assert all(result.approved for result in results)
    assert collections.Counter(spy.take()) == {"account_of": 2, "account_info": 1, "authorize": 40}


async def test_a_budget_of_a_node_whose_account_is_known_is_one_round_trip(
    acme: SpendCore, replica: SpendCore, spy: SpyStore, clock: ManualClock
) -> None:
    await acme.authorize(command("r1", 2 * USD))
    unhinted = await replica.get_budget("research")
    assert spy.take() == ["account_of", "account_info", "budget"]
    again = await replica.get_budget("research")  # The lookup was kept.
    assert spy.take() == ["budget"]

    await replica.load_account_hints()
    spy.take()
    hinted = await replica.get_budget("sales")

    assert spy.take() == ["budget"]
    assert again == unhinted
    assert hinted.kind is NodeKind.POOL
    assert again.window(Window.MONTH).held_micros == 2 * USD
    assert hinted.window(Window.MONTH).limit_micros == 200 * USD
    # A hinted node deleted since: the budget script finds nothing, the index confirms.
    await spy.inner.delete_node("acme", "direct", force=False, windows=windows_at(clock.now_ms(), "UTC"))
    spy.take()
    with pytest.raises(NotFoundError, match="no node 'direct'"):
        await replica.get_budget("direct")
    assert spy.take() == ["budget", "account_of"]


async def test_a_wallet_moved_to_another_pool_is_walked_again_in_the_same_round_trip(
    acme: SpendCore, replica: SpendCore, spy: SpyStore
) -> None:
    old_hold = await replica.authorize(command("r1", 2 * USD))
    assert [chain.node_ids for chain in spy.walked] == [R1_CHAIN]

    moved = json.loads(json.dumps(PLAN))
    r1 = moved["pools"][0]["wallets"].pop(0)
    moved["pools"][1]["wallets"].append(r1)
    moved["pools"][1]["limits"] = {"month": 1.5}
    await acme.apply_plan(plan_from(moved))  # Applied through the other server.
    spy.take()

    settled = await replica.authorize(command("r1", USD, capture=True))

    assert settled.approved, settled.message
    # The replica handed its old chain; the script saw the tree had changed and walked the new one.
    assert spy.take() == ["authorize"]
    assert spy.given[-1].node_ids == R1_CHAIN
    assert [chain.node_ids for chain in spy.walked] == [R1_CHAIN, ("r1", "sales", "acme")]
    assert (await usage(acme, "sales"))[Window.MONTH] == Usage(USD, 0)
    assert (await usage(acme, "research"))[Window.MONTH] == Usage(0, 2 * USD)
    assert (await usage(acme, "acme"))[Window.MONTH] == Usage(USD, 2 * USD)
    assert (await outbox(spy.inner))[-1]["chain"] == "r1,sales,acme"
    # The new pool's limits apply: $1 of its $1.50 is spent.
    denied = await replica.authorize(command("r1", USD))
    assert denied.denied_by == NodeWindow("sales", Window.MONTH)
    assert spy.given[-1].node_ids == ("r1", "sales", "acme")
    # The hold from before the move goes back to the chain it was taken from.
    await replica.void(old_hold.authorization_id)
    assert (await usage(acme, "research"))[Window.MONTH] == Usage(0, 0)
    assert (await usage(acme, "acme"))[Window.MONTH] == Usage(USD, 0)
    assert (await usage(acme, "sales"))[Window.MONTH] == Usage(USD, 0)


async def move_direct_to_globex_behind(replica: SpendCore, acme: SpendCore, spy: SpyStore, clock: ManualClock) -> None:
    """The replica learns that "direct" is in acme; then, through the other server, it moves to globex."""
    await replica.load_account_hints()
    await spy.inner.delete_node("acme", "direct", force=False, windows=windows_at(clock.now_ms(), "UTC"))
    globex = {"account": {"id": "globex", "limits": {"month": 100}}, "wallets": [{"id": "direct"}]}
    await acme.apply_plan(plan_from(globex))


async def test_a_wallet_moved_to_another_account_is_found_through_the_index(
    acme: SpendCore, replica: SpendCore, spy: SpyStore, clock: ManualClock
) -> None:
    await move_direct_to_globex_behind(replica, acme, spy, clock)
    spy.take()

    result = await replica.authorize(command("direct", USD, capture=True))

    assert result.approved, result.message
    assert result.authorization_id.startswith("globex:")
    # Refused in acme (no such wallet there), found in globex through the index, decided there.
    assert spy.take() == ["authorize", "account_of", "account_info", "authorize"]
    assert [chain.node_ids for chain in spy.walked] == [("direct", "globex")]
    assert (await usage(acme, "globex"))[Window.MONTH] == Usage(USD, 0)
    assert (await usage(acme, "acme"))[Window.MONTH] == Usage(0, 0)


async def test_an_agent_token_on_a_wallet_moved_to_another_account_is_checked_in_the_new_one(
    acme: SpendCore, replica: SpendCore, spy: SpyStore, clock: ManualClock
) -> None:
    await move_direct_to_globex_behind(replica, acme, spy, clock)
    token = TokenRecord("a" * 64, "t1", "agent", "direct", "globex", "direct's agent", clock.now_ms())
    await spy.inner.create_token(token)
    spy.take()

    result = await replica.authorize(command("direct", USD, capture=True), token_mode=token.token_hash)

    # The script walked before it checked the token: NOT_FOUND in acme, then the token checked in globex.
    assert result.approved, result.message
    assert spy.take() == ["authorize", "account_of", "account_info", "authorize"]
    with pytest.raises(PermissionDeniedError, match="another account"):
        await replica.authorize(command("r1", USD), token_mode=token.token_hash)


async def test_hints_stop_at_their_bound_and_a_wallet_past_it_is_looked_up_once(
    acme: SpendCore, spy: SpyStore, clock: ManualClock
) -> None:
    bounded = SpendCore(spy, clock, account_hints_size_max=3)  # type: ignore[arg-type]
    assert await bounded.load_account_hints() == 3  # Of acme's seven nodes.
    spy.take()

    for wallet in ("r1", "r2", "s1", "direct"):
        await bounded.authorize(command(wallet, USD))
    first = spy.take()
    for wallet in ("r1", "r2", "s1", "direct"):
        await bounded.authorize(command(wallet, USD))

    # At least one of the four wallets was left out (three hints), and each left out is looked up once.
    assert 1 <= first.count("account_of") <= 4
    assert first.count("authorize") == 4
    assert spy.take() == ["authorize"] * 4  # Their chains are cached.
    assert await bounded.load_account_hints() == 3  # The lookups added no hints past the bound.


async def test_a_hinted_wallet_deleted_since_is_not_found_and_nothing_changes(
    acme: SpendCore, replica: SpendCore, spy: SpyStore, clock: ManualClock, key_prefix: str
) -> None:
    await replica.load_account_hints()
    await spy.inner.delete_node("acme", "direct", force=False, windows=windows_at(clock.now_ms(), "UTC"))
    before = await snapshot(spy.inner.client, key_prefix)
    spy.take()

    with pytest.raises(NotFoundError, match="no wallet 'direct'"):
        await replica.authorize(command("direct", USD))

    assert spy.take() == ["authorize", "account_of"]
    assert await snapshot(spy.inner.client, key_prefix) == before


async def test_an_account_whose_time_zone_is_not_the_cached_one_is_looked_up_again(
    acme: SpendCore, replica: SpendCore, spy: SpyStore, clock: ManualClock, store: RedisStore
) -> None:
    await replica.load_account_hints()
    # A plan cannot change a time zone; the script guards the windows all the same. Changed under the replica:
    await store.client.hset(store.keys.node("acme", "acme"), "tz", "Asia/Tokyo")
    spy.take()

    result = await replica.authorize(command("r1", USD, capture=True))

    assert result.approved, result.message
    assert spy.take() == ["authorize", "account_info", "authorize"]
    assert [chain.time_zone for chain in spy.given] == ["UTC", "Asia/Tokyo"]
    assert spy.walked[-1].time_zone == "Asia/Tokyo"


async def test_plans_applied_here_spare_their_wallets_lookups_and_a_changed_tree_is_walked_again(
    replica: SpendCore, spy: SpyStore
) -> None:
    other = {"account": {"id": "globex", "limits": {"month": 100}}, "wallets": [{"id": "g1"}]}
    await replica.apply_plan(plan_from(PLAN))
    await replica.apply_plan(plan_from(other))
    spy.take()
    await replica.authorize(command("r1", USD))
    await replica.authorize(command("g1", USD))
    # The plans said which account each wallet is in: no lookups.
    assert spy.take() == ["authorize", "authorize"]

    changed = json.loads(json.dumps(PLAN))
    changed["pools"][0]["limits"] = {"month": 1.5}
    await replica.apply_plan(plan_from(changed))
    spy.take()
    await replica.authorize(command("g1", USD))
    denied = await replica.authorize(command("r1", USD))

    assert spy.take() == ["authorize", "authorize"]
    # Both handed their cached chains; acme's tree had changed, so r1's was walked again, and its new limit held.
    assert [chain.node_ids for chain in spy.given[-2:]] == [("g1", "globex"), R1_CHAIN]
    assert [chain.node_ids for chain in spy.walked] == [R1_CHAIN, ("g1", "globex"), R1_CHAIN]
    assert denied.denied_by == NodeWindow("research", Window.MONTH)


async def test_plans_and_new_nodes_applied_through_the_admin_core_spare_their_wallets_lookups(
    replica: SpendCore, spy: SpyStore, clock: ManualClock
) -> None:
    admin = AdminCore(spy, replica, clock)  # type: ignore[arg-type]
    await admin.apply_plan(plan_from(PLAN))
    await admin.create_node("r9", "research", NodeKind.WALLET, Limits())
    spy.take()

    first = await replica.authorize(command("r1", USD))
    created = await replica.authorize(command("r9", USD))

    assert first.approved
    assert created.approved
    assert spy.take() == ["authorize", "authorize"]
    assert [chain.node_ids for chain in spy.walked] == [R1_CHAIN, ("r9", "research", "acme")]


async def test_the_deepest_tree_a_plan_allows_authorizes(core: SpendCore, apply_plan: ApplyPlan) -> None:
    await apply_plan(nested_plan(32))

    result = await core.authorize(command("deep-wallet", USD, capture=True))

    assert result.approved
    assert (await usage(core, "deep-pool-1"))[Window.TOTAL] == Usage(USD, 0)
    assert (await usage(core, "deep"))[Window.TOTAL] == Usage(USD, 0)
    with pytest.raises(PlanError, match="deeper than 32 levels"):
        await apply_plan(nested_plan(33))


async def test_the_example_fleet_enforces_its_per_transaction_and_daily_limits(
    core: SpendCore, apply_plan: ApplyPlan
) -> None:
    await apply_plan(FLEET_YAML)

    over = await core.authorize(command("research-agent-01", USD + 1))
    assert (over.deny_reason, over.denied_by) == (
        DenyReason.PER_TRANSACTION_LIMIT,
        NodeWindow("research-agent-01", Window.NONE),
    )
    assert over.message == "denied: $1.000001 is above the per-transaction limit of research-agent-01 ($1.00)"
    results = [await core.authorize(command("research-agent-01", USD, capture=True)) for _ in range(51)]
    assert [r.approved for r in results] == [True] * 50 + [False]
    assert results[-1].denied_by == NodeWindow("research-agent-01", Window.DAY)
    assert (await usage(core, "research-agents"))[Window.MONTH] == Usage(50 * USD, 0)
    assert (await usage(core, "acme"))[Window.MONTH] == Usage(50 * USD, 0)


# ---------------------------------------------------------------------------------------------------------
# Bad input: the right error, and not one byte changed.

BASE = AuthorizeCommand(
    wallet_id="r1",
    amount_micros=2 * USD,
    currency="USD",
    idempotency_key="fresh-key",
    service="api",
    metadata={"a": "b"},
)

BAD_AUTHORIZATIONS = [
    pytest.param({"wallet_id": ""}, InvalidArgumentError, "wallet_id is required", id="empty-wallet"),
    pytest.param({"wallet_id": "ghost"}, NotFoundError, "no wallet 'ghost'", id="unknown-wallet"),
    pytest.param({"wallet_id": "research"}, InvalidArgumentError, "'research' is a pool, not a wallet", id="pool"),
    pytest.param({"wallet_id": "acme"}, InvalidArgumentError, "not a wallet", id="account"),
    pytest.param({"wallet_id": "r 1"}, InvalidArgumentError, "may only hold letters", id="wallet-with-space"),
    pytest.param({"wallet_id": "w" * 65}, InvalidArgumentError, "65 characters long", id="oversize-wallet"),
    pytest.param({"amount_micros": 0}, InvalidArgumentError, "must be positive", id="zero"),
    pytest.param({"amount_micros": -1}, InvalidArgumentError, "must be positive", id="negative"),
    pytest.param({"amount_micros": 2**63 - 1}, InvalidArgumentError, "above the largest amount", id="int64-max"),
    pytest.param({"amount_micros": 2**63}, InvalidArgumentError, "above the largest amount", id="over-int64"),
    pytest.param(
        {"amount_micros": MONEY_MICROS_MAX + 1}, InvalidArgumentError, "above the largest amount", id="over-money-max"
    ),
    pytest.param(
        {"currency": "EUR"}, InvalidArgumentError, r"not the currency of account 'acme' \(USD\)", id="other-currency"
    ),
    pytest.param({"currency": "usd"}, InvalidArgumentError, "not an ISO 4217 code", id="lowercase-currency"),
    pytest.param({"currency": ""}, InvalidArgumentError, "currency is required", id="no-currency"),
    pytest.param({"idempotency_key": ""}, InvalidArgumentError, "idempotency_key is required", id="no-key"),
    pytest.param({"idempotency_key": "a b"}, InvalidArgumentError, "printable ASCII", id="key-with-space"),
    pytest.param({"idempotency_key": "ключ"}, InvalidArgumentError, "printable ASCII", id="non-ascii-key"),
    pytest.param({"idempotency_key": "a\nb"}, InvalidArgumentError, "printable ASCII", id="key-with-newline"),
    pytest.param(
        {"idempotency_key": "k" * 129}, InvalidArgumentError, "129 characters long; the limit is 128", id="long-key"
    ),
    pytest.param(
        {"metadata": {f"k{i}": "v" for i in range(17)}},
        InvalidArgumentError,
        "17 entries; the limit is 16",
        id="too-many-metadata",
    ),
    pytest.param({"metadata": {"k" * 65: "v"}}, InvalidArgumentError, "1 to 64 characters", id="long-metadata-key"),
    pytest.param({"metadata": {"": "v"}}, InvalidArgumentError, "1 to 64 characters", id="empty-metadata-key"),
    pytest.param(
        {"metadata": {"k": "v" * 257}}, InvalidArgumentError, "257 characters long; the limit is 256", id="long-value"
    ),
    pytest.param({"service": "api\nexample"}, InvalidArgumentError, "control characters", id="newline-in-service"),
    pytest.param({"service": "api\x00"}, InvalidArgumentError, "control characters", id="nul-in-service"),
    pytest.param({"service": "a\tb"}, InvalidArgumentError, "control characters", id="tab-in-service"),
    pytest.param({"service": "\x1b[31m"}, InvalidArgumentError, "control characters", id="escape-in-service"),
    pytest.param({"service": "s" * 129}, InvalidArgumentError, "129 characters long", id="long-service"),
]


@pytest.mark.parametrize(("change", "error", "message"), BAD_AUTHORIZATIONS)
async def test_bad_input_raises_the_right_error_and_changes_nothing(
    acme: SpendCore,
    store: RedisStore,
    key_prefix: str,
    change: dict[str, Any],
    error: type[Exception],
    message: str,
) -> None:
    # Some state first, so that "nothing changed" compares something.
    await acme.authorize(command("r1", 3 * USD))
    await acme.authorize(command("r1", 4 * USD, capture=True, metadata={"x": "y"}))
    before = await snapshot(store.client, key_prefix)
    assert len(before) > 5

    with pytest.raises(error, match=message):
        await acme.authorize(dataclasses.replace(BASE, **change))

    assert await snapshot(store.client, key_prefix) == before


async def test_the_bounds_themselves_are_accepted(acme: SpendCore) -> None:
    at_bounds = dataclasses.replace(
        BASE,
        wallet_id="direct",
        idempotency_key="k" * 128,
        service="s" * 128,
        metadata={f"{i:0>64}": "v" * 256 for i in range(16)},
    )
    assert (await acme.authorize(at_bounds)).approved

    largest = await acme.authorize(dataclasses.replace(BASE, wallet_id="direct", amount_micros=MONEY_MICROS_MAX))
    # Accepted as input; the credit line decides.
    assert largest.denied_by == NodeWindow("acme", Window.MONTH)


async def test_snapshots_see_every_write_under_the_prefix(store: RedisStore, key_prefix: str) -> None:
    # "Changes nothing" above is only as good as the snapshot: it must see a write of any kind.
    before = await snapshot(store.client, key_prefix)
    await store.client.hset(f"{key_prefix}:probe", mapping={"a": "1"})
    after = await snapshot(store.client, key_prefix)
    assert after == {**before, f"{key_prefix}:probe": ("hash", {"a": "1"}, False)}
    await store.client.pexpire(f"{key_prefix}:probe", 60_000)
    assert await snapshot(store.client, key_prefix) != after
