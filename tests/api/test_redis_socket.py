"""A Redis on the server's own machine, reached over a Unix socket: decisions go through the pipe, and an outage
still fails closed, fast.

The README advises the socket for such a deployment (Performance): these tests hold that it works end to end.
"""

from __future__ import annotations

import asyncio
import pathlib
import tempfile
from collections.abc import AsyncIterator

import grpc
import pytest

from helpers import RedisServer, RedisServerError
from spendgate._gen.spendgate.v1 import spend_pb2, spend_pb2_grpc
from spendgate.app import running_server
from spendgate.clock import ManualClock
from spendgate.settings import Settings

from .support import CALL_TIMEOUT_S, FLEET, USD, WALLET, authorize_request, missing, rpc_error

pytestmark = pytest.mark.redis

OUTAGE_CALL_BOUND_S = 1.5


@pytest.fixture
async def socket_redis() -> AsyncIterator[RedisServer]:
    """A redis-server of this test's own, on a Unix socket (in a short temporary directory: sockets' paths are
    short) as well as a TCP port."""
    server = RedisServer(unix_socket=True)
    try:
        await asyncio.to_thread(server.start)
    except RedisServerError as error:
        server.cleanup()
        missing(str(error))
    try:
        yield server
    finally:
        await asyncio.to_thread(server.cleanup)


def test_a_long_directory_is_refused_before_redis_starts() -> None:
    with tempfile.TemporaryDirectory() as directory, pytest.raises(ValueError, match="too long for a Unix socket"):
        RedisServer(directory=pathlib.Path(directory) / ("d" * 120), unix_socket=True)


async def test_decisions_go_through_the_pipe_over_the_socket_and_an_outage_fails_closed(
    socket_redis: RedisServer, clock: ManualClock, key_prefix: str
) -> None:
    settings = Settings(
        port=0, plan=str(FLEET), key_prefix=key_prefix, redis_url=socket_redis.socket_url, redis_timeout_s=0.25
    )
    async with (
        running_server(settings, clock=clock) as server,
        grpc.aio.insecure_channel(server.address) as channel,
    ):
        stub = spend_pb2_grpc.SpendServiceStub(channel)
        stats = server.store.pipe_stats
        assert stats is not None, "a unix:// URL is served by the pipe, not by redis-py"
        before = stats.commands
        response = await stub.Authorize(authorize_request(idempotency_key="over-the-socket"), timeout=CALL_TIMEOUT_S)
        assert response.decision == spend_pb2.DECISION_APPROVED, response
        assert stats.commands > before, "the decision's script went through the pipe"
        budget = await stub.GetBudget(spend_pb2.GetBudgetRequest(node_id=WALLET), timeout=CALL_TIMEOUT_S)
        day = next(window for window in budget.windows if window.window == spend_pb2.WINDOW_DAY)
        assert day.held_micros == USD // 4

        await asyncio.to_thread(socket_redis.kill)
        started = asyncio.get_running_loop().time()
        error = await rpc_error(
            stub.Authorize(authorize_request(idempotency_key="socket-gone"), timeout=CALL_TIMEOUT_S)
        )
        assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()
        assert asyncio.get_running_loop().time() - started < OUTAGE_CALL_BOUND_S
