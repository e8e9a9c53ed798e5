"""Fixtures of the ledger tests: a real Redis server process, a PostgreSQL database of their own, both ledger
backends, and a fleet that produces settled transactions through the real path (core, store, Lua scripts).

Nothing here touches data it did not create: Redis is a redis-server process started for the session (or
SPENDGATE_TEST_REDIS_URL with a key prefix per test), and PostgreSQL is a database created for the session
and dropped at its end, with a schema per test. With CI=true a missing server fails the run; elsewhere the
tests that need it are skipped with the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import os
import pathlib
import random
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import psycopg
import pytest
import redis
import redis.asyncio as aioredis

from spendgate.clock import ManualClock
from spendgate.core import SpendCore
from spendgate.domain import AuthorizeCommand, NodeKind
from spendgate.ledger.postgres import PostgresLedger
from spendgate.ledger.sink import LedgerSink
from spendgate.ledger.sqlite import SqliteLedger
from spendgate.plan import parse_plan
from spendgate.store.keys import Keys
from spendgate.store.redis_store import RedisStore

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
PG_ADMIN_URL = os.environ.get("SPENDGATE_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
# 2026-11-28 22:00 UTC: close to a day boundary, so a fleet's spend crosses into the next day.
START_MS = int(datetime.datetime(2026, 11, 28, 22, 0, tzinfo=datetime.UTC).timestamp() * 1000)


def _missing(what: str) -> None:
    """Fail in CI, skip loudly elsewhere."""
    if IN_CI:
        pytest.fail(f"{what} (CI=true: a missing service fails the run)")
    pytest.skip(f"{what}; set it up to run these tests")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# ---------------------------------------------------------------------------------------------------------
# Redis.


@pytest.fixture(scope="session")
def ledger_redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Redis of the tests' own: a redis-server process, or SPENDGATE_TEST_REDIS_URL (keys are prefixed)."""
    external = os.environ.get("SPENDGATE_TEST_REDIS_URL")
    if external:
        yield external
        return
    if not os.path.exists(REDIS_SERVER):
        _missing(f"redis-server not found at {REDIS_SERVER} and SPENDGATE_TEST_REDIS_URL is not set")
    port = _free_port()
    directory = tmp_path_factory.mktemp("redis")
    process = subprocess.Popen(
        [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        cwd=directory,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        client = redis.Redis(port=port)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or process.poll() is not None:
                    _missing(f"redis-server did not start on port {port}")
                time.sleep(0.05)
        client.close()
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture
def prefix() -> str:
    """A key prefix of this test's own."""
    return f"lt{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def redis_client(ledger_redis_url: str, prefix: str) -> AsyncIterator[aioredis.Redis]:
    """A client of the real Redis; the test's keys (its prefix) are deleted afterwards."""
    client = aioredis.Redis.from_url(ledger_redis_url, decode_responses=True, socket_timeout=10)
    try:
        yield client
    finally:
        keys = [key async for key in client.scan_iter(match=f"{prefix}:*", count=1000)]
        for start in range(0, len(keys), 500):
            await client.delete(*keys[start : start + 500])
        await client.aclose()


# ---------------------------------------------------------------------------------------------------------
# PostgreSQL.


@pytest.fixture(scope="session")
def pg_database_url() -> Iterator[str]:
    """A PostgreSQL database created for this session and dropped at its end."""
    name = f"spendgate_test_{uuid.uuid4().hex[:12]}"
    try:
        admin = psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as error:
        _missing(f"PostgreSQL is not reachable at {PG_ADMIN_URL}: {error}")
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    info = psycopg.conninfo.conninfo_to_dict(PG_ADMIN_URL)
    info["dbname"] = name
    try:
        yield psycopg.conninfo.make_conninfo(**info)
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@dataclasses.dataclass
class SinkFactory:
    """Makes ledgers of one backend, each with tables of its own (a file, or a PostgreSQL schema)."""

    kind: str
    directory: pathlib.Path
    database_url: str | None
    made: list[LedgerSink] = dataclasses.field(default_factory=list)

    def location(self) -> str:
        """A fresh place for a ledger: a file path or a schema name."""
        if self.kind == "sqlite":
            return str(self.directory / f"ledger-{uuid.uuid4().hex[:8]}.sqlite3")
        return f"t_{uuid.uuid4().hex[:12]}"

    async def make(self, location: str | None = None, **options: Any) -> LedgerSink:
        """A migrated ledger at ``location`` (fresh by default)."""
        location = location or self.location()
        sink: LedgerSink
        if self.kind == "sqlite":
            sink = SqliteLedger(location)
        else:
            assert self.database_url is not None
            sink = PostgresLedger(self.database_url, schema=location, **options)
        self.made.append(sink)
        await sink.migrate()
        return sink

    async def close(self) -> None:
        for sink in self.made:
            await sink.close()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def sinks(request: pytest.FixtureRequest, tmp_path: pathlib.Path) -> AsyncIterator[SinkFactory]:
    """A factory of ledgers, once per backend."""
    database_url = request.getfixturevalue("pg_database_url") if request.param == "postgres" else None
    factory = SinkFactory(request.param, tmp_path, database_url)
    try:
        yield factory
    finally:
        await factory.close()


@pytest.fixture
async def sink(sinks: SinkFactory) -> LedgerSink:
    """A migrated ledger, once per backend."""
    return await sinks.make()


# ---------------------------------------------------------------------------------------------------------
# A fleet that spends through the real path.


def fleet_plan(account: str) -> dict[str, Any]:
    """An account with nested pools, a wallet straight under the account, and generous limits."""
    return {
        "account": {"id": account, "limits": {"month": 10_000_000}},
        "pools": [
            {
                "id": f"{account}-research",
                "limits": {"month": 5_000_000},
                "wallets": [{"id": f"{account}-r1", "limits": {"day": 1_000_000}}, {"id": f"{account}-r2"}],
                "pools": [{"id": f"{account}-deep", "wallets": [{"id": f"{account}-d1"}]}],
            },
            {"id": f"{account}-sales", "wallets": [{"id": f"{account}-s1"}]},
        ],
        "wallets": [{"id": f"{account}-direct"}],
    }


SERVICES = ("api.openai.example", "search.example", "")


@dataclasses.dataclass(frozen=True)
class Captured:
    """What the fleet settled in one capture (the expected ledger row)."""

    txn_id: str
    account_id: str
    wallet_id: str
    amount_micros: int
    authorized_micros: int
    service: str
    captured_at_ms: int
    metadata: dict[str, str]


class Fleet:
    """Accounts in Redis behind a SpendCore, spending with a manual clock; remembers every capture."""

    def __init__(self, client: aioredis.Redis, prefix: str, accounts: tuple[str, ...], seed: int = 7) -> None:
        self.client = client
        self.keys = Keys(prefix)
        self.store = RedisStore(client, keys=self.keys, timeout_s=10.0)
        self.clock = ManualClock(START_MS)
        self.core = SpendCore(self.store, self.clock)
        self.accounts = accounts
        self.plans = {account: parse_plan(fleet_plan(account)) for account in accounts}
        self.wallets = [n.node_id for plan in self.plans.values() for n in plan.nodes if n.kind is NodeKind.WALLET]
        self.random = random.Random(seed)
        self.captured: dict[str, Captured] = {}
        self._counter = 0

    async def setup(self) -> Fleet:
        for plan in self.plans.values():
            await self.core.apply_plan(plan)
        return self

    async def spend(self, count: int, *, step_ms_max: int = 600_000) -> list[Captured]:
        """Make ``count`` spends: one-shot captures, partial captures, and voids (which settle nothing)."""
        made: list[Captured] = []
        for _ in range(count):
            self._counter += 1
            wallet = self.random.choice(self.wallets)
            amount = self.random.randint(1, 5_000_000)
            service = self.random.choice(SERVICES)
            metadata = {"run": str(self._counter)} if self.random.random() < 0.5 else {}
            mode = self.random.random()
            command = AuthorizeCommand(
                wallet_id=wallet,
                amount_micros=amount,
                currency="USD",
                idempotency_key=f"k-{uuid.uuid4().hex}",
                service=service,
                capture=mode < 0.6,
                metadata=metadata,
            )
            result = await self.core.authorize(command)
            assert result.approved, result.message
            if mode < 0.6:
                captured = amount
            elif mode < 0.9:
                self.clock.advance(self.random.randint(0, 60_000))
                captured = self.random.randint(1, amount)
                await self.core.capture(result.authorization_id, captured, f"c-{uuid.uuid4().hex}")
            else:
                await self.core.void(result.authorization_id)
                captured = 0
            if captured:
                item = Captured(
                    txn_id=result.authorization_id,
                    account_id=result.authorization_id.split(":")[0],
                    wallet_id=wallet,
                    amount_micros=captured,
                    authorized_micros=amount,
                    service=service,
                    captured_at_ms=self.clock.now_ms(),
                    metadata=metadata,
                )
                self.captured[item.txn_id] = item
                made.append(item)
            self.clock.advance(self.random.randint(0, step_ms_max))
        return made


@pytest.fixture
def fleet_factory(redis_client: aioredis.Redis, prefix: str) -> Callable[..., Awaitable[Fleet]]:
    """Build a fleet of accounts on the real Redis, under this test's prefix."""

    async def make(accounts: tuple[str, ...] = ("acme", "globex"), seed: int = 7) -> Fleet:
        return await Fleet(redis_client, prefix, accounts, seed).setup()

    return make


# ---------------------------------------------------------------------------------------------------------
# A TCP proxy that can cut a server off, to take PostgreSQL "down" without touching the real server.


class TcpProxy:
    """Forwards 127.0.0.1:<port> to a target; :meth:`cut` drops every connection and refuses new ones."""

    def __init__(self, host: str, port: int) -> None:
        self._target = (host, port)
        self._server: asyncio.Server | None = None
        self._up = True
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    async def start(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self._up:
            writer.transport.abort()
            return
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, upstream_writer}
        for source, sink in ((reader, upstream_writer), (upstream_reader, writer)):
            task = asyncio.create_task(self._pipe(source, sink))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, ConnectionError):
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()
        sink.transport.abort()
        self._writers.discard(sink)

    def cut(self) -> None:
        """Take the server 'down': abort every connection and refuse new ones."""
        self._up = False
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    def restore(self) -> None:
        """Bring the server back."""
        self._up = True

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
