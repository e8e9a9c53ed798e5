"""Fixtures of the API tests: a spendgate server in process, on the embedded fakeredis or on a real Redis.

They build on the root ``conftest.py``: ``backend_kind`` (fakeredis, then a real Redis), ``redis_url`` (a
redis-server of the session's own; with CI=true a missing Redis fails the run, elsewhere it is skipped
loudly), ``clock`` (a ManualClock) and ``key_prefix`` (this test's own prefix; only its keys are deleted).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import fakeredis
import grpc
import pytest
import redis.asyncio as aioredis

from helpers import delete_prefix, suppress_connection_errors
from spendgate._gen.spendgate.v1 import spend_pb2_grpc
from spendgate.app import running_server
from spendgate.clock import ManualClock
from spendgate.settings import Settings

from .support import FLEET, HOLD_TTL_S, Gate


@pytest.fixture
async def gate(
    backend_kind: str, clock: ManualClock, key_prefix: str, request: pytest.FixtureRequest
) -> AsyncIterator[Gate]:
    """A spendgate serving the example fleet on a free port, on the backend under test."""
    redis_url = str(request.getfixturevalue("redis_url")) if backend_kind == "redis" else ""
    settings = Settings(port=0, plan=str(FLEET), key_prefix=key_prefix, hold_ttl_s=HOLD_TTL_S, redis_url=redis_url)
    # The embedded store is the fakeredis the server would build for itself without a Redis URL, handed in so
    # that each test has a fresh one. On a real Redis the server builds its own production client.
    client: aioredis.Redis | None = fakeredis.FakeAsyncRedis(decode_responses=True) if not redis_url else None
    try:
        async with (
            running_server(settings, clock=clock, client=client) as server,
            grpc.aio.insecure_channel(server.address) as channel,
        ):
            yield Gate(server, channel, spend_pb2_grpc.SpendServiceStub(channel), key_prefix, clock)
    finally:
        if redis_url:
            async with aioredis.Redis.from_url(redis_url, decode_responses=True) as cleaner:
                with suppress_connection_errors():
                    await delete_prefix(cleaner, key_prefix)
