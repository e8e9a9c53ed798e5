"""Fixtures of the ledger end-to-end tests: our own redis-server, our own PostgreSQL databases, and servers.

Nothing here touches data it did not create. Redis is a ``redis-server`` process started for each test that
needs one (so a test may FLUSHALL it); PostgreSQL is the server at 127.0.0.1:5432 (or
SPENDGATE_TEST_DATABASE_URL, an admin connection), where each test gets a database of its own that is dropped
at its end (and, should a test crash, at the end of the session). With CI=true a missing Redis or PostgreSQL
fails the run; elsewhere the tests that need it are skipped, with the reason in each skip and a warning at
the end of the run.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import fakeredis
import grpc
import psycopg
import psycopg.conninfo
import pytest

from helpers import RedisServer, RedisServerError, in_ci, start_redis_server
from spendgate.app import SpendgateServer, create_server
from spendgate.client import AsyncClient
from spendgate.clock import Clock
from spendgate.settings import Settings

from .support import CALL_TIMEOUT_S, FLEET, pg_url

PG_ADMIN_URL = os.environ.get("SPENDGATE_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
# Every database this session creates starts with this, so the session's end can drop any a crash left.
DATABASE_STEM = f"sg_e2e_{uuid.uuid4().hex[:8]}_"

_MISSING: list[str] = []
SKIP_HINT = "start it to run the ledger end-to-end tests"


def missing(what: str) -> None:
    """Fail in CI, skip loudly elsewhere."""
    if in_ci():
        pytest.fail(f"{what} (CI=true: a missing service fails the run)", pytrace=False)
    _MISSING.append(what)
    pytest.skip(f"{what}; {SKIP_HINT}")


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    """Say loudly, at the end of the run, that ledger end-to-end tests did not run."""
    if not _MISSING:
        return
    skipped = sum(1 for report in terminalreporter.stats.get("skipped", []) if SKIP_HINT in str(report.longrepr))
    terminalreporter.write_sep("!", f"WARNING: {skipped} ledger end-to-end tests were SKIPPED", red=True, bold=True)
    for reason in sorted(set(_MISSING)):
        terminalreporter.write_line(reason, red=True, bold=True)


# ---------------------------------------------------------------------------------------------------------
# PostgreSQL.


@pytest.fixture(scope="session")
def pg_admin_url() -> Iterator[str]:
    """An admin connection URL of a reachable PostgreSQL; drops this session's leftover databases at the end."""
    try:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5) as probe:
            probe.execute("SELECT 1")
    except psycopg.OperationalError as error:
        missing(f"PostgreSQL is not reachable at {PG_ADMIN_URL} ({str(error).strip()[:200]})")
    yield PG_ADMIN_URL
    with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5) as admin:
        rows = admin.execute("SELECT datname FROM pg_database WHERE datname LIKE %s", (DATABASE_STEM + "%",))
        for (name,) in rows.fetchall():
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class Databases:
    """Creates PostgreSQL databases of this test's own and drops them at its end."""

    def __init__(self, admin_url: str) -> None:
        self.admin_url = admin_url
        self.names: list[str] = []

    def create(self) -> str:
        """A new, empty database; return its URL."""
        name = f"{DATABASE_STEM}{uuid.uuid4().hex[:10]}"
        with psycopg.connect(self.admin_url, autocommit=True, connect_timeout=5) as admin:
            admin.execute(f'CREATE DATABASE "{name}"')
        self.names.append(name)
        return pg_url(self.admin_url, dbname=name)

    def set_available(self, database_url: str, available: bool) -> None:
        """Take one of our databases down (refuse connections, end every session in it) or bring it back."""
        name = psycopg.conninfo.conninfo_to_dict(database_url)["dbname"]
        assert name in self.names, "only our own databases may be taken down"
        with psycopg.connect(self.admin_url, autocommit=True, connect_timeout=5) as admin:
            admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS {"true" if available else "false"}')
            if not available:
                admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> "
                    "pg_backend_pid()",
                    (name,),
                )

    def drop_all(self) -> None:
        with psycopg.connect(self.admin_url, autocommit=True, connect_timeout=5) as admin:
            for name in self.names:
                admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def databases(pg_admin_url: str) -> Iterator[Databases]:
    """Make databases of this test's own (dropped at its end)."""
    made = Databases(pg_admin_url)
    try:
        yield made
    finally:
        made.drop_all()


@pytest.fixture
def database_url(databases: Databases) -> str:
    """A PostgreSQL database of this test's own."""
    return databases.create()


# ---------------------------------------------------------------------------------------------------------
# Redis.


@pytest.fixture
def redis_server(tmp_path: pathlib.Path) -> Iterator[RedisServer]:
    """A redis-server process of this test's own (no persistence): it may be flushed."""
    directory = tmp_path / "redis"
    directory.mkdir()
    try:
        server = start_redis_server(directory=directory)
    except RedisServerError as error:
        missing(f"Redis is missing: {error}")
    try:
        yield server
    finally:
        server.cleanup()


# ---------------------------------------------------------------------------------------------------------
# Servers in this process.


class Gate:
    """A spendgate server running in the test's event loop, with a channel and a spend client to it."""

    def __init__(self, server: SpendgateServer, channel: grpc.aio.Channel, client: AsyncClient) -> None:
        self.server = server
        self.channel = channel
        self.client = client
        self.stopped = False

    async def stop(self) -> None:
        """Stop gracefully (in-flight calls finish, the writers drain what was settled); idempotent."""
        if self.stopped:
            return
        self.stopped = True
        with contextlib.suppress(Exception):
            await self.client.close()
            await self.channel.close()
        await self.server.stop(grace_s=1.0)

    @property
    def address(self) -> str:
        """The address clients dial."""
        return self.server.address


StartGate = Callable[..., Any]


@pytest.fixture
async def start_gate(tmp_path: pathlib.Path) -> AsyncIterator[StartGate]:
    """Start in-process servers with the example fleet: ``await start_gate(clock=..., **settings)``.

    Without ``redis_url`` the server is embedded (a fakeredis of its own and, without ``database_url``, a SQLite
    ledger under the test's directory). Every server is stopped gracefully at the end of the test (which drains
    its writers).
    """
    gates: list[Gate] = []

    async def start(*, clock: Clock | None = None, plan: str | None = str(FLEET), **overrides: Any) -> Gate:
        options: dict[str, Any] = {
            "port": 0,
            "ledger": True,
            "data_dir": str(tmp_path / "data"),
            # Decisions are checked here, not latency: a generous deadline keeps a busy two-core machine
            # (which runs the server, its clients, Redis and PostgreSQL at once) from failing a call.
            "redis_timeout_s": 5.0,
            "ledger_linger_ms": 5,
            "shutdown_grace_s": 10.0,
        } | overrides
        if plan:
            options["plan"] = plan
        settings = Settings(**options)
        client = fakeredis.FakeAsyncRedis(decode_responses=True) if settings.embedded else None
        server = await create_server(settings, clock=clock, client=client)
        await server.start()
        channel = grpc.aio.insecure_channel(server.address)
        gate = Gate(server, channel, AsyncClient(server.address, timeout_s=CALL_TIMEOUT_S))
        gates.append(gate)
        return gate

    try:
        yield start
    finally:
        for gate in reversed(gates):
            await gate.stop()
