"""The ledger writer against a real Redis: exactly once through crashes, races and database outages.

Transactions are produced through the real path (SpendCore, RedisStore, the Lua scripts) by a Fleet; the
ledger must end up holding every capture once, with its amounts, chain, service, times and metadata, and its
per-node window totals must equal Redis's spent counters.
"""

from __future__ import annotations

import asyncio
import pathlib
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import fakeredis
import psycopg.conninfo
import pytest

from spendgate.clock import ManualClock, SystemClock
from spendgate.domain import UnavailableError, Window
from spendgate.ledger.postgres import PostgresLedger
from spendgate.ledger.reconcile import reconcile_account
from spendgate.ledger.sink import LedgerSink, LedgerTransaction, TransactionFilter, window_deltas
from spendgate.ledger.writer import LedgerWriter, dead_letter_key, read_outbox

from .conftest import Captured, Fleet, SinkFactory, TcpProxy

pytestmark = pytest.mark.redis

FleetFactory = Callable[..., Awaitable[Fleet]]


def writer_for(fleet: Fleet, sink: LedgerSink, consumer: str, **options: Any) -> LedgerWriter:
    defaults: dict[str, Any] = {
        "batch_size_max": 25,
        "linger_ms": 5,
        "block_ms": 50,
        "claim_idle_ms": 200,
        "claim_interval_ms": 50,
        "accounts_refresh_ms": 50,
        "backoff_initial_ms": 5,
        "backoff_max_ms": 100,
        "trim_approximate": False,
        "trim_interval_ms": 0,
    }
    return LedgerWriter(fleet.client, sink, keys=fleet.keys, consumer=consumer, **(defaults | options))


async def all_transactions(sink: LedgerSink) -> list[LedgerTransaction]:
    out: list[LedgerTransaction] = []
    cursor = None
    while True:
        page = await sink.list_transactions(TransactionFilter(), cursor, 1000)
        out += page.transactions
        if page.next_cursor is None:
            return out
        cursor = page.next_cursor


async def assert_ledger_holds_exactly(sink: LedgerSink, fleet: Fleet) -> None:
    """Every capture once, with what the capture settled; and the totals agree with Redis's counters."""
    listed = await all_transactions(sink)
    assert len(listed) == len({t.txn_id for t in listed})
    assert {t.txn_id for t in listed} == set(fleet.captured)
    for txn in listed:
        captured: Captured = fleet.captured[txn.txn_id]
        assert txn.account_id == captured.account_id
        assert txn.wallet_id == captured.wallet_id
        assert txn.chain[0] == captured.wallet_id
        assert txn.chain[-1] == captured.account_id
        assert txn.amount_micros == captured.amount_micros
        assert txn.authorized_micros == captured.authorized_micros
        assert txn.service == captured.service
        assert txn.captured_at_ms == captured.captured_at_ms
        assert dict(txn.metadata) == captured.metadata
        assert txn.currency == "USD"
    for account in fleet.accounts:
        report = await reconcile_account(fleet.store, sink, account, now_ms=fleet.clock.now_ms())
        assert report.rows
        assert report.drifts == (), report.drifts
        # And the all-time totals equal the sum of the account's captures.
        totals = await sink.window_totals(account, {Window.TOTAL: "all"})
        expected = sum(c.amount_micros for c in fleet.captured.values() if c.account_id == account)
        assert sum(v.spent_micros for k, v in totals.items() if k.node_id == account) == expected


async def pending_count(fleet: Fleet, group: str = "ledger") -> int:
    total = 0
    for account in fleet.accounts:
        summary = await fleet.client.xpending(fleet.keys.outbox(account), group)
        total += int(summary["pending"])
    return total


class GatedSink:
    """Wraps a ledger; its inserts can be made to fail, or to stop (before or after committing) on a gate."""

    def __init__(self, inner: LedgerSink) -> None:
        self.inner = inner
        self.down = False
        self.calls = 0
        self.inserted = 0
        self.hold_before: asyncio.Event | None = None
        self.hold_after: asyncio.Event | None = None
        self.entered = asyncio.Event()

    async def insert_transactions(self, batch: Sequence[LedgerTransaction]) -> int:
        self.calls += 1
        if self.down:
            raise UnavailableError("the ledger database is down (simulated)")
        self.entered.set()
        if self.hold_before is not None:
            await self.hold_before.wait()
        inserted = await self.inner.insert_transactions(batch)
        self.inserted += inserted
        if self.hold_after is not None:
            await self.hold_after.wait()
        return inserted

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


