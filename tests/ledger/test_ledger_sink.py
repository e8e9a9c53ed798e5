"""The ledger contract, run against SQLite and PostgreSQL alike.

Transactions come from the real path (SpendCore, RedisStore and the Lua scripts, on fakeredis here) and are
read from the outbox exactly as the writer reads them; every query is checked against the raw list.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import random
from collections import defaultdict
from collections.abc import Callable

import fakeredis
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spendgate.admin import node_record
from spendgate.clock import ManualClock
from spendgate.core import SpendCore
from spendgate.domain import AuthorizeCommand, InvalidArgumentError, Window
from spendgate.ledger.sink import (
    LIST_LIMIT_DEFAULT,
    LedgerSink,
    LedgerTransaction,
    ReportGroup,
    ReportPeriod,
    TransactionFilter,
    WindowKey,
    window_deltas,
)
from spendgate.plan import parse_plan
from spendgate.store.keys import Keys
from spendgate.store.redis_store import RedisStore

from .conftest import SERVICES, START_MS, SinkFactory, fleet_plan


async def produce(count: int = 120, seed: int = 3) -> list[LedgerTransaction]:
    """Spend through the real core on fakeredis and return the outbox entries as transactions."""
    rng = random.Random(seed)
    client = fakeredis.FakeAsyncRedis(decode_responses=True)
    keys = Keys("contract")
    clock = ManualClock(START_MS)
    core = SpendCore(RedisStore(client, keys=keys), clock)
    plans = [parse_plan(fleet_plan(account)) for account in ("acme", "globex")]
    for plan in plans:
        await core.apply_plan(plan)
    wallets = [n.node_id for plan in plans for n in plan.nodes if n.kind.name == "WALLET"]
    for index in range(count):
        command = AuthorizeCommand(
            wallet_id=rng.choice(wallets),
            amount_micros=rng.randint(1, 3_000_000),
            currency="USD",
            idempotency_key=f"k-{seed}-{index}",
            service=rng.choice(SERVICES),
            capture=rng.random() < 0.7,
            metadata={"i": str(index)} if index % 3 == 0 else {},
        )
        result = await core.authorize(command)
        assert result.approved
        if not command.capture:
            await core.capture(result.authorization_id, rng.randint(1, command.amount_micros), f"c-{index}")
        # Several transactions share a millisecond now and then, so the txn_id tie-break is exercised.
        clock.advance(rng.choice([0, 0, 1, 3_600_000, 7_200_000]))
    transactions = []
    for account in ("acme", "globex"):
        transactions += [LedgerTransaction.from_stream_fields(f) for _, f in await client.xrange(keys.outbox(account))]
    await client.aclose()
    return transactions


@pytest.fixture(scope="module")
def transactions() -> list[LedgerTransaction]:
    return asyncio.run(produce())


def order(txns: list[LedgerTransaction]) -> list[LedgerTransaction]:
    return sorted(txns, key=lambda t: (t.captured_at_ms, t.txn_id))


def matches(txn: LedgerTransaction, f: TransactionFilter) -> bool:
    return (
        (f.node_id is None or f.node_id in txn.chain)
        and (f.since_ms is None or txn.captured_at_ms >= f.since_ms)
        and (f.until_ms is None or txn.captured_at_ms < f.until_ms)
        and (f.service is None or txn.service == f.service)
    )


async def walk(sink: LedgerSink, f: TransactionFilter, limit: int) -> list[LedgerTransaction]:
    out: list[LedgerTransaction] = []
    cursor = None
    for _ in range(10_000):
        page = await sink.list_transactions(f, cursor, limit)
        assert len(page.transactions) <= limit
        out += page.transactions
        if page.next_cursor is None:
            return out
        assert len(page.transactions) == limit
        cursor = page.next_cursor
    raise AssertionError("pagination did not end")


def filters_for(txns: list[LedgerTransaction]) -> list[TransactionFilter]:
    times = sorted(t.captured_at_ms for t in txns)
    middle, late = times[len(times) // 3], times[2 * len(times) // 3]
    return [
        TransactionFilter(),
        TransactionFilter(node_id="acme"),
        TransactionFilter(node_id="acme-research"),
        TransactionFilter(node_id="acme-deep"),
        TransactionFilter(node_id="globex-r1"),
        TransactionFilter(node_id="acme-direct"),
        TransactionFilter(node_id="nobody"),
        TransactionFilter(since_ms=middle),
        TransactionFilter(until_ms=middle),
        TransactionFilter(node_id="acme-research", since_ms=middle, until_ms=late),
        TransactionFilter(service="search.example"),
        TransactionFilter(service=""),
        TransactionFilter(node_id="globex", service="api.openai.example", since_ms=middle),
        TransactionFilter(since_ms=late, until_ms=late),
    ]


# ---------------------------------------------------------------------------------------------------------
# Schema.


async def test_migrate_is_idempotent_and_concurrent(sinks: SinkFactory) -> None:
    location = sinks.location()
    first, second = await sinks.make(location), await sinks.make(location)
    versions = await asyncio.gather(first.migrate(), second.migrate(), first.migrate())
    assert versions == [2, 2, 2]
    await first.insert_transactions((await produce(3, seed=1))[:1])
    assert await second.count_transactions() == 1


# ---------------------------------------------------------------------------------------------------------
# Inserts.


async def test_inserts_are_idempotent_on_the_transaction_id(
    sink: LedgerSink, transactions: list[LedgerTransaction]
) -> None:
    half = len(transactions) // 2
    assert await sink.insert_transactions([]) == 0
    assert await sink.insert_transactions(transactions[:half]) == half
    assert await sink.insert_transactions(transactions[:half]) == 0
    # Overlapping, and with a duplicate inside the batch itself.
    batch = transactions[half - 5 :] + transactions[-3:]
    assert await sink.insert_transactions(batch) == len(transactions) - half
    assert await sink.count_transactions() == len(transactions)
    # The totals counted each transaction once, whatever was inserted twice.
    for account in ("acme", "globex"):
        expected = {k: v for k, v in window_deltas(transactions).items() if k.node_id.startswith(account)}
        assert await sink.window_totals(account) == expected


async def test_concurrent_inserts_of_overlapping_batches_count_once(
    sinks: SinkFactory, transactions: list[LedgerTransaction]
) -> None:
    location = sinks.location()
    ledgers = [await sinks.make(location) for _ in range(3)]
    rng = random.Random(5)
    batches = [rng.sample(transactions, len(transactions) // 2) for _ in range(12)]
    inserted = await asyncio.gather(*(ledgers[i % 3].insert_transactions(b) for i, b in enumerate(batches)))
    union = {t.txn_id: t for batch in batches for t in batch}
    assert sum(inserted) == len(union)
    assert await ledgers[0].count_transactions() == len(union)
    expected = {k: v for k, v in window_deltas(list(union.values())).items() if k.node_id.startswith("acme")}
    assert await ledgers[1].window_totals("acme") == expected


async def test_transactions_come_back_exactly(sink: LedgerSink, transactions: list[LedgerTransaction]) -> None:
    await sink.insert_transactions(transactions)
    listed = await walk(sink, TransactionFilter(), 1000)
    assert listed == order(transactions)
    assert all(isinstance(t.amount_micros, int) for t in listed)
    ids = [t.txn_id for t in transactions[:5]] + ["acme:missing"]
    assert await sink.existing_txn_ids(ids) == set(ids[:5])


# ---------------------------------------------------------------------------------------------------------
# Listing.


@pytest.mark.parametrize("limit", [1, 7, 50, 1000])
async def test_filters_and_pages_agree_with_the_raw_transactions(
    sink: LedgerSink, transactions: list[LedgerTransaction], limit: int
) -> None:
    await sink.insert_transactions(transactions)
    for f in filters_for(transactions):
        expected = order([t for t in transactions if matches(t, f)])
        got = await walk(sink, f, limit)
        assert [t.txn_id for t in got] == [t.txn_id for t in expected], f
        assert got == expected


async def test_pages_stay_stable_while_transactions_arrive(
    sink: LedgerSink, transactions: list[LedgerTransaction]
) -> None:
    ordered = order(transactions)
    early, late = ordered[: len(ordered) // 2], ordered[len(ordered) // 2 :]
    await sink.insert_transactions(early[::2])
    f = TransactionFilter(node_id="acme")
    seen: list[str] = []
    page = await sink.list_transactions(f, None, 5)
    seen += [t.txn_id for t in page.transactions]
    pending = [early[1::2], late]
    while page.next_cursor is not None:
        if pending:
            # New transactions land between page fetches: some before the cursor, some after it.
            await sink.insert_transactions(pending.pop(0))
        page = await sink.list_transactions(f, page.next_cursor, 5)
        seen += [t.txn_id for t in page.transactions]
    assert len(seen) == len(set(seen)), "a transaction appeared on two pages"
    position = {t.txn_id: (t.captured_at_ms, t.txn_id) for t in ordered}
    assert seen == sorted(seen, key=position.__getitem__)
    # Everything inserted after the walk passed it is still on the pages after the cursor.
    assert {t.txn_id for t in late if "acme" in t.chain} <= set(seen)


async def test_page_sizes_and_tokens_are_checked(sink: LedgerSink, transactions: list[LedgerTransaction]) -> None:
    await sink.insert_transactions(transactions)
    page = await sink.list_transactions(TransactionFilter(), None, 0)
    assert len(page.transactions) == min(LIST_LIMIT_DEFAULT, len(transactions))
    for bad in (-1, 1001):
        with pytest.raises(InvalidArgumentError, match="page size"):
            await sink.list_transactions(TransactionFilter(), None, bad)
    with pytest.raises(InvalidArgumentError, match="page token"):
        await sink.list_transactions(TransactionFilter(), "garbage!", 10)
    last = await sink.list_transactions(TransactionFilter(node_id="nobody"), None, 10)
    assert last.transactions == ()
    assert last.next_cursor is None


# ---------------------------------------------------------------------------------------------------------
# Reports and window totals.


def raw_report(
    txns: list[LedgerTransaction], group_by: ReportGroup, period: ReportPeriod, f: TransactionFilter
) -> list[tuple[str, str, str, int, int]]:
    group_of: dict[ReportGroup, Callable[[LedgerTransaction], str]] = {
        ReportGroup.WALLET: lambda t: t.wallet_id,
        ReportGroup.POOL: lambda t: t.chain[1],
        ReportGroup.ACCOUNT: lambda t: t.account_id,
        ReportGroup.SERVICE: lambda t: t.service,
    }
    sums: dict[tuple[str, str, str], list[int]] = defaultdict(lambda: [0, 0])
    for t in txns:
        if matches(t, f):
            key = (t.day if period is ReportPeriod.DAY else t.month, group_of[group_by](t), t.currency)
            sums[key][0] += t.amount_micros
            sums[key][1] += 1
    return [(*key, amount, count) for key, (amount, count) in sorted(sums.items())]


async def test_reports_agree_with_the_raw_transactions(sink: LedgerSink, transactions: list[LedgerTransaction]) -> None:
    await sink.insert_transactions(transactions)
    for f, group_by, period in itertools.product(filters_for(transactions), ReportGroup, ReportPeriod):
        rows = await sink.spend_report(group_by, period, f)
        got = [(r.period, r.group, r.currency, r.amount_micros, r.transaction_count) for r in rows]
        assert got == raw_report(transactions, group_by, period, f), (f, group_by, period)
        assert all(isinstance(r.amount_micros, int) for r in rows)
    # The month report of an account sums to its ledger's monthly totals.
    rows = await sink.spend_report(ReportGroup.ACCOUNT, ReportPeriod.MONTH, TransactionFilter(node_id="acme"))
    totals = await sink.window_totals("acme", {Window.MONTH: "2026-11"})
    november = sum(r.amount_micros for r in rows if r.period == "2026-11")
    assert totals[WindowKey("acme", Window.MONTH, "2026-11")].spent_micros == november


async def test_a_report_too_large_is_refused(sink: LedgerSink, transactions: list[LedgerTransaction]) -> None:
    await sink.insert_transactions(transactions)
    with pytest.raises(InvalidArgumentError, match="more than 3 rows"):
        await sink.spend_report(ReportGroup.WALLET, ReportPeriod.DAY, TransactionFilter(), rows_max=3)


async def test_window_totals_agree_with_the_raw_transactions(
    sink: LedgerSink, transactions: list[LedgerTransaction]
) -> None:
    await sink.insert_transactions(transactions)
    deltas = window_deltas(transactions)
    every = await sink.window_totals("acme")
    assert every == {k: v for k, v in deltas.items() if k.node_id.startswith("acme")}
    windows = {Window.DAY: "2026-11-29", Window.MONTH: "2026-11", Window.TOTAL: "all"}
    some = await sink.window_totals("globex", windows)
    assert some == {
        k: v for k, v in deltas.items() if k.node_id.startswith("globex") and windows.get(k.window) == k.window_id
    }
    assert some  # The fleet spent on 2026-11-29.
    assert await sink.window_totals("globex", {}) == {}
    assert await sink.window_totals("nobody") == {}
    with pytest.raises(InvalidArgumentError):
        await sink.window_totals("acme", {Window.MINUTE: "1"})


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rows=st.lists(
        st.tuples(
            st.sampled_from(["w1", "w2", "w3"]),
            st.integers(0, 10**15),
            st.integers(0, 5),
            st.sampled_from(["a", "b", ""]),
        ),
        max_size=40,
    ),
    limit=st.integers(1, 9),
)
async def test_property_reports_pages_and_totals_agree(
    sinks: SinkFactory, rows: list[tuple[str, int, int, str]], limit: int
) -> None:
    pools = {"w1": "p1", "w2": "p1", "w3": "p2"}
    txns = [
        LedgerTransaction(
            txn_id=f"acct:{index:04d}",
            account_id="acct",
            wallet_id=wallet,
            chain=(wallet, pools[wallet], "acct"),
            amount_micros=amount,
            authorized_micros=amount,
            currency="USD",
            service=service,
            metadata={},
            authorized_at_ms=day * 86_400_000,
            captured_at_ms=day * 86_400_000 + index % 3,
            day=f"1970-01-0{day + 1}",
            week="1970-W01",
            month="1970-01",
            idempotency_key=str(index),
            capture_idempotency_key="",
        )
        for index, (wallet, amount, day, service) in enumerate(rows)
    ]
    sink = await sinks.make()
    await sink.insert_transactions(txns)
    f = TransactionFilter(node_id="p1")
    assert await walk(sink, f, limit) == order([t for t in txns if matches(t, f)])
    for group_by in ReportGroup:
        rows_got = await sink.spend_report(group_by, ReportPeriod.DAY, TransactionFilter())
        got = [(r.period, r.group, r.currency, r.amount_micros, r.transaction_count) for r in rows_got]
        assert got == raw_report(txns, group_by, ReportPeriod.DAY, TransactionFilter())
    assert await sink.window_totals("acct") == window_deltas(txns)
    await sink.close()


# ---------------------------------------------------------------------------------------------------------
# Configuration history and audit.


async def test_configuration_history_restores_plans(sink: LedgerSink) -> None:
    first = parse_plan(fleet_plan("acme"))
    document = fleet_plan("acme")
    document["account"]["limits"] = {"month": "12345.678901", "total": 5}
    document["pools"][1]["wallets"][0] |= {
        "frozen": "incident 42",
        "shadow": True,
        "limits": {"day": 0.5, "per_transaction": "0.000001", "velocity_per_minute": 9, "allowed_services": ["x"]},
        "breaker": {"multiplier": 2.5, "recent_minutes": 3, "trailing_minutes": 30, "min_spend": 1},
    }
    second = parse_plan(document)
    other = parse_plan(fleet_plan("globex"))
    assert await sink.record_config(first, actor="alice", at_ms=1) == 1
    assert await sink.record_config(other, actor="bob", at_ms=2) == 1
    assert await sink.record_config(second, actor="carol", at_ms=3) == 2
    history = await sink.config_history("acme")
    assert [(v.version, v.actor, v.at_ms) for v in history] == [(2, "carol", 3), (1, "alice", 1)]
    assert history[0].plan == second
    assert history[1].plan == first
    assert await sink.latest_plans() == [second, other]
    assert len(await sink.config_history("acme", limit=1)) == 1
    assert await sink.config_history("nobody") == []


async def test_audit_records_come_back_in_order(sink: LedgerSink) -> None:
    plan = parse_plan(fleet_plan("acme"))
    before, after = node_record(plan.nodes[1]), node_record(dataclasses.replace(plan.nodes[1], frozen_reason="x"))
    await sink.record_audit(actor="ops", action="freeze", node_id="acme-research", before=before, after=after, at_ms=20)
    await sink.record_audit(actor="ops", action="create", node_id="n", before=None, after={"id": "n"}, at_ms=10)
    await sink.record_audit(actor="", action="delete", node_id="n", before={"id": "n"}, after=None, at_ms=30)
    records = await sink.list_audit()
    assert [(r.at_ms, r.action) for r in records] == [(10, "create"), (20, "freeze"), (30, "delete")]
    # Values come back as JSON has them: tuples as lists.
    assert records[1].before == json.loads(json.dumps(before))
    assert records[1].after is not None
    assert records[1].after["frozen_reason"] == "x"
    assert records[2].after is None
    assert [r.action for r in await sink.list_audit(since_ms=20, limit=1)] == ["freeze"]
    assert len({r.audit_id for r in records}) == 3
