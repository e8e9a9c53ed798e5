"""Helpers of the ledger end-to-end tests: spendgate subprocesses, a PostgreSQL proxy, a spender that remembers
every capture, and the checks that the ledger holds each of them exactly once.

The redis-server processes, free ports and plans come from the shared ``tests/helpers.py``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import os
import pathlib
import random
import signal
import sys
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar
from urllib.parse import quote

import grpc
import psycopg
import psycopg.conninfo
import pytest

from helpers import FLEET_YAML
from helpers import eventually as helpers_eventually
from spendgate._gen.spendgate.v1 import billing_pb2, billing_pb2_grpc
from spendgate.client import AsyncClient
from spendgate.clock import ManualClock
from spendgate.domain import NodeKind
from spendgate.ledger import LedgerTransaction, TransactionFilter, open_ledger
from spendgate.plan import load_plan
from spendgate.windows import windows_at

T = TypeVar("T")

FLEET = FLEET_YAML
ACCOUNT = "acme"
# The spendgate command of the environment running the tests (the project's virtualenv).
SPENDGATE = pathlib.Path(sys.executable).parent / "spendgate"
# A deadline on single calls: far above what a healthy call needs, so it only stops a hang.
CALL_TIMEOUT_S = 20.0
SERVICES = ("api.openai.example", "search.example", "")


def _chains() -> dict[str, tuple[str, ...]]:
    """Every wallet of the example fleet with its chain up to the account."""
    plan = load_plan(FLEET)
    parents = {node.node_id: node.parent_id for node in plan.nodes}
    chains: dict[str, tuple[str, ...]] = {}
    for node in plan.nodes:
        if node.kind is NodeKind.WALLET:
            chain = [node.node_id]
            while (parent := parents[chain[-1]]) is not None:
                chain.append(parent)
            chains[node.node_id] = tuple(chain)
    return chains


CHAINS = _chains()
WALLETS = tuple(sorted(CHAINS))
POOLS = tuple(sorted({chain[1] for chain in CHAINS.values()}))


# ---------------------------------------------------------------------------------------------------------
# Waiting and time.


async def eventually(check: Callable[[], Awaitable[T]], *, timeout_s: float = 30.0, what: str = "a condition") -> T:
    """:func:`helpers.eventually` with this suite's longer deadline (a ledger drains on its own schedule)."""
    return await helpers_eventually(check, timeout_s=timeout_s, what=what)


def wall_ms() -> int:
    """The machine's clock in ms (what a server on the system clock stamps transactions with)."""
    return time.time_ns() // 1_000_000


def avoid_midnight(margin_s: float = 90.0) -> None:
    """Tests on the machine's clock compare today's windows before and after: never run them across midnight.

    Sleeps until just after midnight UTC (the example fleet's time zone) when it is less than ``margin_s``
    away; that wait is bounded by the margin.
    """
    now = datetime.datetime.now(datetime.UTC)
    midnight = datetime.datetime.combine(now.date() + datetime.timedelta(days=1), datetime.time(), datetime.UTC)
    left_s = (midnight - now).total_seconds()
    if left_s < margin_s:
        time.sleep(left_s + 1.0)