# ---------------------------------------------------------------------------------------------------------


async def test_drains_every_outbox_exactly_once(sinks: SinkFactory, fleet_factory: FleetFactory) -> None:
    fleet = await fleet_factory()
    sink = await sinks.make()
    await fleet.spend(150)
    # Before the writer runs, reconciliation counts what is still in the outbox.
    for account in fleet.accounts:
        outbox = await read_outbox(fleet.client, fleet.keys, account)
        report = await reconcile_account(fleet.store, sink, account, now_ms=fleet.clock.now_ms(), outbox=outbox)
        assert report.drifts == ()
        assert report.rows
        assert all(row.ledger_spent_micros == 0 for row in report.rows)
    writer = writer_for(fleet, sink, "w1", clock=SystemClock())
    lag = await writer.lag()
    assert (lag.pending_entries, lag.undelivered_entries) == (0, len(fleet.captured))
    assert lag.oldest_age_ms >= 0
    assert await writer.drain(timeout_s=30) == len(fleet.captured)
    await assert_ledger_holds_exactly(sink, fleet)
    assert writer.stats.inserted == len(fleet.captured)
    assert writer.stats.duplicates == 0
    assert await writer.lag() == type(lag)(0, 0, 0)
    # Acknowledged entries are trimmed away.
    for account in fleet.accounts:
        assert await fleet.client.xlen(fleet.keys.outbox(account)) == 0
    # More spend later (crossing into the next day) is picked up too.
    await fleet.spend(40)
    await writer.drain(timeout_s=30)
    await assert_ledger_holds_exactly(sink, fleet)


async def test_reconcile_reports_drift(sinks: SinkFactory, fleet_factory: FleetFactory) -> None:
    fleet = await fleet_factory(("acme",))
    sink = await sinks.make()
    await fleet.spend(30)
    await writer_for(fleet, sink, "w1").drain(timeout_s=30)
    report = await reconcile_account(fleet.store, sink, "acme", now_ms=fleet.clock.now_ms())
    assert report.drifts == ()
    # A counter that moved without a settlement (a lost write, a bad restore) shows as drift on that window.
    node_key = fleet.keys.node("acme", "acme-sales")
    await fleet.client.hincrby(node_key, "m:s", 1234)
    drifts = (await reconcile_account(fleet.store, sink, "acme", now_ms=fleet.clock.now_ms())).drifts
    assert [(d.node_id, d.window, d.drift_micros) for d in drifts] == [("acme-sales", Window.MONTH, 1234)]


async def test_a_writer_cancelled_mid_batch_loses_nothing(sinks: SinkFactory, fleet_factory: FleetFactory) -> None:
    fleet = await fleet_factory()
    sink = await sinks.make()
    await fleet.spend(120)
    # Writer A reads a batch and is cancelled inside the insert, before committing.
    stuck = GatedSink(sink)
    stuck.hold_before = asyncio.Event()
    first = writer_for(fleet, stuck, "crashing")  # type: ignore[arg-type]
    task = asyncio.create_task(first.run())
    await asyncio.wait_for(stuck.entered.wait(), 10)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert await pending_count(fleet) > 0
    held = [e for account in fleet.accounts for e, _ in await fleet.client.xrange(fleet.keys.outbox(account))]
    # Writer B writes the rest and then claims A's pending entries once they are idle; its trims never
    # remove an entry still pending under A.
    second = writer_for(fleet, sink, "survivor", claim_idle_ms=300, claim_interval_ms=10_000)
    await second.step(wait=False)
    remaining = {e for account in fleet.accounts for e, _ in await fleet.client.xrange(fleet.keys.outbox(account))}
    pending_under_a = [
        p["message_id"]
        for account in fleet.accounts
        for p in await fleet.client.xpending_range(fleet.keys.outbox(account), "ledger", "-", "+", 1000, "crashing")
    ]
    assert pending_under_a
    assert set(pending_under_a) <= remaining <= set(held)
    await second.drain(timeout_s=30)
    assert second.stats.claimed >= len(pending_under_a)
    assert await pending_count(fleet) == 0
    await assert_ledger_holds_exactly(sink, fleet)


