"""Exactly once through the real path: a server on a real Redis settles money, ledger writers move it into a real
PostgreSQL, and every captured transaction ends up in the ledger once, with what its capture settled.

The writers are the real ones: ``spendgate ledger`` subprocesses (killed with SIGKILL, restarted, racing) and
the server's own. The ledger is then checked directly in PostgreSQL, and ``spendgate reconcile`` checks that its
per-node window totals equal the Redis counters (a transaction counted twice would show there even though the
transactions table cannot hold an id twice).
"""

from __future__ import annotations

import asyncio
import pathlib
import signal
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from helpers import RedisServer, free_port
from spendgate.ledger import LedgerWriter, open_ledger
from spendgate.store.keys import Keys

from .conftest import Databases, StartGate
from .support import (
    ACCOUNT,
    PgProxy,
    Process,
    Spender,
    assert_exactly_once,
    clean_env,
    count_rows,
    drained,
    eventually,
    ledger_status,
    ledger_transactions,
    new_name,
    pg_target,
    run_cli,
)

pytestmark = [pytest.mark.redis, pytest.mark.postgres]

# Small batches: a load is many batches, so a kill lands between some of them.
BATCH_SIZE_MAX = 20


def direct_env(redis_url: str, database_url: str, prefix: str) -> dict[str, str]:
    """The environment of the operator commands (`spendgate ledger`, `reconcile`, `rebuild`)."""
    return clean_env(
        redis_url=redis_url,
        database_url=database_url,
        key_prefix=prefix,
        redis_timeout_s="5",
        ledger_batch_size_max=str(BATCH_SIZE_MAX),
        ledger_linger_ms="5",
        log_format="text",
    )


async def reconciles(redis_url: str, database_url: str, prefix: str) -> None:
    """`spendgate reconcile` finds no drift between Redis's counters and the ledger."""
    result = await run_cli("reconcile", env=direct_env(redis_url, database_url, prefix))
    assert result.code == 0, result
    assert "no drift" in result.out, result


