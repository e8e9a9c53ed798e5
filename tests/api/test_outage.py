"""Redis down or stalled: calls fail closed with UNAVAILABLE within a bound, and recover by themselves.

Each test runs a redis-server process of its own (``helpers.RedisServer``), so it can kill, pause and restart
it. The time bound is
generous on purpose (the store's deadline is 0.25 s; a call must end well under 1.5 s): it checks that calls
never hang, not how fast they are.
"""

from __future__ import annotations

import asyncio
import pathlib
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from helpers import RedisServer, RedisServerError, eventually
from spendgate._gen.spendgate.v1 import spend_pb2, spend_pb2_grpc
from spendgate.app import SpendgateServer, running_server
from spendgate.client import AdminClient
from spendgate.clock import ManualClock
from spendgate.settings import Settings

from .support import CALL_TIMEOUT_S, FLEET, HOLD_TTL_S, USD, WALLET, authorize_request, missing, rpc_error

pytestmark = pytest.mark.redis

OUTAGE_CALL_BOUND_S = 1.5
REDIS_TIMEOUT_S = 0.25


@pytest.fixture
async def redis_process(tmp_path: pathlib.Path) -> AsyncIterator[RedisServer]:
    """A redis-server of this test's own, which the test may kill, pause and restart."""
    server = RedisServer(directory=tmp_path)
    try:
        await asyncio.to_thread(server.start)
    except RedisServerError as error:
        missing(str(error))
    try:
        yield server
    finally:
        if server.process is not None and server.process.poll() is None:
            # A paused process would ignore the SIGTERM of stop().
            server.process.send_signal(signal.SIGCONT)
        await asyncio.to_thread(server.stop)


def pause(redis_process: RedisServer, signum: signal.Signals) -> None:
    assert redis_process.process is not None
    redis_process.process.send_signal(signum)


def settings_for(redis_process: RedisServer, prefix: str) -> Settings:
    return Settings(
        port=0,
        plan=str(FLEET),
        key_prefix=prefix,
        hold_ttl_s=HOLD_TTL_S,
        redis_url=redis_process.url,
        redis_timeout_s=REDIS_TIMEOUT_S,
    )


async def health(channel: grpc.aio.Channel) -> Any:
    response = await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service="spendgate.v1.SpendService"), timeout=CALL_TIMEOUT_S
    )
    return response.status


async def fails_fast_with_unavailable(name: str, call: Callable[[], Awaitable[Any]]) -> None:
    """The call must fail (never approve) with UNAVAILABLE, and end within the bound."""
    started = time.monotonic()
    error = await rpc_error(call())
    elapsed_s = time.monotonic() - started
    assert error.code() == grpc.StatusCode.UNAVAILABLE, f"{name}: {error.code()} {error.details()}"
    assert "redis is unavailable" in (error.details() or ""), f"{name}: {error.details()}"
    assert elapsed_s < OUTAGE_CALL_BOUND_S, f"{name} took {elapsed_s:.2f} s"


async def approved(stub: Any, key: str, **fields: Any) -> spend_pb2.AuthorizeResponse:
    response: spend_pb2.AuthorizeResponse = await stub.Authorize(
        authorize_request(idempotency_key=key, **fields), timeout=CALL_TIMEOUT_S
    )
    assert response.decision == spend_pb2.DECISION_APPROVED, response
    return response


def apply_fleet(server: SpendgateServer) -> None:
    """What an operator does after Redis lost everything: apply the plan again, over the admin API."""
    with AdminClient(server.address) as admin:
        updates = list(admin.apply_plan(FLEET.read_text()))
    assert updates[-1].done
    assert updates[-1].applied