def today_utc() -> str:
    """Today's day window id in UTC."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")


def utc_ms(text: str) -> int:
    """Milliseconds of an ISO time in UTC, e.g. ``2026-11-01T00:00``."""
    return int(datetime.datetime.fromisoformat(text).replace(tzinfo=datetime.UTC).timestamp() * 1000)


# ---------------------------------------------------------------------------------------------------------
# Subprocesses.


def clean_env(**settings: str) -> dict[str, str]:
    """The environment of a spendgate subprocess: ours without any SPENDGATE_* variable, plus ``settings``.

    ``settings`` are given without the prefix: ``clean_env(redis_url=...)`` sets SPENDGATE_REDIS_URL.
    """
    env = {name: value for name, value in os.environ.items() if not name.startswith("SPENDGATE_")}
    # A wide terminal keeps rich from wrapping tables and messages mid-word.
    env |= {"COLUMNS": "250", "NO_COLOR": "1"}
    env |= {f"SPENDGATE_{name.upper()}": value for name, value in settings.items()}
    return env


@dataclasses.dataclass(frozen=True)
class CliResult:
    """What one ``spendgate`` command did."""

    code: int
    out: str
    err: str

    def __str__(self) -> str:
        return f"exit {self.code}\n--- stdout\n{self.out}\n--- stderr\n{self.err}"


async def run_cli(*args: str, env: Mapping[str, str] | None = None, timeout_s: float = 90.0) -> CliResult:
    """Run ``spendgate ARGS``; return its exit code, stdout and stderr."""
    process = await asyncio.create_subprocess_exec(
        str(SPENDGATE),
        *args,
        env=dict(env) if env is not None else clean_env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=timeout_s)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return CliResult(process.returncode, stdout.decode(), stderr.decode())


class Process:
    """A long-running spendgate subprocess (``serve`` or ``ledger``); its output goes to a log file."""

    def __init__(self, args: Sequence[str], env: Mapping[str, str], log_path: pathlib.Path) -> None:
        self.args = list(args)
        self.env = dict(env)
        self.log_path = log_path
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> Process:
        """Start the command (stdout and stderr appended to the log file)."""
        with self.log_path.open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                str(SPENDGATE),
                *self.args,
                env=self.env,
                stdout=log,
                stderr=log,
                cwd=self.log_path.parent,
            )
        return self

    @property
    def running(self) -> bool:
        """Whether the process is alive."""
        return self.process is not None and self.process.returncode is None

    def log(self) -> str:
        """Everything the process wrote so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    async def terminate(self, timeout_s: float = 30.0) -> int:
        """SIGTERM, then wait for the exit; return the exit code."""
        assert self.process is not None
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(self.process.wait(), timeout_s)

    async def kill(self) -> int:
        """SIGKILL (a crash): the process gets no chance to finish anything."""
        assert self.process is not None
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGKILL)
        return await asyncio.wait_for(self.process.wait(), 30)

    async def cleanup(self) -> None:
        """Kill the process if a failing test left it running."""
        if self.process is not None and self.process.returncode is None:
            await self.kill()


async def serve(port: int, env: Mapping[str, str], log_path: pathlib.Path) -> Process:
    """Start ``spendgate serve --plan examples/fleet.yaml`` on a port and wait until it answers."""
    process = await Process(
        ["serve", "--plan", str(FLEET), "--port", str(port), "--log-format", "text"], env, log_path
    ).start()
    address = f"127.0.0.1:{port}"

    async def answering() -> bool:
        if not process.running:
            pytest.fail(f"spendgate serve exited early:\n{process.log()}")
        async with AsyncClient(address, timeout_s=1.0) as client:
            try:
                await client.get_budget(ACCOUNT)
            except Exception:  # Not listening yet (UNAVAILABLE) or still starting: poll again.
                return False
        return True

    await eventually(answering, timeout_s=60, what="spendgate serve to answer")
    return process


# ---------------------------------------------------------------------------------------------------------
# PostgreSQL URLs.


def pg_url(url: str, *, dbname: str | None = None, host: str | None = None, port: int | None = None) -> str:
    """A ``postgresql://`` URL (what SPENDGATE_DATABASE_URL takes) from a URL or conninfo, with changes."""
    info = psycopg.conninfo.conninfo_to_dict(url)
    user = quote(str(info.get("user", "postgres")), safe="")
    password = info.get("password")
    credentials = f"{user}:{quote(str(password), safe='')}" if password else user
    host = host or str(info.get("host", "127.0.0.1"))
    port = port or int(info.get("port", 5432))
    return f"postgresql://{credentials}@{host}:{port}/{dbname or info.get('dbname', 'postgres')}"


def pg_target(url: str) -> tuple[str, int]:
    """The host and port a PostgreSQL URL names."""
    info = psycopg.conninfo.conninfo_to_dict(url)
    return str(info.get("host", "127.0.0.1")), int(info.get("port", 5432))


# ---------------------------------------------------------------------------------------------------------
# A TCP proxy in front of PostgreSQL that can stall the traffic (a hung database) or cut it.


