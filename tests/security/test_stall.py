"""A Redis that stalls in the middle of a load, with auth on: every call ends within its deadline with OK or
UNAVAILABLE, nothing is approved while Redis is stalled, every approval is counted (and nothing else is), and
the server recovers by itself when Redis resumes.

tests/api/test_outage.py covers a dead Redis and single calls against a paused one with auth off; this
drives a mixed load (authorize, capture, void, an AuthorizeStream, and token-checked reads) through the stall
and settles every request afterwards by retrying it with its idempotency key, as a client would.
"""

from __future__ import annotations

import asyncio
import dataclasses
import signal
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from helpers import RedisServer, eventually
from spendgate._gen.spendgate.v1 import admin_pb2, spend_pb2

from .conftest import StartSecured
from .support import RPCS, Secured, authorize, call, own_connection

pytestmark = pytest.mark.redis

REDIS_TIMEOUT_S = 0.25
# A failed call must end well within this (the store's deadline is 0.25 s): it checks that calls never hang,
# not how fast they are.
CALL_BOUND_S = 1.5
CLIENT_DEADLINE_S = 5.0
STALL_S = 1.5
AMOUNT = 1_000
WALLETS = {"agent_a": "research-agent-01", "agent_a2": "sales-agent-01"}
ACCEPTED = (grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE)


@dataclasses.dataclass
class Done:
    """One call of the load: what it was, how it ended, when."""

    who: str
    rpc: str
    request: Any
    code: grpc.StatusCode
    details: str
    response: Any
    started: float
    ended: float


class Load:
    """Workers that call the server until told to stop, recording every call."""

    def __init__(self, s: Secured, channel: grpc.aio.Channel) -> None:
        self.s = s
        self.channel = channel
        self.done: list[Done] = []
        self.stop = asyncio.Event()

    async def one(self, who: str, rpc: str, request: Any) -> Done:
        started = time.monotonic()
        outcome = await call(self.channel, rpc, request, self.s.metadata(who), timeout_s=CLIENT_DEADLINE_S)
        response = outcome.responses[-1] if outcome.responses else None
        record = Done(who, rpc, request, outcome.code, outcome.details, response, started, time.monotonic())
        self.done.append(record)
        return record

    async def spender(self, who: str, index: int) -> None:
        """Authorize, then capture half or void, again and again."""
        wallet = WALLETS[who]
        n = 0
        while not self.stop.is_set():
            n += 1
            key = f"{who}-{index}-{n}"
            held = await self.one(who, "Authorize", authorize(wallet, key, AMOUNT))
            if held.code != grpc.StatusCode.OK or held.response.decision != spend_pb2.DECISION_APPROVED:
                await asyncio.sleep(0.01)
                continue
            hold = held.response.authorization_id
            if n % 2:
                request: Any = spend_pb2.CaptureRequest(
                    authorization_id=hold, amount_micros=AMOUNT // 2, idempotency_key=f"c-{key}"
                )
                await self.one(who, "Capture", request)
            else:
                await self.one(who, "Void", spend_pb2.VoidRequest(authorization_id=hold))

    async def one_shots(self, who: str) -> None:
        """One-shot authorizations (captured at once) through a single long AuthorizeStream."""
        wallet = WALLETS[who]
        sent: dict[str, tuple[spend_pb2.AuthorizeRequest, float]] = {}
        queue: asyncio.Queue[spend_pb2.AuthorizeStreamRequest | None] = asyncio.Queue()

        async def items() -> AsyncIterator[spend_pb2.AuthorizeStreamRequest]:
            while (item := await queue.get()) is not None:
                yield item

        method = self.channel.stream_stream(
            RPCS["AuthorizeStream"].path,
            request_serializer=spend_pb2.AuthorizeStreamRequest.SerializeToString,
            response_deserializer=spend_pb2.AuthorizeStreamResponse.FromString,
        )
        stream = method(items(), metadata=self.s.metadata(who), timeout=60)

        async def feed() -> None:
            n = 0
            while not self.stop.is_set():
                n += 1
                request = authorize(wallet, f"stream-{n}", AMOUNT, capture=True)
                sent[f"r{n}"] = (request, time.monotonic())
                await queue.put(spend_pb2.AuthorizeStreamRequest(request_id=f"r{n}", request=request))
                await asyncio.sleep(0.02)
            await queue.put(None)

        feeder = asyncio.create_task(feed())
        async for answer in stream:
            request, started = sent[answer.request_id]
            code = next(c for c in grpc.StatusCode if c.value[0] == answer.error_code)
            response = answer.response if answer.error_code == 0 else None
            self.done.append(
                Done(who, "AuthorizeStream", request, code, answer.error_message, response, started, time.monotonic())
            )
        await feeder

    async def reader(self) -> None:
        """Token-checked reads of both planes."""
        reads = [
            ("agent_a", "GetBudget", spend_pb2.GetBudgetRequest(node_id="research-agent-01")),
            ("reader_a", "GetTree", admin_pb2.GetTreeRequest(node_id="acme")),
            ("admin_a", "ListTokens", admin_pb2.ListTokensRequest()),
        ]
        n = 0
        while not self.stop.is_set():
            who, rpc, request = reads[n % len(reads)]
            n += 1
            await self.one(who, rpc, request)
            await asyncio.sleep(0.02)


