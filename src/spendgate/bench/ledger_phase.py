"""The ``ledger`` phase: the ledger writer's throughput into PostgreSQL against the server's, side by side.

Three steps, in one run on one machine, against a PostgreSQL database created for the run and dropped after
it, and the benchmark's own Redis under a key prefix of the phase's own (so the other phases' outboxes and
the main server's writer are not involved):

1. ``ledger-server``: ``spendgate serve`` with ``SPENDGATE_LEDGER_WRITERS=0`` takes one-shot (capture=true)
   authorizations, closed loop, from the usual generator processes. Nothing drains the outbox, so every
   approval is left in it. Its calls/s is the server's authorize-and-capture throughput.
2. The server stops and ``spendgate ledger --writers N`` (the operator's command, in a process of its own)
   drains that outbox into the database while the phase polls the outbox lag. Entries per second are
   counted from the first committed batch to the empty outbox (the process's start-up and the first batch
   are left out; both are reported). Afterwards the ledger must hold exactly one row per outbox entry.
3. ``ledger-lag``: ``spendgate serve`` with N in-process writers into the same database takes one-shot
   authorizations in an open loop at the throughput step 1 measured, while the phase samples the lag
   (:meth:`~spendgate.ledger.writer.LedgerWriter.lag`, what ``GetLedgerStatus`` reports) every 0.5 s, and
   goes on sampling after the load stops until the outbox is empty. The lag is bounded when it is back to
   zero within :data:`SETTLE_BOUND_S` of the end of the load.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import pathlib
import resource
import signal
import subprocess
import sys
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import psycopg
import redis.asyncio as aioredis
import redis.exceptions
from rich.console import Console
from rich.table import Table

from spendgate.bench.servers import ServerProcess, free_port, machine_busy_cpu_s, process_cpu_s, spendgate_server
from spendgate.ledger.postgres import PostgresLedger
from spendgate.ledger.writer import LedgerWriter, OutboxLag
from spendgate.store.keys import Keys

if TYPE_CHECKING:
    from spendgate.bench.fleet import Fleet
    from spendgate.bench.runner import Bench
    from spendgate.bench.stats import PhaseResult

# Where the phase creates its database when --database-url is not given (trust auth, like the tests').
DATABASE_URL_DEFAULT = "postgresql://postgres@127.0.0.1:5432/postgres"
# The target: the writer sustains at least this multiple of the server's authorize-and-capture rate.
RATIO_TARGET = 5.0
# The phase's keys in the benchmark's Redis, apart from the other phases' ("sg").
KEY_PREFIX = "sgledger"
# How often the lag is sampled under load (step 3), and after the load while it drains.
LAG_SAMPLE_INTERVAL_S = 0.5
SETTLE_SAMPLE_INTERVAL_S = 0.05
# The lag is bounded when the outbox is empty again this soon after the load stops.
SETTLE_BOUND_S = 5.0
SETTLE_TIMEOUT_S = 60.0
# How often the outbox is polled while the standalone writer drains it (step 2), and for how long at most.
DRAIN_POLL_INTERVAL_S = 0.01
DRAIN_TIMEOUT_S = 300.0
WRITER_STOP_TIMEOUT_S = 15.0


@dataclasses.dataclass(slots=True)
class LagSample:
    """The outbox lag at one moment of step 3 (seconds since the load was sent off: lead and warm-up included)."""

    at_s: float
    entries: int
    oldest_age_ms: int
    loading: bool


@dataclasses.dataclass(slots=True)
class LedgerFigures:
    """What the ledger phase measured."""

    database: str
    writers: int
    # Step 1: the server's one-shot authorize-and-capture calls/s (closed loop, measured window).
    server_calls_per_s: float = 0.0
    # Step 2: the standalone writer.
    entries: int = 0
    writer_start_s: float = 0.0
    first_batch_entries: int = 0
    writer_drain_s: float = 0.0
    writer_entries_per_s: float = 0.0
    writer_cpu_s: float | None = None
    redis_cpu_s: float | None = None
    # Every postgres process's CPU over the drain; the harness's own (it polls the lag); the rest of the machine.
    database_cpu_s: float | None = None
    harness_cpu_s: float | None = None
    other_cpu_s: float | None = None
    # (seconds since the writer's launch, entries left) at each poll.
    drain_samples: list[tuple[float, int]] = dataclasses.field(default_factory=list)
    ledger_rows_after_drain: int = 0
    # Step 3: the server with its writers, at the measured rate.
    lag_rate_target: float = 0.0
    lag_calls_per_s: float = 0.0
    lag_load_s: float = 0.0
    lag_samples: list[LagSample] = dataclasses.field(default_factory=list)
    settle_s: float | None = None
    # After the lag server stopped (it drains on stop): rows, and what the generators saw approved.
    ledger_rows_final: int = 0
    approvals: int = 0
    approvals_unknown: int = 0
    # What went wrong (the phase fails), and what limits the figures (it does not).
    problems: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def ratio(self) -> float | None:
        """Writer entries/s over server calls/s."""
        if not self.server_calls_per_s or not self.writer_entries_per_s:
            return None
        return self.writer_entries_per_s / self.server_calls_per_s

    @property
    def lag_max_entries(self) -> int:
        """The most entries behind while loading."""
        return max((s.entries for s in self.lag_samples if s.loading), default=0)

    @property
    def lag_max_age_ms(self) -> int:
        """The oldest entry's largest age while loading."""
        return max((s.oldest_age_ms for s in self.lag_samples if s.loading), default=0)

    @property
    def lag_bounded(self) -> bool:
        """Whether the outbox was empty again within SETTLE_BOUND_S of the end of the load."""
        return self.settle_s is not None and self.settle_s <= SETTLE_BOUND_S

    @property
    def exactly_once(self) -> bool:
        """Every outbox entry is one ledger row, after the drain and after the lag server stopped."""
        return self.ledger_rows_after_drain == self.entries and (
            self.approvals <= self.ledger_rows_final <= self.approvals + self.approvals_unknown
        )

    @property
    def passed(self) -> bool:
        """Correctness only (exactly once, and the phase ran): the speed figures are reported, not judged."""
        return self.exactly_once and not self.problems

    def to_json(self) -> dict[str, Any]:
        """The figures for ``--json``."""
        ratio = self.ratio
        return {
            "database": self.database,
            "writers": self.writers,
            "server_calls_per_s": round(self.server_calls_per_s, 1),
            "writer": {
                "entries": self.entries,
                "start_s": round(self.writer_start_s, 3),
                "first_batch_entries": self.first_batch_entries,
                "drain_s": round(self.writer_drain_s, 3),
                "entries_per_s": round(self.writer_entries_per_s, 1),
                "cpu_s": _round(self.writer_cpu_s),
                "redis_cpu_s": _round(self.redis_cpu_s),
                "postgres_cpu_s": _round(self.database_cpu_s),
                "harness_cpu_s": _round(self.harness_cpu_s),
                "other_cpu_s": _round(self.other_cpu_s),
                "samples": self.drain_samples,
                "ledger_rows": self.ledger_rows_after_drain,
            },
            "ratio_writer_to_server": None if ratio is None else round(ratio, 2),
            "ratio_target": RATIO_TARGET,
            "ratio_ok": ratio is not None and ratio >= RATIO_TARGET,
            "lag": {
                "rate_target_per_s": round(self.lag_rate_target, 1),
                "calls_per_s": round(self.lag_calls_per_s, 1),
                "load_s": round(self.lag_load_s, 3),
                "max_entries": self.lag_max_entries,
                "max_oldest_age_ms": self.lag_max_age_ms,
                "settle_s": None if self.settle_s is None else round(self.settle_s, 3),
                "settle_bound_s": SETTLE_BOUND_S,
                "bounded": self.lag_bounded,
                "samples": [dataclasses.asdict(sample) for sample in self.lag_samples],
            },
            "exactly_once": {
                "ok": self.exactly_once,
                "rows_after_drain": self.ledger_rows_after_drain,
                "rows_final": self.ledger_rows_final,
                "approvals": self.approvals,
                "approvals_unknown": self.approvals_unknown,
            },
            "problems": self.problems,
            "notes": self.notes,
            "passed": self.passed,
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def database_url_with(url: str, database: str) -> str:
    """``url`` (a ``postgresql://`` URL) naming ``database`` instead of its own."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres"):
        raise ValueError(f"--database-url must be a postgresql:// URL, not {url[:40]!r}")
    return urllib.parse.urlunsplit(parts._replace(path="/" + database))


def _redacted(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    user = parts.username or ""
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}@{netloc}" if user else netloc))


@contextlib.asynccontextmanager
async def _database(admin_url: str, name: str) -> AsyncIterator[str]:
    """Create a database of the run's own and drop it afterwards; yields its URL."""
    connection = await psycopg.AsyncConnection.connect(admin_url, autocommit=True, connect_timeout=5)
    try:
        await connection.execute(psycopg.sql.SQL("CREATE DATABASE {}").format(psycopg.sql.Identifier(name)))
        try:
            yield database_url_with(admin_url, name)
        finally:
            # FORCE: a connection the writers left behind must not keep the database alive.
            await connection.execute(
                psycopg.sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(psycopg.sql.Identifier(name))
            )
    finally:
        await connection.close()


class _WriterProcess:
    """``spendgate ledger --writers N`` in a process of its own, stopped with SIGTERM."""

    def __init__(self, writers: int, environment: dict[str, str], log_path: pathlib.Path) -> None:
        command = [sys.executable, "-c", "from spendgate.cli import main; main()", "ledger", "--writers", str(writers)]
        self._log = log_path.open("wb")
        self.log_path = log_path
        self._process = subprocess.Popen(  # noqa: S603 - our own interpreter running our own command
            command, stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, **environment}
        )

    def cpu_s(self) -> float | None:
        return process_cpu_s(self._process.pid)

    def failed(self) -> str:
        """Why the process ended early ('' while it runs)."""
        if self._process.poll() is None:
            return ""
        self._log.flush()
        tail = self.log_path.read_text(errors="replace")[-1500:]
        return f"spendgate ledger exited with status {self._process.returncode}: {tail}"

    def stop(self) -> None:
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
            try:
                self._process.wait(WRITER_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        with contextlib.suppress(OSError):
            self._log.close()


class LedgerPhase:
    """Runs the three steps for one :class:`~spendgate.bench.runner.Bench` (see the module's docstring)."""

    def __init__(self, bench: Bench, fleet: Fleet) -> None:
        self.bench = bench
        self.fleet = fleet
        self.options = bench.options
        self.keys = Keys(KEY_PREFIX)
        self.database_name = f"spendgate_bench_{bench.run_id}"

    async def run(self) -> LedgerFigures | None:
        """Run the phase; returns None (with the reason in the report's skipped list) when it cannot run."""
        bench = self.bench
        if bench.redis is None:
            bench.report.skipped["ledger"] = "needs a redis-server binary (--redis-server PATH)"
            return None
        admin_url = self.options.database_url or DATABASE_URL_DEFAULT
        async with contextlib.AsyncExitStack() as stack:
            try:
                url = await stack.enter_async_context(_database(admin_url, self.database_name))
            except (psycopg.Error, OSError, ValueError) as error:
                bench.report.skipped["ledger"] = (
                    f"no PostgreSQL at {_redacted(admin_url)} ({error}); pass --database-url"
                )
                return None
            figures = LedgerFigures(
                database=f"{_redacted(url)} (dropped after the run)", writers=self.options.ledger_writers
            )
            client = aioredis.Redis.from_url(bench.redis.url, decode_responses=True, socket_timeout=10.0)
            stack.push_async_callback(client.aclose)
            self.ledger = PostgresLedger(url)
            stack.push_async_callback(self.ledger.close)
            # Only for lag(): it reads Redis, never the sink.
            self.reader = LedgerWriter(client, self.ledger, keys=self.keys)
            try:
                await self._steps(figures, url)
            except (RuntimeError, OSError, psycopg.Error, redis.exceptions.RedisError) as error:
                figures.problems.append(f"{type(error).__name__}: {error}")
            return figures
        return None  # pragma: no cover - unreachable: the block returns (mypy cannot tell the stack re-raises)

    def _environment(self, url: str, writers: int) -> dict[str, str]:
        """A server's or writer's SPENDGATE_* settings: the user's, then the phase's own."""
        return {
            "SPENDGATE_DATA_DIR": str(self.bench.work_dir / "ledger-data"),
            **dict(self.options.server_environment),
            "SPENDGATE_LEDGER": "on",
            "SPENDGATE_KEY_PREFIX": KEY_PREFIX,
            "SPENDGATE_DATABASE_URL": url,
            "SPENDGATE_LEDGER_WRITERS": str(writers),
        }

    @contextlib.asynccontextmanager
    async def _server(self, url: str, writers: int, log_name: str) -> AsyncIterator[ServerProcess]:
        bench, fleet = self.bench, self.fleet
        redis_url = bench.redis.url if bench.redis is not None else ""
        port = free_port()
        process = spendgate_server(
            port,
            redis_url,
            str(fleet.plan_paths[0]),
            bench.work_dir / log_name,
            extra_environment=self._environment(url, writers),
        )
        try:
            wallets = len(fleet.wallet_ids)
            await asyncio.get_running_loop().run_in_executor(None, process.wait_serving, 60.0 + wallets / 500)
            yield process
        finally:
            await asyncio.get_running_loop().run_in_executor(None, process.stop)

    async def _steps(self, figures: LedgerFigures, url: str) -> None:
        from spendgate.bench.runner import OPEN_LOOP_IN_FLIGHT_MIN, _apply_directly

        bench, options = self.bench, self.options
        redis_url = bench.redis.url if bench.redis is not None else ""
        writers = options.ledger_writers
        if len(self.fleet.plans) > 1:
            await _apply_directly(redis_url, self.fleet, slice(1, None), key_prefix=KEY_PREFIX)
        template = dataclasses.replace(bench._template("unary", "", "", options.amount_micros), one_shot=True)

        # 1. The server alone, its outbox filling up.
        bench.say(f"phase [bold]ledger[/]: the server with no ledger writer, into {self.database_name}")
        async with self._server(url, 0, "ledger-server.log") as server:
            loaded = await bench._phase(
                "ledger-server",
                "one-shot Authorize with no ledger writer (the outbox fills up)",
                dataclasses.replace(template, target=server.target),
                concurrency=options.concurrency,
                server_cpu=server.cpu_s,
                server_pid=server.pid,
            )
        figures.server_calls_per_s = loaded.throughput
        self._count_approvals(figures, loaded)

        # 2. The standalone writer drains it.
        await self._drain(figures, url, writers)
        figures.ledger_rows_after_drain = await self.ledger.count_transactions()

        # 3. The server with its writers, at the rate it reached alone.
        rate = figures.server_calls_per_s
        if not rate:
            figures.problems.append("the server approved nothing in step 1: no rate to hold")
            return
        figures.lag_rate_target = rate
        bench.say(f"phase [bold]ledger[/]: the server with {writers} ledger writer(s) at {rate:,.0f}/s, lag sampled")
        async with self._server(url, writers, "ledger-lag-server.log") as server:
            samples = figures.lag_samples
            started = time.monotonic()
            sampler = asyncio.create_task(self._sample(samples, started))
            try:
                lagged = await bench._phase(
                    "ledger-lag",
                    f"one-shot Authorize with {writers} in-process ledger writer(s), at the ledger-server rate",
                    dataclasses.replace(template, target=server.target),
                    concurrency=max(options.concurrency, OPEN_LOOP_IN_FLIGHT_MIN),
                    rate=rate,
                    server_cpu=server.cpu_s,
                    server_pid=server.pid,
                )
            finally:
                # The load ends when the generators have all reported back, which is later than the measured
                # window when the server fell behind the open loop's schedule (they send what was scheduled).
                figures.lag_load_s = time.monotonic() - started
                figures.settle_s = await self._settle(sampler, samples, started, figures.lag_load_s)
            figures.lag_calls_per_s = lagged.throughput
            self._count_approvals(figures, lagged)
        # The server drained what was left when it stopped.
        figures.ledger_rows_final = await self.ledger.count_transactions()
        left = (await self.reader.lag()).entries
        if left:
            figures.problems.append(f"{left:,} outbox entries were left after the lag server stopped")

    def _count_approvals(self, figures: LedgerFigures, result: PhaseResult) -> None:
        amount = self.options.amount_micros
        figures.approvals += result.approved_micros // amount
        figures.approvals_unknown += result.unknown_outcomes

    async def _drain(self, figures: LedgerFigures, url: str, writers: int) -> None:
        """Step 2: start ``spendgate ledger --writers N`` and time it draining the outbox."""
        bench = self.bench
        figures.entries = initial = (await self.reader.lag()).entries
        bench.say(f"phase [bold]ledger[/]: spendgate ledger --writers {writers} drains {initial:,} outbox entries")
        if not initial:
            figures.problems.append("the outbox was empty after step 1: nothing to drain")
            return
        redis_url = bench.redis.url if bench.redis is not None else ""
        redis_cpu: Callable[[], float | None] = bench.redis.cpu_s if bench.redis is not None else (lambda: None)
        environment = {**self._environment(url, writers), "SPENDGATE_REDIS_URL": redis_url}
        environment |= {"SPENDGATE_LOG_LEVEL": "WARNING", "SPENDGATE_LOG_FORMAT": "text"}
        launched = time.monotonic()
        process = _WriterProcess(writers, environment, bench.work_dir / "ledger-writer.log")

        def snapshot(entries: int) -> _Snapshot:
            return _Snapshot(
                at=time.monotonic(),
                entries=entries,
                writer_cpu_s=process.cpu_s(),
                redis_cpu_s=redis_cpu(),
                harness_cpu_s=_own_cpu_s(),
                postgres_cpu_s=postgres_cpu_s(),
                machine_cpu_s=machine_busy_cpu_s(),
            )

        first: _Snapshot | None = None
        last: _Snapshot | None = None
        try:
            deadline = launched + DRAIN_TIMEOUT_S
            while True:
                lag: OutboxLag = await self.reader.lag()
                now = time.monotonic()
                figures.drain_samples.append((round(now - launched, 4), lag.entries))
                if first is None and lag.entries < initial:
                    first = snapshot(lag.entries)
                if lag.entries == 0:
                    last = snapshot(0)
                    break
                if failure := process.failed():
                    raise RuntimeError(failure)
                if now > deadline:
                    raise RuntimeError(f"the writer did not drain {initial:,} entries within {DRAIN_TIMEOUT_S:.0f} s")
                await asyncio.sleep(DRAIN_POLL_INTERVAL_S)
        finally:
            await asyncio.get_running_loop().run_in_executor(None, process.stop)
        if first is None or last is None:
            return
        figures.writer_start_s = first.at - launched
        figures.first_batch_entries = initial - first.entries
        if first.entries == 0 or last.at <= first.at:
            figures.notes.append(
                f"the writer drained all {initial:,} entries in its first batch: too few to time its rate; "
                "run longer phases (--duration)"
            )
            return
        # From the first commit to the empty outbox: what the writer sustains, its start-up left out.
        figures.writer_drain_s = last.at - first.at
        figures.writer_entries_per_s = first.entries / figures.writer_drain_s
        figures.writer_cpu_s = _delta(first.writer_cpu_s, last.writer_cpu_s)
        figures.redis_cpu_s = _delta(first.redis_cpu_s, last.redis_cpu_s)
        figures.harness_cpu_s = _delta(first.harness_cpu_s, last.harness_cpu_s)
        figures.database_cpu_s = _delta(first.postgres_cpu_s, last.postgres_cpu_s)
        machine = _delta(first.machine_cpu_s, last.machine_cpu_s)
        if machine is not None:
            known = (figures.writer_cpu_s, figures.redis_cpu_s, figures.harness_cpu_s, figures.database_cpu_s)
            figures.other_cpu_s = max(0.0, machine - sum(value or 0.0 for value in known))

    async def _sample(self, samples: list[LagSample], started: float) -> None:
        """Sample the lag every LAG_SAMPLE_INTERVAL_S until cancelled."""
        while True:
            try:
                lag = await self.reader.lag()
            except (redis.exceptions.RedisError, OSError, TimeoutError):
                # One missed sample is no reason to give up the phase; the next one comes in LAG_SAMPLE_INTERVAL_S.
                lag = None
            if lag is not None:
                at = time.monotonic() - started
                samples.append(LagSample(round(at, 3), lag.entries, lag.oldest_age_ms, loading=True))
            await asyncio.sleep(LAG_SAMPLE_INTERVAL_S)

    async def _settle(
        self, sampler: asyncio.Task[None], samples: list[LagSample], started: float, load_s: float
    ) -> float | None:
        """After the load: sample until the outbox is empty; return how long after the load's end that was."""
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        while time.monotonic() < deadline:
            lag = await self.reader.lag()
            at = time.monotonic() - started
            samples.append(LagSample(round(at, 3), lag.entries, lag.oldest_age_ms, loading=False))
            if lag.entries == 0:
                return max(0.0, at - load_s)
            await asyncio.sleep(SETTLE_SAMPLE_INTERVAL_S)
        return None


@dataclasses.dataclass(frozen=True, slots=True)
class _Snapshot:
    """Where the drain stood at one poll, and the CPU everyone had used by then."""

    at: float
    entries: int
    writer_cpu_s: float | None
    redis_cpu_s: float | None
    harness_cpu_s: float
    postgres_cpu_s: float | None
    machine_cpu_s: float | None


def _own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def postgres_cpu_s() -> float | None:
    """CPU seconds used so far by every process named ``postgres`` on this machine (None without /proc).

    Backends of other users of the same server count too: on a shared machine the figure is an upper bound.
    """
    proc = pathlib.Path("/proc")
    if not proc.is_dir():
        return None
    total = 0.0
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if stat[stat.find("(") + 1 : stat.rfind(")")].startswith("postgres"):
            total += process_cpu_s(int(entry.name)) or 0.0
    return total


def _delta(before: float | None, after: float | None) -> float | None:
    return None if before is None or after is None else after - before


async def run_ledger_phase(bench: Bench, fleet: Fleet) -> LedgerFigures | None:
    """Run the ledger phase for a benchmark (see the module's docstring)."""
    return await LedgerPhase(bench, fleet).run()


def _cores(cpu_s: float | None, seconds: float) -> str:
    return "-" if cpu_s is None or seconds <= 0 else f"{cpu_s / seconds:.2f}"


def print_ledger(figures: LedgerFigures, console: Console) -> None:
    """The ledger phase's figures: server and writer side by side, the ratio, the lag under load."""
    table = Table(
        title=f"Ledger phase: into PostgreSQL {figures.database}, {figures.writers} writer loop(s)",
        title_justify="left",
    )
    for column in ("step", "rate", "entries", "seconds", "cores busy / lag"):
        table.add_column(column, justify="left" if column in ("step", "cores busy / lag") else "right", no_wrap=True)
    table.add_row(
        "server, no writer", f"{figures.server_calls_per_s:,.0f} calls/s", "", "", "(see ledger-server above)"
    )
    drain = figures.writer_drain_s
    table.add_row(
        f"spendgate ledger --writers {figures.writers}",
        f"{figures.writer_entries_per_s:,.0f} entries/s",
        f"{figures.entries:,}",
        f"{drain:.2f}",
        f"writer {_cores(figures.writer_cpu_s, drain)}, postgres {_cores(figures.database_cpu_s, drain)}, "
        f"redis {_cores(figures.redis_cpu_s, drain)}, harness {_cores(figures.harness_cpu_s, drain)}, "
        f"other {_cores(figures.other_cpu_s, drain)}",
    )
    settle = f"not empty within {SETTLE_TIMEOUT_S:.0f} s" if figures.settle_s is None else f"{figures.settle_s:.2f} s"
    table.add_row(
        f"server + writers @{figures.lag_rate_target:,.0f}/s",
        f"{figures.lag_calls_per_s:,.0f} calls/s",
        f"{figures.lag_max_entries:,}",
        f"{figures.lag_load_s:.1f}",
        f"max lag {figures.lag_max_entries:,} entries, oldest {figures.lag_max_age_ms:,} ms",
    )
    console.print(table)
    ratio = figures.ratio
    if ratio is not None:
        verdict = "green]met" if ratio >= RATIO_TARGET else "red]not met"
        console.print(
            f"  writer = [bold]{ratio:.1f}x[/] the server's authorize-and-capture throughput "
            f"(target {RATIO_TARGET:g}x: [{verdict}[/]); its first batch committed {figures.writer_start_s:.2f} s "
            f"after launch and is left out of the rate",
            highlight=False,
        )
    bounded = "green]bounded" if figures.lag_bounded else "red]not bounded"
    console.print(
        f"  lag under load: [{bounded}[/] (max {figures.lag_max_entries:,} entries, oldest {figures.lag_max_age_ms:,} "
        f"ms; empty {settle} after the load, bound {SETTLE_BOUND_S:g} s)",
        highlight=False,
    )
    if figures.exactly_once:
        console.print(
            f"[bold green]PASS[/] ledger exactly once: {figures.ledger_rows_after_drain:,} rows for "
            f"{figures.entries:,} outbox entries after the drain, {figures.ledger_rows_final:,} for "
            f"{figures.approvals:,} approvals in the end",
            highlight=False,
        )
    else:
        console.print(
            f"[bold red]FAIL[/] ledger rows {figures.ledger_rows_after_drain:,} after the drain for "
            f"{figures.entries:,} outbox entries; {figures.ledger_rows_final:,} in the end for "
            f"{figures.approvals:,} approvals (+ up to {figures.approvals_unknown:,} unknown)",
            highlight=False,
        )
    for problem in figures.problems:
        console.print(f"  [red]ledger phase:[/] {problem}", highlight=False)
    for note in figures.notes:
        console.print(f"  note: {note}", highlight=False)
