"""The embedded default keeps working across restarts: `spendgate serve` with no Redis and no database URL.

Its store lives in memory, so everything that must survive a restart comes back from the SQLite ledger under
SPENDGATE_DATA_DIR: the configuration (with freezes) and the open windows' spent counters, so that limits are
still enforced to the micro-unit. These tests run the real command as a subprocess on the machine's clock.
"""

from __future__ import annotations

import asyncio
import json
import pathlib

from helpers import USD, free_port
from spendgate.client import AdminClient, AsyncClient, BillingClient
from spendgate.domain import DenyReason, Window

from .support import (
    ACCOUNT,
    ALL_NODES,
    CALL_TIMEOUT_S,
    Spender,
    assert_exactly_once,
    avoid_midnight,
    budget_snapshot,
    budgets,
    clean_env,
    eventually,
    run_cli,
    serve,
    today_utc,
)

WALLET = "research-agent-01"  # $50 a day, at most $1 a transaction
FROZEN = "content-agent-01"
FREEZE_REASON = "runaway loop, paused by the on-call"


async def test_budgets_freezes_and_limits_survive_restarts(tmp_path: pathlib.Path) -> None:
    avoid_midnight()
    port = free_port()
    address = f"127.0.0.1:{port}"
    env = clean_env(data_dir=str(tmp_path / "data"), auth="off")
    server = await serve(port, env, tmp_path / "serve-1.log")
    try:
        async with AsyncClient(address, timeout_s=CALL_TIMEOUT_S) as client:
            spender = Spender(client)
            # The wallet spends $49 of its $50 day: 47 one-shots, a full and a partial capture of holds.
            for index in range(47):
                await spender.one_shot(WALLET, USD, service="api.openai.example" if index % 2 else "")
            await spender.hold_and_capture(WALLET, USD, USD, service="search.example")
            await spender.hold_and_capture(WALLET, USD, USD // 2)
            await spender.one_shot(WALLET, USD // 2)
            # Spend elsewhere in the tree, and a hold that is voided (it settles nothing).
            await spender.hold_and_capture("sales-agent-01", USD, 250_000, service="search.example")
            await spender.one_shot("research-agent-02", 123_456, metadata={"task": "t-1"})
            await spender.hold_and_void("sales-agent-02", USD)
            wallet_day = (await client.get_budget(WALLET)).window(Window.DAY)
            assert (wallet_day.window_id, wallet_day.spent_micros) == (today_utc(), 49 * USD)
            before = budget_snapshot(await budgets(client, ALL_NODES))
        await asyncio.to_thread(_freeze, address, FROZEN, FREEZE_REASON)
        assert await server.terminate() == 0, server.log()
        assert "stopped" in server.log()

        # First restart: spent counters and the freeze come back; exactly $1 is left for the wallet today. This
        # server's writer holds what it reads for 30 s before writing (a long linger), so what is settled now
        # is still in the in-memory outbox when the server is stopped.
        server = await serve(port, env | {"SPENDGATE_LEDGER_LINGER_MS": "30000"}, tmp_path / "serve-2.log")
        async with AsyncClient(address, timeout_s=CALL_TIMEOUT_S) as client:
            after = budget_snapshot(await budgets(client, ALL_NODES))
            expected = dict(before)
            expected[FROZEN] = (FREEZE_REASON, before[FROZEN][1])
            assert after == expected
            remaining = (await client.get_budget(WALLET)).window(Window.DAY).remaining_micros
            assert remaining == USD
            frozen = await client.authorize(FROZEN, 1)
            assert not frozen.approved
            assert frozen.deny_reason is DenyReason.FROZEN
            spender.client = client  # The same record of settled money, over this server's connection.
            last_dollar = await spender.one_shot(WALLET, USD, service="api.openai.example")
            assert last_dollar.amount_micros == USD
            over = await client.authorize(WALLET, 1)
            assert not over.approved
            assert over.deny_reason is DenyReason.WINDOW_LIMIT, over
            assert over.denied_by is not None
            assert (over.denied_by.node_id, over.denied_by.window) == (WALLET, Window.DAY)
        pending, _, written = await asyncio.to_thread(_status, address)
        assert (pending, written) == (1, len(spender.settled) - 1), "the last dollar should still be in the outbox"
        assert await server.terminate() == 0, server.log()

        # Second restart: the last dollar was written to the ledger on the way down, so it comes back too.
        server = await serve(port, env, tmp_path / "serve-3.log")
        async with AsyncClient(address, timeout_s=CALL_TIMEOUT_S) as client:
            day = (await client.get_budget(WALLET)).window(Window.DAY)
            assert (day.spent_micros, day.remaining_micros) == (50 * USD, 0)
            assert not (await client.authorize(WALLET, 1)).approved
            assert (await client.get_budget(FROZEN)).frozen_reason == FREEZE_REASON
            pool_month = (await client.get_budget("research-agents")).window(Window.MONTH).spent_micros
            assert pool_month == 50 * USD + 123_456
            account_month = (await client.get_budget(ACCOUNT)).window(Window.MONTH).spent_micros
            assert account_month == spender.total_micros()
        # Every capture, from before and after the restarts, is in the SQLite ledger once; the CLI reads the
        # same ledger through the server.
        await drained(address, len(spender.settled))
        assert_exactly_once(await asyncio.to_thread(_transactions, address), spender.settled)
        result = await run_cli("--target", address, "transactions", "--under", ACCOUNT, "--json")
        assert result.code == 0, result
        rows = [json.loads(line) for line in result.out.splitlines() if line.strip()]
        assert sorted(row["txn_id"] for row in rows) == sorted(spender.settled)
        assert sum(row["amount_micros"] for row in rows) == spender.total_micros()
        assert await server.terminate() == 0, server.log()
    finally:
        await server.cleanup()


async def drained(address: str, settled: int) -> None:
    """Wait until the server's writer has moved everything settled into the ledger."""

    async def check() -> bool:
        pending, _, written = await asyncio.to_thread(_status, address)
        if pending:
            return False
        # Entries are acknowledged only after their commit: with nothing pending, the ledger holds all of them.
        assert written == settled, f"nothing is pending, yet the ledger holds {written} of {settled}"
        return True

    await eventually(check, what=f"the ledger to hold all {settled} settled transactions")


def _status(address: str) -> tuple[int, int, int]:
    with BillingClient(address, timeout_s=CALL_TIMEOUT_S) as billing:
        return billing.status()


def _freeze(address: str, node_id: str, reason: str) -> None:
    with AdminClient(address, timeout_s=CALL_TIMEOUT_S) as admin:
        admin.freeze(node_id, reason)


def _transactions(address: str) -> list[object]:
    with BillingClient(address, timeout_s=CALL_TIMEOUT_S) as billing:
        return list(billing.transactions(ACCOUNT, page_size=7))