async def test_a_writer_cancelled_after_commit_before_ack_writes_once(
    sinks: SinkFactory, fleet_factory: FleetFactory
) -> None:
    fleet = await fleet_factory()
    sink = await sinks.make()
    await fleet.spend(80)
    stuck = GatedSink(sink)
    stuck.hold_after = asyncio.Event()
    first = writer_for(fleet, stuck, "crashing")  # type: ignore[arg-type]
    task = asyncio.create_task(first.run())
    await asyncio.wait_for(stuck.entered.wait(), 10)
    await writer_until(lambda: stuck.inserted > 0)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    committed = stuck.inserted
    second = writer_for(fleet, sink, "survivor", claim_idle_ms=0)
    await second.drain(timeout_s=30)
    # The committed-but-unacknowledged batch came back and was skipped, not written twice.
    assert second.stats.duplicates == committed
    assert second.stats.inserted == len(fleet.captured) - committed
    await assert_ledger_holds_exactly(sink, fleet)


async def test_writers_racing_write_each_transaction_once(sinks: SinkFactory, fleet_factory: FleetFactory) -> None:
    fleet = await fleet_factory(("acme", "globex", "initech"))
    location = sinks.location()
    ledgers = [GatedSink(await sinks.make(location)) for _ in range(3)]
    # A short claim idle time makes the writers also steal each other's in-flight entries now and then.
    writers = [writer_for(fleet, ledgers[i], f"w{i}", claim_idle_ms=20) for i in range(3)]  # type: ignore[arg-type]
    tasks = [asyncio.create_task(w.run()) for w in writers]
    for _ in range(6):
        await fleet.spend(40, step_ms_max=60_000)
        await asyncio.sleep(0.02)
    await writers[0].drain(timeout_s=30)
    for writer in writers:
        writer.stop()
    await asyncio.wait_for(asyncio.gather(*tasks), 10)
    assert sum(ledger.inserted for ledger in ledgers) == len(fleet.captured)
    assert sum(1 for w in writers if w.stats.entries) >= 2, "the writers did not share the work"
    await assert_ledger_holds_exactly(ledgers[0].inner, fleet)


async def test_database_outage_loses_nothing_and_catches_up(sinks: SinkFactory, fleet_factory: FleetFactory) -> None:
    fleet = await fleet_factory()
    flaky = GatedSink(await sinks.make())
    writer = writer_for(fleet, flaky, "w1", clock=SystemClock())  # type: ignore[arg-type]
    task = asyncio.create_task(writer.run())
    await fleet.spend(30)
    await writer_until(lambda: flaky.inserted == len(fleet.captured))
    flaky.down = True
    await fleet.spend(90)
    await writer_until(lambda: writer.stats.sink_failures >= 5)
    lag = await writer.lag()
    # The backlog waits in Redis: one batch pending in the writer's hands, the rest not delivered, and the
    # writer reads nothing more while it cannot write what it holds.
    assert 1 <= lag.pending_entries <= 25
    assert lag.entries == len(fleet.captured) - flaky.inserted
    assert lag.oldest_age_ms >= 0
    failures = writer.stats.sink_failures
    await writer_until(lambda: writer.stats.sink_failures >= failures + 3)
    later = await writer.lag()
    assert (later.pending_entries, later.undelivered_entries) == (lag.pending_entries, lag.undelivered_entries)
    assert later.oldest_age_ms >= lag.oldest_age_ms
    assert writer.stats.last_error.startswith("UnavailableError")
    flaky.down = False
    await writer_until(lambda: flaky.inserted == len(fleet.captured))
    writer.stop()
    await asyncio.wait_for(task, 10)
    assert (await writer.lag()).entries == 0
    await assert_ledger_holds_exactly(flaky.inner, fleet)


async def writer_until(condition: Callable[[], bool], timeout_s: float = 30) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():  # noqa: ASYNC110 - the code under test signals nothing; poll its counters.
            await asyncio.sleep(0.01)


@pytest.mark.postgres
async def test_postgres_going_away_mid_load_loses_nothing(
    pg_database_url: str, tmp_path: pathlib.Path, fleet_factory: FleetFactory
) -> None:
    """A real connection loss: PostgreSQL is reached through a proxy that is cut, then restored."""
    sinks = SinkFactory("postgres", tmp_path, pg_database_url)

    info = psycopg.conninfo.conninfo_to_dict(pg_database_url)
    proxy = await TcpProxy(str(info.get("host", "127.0.0.1")), int(info.get("port", 5432))).start()
    info |= {"host": "127.0.0.1", "port": str(proxy.port)}
    schema = sinks.location()
    ledger = PostgresLedger(psycopg.conninfo.make_conninfo(**info), schema=schema, timeout_s=0.5)
    await ledger.migrate()
    fleet = await fleet_factory()
    writer = writer_for(fleet, ledger, "w1", batch_size_max=50)
    task = asyncio.create_task(writer.run())
    try:
        await fleet.spend(40)
        await writer.drain(timeout_s=30)
        proxy.cut()
        await fleet.spend(150)
        await writer_until(lambda: writer.stats.sink_failures >= 3)
        assert (await writer.lag()).entries > 0
        proxy.restore()
        await writer_until(lambda: writer.stats.entries >= len(fleet.captured), timeout_s=60)
        writer.stop()
        await asyncio.wait_for(task, 10)
        direct = await sinks.make(schema)
        await assert_ledger_holds_exactly(direct, fleet)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await ledger.close()
        await proxy.close()
        await sinks.close()


