"""Fixtures shared by every test: a real Redis of our own, the two store backends, a manual clock, the core.

Real Redis: a ``redis-server`` process started for the session (no persistence, in a temporary directory,
on a free port) and stopped at its end; or, when ``SPENDGATE_TEST_REDIS_URL`` is set, that server. Without
either, the tests marked ``redis`` FAIL when ``CI=true`` and are skipped elsewhere, with the reason in each
skip and a warning at the end of the run.

Nothing here deletes data it did not create: every test gets key prefixes of its own
(``spendgate.store.keys.Keys(prefix=...)``) and at teardown deletes only the keys under them.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import fakeredis
import pytest
import redis
import redis.asyncio as aioredis

from helpers import (
    START_MS,
    RedisServerError,
    delete_prefix,
    in_ci,
    new_prefix,
    plan_from,
    start_redis_server,
    suppress_connection_errors,
)
from spendgate.clock import ManualClock
from spendgate.core import SpendCore
from spendgate.domain import AccountPlan
from spendgate.store.keys import Keys
from spendgate.store.pipe import RedisPipe
from spendgate.store.redis_store import RedisStore

# The stores under test get a generous deadline: these tests check decisions, not latency, and fakeredis runs
# a pipelined batch of up to 256 scripts synchronously, which can exceed the production 0.25 s on a busy
# two-core machine (a spurious UnavailableError would make a logic test flaky).
STORE_TIMEOUT_S = 10.0

# Why the real Redis is missing, when it is (reported once more at the end of the run).
_REDIS_MISSING: list[str] = []


def _redis_missing(reason: str) -> None:
    message = (
        f"Redis is missing: {reason}. Install it (apt-get install redis-server, or brew install redis) or set "
        "SPENDGATE_TEST_REDIS_URL=redis://host:port/db to run the tests marked 'redis'"
    )
    if in_ci():
        pytest.fail(f"{message} (CI=true: a missing Redis fails the run)", pytrace=False)
    _REDIS_MISSING.append(message)
    pytest.skip(message)


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    """Say loudly, at the end of the run, that the real-Redis tests did not run."""
    if not _REDIS_MISSING:
        return
    skipped = sum(
        1 for report in terminalreporter.stats.get("skipped", []) if "Redis is missing" in str(report.longrepr)
    )
    terminalreporter.write_sep("!", f"WARNING: {skipped} tests against a real Redis were SKIPPED", red=True, bold=True)
    terminalreporter.write_line(_REDIS_MISSING[0], red=True, bold=True)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The URL of a real Redis the tests may write to (under their own key prefixes)."""
    external = os.environ.get("SPENDGATE_TEST_REDIS_URL")
    # The skip or failure is raised outside the except blocks, so its report is one message, not a chain.
    problem = ""
    if external:
        try:
            with redis.Redis.from_url(external, socket_connect_timeout=5, socket_timeout=5) as probe:
                probe.ping()
        except (redis.exceptions.RedisError, OSError) as error:
            problem = f"SPENDGATE_TEST_REDIS_URL={external} does not answer ({error})"
        if problem:
            _redis_missing(problem)
        yield external
        return
    try:
        server = start_redis_server(directory=tmp_path_factory.mktemp("redis"))
    except RedisServerError as error:
        problem = f"{error}, and SPENDGATE_TEST_REDIS_URL is not set"
    if problem:
        _redis_missing(problem)
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(params=["fakeredis", pytest.param("redis", marks=pytest.mark.redis)])
def backend_kind(request: pytest.FixtureRequest) -> str:
    """Which backend a test runs on: the in-process fakeredis, or the real Redis."""
    return str(request.param)


async def open_client(kind: str, request: pytest.FixtureRequest) -> aioredis.Redis:
    """A client of one backend; a fakeredis client has a server of its own."""
    if kind == "fakeredis":
        return fakeredis.FakeAsyncRedis(decode_responses=True)
    url = request.getfixturevalue("redis_url")
    return aioredis.Redis.from_url(url, decode_responses=True, socket_timeout=STORE_TIMEOUT_S)


@pytest.fixture
async def backend(backend_kind: str, request: pytest.FixtureRequest) -> AsyncIterator[aioredis.Redis]:
    """A ``redis.asyncio`` client (decode_responses=True) of each backend in turn: fakeredis, then Redis."""
    client = await open_client(backend_kind, request)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def make_store(
    backend: aioredis.Redis, backend_kind: str, request: pytest.FixtureRequest
) -> AsyncIterator[Callable[..., RedisStore]]:
    """Make RedisStores over the backend, each under a new key prefix; their keys are deleted afterwards.

    Over the real Redis the scripts go through the pipe (store/pipe.py), as in a server; pass ``pipe=None``
    for redis-py's batcher.
    """
    prefixes: list[str] = []
    pipes: list[RedisPipe] = []

    def make(prefix: str | None = None, **options: Any) -> RedisStore:
        prefix = prefix or new_prefix()
        if prefix not in prefixes:
            prefixes.append(prefix)
        options.setdefault("timeout_s", STORE_TIMEOUT_S)
        if backend_kind == "redis" and "pipe" not in options:
            pipe = RedisPipe.from_url(request.getfixturevalue("redis_url"), timeout_s=options["timeout_s"])
            pipes.append(pipe)
            options["pipe"] = pipe
        return RedisStore(backend, keys=Keys(prefix), **options)

    try:
        yield make
    finally:
        for pipe in pipes:
            await pipe.close()
        # A test may have killed the server (outage tests); a restarted server holds none of our keys.
        with suppress_connection_errors():
            for prefix in prefixes:
                await delete_prefix(backend, prefix)


@pytest.fixture
def key_prefix() -> str:
    """This test's key prefix (the one ``store`` uses)."""
    return new_prefix()


@pytest.fixture
def store(make_store: Callable[..., RedisStore], key_prefix: str) -> RedisStore:
    """A RedisStore over the backend under this test's own prefix."""
    return make_store(key_prefix)


@pytest.fixture
def clock() -> ManualClock:
    """A clock stopped at Monday 2026-11-30 10:00:00 UTC; it moves only with ``advance`` / ``set``."""
    return ManualClock(START_MS)


@pytest.fixture
def core(store: RedisStore, clock: ManualClock) -> SpendCore:
    """The spend core over the store and the manual clock."""
    return SpendCore(store, clock)


PlanSource = dict[str, Any] | str | os.PathLike[str] | AccountPlan


@pytest.fixture
def apply_plan(core: SpendCore) -> Callable[[PlanSource], Awaitable[AccountPlan]]:
    """Apply a plan (a dict as YAML gives it, a plan file such as examples/fleet.yaml, or a plan) to ``core``."""

    async def apply(source: PlanSource) -> AccountPlan:
        plan = plan_from(source)
        await core.apply_plan(plan)
        return plan

    return apply
