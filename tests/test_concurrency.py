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


async def test_one_shots_racing_a_move_of_their_wallet_to_another_pool_keep_both_pools_within_limits(
    make_store: Callable[..., RedisStore], clock: ManualClock, key_prefix: str
) -> None:
    # Four replicas with caches of their own, two of which learnt the fleet's accounts at start; while their
    # calls race, the wallet moves from p1 ($30 a month) to p2 ($20) through another server. A decision on a
    # chain the move made out of date walks the new one in the same atomic step, so each pool counts only what
    # was spent under it.
    tree = {
        "account": {"id": "acme", "limits": {"month": 1000}},
        "pools": [
            {"id": "p1", "limits": {"month": 30}, "wallets": [{"id": "w", "limits": {"day": 100}}]},
            {"id": "p2", "limits": {"month": 20}},
        ],
    }
    admin = SpendCore(make_store(key_prefix), clock)
    await admin.apply_plan(plan_from(tree))
    replicas = [SpendCore(make_store(key_prefix), clock) for _ in range(4)]
    for replica in replicas[:2]:
        await replica.load_account_hints()
    moved = {
        "account": tree["account"],
        "pools": [{"id": "p1", "limits": {"month": 30}}, {**tree["pools"][1], "wallets": tree["pools"][0]["wallets"]}],
    }

    # Each replica caches the wallet's chain under p1, then the calls race the move, then more follow it.
    first = [await replica.authorize(command("w", USD, capture=True)) for replica in replicas]
    wave = [replicas[i % 4].authorize(command("w", USD, capture=True)) for i in range(150)]
    *racing, _ = await asyncio.gather(*wave, admin.apply_plan(plan_from(moved)))
    after = await asyncio.gather(*(replicas[i % 4].authorize(command("w", USD, capture=True)) for i in range(50)))
    results = [*first, *racing, *after]

    approved = sum(result.approved for result in results)
    p1 = (await admin.get_budget("p1")).window(Window.MONTH).spent_micros
    p2 = (await admin.get_budget("p2")).window(Window.MONTH).spent_micros
    assert p1 <= 30 * USD
    assert p2 == 20 * USD  # The calls after the move fill it.
    assert p1 + p2 == approved * USD
    assert (await admin.get_budget("w")).window(Window.DAY).spent_micros == approved * USD
    assert (await admin.get_budget("acme")).window(Window.MONTH).spent_micros == approved * USD
    store = replicas[0].store
    assert isinstance(store, RedisStore)
    outbox = await store.client.xrange(store.keys.outbox("acme"))
    chains = collections.Counter(fields["chain"] for _, fields in outbox)
    assert chains == +collections.Counter({"w,p1,acme": p1 // USD, "w,p2,acme": p2 // USD})
    assert {r.denied_by for r in results if not r.approved} <= {
        NodeWindow("p1", Window.MONTH),
        NodeWindow("p2", Window.MONTH),
    }
