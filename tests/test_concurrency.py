"""Concurrency: many authorizers racing for one budget get exactly the approvals the budget allows.

The requests go through SpendCore concurrently (``asyncio.gather``), so they share its chain cache and the
store's pipelined batches, as a server's concurrent RPCs would. On both backends.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Awaitable, Callable
from typing import Any

from helpers import USD, command, plan_from, with_pool_of_wallets
from spendgate.clock import ManualClock
from spendgate.core import SpendCore
from spendgate.domain import DenyReason, FailedPreconditionError, NodeWindow, Window
from spendgate.store.redis_store import RedisStore

ApplyPlan = Callable[[Any], Awaitable[Any]]


async def test_500_concurrent_one_shots_on_a_50_dollar_day_approve_exactly_50(
    make_store: Callable[..., RedisStore], clock: ManualClock, key_prefix: str
) -> None:
    # Four replicas, each with a store (and so a batcher and connections) and a chain cache of its own, as four
    # servers behind a load balancer sharing one Redis.
    replicas = [SpendCore(make_store(key_prefix), clock) for _ in range(4)]
    plan = plan_from({"account": {"id": "acme"}, "wallets": [{"id": "w", "limits": {"day": 50}}]})
    await replicas[0].apply_plan(plan)
    core, store = replicas[0], replicas[0].store

    results = await asyncio.gather(*(replicas[i % 4].authorize(command("w", USD, capture=True)) for i in range(500)))

    approved = [r for r in results if r.approved]
    assert len(approved) == 50
    assert len({r.authorization_id for r in approved}) == 50
    denials = collections.Counter((r.deny_reason, r.denied_by) for r in results if not r.approved)
    assert denials == {(DenyReason.WINDOW_LIMIT, NodeWindow("w", Window.DAY)): 450}
    day = (await core.get_budget("w")).window(Window.DAY)
    assert (day.spent_micros, day.held_micros, day.remaining_micros) == (50 * USD, 0, 0)
    assert (await core.get_budget("acme")).window(Window.TOTAL).spent_micros == 50 * USD
    assert await store.client.xlen(store.keys.outbox("acme")) == 50


async def test_500_concurrent_one_shots_under_a_pool_month_limit_approve_exactly_the_pool_limit(
    core: SpendCore, apply_plan: ApplyPlan, store: RedisStore
) -> None:
    # Five wallets with $100/day each; their pool may spend $37 a month: the pool is the binding limit.
    await apply_plan(with_pool_of_wallets("acme", pool_month=37, wallets=5, wallet_day=100))
    requests = [command(f"acme-w{i % 5}", USD, capture=True) for i in range(500)]

    results = await asyncio.gather(*(core.authorize(request) for request in requests))

    assert sum(r.approved for r in results) == 37
    assert {r.denied_by for r in results if not r.approved} == {NodeWindow("acme-pool", Window.MONTH)}
    per_wallet = collections.Counter(req.wallet_id for req, r in zip(requests, results, strict=True) if r.approved)
    for i in range(5):
        day = (await core.get_budget(f"acme-w{i}")).window(Window.DAY)
        assert (day.spent_micros, day.held_micros) == (per_wallet[f"acme-w{i}"] * USD, 0)
    assert sum(per_wallet.values()) == 37
    month = (await core.get_budget("acme-pool")).window(Window.MONTH)
    assert (month.spent_micros, month.held_micros) == (37 * USD, 0)
    assert (await core.get_budget("acme")).window(Window.MONTH).spent_micros == 37 * USD
    assert await store.client.xlen(store.keys.outbox("acme")) == 37


async def test_concurrent_holds_then_concurrent_captures_and_voids_keep_the_books(
    core: SpendCore, apply_plan: ApplyPlan
) -> None:
    await apply_plan({"account": {"id": "acme"}, "wallets": [{"id": "w", "limits": {"day": 50}}]})
    holds = await asyncio.gather(*(core.authorize(command("w", 2 * USD)) for _ in range(100)))
    held = [r for r in holds if r.approved]
    assert len(held) == 25

    # Half captured for $1 each, half voided, all at once.
    await asyncio.gather(
        *(
            core.capture(r.authorization_id, USD, f"cap-{i}") if i % 2 == 0 else core.void(r.authorization_id)
            for i, r in enumerate(held)
        )
    )

    day = (await core.get_budget("w")).window(Window.DAY)
    assert (day.spent_micros, day.held_micros) == (13 * USD, 0)


async def test_racing_captures_and_voids_of_one_hold_resolve_it_exactly_once(
    core: SpendCore, apply_plan: ApplyPlan
) -> None:
    await apply_plan({"account": {"id": "acme"}, "wallets": [{"id": "w"}]})
    hold = await core.authorize(command("w", 5 * USD))

    outcomes = await asyncio.gather(
        *(core.capture(hold.authorization_id, 3 * USD, f"cap-{i}") for i in range(20)),
        *(core.void(hold.authorization_id) for _ in range(20)),
        return_exceptions=True,
    )

    errors = [o for o in outcomes if isinstance(o, Exception)]
    assert all(isinstance(error, FailedPreconditionError) for error in errors), errors
    captures = [o for o in outcomes[:20] if not isinstance(o, Exception)]
    voids = [o for o in outcomes[20:] if not isinstance(o, Exception)]
    # Either one capture won (and every void was refused), or the void won (and every capture was refused;
    # repeated voids answer alike).
    assert (len(captures), len(voids)) in ((1, 0), (0, 20))
    total = (await core.get_budget("w")).window(Window.TOTAL)
    assert (total.spent_micros, total.held_micros) == ((3 * USD if captures else 0), 0)