async def test_redis_killed_fails_closed_fast_and_recovers_by_itself_after_a_restart(
    redis_process: RedisServer, clock: ManualClock, key_prefix: str
) -> None:
    settings = settings_for(redis_process, key_prefix)
    async with (
        running_server(settings, clock=clock) as server,
        grpc.aio.insecure_channel(server.address) as channel,
    ):
        stub = spend_pb2_grpc.SpendServiceStub(channel)
        held = await approved(stub, "before")
        assert await health(channel) == health_pb2.HealthCheckResponse.SERVING

        await asyncio.to_thread(redis_process.kill)

        calls: list[tuple[str, Callable[[], Awaitable[Any]]]] = [
            ("Authorize", lambda: stub.Authorize(authorize_request(idempotency_key="down-1"), timeout=CALL_TIMEOUT_S)),
            (
                "Authorize (one-shot)",
                lambda: stub.Authorize(
                    authorize_request(idempotency_key="down-2", capture=True), timeout=CALL_TIMEOUT_S
                ),
            ),
            (
                "Authorize (a wallet not resolved before)",
                lambda: stub.Authorize(
                    authorize_request("sales-agent-02", idempotency_key="down-3"), timeout=CALL_TIMEOUT_S
                ),
            ),
            (
                "Capture",
                lambda: stub.Capture(
                    spend_pb2.CaptureRequest(
                        authorization_id=held.authorization_id, amount_micros=1, idempotency_key="c"
                    ),
                    timeout=CALL_TIMEOUT_S,
                ),
            ),
            (
                "Void",
                lambda: stub.Void(
                    spend_pb2.VoidRequest(authorization_id=held.authorization_id), timeout=CALL_TIMEOUT_S
                ),
            ),
            (
                "GetBudget",
                lambda: stub.GetBudget(spend_pb2.GetBudgetRequest(node_id=WALLET), timeout=CALL_TIMEOUT_S),
            ),
        ]
        for name, call in calls:
            await fails_fast_with_unavailable(name, call)
        # A burst of calls at once fails the same way; none is approved.
        await asyncio.gather(
            *(
                fails_fast_with_unavailable(
                    f"Authorize #{i}",
                    lambda i=i: stub.Authorize(  # type: ignore[misc]
                        authorize_request(idempotency_key=f"burst-{i}"), timeout=CALL_TIMEOUT_S
                    ),
                )
                for i in range(20)
            )
        )

        async def not_serving() -> bool:
            return bool(await health(channel) == health_pb2.HealthCheckResponse.NOT_SERVING)

        await eventually(not_serving, what="the health check to report NOT_SERVING")

        # Redis comes back empty on the same port (it keeps nothing on disk); the plan is applied again.
        await asyncio.to_thread(redis_process.start)
        await asyncio.to_thread(apply_fleet, server)

        # The same server, without a restart, serves again.
        after = await approved(stub, "after")
        assert after.remaining.remaining_micros == 50 * USD - USD // 4
        budget = await stub.GetBudget(spend_pb2.GetBudgetRequest(node_id=WALLET), timeout=CALL_TIMEOUT_S)
        assert budget.windows[0].held_micros == USD // 4

        async def serving() -> bool:
            return bool(await health(channel) == health_pb2.HealthCheckResponse.SERVING)

        await eventually(serving, what="the health check to report SERVING again")


async def test_a_stalled_redis_times_out_and_the_retry_with_the_same_key_charges_once(
    redis_process: RedisServer, clock: ManualClock, key_prefix: str
) -> None:
    settings = settings_for(redis_process, key_prefix)
    async with (
        running_server(settings, clock=clock) as server,
        grpc.aio.insecure_channel(server.address) as channel,
    ):
        stub = spend_pb2_grpc.SpendServiceStub(channel)
        await approved(stub, "warm-up", amount_micros=USD // 10)

        # A paused Redis accepts connections and bytes but never answers: only the deadline ends the call.
        pause(redis_process, signal.SIGSTOP)
        try:
            await fails_fast_with_unavailable(
                "Authorize",
                lambda: stub.Authorize(authorize_request(idempotency_key="stalled"), timeout=CALL_TIMEOUT_S),
            )
            await fails_fast_with_unavailable(
                "GetBudget", lambda: stub.GetBudget(spend_pb2.GetBudgetRequest(node_id=WALLET), timeout=CALL_TIMEOUT_S)
            )
        finally:
            pause(redis_process, signal.SIGCONT)

        # The stalled request may or may not have reached Redis; retried with its key, it is decided once.
        async def retried() -> spend_pb2.AuthorizeResponse | None:
            try:
                return await approved(stub, "stalled")
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                return None

        response = await eventually(retried, what="Authorize to succeed after Redis resumed")
        assert await approved(stub, "stalled") == response
        budget = await stub.GetBudget(spend_pb2.GetBudgetRequest(node_id=WALLET), timeout=CALL_TIMEOUT_S)
        assert budget.windows[0].held_micros == USD // 10 + USD // 4
