"""Fixtures of the security tests: spendgate servers with auth on, in process, on fakeredis or a real Redis.

The real Redis is the root conftest's ``redis_url`` (a redis-server process of the session's own, or
SPENDGATE_TEST_REDIS_URL; missing, it fails the run with CI=true and is skipped loudly elsewhere). Every
server uses a key prefix of its own, and only the keys under this test's prefixes are deleted. Tests that
pause or kill Redis start a redis-server process of their own (``own_redis``).
"""

from __future__ import annotations

import asyncio
import contextlib
import pathlib
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import fakeredis
import grpc
import pytest
import redis.asyncio as aioredis

from helpers import (
    START_MS,
    RedisServer,
    RedisServerError,
    delete_prefix,
    eventually,
    new_prefix,
    suppress_connection_errors,
)
from spendgate._gen.spendgate.v1 import admin_pb2
from spendgate.app import running_server
from spendgate.client import Tls
from spendgate.clock import ManualClock
from spendgate.settings import Settings

from .support import FLEET, OTHER_PLAN_YAML, TOKENS, Issued, Secured, make_pki, missing

StartSecured = Callable[..., Awaitable[Secured]]


@pytest.fixture
async def start_secured(request: pytest.FixtureRequest, tmp_path: pathlib.Path) -> AsyncIterator[StartSecured]:
    """Start servers with auth on: ``await start_secured(backend, prefix=..., fake_server=..., **settings)``.

    A server serves the example fleet (account ``acme``); unless ``setup=False`` it also gets the account
    ``globex`` and the tokens of :data:`~.support.TOKENS`, made over the API with the root token. Servers
    that share a ``prefix`` (and, on fakeredis, a ``fake_server``) are replicas of one deployment. With
    ``tls`` the fixture's own channel speaks TLS with those files (for a server with TLS settings).
    """
    stack = contextlib.AsyncExitStack()
    cleanup: set[tuple[str, str]] = set()
    count = 0

    async def start(
        backend: str = "fakeredis",
        *,
        prefix: str | None = None,
        fake_server: fakeredis.FakeServer | None = None,
        setup: bool = True,
        clock: ManualClock | None = None,
        tls: Tls | None = None,
        **overrides: Any,
    ) -> Secured:
        nonlocal count
        count += 1
        key_prefix = prefix or new_prefix()
        data_dir = tmp_path / f"data-{count}"
        client: aioredis.Redis | None = None
        if backend == "redis":
            # A test with a redis-server of its own (own_redis) passes its URL; the others share the session's.
            redis_url = overrides.get("redis_url") or str(request.getfixturevalue("redis_url"))
            overrides["redis_url"] = redis_url
            cleanup.add((redis_url, key_prefix))
            # These tests check behaviour, not latency: a generous deadline keeps a busy machine from failing
            # a call (the stall tests set their own).
            overrides.setdefault("redis_timeout_s", 5.0)
        else:
            client = fakeredis.FakeAsyncRedis(decode_responses=True, server=fake_server)
        settings = Settings(
            port=0, plan=str(FLEET), key_prefix=key_prefix, auth=True, data_dir=str(data_dir), **overrides
        )
        server = await stack.enter_async_context(
            running_server(settings, clock=clock or ManualClock(START_MS), client=client)
        )
        channel = await stack.enter_async_context(
            grpc.aio.secure_channel(server.address, tls.credentials())
            if tls
            else grpc.aio.insecure_channel(server.address)
        )
        secured = Secured(server, channel, key_prefix, {}, data_dir)
        if setup:
            await secured.ok("ApplyPlan", admin_pb2.ApplyPlanRequest(plan_yaml=OTHER_PLAN_YAML))
            for name, (role, scope) in TOKENS.items():
                response = await secured.ok(
                    "CreateToken", admin_pb2.CreateTokenRequest(role=role, scope_node_id=scope, name=name)
                )
                secured.tokens[name] = Issued(response.secret, response.token.token_id)
        if settings.ledger and settings.ledger_writers:
            await ledger_streams_made(secured)
        return secured

    try:
        yield start
    finally:
        await stack.aclose()
        for url, key_prefix in cleanup:
            async with aioredis.Redis.from_url(url, decode_responses=True) as cleaner:
                with suppress_connection_errors():
                    await delete_prefix(cleaner, key_prefix)


async def ledger_streams_made(secured: Secured) -> None:
    """Wait until the ledger writer has made every account's outbox stream (its consumer group's).

    The writer makes them in the background when it first sees an account; a snapshot taken before that
    would see a key appear on its own.
    """
    store = secured.server.store

    async def made() -> bool:
        accounts = await store.account_ids()
        return all([await store.client.exists(store.keys.outbox(account)) for account in accounts])

    await eventually(made, what="the ledger writer to make every outbox stream")


@pytest.fixture
async def secured(start_secured: StartSecured, backend_kind: str) -> Secured:
    """A secured server on each backend in turn (``backend_kind`` is the root conftest's)."""
    return await start_secured(backend_kind)


@pytest.fixture
async def own_redis(tmp_path: pathlib.Path) -> AsyncIterator[RedisServer]:
    """A redis-server of this test's own, which the test may pause (SIGSTOP) and resume."""
    server = RedisServer(directory=tmp_path / "own-redis")
    server.directory.mkdir()
    try:
        await asyncio.to_thread(server.start)
    except RedisServerError as error:
        missing(f"Redis is missing: {error}")
    try:
        yield server
    finally:
        if server.process is not None and server.process.poll() is None:
            # A paused process would ignore the SIGTERM of stop().
            server.process.send_signal(signal.SIGCONT)
        await asyncio.to_thread(server.stop)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A CA, server and client certificates, made once per session with the openssl command line."""
    return make_pki(tmp_path_factory.mktemp("pki"))