_KILLED_WRITER = """
import asyncio, os, signal, sys
import redis.asyncio as aioredis
from spendgate.ledger import sqlite as ledger_sqlite
from spendgate.ledger.postgres import PostgresLedger
from spendgate.ledger.writer import LedgerWriter
from spendgate.store.keys import Keys

redis_url, prefix, kind, location, database_url, moment = sys.argv[1:7]
batches = 0

def die():
    os.kill(os.getpid(), signal.SIGKILL)

if kind == "postgres" and moment == "during":
    # Die inside the database transaction: after the batch's statement ran, before COMMIT.
    import psycopg
    from spendgate.ledger import postgres as ledger_postgres
    original_execute = psycopg.AsyncConnection.execute
    async def execute(self, query, params=None, **kwargs):
        cursor = await original_execute(self, query, params, **kwargs)
        if query is ledger_postgres._INSERT_BATCH and batches == 2:
            die()
        return cursor
    psycopg.AsyncConnection.execute = execute

if kind == "sqlite" and moment == "during":
    # Die inside the database transaction: after the batch's rows are written, before COMMIT.
    original = ledger_sqlite.SqliteLedger._write
    def write(connection, body):
        def body_then_die():
            result = body()
            if batches == 2:
                die()
            return result
        return original(connection, body_then_die)
    ledger_sqlite.SqliteLedger._write = staticmethod(write)

class Killing:
    def __init__(self, inner):
        self.inner = inner
    async def insert_transactions(self, batch):
        global batches
        batches += 1
        if batches == 2 and moment == "before":
            die()
        inserted = await self.inner.insert_transactions(batch)
        if batches == 2 and moment == "after":
            die()
        return inserted
    def __getattr__(self, name):
        return getattr(self.inner, name)

async def main():
    if kind == "sqlite":
        sink = ledger_sqlite.SqliteLedger(location)
    else:
        sink = PostgresLedger(database_url, schema=location)
    await sink.migrate()
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    writer = LedgerWriter(client, Killing(sink), keys=Keys(prefix), consumer="doomed", batch_size_max=20,
                          linger_ms=0, block_ms=100)
    await writer.run()

asyncio.run(main())
"""


@pytest.mark.parametrize("moment", ["before", "during", "after"])
async def test_a_writer_killed_with_sigkill_loses_nothing(
    sinks: SinkFactory, fleet_factory: FleetFactory, ledger_redis_url: str, prefix: str, moment: str
) -> None:
    fleet = await fleet_factory()
    await fleet.spend(100)
    location = sinks.location()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _KILLED_WRITER,
        ledger_redis_url,
        prefix,
        sinks.kind,
        location,
        sinks.database_url or "",
        moment,
        stderr=subprocess.PIPE,
    )
    _, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == -signal.SIGKILL, stderr.decode()
    sink = await sinks.make(location)
    # The first batch was written and acknowledged; the second is pending (committed or not).
    assert await pending_count(fleet) == 20
    committed = await sink.count_transactions()
    assert committed == {"before": 20, "during": 20, "after": 40}[moment]
    survivor = writer_for(fleet, sink, "survivor", claim_idle_ms=0)
    await survivor.drain(timeout_s=30)
    assert survivor.stats.duplicates == (20 if moment == "after" else 0)
    await assert_ledger_holds_exactly(sink, fleet)


