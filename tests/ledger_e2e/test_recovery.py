"""Recovery through the operator commands: `spendgate reconcile` compares Redis with the ledger, `spendgate
rebuild` restores Redis from it, and GetLedgerStatus shows the lag in between.

A server on the machine's clock settles money into our own redis-server and our own PostgreSQL database; the
commands run as subprocesses against the same Redis and database, as an operator would run them.
"""

from __future__ import annotations

import asyncio
import re

import pytest
import redis.asyncio as aioredis

from helpers import USD, RedisServer
from spendgate.client import AdminClient
from spendgate.domain import DenyReason, NotFoundError, Window
from spendgate.store.keys import Keys

from .conftest import StartGate
from .support import (
    ACCOUNT,
    ALL_NODES,
    CALL_TIMEOUT_S,
    WALLETS,
    Spender,
    assert_exactly_once,
    avoid_midnight,
    budget_snapshot,
    budgets,
    clean_env,
    drained,
    eventually,
    ledger_status,
    ledger_transactions,
    new_name,
    run_cli,
    today_utc,
    wall_ms,
)

pytestmark = [pytest.mark.redis, pytest.mark.postgres]

WALLET = "research-agent-01"  # $50 a day, at most $1 a transaction


def operator_env(redis_server: RedisServer, database_url: str, prefix: str) -> dict[str, str]:
    """What an operator's shell has: the deployment's Redis, database and key prefix."""
    return clean_env(
        redis_url=redis_server.url, database_url=database_url, key_prefix=prefix, redis_timeout_s="5", log_format="text"
    )


async def test_ledger_status_shows_the_lag_until_a_writer_drains_it(
    redis_server: RedisServer, database_url: str, start_gate: StartGate
) -> None:
    """No writer runs in the server; the lag grows with every settlement, then `spendgate ledger --once` drains it."""
    prefix = new_name("r")
    gate = await start_gate(redis_url=redis_server.url, database_url=database_url, key_prefix=prefix, ledger_writers=0)
    status = await ledger_status(gate.channel)
    assert (status.pending_entries, status.oldest_pending_age_ms, status.ledger_transactions) == (0, 0, 0)
    spender = Spender(gate.client, seed=21)
    await spender.random_spend(30)
    first_settled_ms = min(item.captured_at_ms[0] for item in spender.settled.values())
    status = await ledger_status(gate.channel)
    assert status.pending_entries == len(spender.settled), status
    assert status.ledger_transactions == 0
    # The oldest entry is the first settlement: its age is positive and no more than the time since then.
    age_bound_ms = wall_ms() - first_settled_ms
    assert 0 < status.oldest_pending_age_ms <= age_bound_ms + 1000, (status, age_bound_ms)

    result = await run_cli("ledger", "--once", env=operator_env(redis_server, database_url, prefix))
    assert result.code == 0, result
    assert f"wrote {len(spender.settled)} transaction(s)" in result.out, result
    status = await ledger_status(gate.channel)
    assert (status.pending_entries, status.oldest_pending_age_ms) == (0, 0), status
    assert status.ledger_transactions == len(spender.settled)
    assert not status.ledger_unavailable
    assert_exactly_once(await ledger_transactions(database_url), spender.settled)