@pytest.fixture
async def redis(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    """A client of the test's own Redis."""
    client = aioredis.Redis.from_url(redis_server.url, decode_responses=True, socket_timeout=10)
    try:
        yield client
    finally:
        await client.aclose()


async def pending_of(redis: aioredis.Redis, prefix: str, consumer: str) -> list[str]:
    """The outbox entries delivered to ``consumer`` and not acknowledged."""
    rows = await redis.xpending_range(Keys(prefix).outbox(ACCOUNT), "ledger", "-", "+", 10_000, consumername=consumer)
    return [str(row["message_id"]) for row in rows]


async def txn_ids_of(redis: aioredis.Redis, prefix: str, entry_ids: list[str]) -> set[str]:
    """The transaction ids carried by outbox entries."""
    stream = Keys(prefix).outbox(ACCOUNT)
    ids = set()
    for entry_id in entry_ids:
        [(_, fields)] = await redis.xrange(stream, entry_id, entry_id)
        ids.add(fields["txn_id"])
    return ids


# ---------------------------------------------------------------------------------------------------------
# A writer killed with SIGKILL.


async def test_a_writer_killed_mid_batch_is_taken_over_by_another(
    redis_server: RedisServer,
    redis: aioredis.Redis,
    database_url: str,
    start_gate: StartGate,
    tmp_path: pathlib.Path,
) -> None:
    """The database hangs while a `spendgate ledger` holds a batch; it is SIGKILLed; another writer claims it."""
    prefix = new_name("x")
    gate = await start_gate(redis_url=redis_server.url, database_url=database_url, key_prefix=prefix, ledger_writers=0)
    proxy = PgProxy(*pg_target(database_url)).start()
    doomed = Process(
        # One writer loop ("doomed-0"): the test follows the batch that loop holds.
        ["ledger", "--writers", "1", "--consumer", "doomed"],
        direct_env(redis_server.url, proxy.url(database_url), prefix),
        tmp_path / "doomed.log",
    )
    spender = Spender(gate.client, seed=11)
    takeover_ledger = open_ledger(database_url)
    takeover = LedgerWriter(
        redis,
        takeover_ledger,
        keys=Keys(prefix),
        consumer="takeover",
        batch_size_max=BATCH_SIZE_MAX,
        linger_ms=5,
        block_ms=100,
        claim_idle_ms=300,
        claim_interval_ms=50,
        accounts_refresh_ms=50,
        backoff_max_ms=200,
    )
    takeover_task: asyncio.Task[None] | None = None
    load: asyncio.Task[None] | None = None
    try:
        await doomed.start()
        await spender.load(60)

        async def written() -> bool:
            return await count_rows(database_url) == len(spender.settled)

        await eventually(written, what=f"`spendgate ledger` to write the first load (see {doomed.log_path})")

        # The database hangs (every byte held, no connection closed) while the load goes on: the writer takes
        # a batch, and its insert cannot finish.
        proxy.pause()
        load = asyncio.create_task(spender.load(200))

        async def holding() -> list[str]:
            return await pending_of(redis, prefix, "doomed-0")

        await eventually(holding, what="the writer to take a batch it cannot write")
        assert await doomed.kill() == -signal.SIGKILL
        held = await pending_of(redis, prefix, "doomed-0")
        held_ids = await txn_ids_of(redis, prefix, held)
        assert held_ids <= set(spender.settled)
        before_takeover = {txn.txn_id for txn in await ledger_transactions(database_url)}
        assert not held_ids & before_takeover, "the batch in hand when the writer died was not written"
        proxy.resume()

        # Another writer claims what the dead one held, while the load still runs, and writes everything else.
        takeover_task = asyncio.create_task(takeover.run())
        await load
        await spender.load(40)
        await drained(gate.channel, len(spender.settled))
        assert takeover.stats.claimed >= len(held), takeover.stats
        assert await pending_of(redis, prefix, "doomed-0") == []
        assert_exactly_once(await ledger_transactions(database_url), spender.settled)
        await reconciles(redis_server.url, database_url, prefix)
    finally:
        if load is not None and not load.done():
            load.cancel()
            await asyncio.gather(load, return_exceptions=True)
        takeover.stop()
        if takeover_task is not None:
            await asyncio.wait_for(takeover_task, 30)
        await takeover_ledger.close()
        await doomed.cleanup()
        proxy.close()


async def test_a_writer_killed_after_its_commit_before_its_ack_writes_nothing_twice(
    redis_server: RedisServer,
    redis: aioredis.Redis,
    database_url: str,
    start_gate: StartGate,
    tmp_path: pathlib.Path,
) -> None:
    """The batch commits but Redis holds the acknowledgement; SIGKILL; the writer restarts under its name."""
    prefix = new_name("x")
    gate = await start_gate(redis_url=redis_server.url, database_url=database_url, key_prefix=prefix, ledger_writers=0)
    proxy = PgProxy(*pg_target(database_url)).start()
    env = direct_env(redis_server.url, proxy.url(database_url), prefix)
    # One writer loop ("steady-0"): the test follows the batch that loop holds, and no other loop's.
    first = Process(["ledger", "--writers", "1", "--consumer", "steady"], env, tmp_path / "first.log")
    second = Process(["ledger", "--writers", "1", "--consumer", "steady"], env, tmp_path / "second.log")
    spender = Spender(gate.client, seed=12)
    paused = False
    try:
        await first.start()
        await spender.load(40)

        async def written() -> bool:
            return await count_rows(database_url) == len(spender.settled)

        await eventually(written, what=f"`spendgate ledger` to write the first load (see {first.log_path})")
        proxy.pause()
        await spender.load(30)

        async def holding() -> list[str]:
            return await pending_of(redis, prefix, "steady-0")

        held = await eventually(holding, what="the writer to take a batch it cannot write")
        held_ids = await txn_ids_of(redis, prefix, held)
        written_before = await count_rows(database_url)
        # Redis now holds every write (the acknowledgement among them); then the database answers again, so
        # the batch commits and its XACK waits in Redis.
        await redis.execute_command("CLIENT", "PAUSE", "60000", "WRITE")
        paused = True
        proxy.resume()

        async def committed() -> bool:
            return await count_rows(database_url) == written_before + len(held_ids)

        await eventually(committed, what="the held batch to commit")
        assert await first.kill() == -signal.SIGKILL
        await redis.execute_command("CLIENT", "UNPAUSE")
        paused = False
        assert await pending_of(redis, prefix, "steady-0") == held, "the committed batch was never acknowledged"
        assert held_ids <= {txn.txn_id for txn in await ledger_transactions(database_url)}

        # The restarted writer (same consumer name) re-reads its own pending entries at once; the ledger skips
        # them as already written, and counts nothing twice.
        await second.start()
        await spender.load(30)
        await drained(gate.channel, len(spender.settled))
        assert await pending_of(redis, prefix, "steady-0") == []
        assert await count_rows(database_url) == len(spender.settled)
        assert_exactly_once(await ledger_transactions(database_url), spender.settled)
        await reconciles(redis_server.url, database_url, prefix)
        assert await second.terminate() == 0, second.log()
    finally:
        if paused:
            await redis.execute_command("CLIENT", "UNPAUSE")
        await first.cleanup()
        await second.cleanup()
        proxy.close()


async def test_a_writer_started_before_its_database_waits_for_it(
    redis_server: RedisServer,
    database_url: str,
    start_gate: StartGate,
    tmp_path: pathlib.Path,
) -> None:
    """`spendgate ledger` started while its database refuses connections retries, then writes everything."""
    prefix = new_name("x")
    gate = await start_gate(redis_url=redis_server.url, database_url=database_url, key_prefix=prefix, ledger_writers=0)
    # A port nothing listens on: connections to it are refused.
    proxy = PgProxy("127.0.0.1", free_port()).start()
    writer = Process(
        ["ledger", "--writers", "1", "--consumer", "early"],
        direct_env(redis_server.url, proxy.url(database_url), prefix),
        tmp_path / "early.log",
    )
    spender = Spender(gate.client, seed=14)
    try:
        await writer.start()
        await spender.load(20)

        async def retrying() -> bool:
            return writer.log().count("ledger database unavailable") >= 2

        await eventually(retrying, what=f"`spendgate ledger` to retry its database (see {writer.log_path})")
        assert writer.running, writer.log()
        assert await count_rows(database_url) == 0
        proxy.retarget(*pg_target(database_url))
        await spender.load(10)
        await drained(gate.channel, len(spender.settled))
        assert_exactly_once(await ledger_transactions(database_url), spender.settled)
        assert await writer.terminate() == 0, writer.log()
    finally:
        await writer.cleanup()
        proxy.close()


async def test_a_writer_waiting_for_its_database_stops_on_sigterm(
    redis_server: RedisServer,
    tmp_path: pathlib.Path,
) -> None:
    """A writer still waiting for its database exits cleanly, and at once, when told to stop."""
    url = f"postgresql://nobody@127.0.0.1:{free_port()}/nothing"  # Nothing listens there.
    writer = Process(
        ["ledger", "--writers", "1"], direct_env(redis_server.url, url, new_name("x")), tmp_path / "stop.log"
    )
    try:
        await writer.start()

        async def retrying() -> bool:
            return "ledger database unavailable" in writer.log()

        await eventually(retrying, what=f"`spendgate ledger` to retry its database (see {writer.log_path})")
        assert await writer.terminate(timeout_s=10.0) == 0, writer.log()
    finally:
        await writer.cleanup()


# ---------------------------------------------------------------------------------------------------------
# Writers racing.


async def test_writers_racing_write_each_transaction_once(
    redis_server: RedisServer,
    redis: aioredis.Redis,
    database_url: str,
    start_gate: StartGate,
    tmp_path: pathlib.Path,
) -> None:
    """Two `spendgate ledger` processes, the server's own writers and a writer that steals every pending entry."""
    prefix = new_name("x")
    gate = await start_gate(
        redis_url=redis_server.url,
        database_url=database_url,
        key_prefix=prefix,
        ledger_writers=2,
        ledger_batch_size_max=BATCH_SIZE_MAX,
    )
    env = direct_env(redis_server.url, database_url, prefix)
    processes = [
        Process(["ledger", "--writers", "2", "--consumer", f"racer-{index}"], env, tmp_path / f"racer-{index}.log")
        for index in range(2)
    ]
    thief_ledger = open_ledger(database_url)
    # It claims entries the moment another writer has read them, so the same entries are written concurrently.
    thief = LedgerWriter(
        redis,
        thief_ledger,
        keys=Keys(prefix),
        consumer="thief",
        batch_size_max=BATCH_SIZE_MAX,
        linger_ms=0,
        block_ms=20,
        claim_idle_ms=0,
        claim_interval_ms=0,
        accounts_refresh_ms=50,
    )
    thief_task = asyncio.create_task(thief.run())
    spender = Spender(gate.client, seed=13)
    try:
        for process in processes:
            await process.start()
        await spender.load(400, concurrency=12)
        await drained(gate.channel, len(spender.settled))
        assert_exactly_once(await ledger_transactions(database_url), spender.settled)
        await reconciles(redis_server.url, database_url, prefix)
        for process in processes:
            assert await process.terminate() == 0, process.log()
    finally:
        thief.stop()
        await asyncio.wait_for(thief_task, 30)
        await thief_ledger.close()
        for process in processes:
            await process.cleanup()


# ---------------------------------------------------------------------------------------------------------
# The database going away.


async def test_the_database_going_away_during_load_loses_nothing_and_doubles_nothing(
    redis_server: RedisServer, databases: Databases, database_url: str, start_gate: StartGate
) -> None:
    """Our database refuses connections and its sessions are ended mid-load; money keeps settling; it returns."""
    prefix = new_name("x")
    gate = await start_gate(
        redis_url=redis_server.url,
        database_url=database_url,
        key_prefix=prefix,
        ledger_writers=1,
        ledger_batch_size_max=BATCH_SIZE_MAX,
    )
    spender = Spender(gate.client, seed=14)
    await spender.load(60)
    await drained(gate.channel, len(spender.settled))
    written_before = len(spender.settled)
    try:
        databases.set_available(database_url, False)
        # Money keeps settling while the ledger is down (the spender fails the test on any denial or error).
        await spender.load(200)
        waiting = len(spender.settled) - written_before
        assert waiting > 0
        # Nothing is dropped: every settlement since the outage waits in the outbox, and the status says so.
        status = await ledger_status(gate.channel)
        assert status.ledger_unavailable, status
        assert status.pending_entries == waiting, status
        assert status.oldest_pending_age_ms > 0, status
    finally:
        databases.set_available(database_url, True)
    await spender.load(40)
    await drained(gate.channel, len(spender.settled))
    assert not (await ledger_status(gate.channel)).ledger_unavailable
    assert_exactly_once(await ledger_transactions(database_url), spender.settled)
    await reconciles(redis_server.url, database_url, prefix)