async def test_unreadable_entries_are_set_aside(sinks: SinkFactory, fleet_factory: FleetFactory) -> None:
    fleet = await fleet_factory(("acme",))
    sink = await sinks.make()
    await fleet.spend(10)
    outbox = fleet.keys.outbox("acme")
    bad_id = await fleet.client.xadd(outbox, {"txn_id": "acme:bad", "amount_micros": "lots"})
    await fleet.spend(10)
    writer = writer_for(fleet, sink, "w1")
    await writer.drain(timeout_s=30)
    assert writer.stats.dead_lettered == 1
    await assert_ledger_holds_exactly(sink, fleet)
    dead = await fleet.client.xrange(dead_letter_key(fleet.keys, "acme"))
    assert len(dead) == 1
    fields = dead[0][1]
    assert fields["source_id"] == bad_id
    assert fields["field:amount_micros"] == "lots"
    assert "no 'account_id'" in fields["error"] or "chain" in fields["error"]
    assert await pending_count(fleet) == 0


async def test_lag_counts_pending_and_undelivered_entries(sinks: SinkFactory, fleet_factory: FleetFactory) -> None:
    fleet = await fleet_factory()
    sink = await sinks.make()
    clock = ManualClock(0)
    empty = writer_for(fleet, sink, "w1", clock=clock)
    assert (await empty.lag()).entries == 0
    await fleet.spend(60)
    entry_ids = [e for account in fleet.accounts for e, _ in await fleet.client.xrange(fleet.keys.outbox(account))]
    newest_ms = max(int(entry_id.split("-")[0]) for entry_id in entry_ids)
    clock.set(newest_ms + 60_000)
    lag = await empty.lag()
    assert (lag.pending_entries, lag.undelivered_entries) == (0, len(fleet.captured))
    assert lag.oldest_age_ms >= 60_000
    # One batch delivered and held by a writer that is stuck before committing.
    stuck = GatedSink(sink)
    stuck.hold_before = asyncio.Event()
    holder = writer_for(fleet, stuck, "holder", clock=clock)  # type: ignore[arg-type]
    task = asyncio.create_task(holder.run())
    await asyncio.wait_for(stuck.entered.wait(), 10)
    lag = await empty.lag()
    # A batch, and at most one entry more per stream (each stream is asked for its share, rounded up).
    assert 25 <= lag.pending_entries < 25 + len(fleet.accounts)
    assert lag.entries == len(fleet.captured)
    stuck.hold_before.set()
    await holder.drain(timeout_s=30)
    holder.stop()
    await asyncio.wait_for(task, 10)
    assert await empty.lag() == type(lag)(0, 0, 0)


async def test_writer_recreates_its_group_after_redis_lost_it(sinks: SinkFactory, fleet_factory: FleetFactory) -> None:
    fleet = await fleet_factory(("acme",))
    sink = await sinks.make()
    writer = writer_for(fleet, sink, "w1")
    task = asyncio.create_task(writer.run())
    await fleet.spend(10)
    await writer_until(lambda: writer.stats.entries == len(fleet.captured))
    # As after a Redis restart without persistence: the outbox and its group are gone, new spend arrives.
    await fleet.client.delete(fleet.keys.outbox("acme"))
    await fleet.spend(10)
    await writer_until(lambda: writer.stats.entries == len(fleet.captured))
    writer.stop()
    await asyncio.wait_for(task, 10)
    assert await sink.count_transactions() == len(fleet.captured)


async def test_works_over_fakeredis_as_in_embedded_mode(sinks: SinkFactory) -> None:
    client = fakeredis.FakeAsyncRedis(decode_responses=True)
    fleet = await Fleet(client, "embedded", ("acme",)).setup()  # type: ignore[arg-type]
    sink = await sinks.make()
    await fleet.spend(60)
    stuck = GatedSink(sink)
    stuck.hold_before = asyncio.Event()
    first = writer_for(fleet, stuck, "crashing")  # type: ignore[arg-type]
    task = asyncio.create_task(first.run())
    await asyncio.wait_for(stuck.entered.wait(), 10)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    second = writer_for(fleet, sink, "survivor", claim_idle_ms=0)
    await second.drain(timeout_s=30)
    assert second.stats.claimed > 0
    await assert_ledger_holds_exactly(sink, fleet)
    await client.aclose()


def test_window_sums_of_a_fleet_match_a_manual_count() -> None:
    """A guard on the helper the other tests rely on: window_deltas adds each spend to its whole chain."""
    txn = LedgerTransaction(
        txn_id="a:1",
        account_id="a",
        wallet_id="w",
        chain=("w", "p", "a"),
        amount_micros=5,
        authorized_micros=5,
        currency="USD",
        service="",
        metadata={},
        authorized_at_ms=0,
        captured_at_ms=0,
        day="d",
        week="w",
        month="m",
        idempotency_key="",
        capture_idempotency_key="",
    )
    assert sum(t.spent_micros for t in window_deltas([txn]).values()) == 5 * 3 * 4