async def settle(s: Secured, done: list[Done]) -> dict[str, Any]:
    """Retry every request that ended UNAVAILABLE with its key until it has an answer; return the final
    answer of every authorization (by wallet and key), capture and void."""
    final: dict[tuple[str, str], Any] = {}
    for record in done:
        if record.rpc in ("GetBudget", "GetTree", "ListTokens"):
            continue
        rpc = "Authorize" if record.rpc == "AuthorizeStream" else record.rpc
        request = record.request
        key = (rpc, request.SerializeToString(deterministic=True).hex())
        if record.code == grpc.StatusCode.OK:
            final[key] = (request, record.response)
            continue
        retried = await s.call(rpc, request, record.who)
        assert retried.code == grpc.StatusCode.OK, f"the retry of {rpc} after recovery: {retried}"
        final[key] = (request, retried.responses[-1])
    return final


def expected_usage(final: dict[tuple[str, str], Any]) -> dict[str, tuple[int, int]]:
    """Per wallet: (held, spent) that the settled answers imply."""
    holds: dict[str, tuple[str, int]] = {}
    spent = {wallet: 0 for wallet in WALLETS.values()}
    for (rpc, _), (request, response) in final.items():
        if rpc == "Authorize" and response.decision == spend_pb2.DECISION_APPROVED:
            if request.capture:
                spent[request.wallet_id] += request.amount_micros
            else:
                holds[response.authorization_id] = (request.wallet_id, request.amount_micros)
    for (rpc, _), (request, response) in final.items():
        if rpc in ("Capture", "Void"):
            wallet, amount = holds.pop(request.authorization_id)
            if rpc == "Capture":
                spent[wallet] += response.captured_micros
    held = {wallet: 0 for wallet in WALLETS.values()}
    for wallet, amount in holds.values():
        held[wallet] += amount
    return {wallet: (held[wallet], spent[wallet]) for wallet in WALLETS.values()}


def pause(redis: RedisServer, signum: signal.Signals) -> None:
    assert redis.process is not None
    redis.process.send_signal(signum)


async def test_a_redis_stalled_mid_load_fails_closed_counts_every_approval_and_recovers(
    own_redis: RedisServer, start_secured: StartSecured
) -> None:
    s = await start_secured("redis", redis_url=own_redis.url, redis_timeout_s=REDIS_TIMEOUT_S)
    async with own_connection(s.address) as channel:
        load = Load(s, channel)
        workers = [
            *(asyncio.create_task(load.spender(who, i)) for who in WALLETS for i in range(3)),
            asyncio.create_task(load.one_shots("agent_a2")),
            asyncio.create_task(load.reader()),
        ]
        try:
            await asyncio.sleep(0.7)
            stalled_at = time.monotonic()
            pause(own_redis, signal.SIGSTOP)
            try:
                await asyncio.sleep(STALL_S)
            finally:
                resumed_at = time.monotonic()
                pause(own_redis, signal.SIGCONT)

            # The server recovers by itself: new calls of every kind succeed again, with no intervention.
            async def recovered() -> bool:
                after = [d for d in load.done if d.started > resumed_at]
                return {d.rpc for d in after if d.code == grpc.StatusCode.OK} >= {
                    "Authorize",
                    "Capture",
                    "Void",
                    "AuthorizeStream",
                    "GetBudget",
                    "GetTree",
                    "ListTokens",
                }

            await eventually(recovered, timeout_s=10, what="every kind of call to succeed after Redis resumed")
        finally:
            load.stop.set()
            await asyncio.wait_for(asyncio.gather(*workers), timeout=30)

    done = load.done
    assert len(done) > 100, f"the load made only {len(done)} calls"
    wrong = [f"{d.who} {d.rpc}: {d.code.name} {d.details}" for d in done if d.code not in ACCEPTED]
    assert not wrong, "calls ended other than OK or UNAVAILABLE:\n" + "\n".join(wrong[:20])
    slow = [
        f"{d.rpc} took {d.ended - d.started:.2f} s"
        for d in done
        if d.code != grpc.StatusCode.OK and d.ended - d.started > CALL_BOUND_S
    ]
    assert not slow, "failed calls must end within the bound:\n" + "\n".join(slow[:20])
    # Calls made while Redis was stalled all failed closed; none was approved or answered.
    during = [d for d in done if d.started > stalled_at + 0.05 and d.ended < resumed_at]
    assert len(during) >= 10, f"only {len(during)} calls fell inside the stall"
    approved_during = [f"{d.rpc} {d.code.name}" for d in during if d.code == grpc.StatusCode.OK]
    assert not approved_during, f"answered while Redis was stalled: {approved_during}"
    assert {d.rpc for d in during} >= {"Authorize", "AuthorizeStream", "GetBudget", "GetTree", "ListTokens"}
    assert all("redis is unavailable" in d.details for d in during), {d.details for d in during}

    # Every request is settled by a retry with its key; the counters then say exactly what was approved.
    final = await settle(s, done)
    for wallet, (held, spent) in expected_usage(final).items():
        budget = await s.ok("GetBudget", spend_pb2.GetBudgetRequest(node_id=wallet))
        day = budget.windows[0]
        assert (day.held_micros, day.spent_micros) == (held, spent), f"{wallet}: counters disagree with answers"
    account = await s.ok("GetBudget", spend_pb2.GetBudgetRequest(node_id="acme"))
    usage = expected_usage(final).values()
    month = next(w for w in account.windows if w.window == spend_pb2.WINDOW_MONTH)
    assert (month.held_micros, month.spent_micros) == (sum(h for h, _ in usage), sum(p for _, p in usage))