class PgProxy:
    """Forwards 127.0.0.1:<port> to PostgreSQL, in a thread of its own (so blocking test code cannot stall it).

    :meth:`pause` holds every byte in both directions without closing anything (a database that hangs);
    :meth:`resume` lets them through again.
    """

    def __init__(self, host: str, port: int) -> None:
        self._target = (host, port)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="pg-proxy", daemon=True)
        self._flowing: asyncio.Event | None = None
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = 0

    def _run(self, coroutine: Awaitable[T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=10)  # type: ignore[arg-type]

    def start(self) -> PgProxy:
        """Listen on a free port."""
        self._thread.start()

        async def listen() -> int:
            self._flowing = asyncio.Event()
            self._flowing.set()
            self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
            return int(self._server.sockets[0].getsockname()[1])

        self.port = self._run(listen())
        return self

    def url(self, database_url: str) -> str:
        """``database_url`` pointed at the proxy."""
        return pg_url(database_url, host="127.0.0.1", port=self.port)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, upstream_writer}
        asyncio.ensure_future(self._pipe(reader, upstream_writer))  # noqa: RUF006 - cancelled with the loop
        asyncio.ensure_future(self._pipe(upstream_reader, writer))  # noqa: RUF006

    async def _pipe(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        assert self._flowing is not None
        try:
            while data := await source.read(65536):
                await self._flowing.wait()
                sink.write(data)
                await sink.drain()
        except (OSError, ConnectionError):
            pass
        finally:
            sink.transport.abort()
            self._writers.discard(sink)

    def retarget(self, host: str, port: int) -> None:
        """Send the connections made from now on to ``host:port`` (a database that comes up elsewhere)."""
        self._target = (host, port)

    def pause(self) -> None:
        """Hold all traffic (connections stay open)."""

        async def pause() -> None:
            assert self._flowing is not None
            self._flowing.clear()

        self._run(pause())

    def resume(self) -> None:
        """Let the held traffic through."""

        async def resume() -> None:
            assert self._flowing is not None
            self._flowing.set()

        self._run(resume())

    def close(self) -> None:
        """Drop every connection and stop the thread."""

        async def close() -> None:
            assert self._flowing is not None
            self._flowing.set()
            for writer in list(self._writers):
                writer.transport.abort()
            if self._server is not None:
                self._server.close()

        self._run(close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()


# ---------------------------------------------------------------------------------------------------------
# Spending through the API while remembering what must reach the ledger.


@dataclasses.dataclass(frozen=True)
class Expected:
    """One settled transaction as the capture made it: what the ledger must hold, once."""

    txn_id: str
    wallet_id: str
    amount_micros: int
    authorized_micros: int
    service: str
    metadata: dict[str, str]
    # Bounds on the server's clock readings at authorization and capture (equal on a ManualClock).
    authorized_at_ms: tuple[int, int]
    captured_at_ms: tuple[int, int]

    @property
    def chain(self) -> tuple[str, ...]:
        """Wallet, pool, account."""
        return CHAINS[self.wallet_id]

    @property
    def pool_id(self) -> str:
        """The wallet's pool."""
        return self.chain[1]

    @property
    def captured_ms(self) -> int:
        """The capture time (exact on a ManualClock; the upper bound otherwise)."""
        return self.captured_at_ms[1]


class Spender:
    """Authorizes and captures through the gRPC API, remembering every settled transaction.

    With a ManualClock the recorded times are exact and the clock moves only when :meth:`advance` says so;
    on the server's system clock they are bounded by the wall clock read around each call.
    """

    def __init__(self, client: AsyncClient, clock: ManualClock | None = None, seed: int = 3) -> None:
        self.client = client
        self.clock = clock
        self.random = random.Random(seed)
        self.settled: dict[str, Expected] = {}
        self.voided: list[str] = []
        self._count = 0

    def _now(self) -> int:
        return self.clock.now_ms() if self.clock is not None else wall_ms()

    def advance(self, milliseconds: int) -> None:
        """Move the ManualClock (if any)."""
        if self.clock is not None:
            self.clock.advance(milliseconds)

    def _labels(self) -> dict[str, str]:
        self._count += 1
        choice = self._count % 3
        if choice == 0:
            return {}
        if choice == 1:
            return {"task": f"t-{self._count}"}
        return {"task": f"t-{self._count}", "model": "gpt-x", "note": 'ünïcødé, "quoted"'}

    async def one_shot(
        self, wallet: str, amount_micros: int, *, service: str = "", metadata: dict[str, str] | None = None
    ) -> Expected:
        """Authorize and settle at once (capture=true)."""
        labels = self._labels() if metadata is None else metadata
        before = self._now()
        result = await self.client.authorize(wallet, amount_micros, service=service, capture=True, metadata=labels)
        after = self._now()
        assert result.approved, f"{wallet} {amount_micros}: {result.message}"
        expected = Expected(
            result.authorization_id,
            wallet,
            amount_micros,
            amount_micros,
            service,
            labels,
            (before, after),
            (before, after),
        )
        self.settled[expected.txn_id] = expected
        return expected

    async def hold_and_capture(
        self, wallet: str, amount_micros: int, captured_micros: int, *, service: str = "", wait_ms: int = 0
    ) -> Expected:
        """Hold, (on a ManualClock) let ``wait_ms`` pass, then capture part or all of the hold."""
        labels = self._labels()
        before = self._now()
        result = await self.client.authorize(wallet, amount_micros, service=service, metadata=labels)
        authorized = (before, self._now())
        assert result.approved, f"{wallet} {amount_micros}: {result.message}"
        self.advance(wait_ms)
        before = self._now()
        capture = await self.client.capture(result.authorization_id, captured_micros)
        captured = (before, self._now())
        assert capture.captured_micros == captured_micros
        expected = Expected(
            result.authorization_id, wallet, captured_micros, amount_micros, service, labels, authorized, captured
        )
        self.settled[expected.txn_id] = expected
        return expected

    async def hold_and_void(self, wallet: str, amount_micros: int) -> None:
        """Hold, then release: nothing settles, so nothing may reach the ledger."""
        result = await self.client.authorize(wallet, amount_micros)
        assert result.approved, result.message
        await self.client.void(result.authorization_id)
        self.voided.append(result.authorization_id)

    async def random_spend(
        self,
        count: int,
        *,
        amount_max_micros: int = 20_000,
        step_ms_max: int = 0,
        wallets: Sequence[str] = WALLETS,
    ) -> None:
        """``count`` spends of small random amounts over the wallets: one-shots, partial captures and voids."""
        for _ in range(count):
            wallet = self.random.choice(wallets)
            amount = self.random.randint(1, amount_max_micros)
            service = self.random.choice(SERVICES)
            mode = self.random.random()
            if mode < 0.6:
                await self.one_shot(wallet, amount, service=service)
            elif mode < 0.9:
                await self.hold_and_capture(
                    wallet,
                    amount,
                    self.random.randint(1, amount),
                    service=service,
                    wait_ms=self.random.randint(0, 60_000),
                )
            else:
                await self.hold_and_void(wallet, amount)
            self.advance(self.random.randint(0, step_ms_max))

    async def load(self, count: int, *, concurrency: int = 8, amount_max_micros: int = 20_000) -> None:
        """``count`` spends from ``concurrency`` concurrent agents (no clock moves: for the system clock)."""
        share = [count // concurrency + (1 if i < count % concurrency else 0) for i in range(concurrency)]
        await asyncio.gather(*(self.random_spend(n, amount_max_micros=amount_max_micros) for n in share))

    def total_micros(self) -> int:
        """Everything settled."""
        return sum(item.amount_micros for item in self.settled.values())


# ---------------------------------------------------------------------------------------------------------
# What the ledger holds.


async def ledger_transactions(
    database_url: str, data_dir: pathlib.Path | str = ".spendgate"
) -> list[LedgerTransaction]:
    """Every transaction in a ledger, read directly from its database (not through the server)."""
    ledger = open_ledger(database_url, data_dir=data_dir)
    try:
        out: list[LedgerTransaction] = []
        cursor = None
        while True:
            page = await ledger.list_transactions(TransactionFilter(), cursor, 1000)
            out += page.transactions
            if page.next_cursor is None:
                return out
            cursor = page.next_cursor
    finally:
        await ledger.close()


async def count_rows(database_url: str, table: str = "transactions") -> int:
    """Rows of a ledger table in PostgreSQL, counted directly (no ledger code in between)."""
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True, connect_timeout=5) as connection:
        cursor = await connection.execute(f"SELECT count(*) FROM {table}")  # noqa: S608 - the tests' own names
        row = await cursor.fetchone()
        assert row is not None
        return int(row[0])


def check_transaction(txn: Any, expected: Expected) -> None:
    """One ledger transaction (a LedgerTransaction, a client Transaction or a proto) against its capture."""
    where = f"transaction {expected.txn_id}"
    assert txn.txn_id == expected.txn_id
    assert txn.account_id == ACCOUNT, where
    assert txn.wallet_id == expected.wallet_id, where
    assert tuple(txn.chain) == expected.chain, where
    assert txn.amount_micros == expected.amount_micros, where
    assert txn.authorized_micros == expected.authorized_micros, where
    assert txn.currency == "USD", where
    assert txn.service == expected.service, where
    assert dict(txn.metadata) == expected.metadata, where
    low, high = expected.authorized_at_ms
    assert low <= txn.authorized_at_ms <= high, f"{where}: authorized_at_ms {txn.authorized_at_ms} not in {low}..{high}"
    low, high = expected.captured_at_ms
    assert low <= txn.captured_at_ms <= high, f"{where}: captured_at_ms {txn.captured_at_ms} not in {low}..{high}"
    # The windows are those of the authorization, in the account's time zone (UTC for the example fleet).
    windows = windows_at(txn.authorized_at_ms, "UTC")
    authorized = datetime.datetime.fromtimestamp(txn.authorized_at_ms / 1000, datetime.UTC)
    assert txn.day == authorized.strftime("%Y-%m-%d"), where
    assert txn.month == authorized.strftime("%Y-%m"), where
    assert txn.week == windows.week, where


def assert_exactly_once(listed: Iterable[Any], settled: Mapping[str, Expected]) -> None:
    """The ledger holds every settled transaction once, with what its capture settled, and nothing else."""
    listed = list(listed)
    ids = [txn.txn_id for txn in listed]
    doubled = sorted({txn_id for txn_id in ids if ids.count(txn_id) > 1})
    assert not doubled, f"{len(doubled)} transactions are in the ledger more than once: {doubled[:5]}"
    missing = sorted(set(settled) - set(ids))
    assert not missing, f"{len(missing)} of {len(settled)} captures are missing from the ledger: {missing[:5]}"
    extra = sorted(set(ids) - set(settled))
    assert not extra, f"{len(extra)} ledger transactions were never settled: {extra[:5]}"
    for txn in listed:
        check_transaction(txn, settled[txn.txn_id])


def page_order(items: Iterable[Expected]) -> list[Expected]:
    """Expected transactions in the ledger's page order: capture time, then id."""
    return sorted(items, key=lambda item: (item.captured_ms, item.txn_id))


# ---------------------------------------------------------------------------------------------------------
# The server's BillingService.


async def ledger_status(channel: grpc.aio.Channel) -> billing_pb2.GetLedgerStatusResponse:
    """GetLedgerStatus over the raw stub."""
    stub = billing_pb2_grpc.BillingServiceStub(channel)  # type: ignore[no-untyped-call]
    response: billing_pb2.GetLedgerStatusResponse = await stub.GetLedgerStatus(
        billing_pb2.GetLedgerStatusRequest(), timeout=CALL_TIMEOUT_S
    )
    return response


async def drained(channel: grpc.aio.Channel, settled: int, *, timeout_s: float = 60.0) -> None:
    """Wait until the server reports nothing pending and the ledger holds ``settled`` transactions."""

    async def check() -> bool:
        status = await ledger_status(channel)
        if status.pending_entries or status.ledger_unavailable:
            return False
        # Entries are acknowledged only after their commit: with nothing pending, the ledger holds all of them.
        assert status.ledger_transactions == settled, f"nothing is pending, yet the ledger holds {status}"
        return True

    await eventually(check, timeout_s=timeout_s, what=f"the ledger to hold all {settled} settled transactions")


def budget_snapshot(budgets: Iterable[Any]) -> dict[str, Any]:
    """Per node: frozen reason and, per window, (window id, limit, spent) — what must survive a restart."""
    return {
        budget.node_id: (
            budget.frozen_reason,
            tuple((w.window.name, w.window_id, w.limit_micros, w.spent_micros) for w in budget.windows),
        )
        for budget in budgets
    }


async def budgets(client: AsyncClient, node_ids: Iterable[str]) -> list[Any]:
    """GetBudget of several nodes."""
    return [await client.get_budget(node_id) for node_id in node_ids]


ALL_NODES = (ACCOUNT, *POOLS, *WALLETS)


def new_name(stem: str) -> str:
    """A name no other test uses."""
    return f"{stem}{uuid.uuid4().hex[:10]}"