async def test_reconcile_agrees_once_drained_and_names_a_tampered_counter(
    redis_server: RedisServer, database_url: str, start_gate: StartGate
) -> None:
    avoid_midnight()
    prefix = new_name("r")
    env = operator_env(redis_server, database_url, prefix)
    gate = await start_gate(redis_url=redis_server.url, database_url=database_url, key_prefix=prefix, ledger_writers=0)
    spender = Spender(gate.client, seed=22)
    await spender.random_spend(60, amount_max_micros=200_000)

    # Nothing is in the ledger yet: reconcile counts what is still in the outbox.
    result = await run_cli("reconcile", env=env)
    assert result.code == 0, result
    assert "no drift" in result.out
    # And once a writer has drained the outbox into the ledger.
    result = await run_cli("ledger", "--once", env=env)
    assert result.code == 0, result
    await drained(gate.channel, len(spender.settled))
    result = await run_cli("reconcile", env=env)
    assert result.code == 0, result
    assert "no drift" in result.out
    windows = int(re.search(r"(\d+) window\(s\)", result.out).group(1))  # type: ignore[union-attr]
    assert windows == 11 * 4, result  # every node of the example fleet, day / week / month / total

    # A counter that lost (or gained) money is drift: reconcile names the node and the window, and exits 1.
    async with aioredis.Redis.from_url(redis_server.url, decode_responses=True) as redis:
        await redis.hincrby(Keys(prefix).node(ACCOUNT, WALLET), "d:s", 1234)
    result = await run_cli("reconcile", env=env)
    assert result.code == 1, result
    drifted = [line for line in result.out.splitlines() if WALLET in line]
    assert len(drifted) == 1, result
    assert f"day {today_utc()}" in drifted[0], result
    assert "1234" in drifted[0].split(), result
    assert "1 of 44 window(s) drifted" in result.out, result
    assert "research-agents" not in result.out, "only the tampered counter drifted"
    # Reconciling one account at a time says the same.
    result = await run_cli("reconcile", "--account", ACCOUNT, env=env)
    assert result.code == 1, result
    assert WALLET in result.out


async def test_rebuild_after_flushall_enforces_limits_exactly_as_before(
    redis_server: RedisServer, database_url: str, start_gate: StartGate
) -> None:
    """Redis loses everything; `spendgate rebuild` restores the tree (with its freeze) and the spent counters."""
    avoid_midnight()
    prefix = new_name("r")
    env = operator_env(redis_server, database_url, prefix)
    gate = await start_gate(redis_url=redis_server.url, database_url=database_url, key_prefix=prefix, ledger_writers=1)
    spender = Spender(gate.client, seed=23)
    # Spend across the rest of the tree, and an operator's freeze.
    await spender.random_spend(40, amount_max_micros=300_000, wallets=[w for w in WALLETS if w != WALLET])
    await asyncio.to_thread(_freeze, gate.address, "content-agent-02", "card reported stolen")
    # The wallet gets to $49 of its $50 day: one-shots, a full and a partial capture of holds.
    for index in range(47):
        await spender.one_shot(WALLET, USD, service="api.openai.example" if index % 3 else "search.example")
    await spender.hold_and_capture(WALLET, USD, USD)
    await spender.hold_and_capture(WALLET, USD, USD // 4)
    await spender.one_shot(WALLET, 3 * USD // 4)
    await drained(gate.channel, len(spender.settled))
    before = budget_snapshot(await budgets(gate.client, ALL_NODES))
    assert before[WALLET][1][0][1:] == (today_utc(), 50 * USD, 49 * USD)
    assert before["content-agent-02"][0] == "card reported stolen"

    async with aioredis.Redis.from_url(redis_server.url, decode_responses=True) as redis:
        assert await redis.flushall()
    with pytest.raises(NotFoundError):
        await gate.client.get_budget(WALLET)

    result = await run_cli("rebuild", env=env)
    assert result.code == 0, result
    assert f"rebuilt {ACCOUNT}:" in result.out, result
    assert budget_snapshot(await budgets(gate.client, ALL_NODES)) == before
    frozen = await gate.client.authorize("content-agent-02", 1)
    assert (frozen.approved, frozen.deny_reason) == (False, DenyReason.FROZEN)
    # Exactly $1 more, and not one micro-unit beyond it.
    last = await spender.one_shot(WALLET, USD)
    assert last.amount_micros == USD
    over = await gate.client.authorize(WALLET, 1)
    assert not over.approved
    assert over.deny_reason is DenyReason.WINDOW_LIMIT
    assert over.denied_by is not None
    assert (over.denied_by.node_id, over.denied_by.window) == (WALLET, Window.DAY)

    # The server's writer carries on after the flush: the new dollar reaches the ledger, and the ledger and the
    # rebuilt counters agree.
    async def written() -> bool:
        return len(await ledger_transactions(database_url)) == len(spender.settled)

    await eventually(written, what="the capture made after the rebuild to reach the ledger")
    assert_exactly_once(await ledger_transactions(database_url), spender.settled)
    result = await run_cli("reconcile", env=env)
    assert result.code == 0, result


def _freeze(address: str, node_id: str, reason: str) -> None:
    with AdminClient(address, timeout_s=CALL_TIMEOUT_S) as admin:
        admin.freeze(node_id, reason)
