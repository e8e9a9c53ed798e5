"""Runs a benchmark: sets up the fleet and the servers, runs the phases, checks the budgets.

The phases (``--phases`` picks some of them); the ceilings run first, before spendgate's server starts:

``empty-unary``      the ceiling: an empty unary handler on the same server stack, closed loop
``empty-stream``     the streaming ceiling: an empty ``AuthorizeStream`` handler
``empty-unary-metrics``  the empty handler with spendgate's metrics interceptor (not run by default)
``unary``            unary ``Authorize`` on spendgate (closed loop, or open loop at ``--rate``)
``unary-half``       unary ``Authorize``, open loop at half the throughput ``unary`` reached (latency at load)
``stream``           ``AuthorizeStream`` on spendgate
``redis``            the authorize script straight at Redis, one EVALSHA per round trip, ``concurrency`` callers
``redis-pipelined``  the same, ``--batch`` scripts per pipelined round trip
``exhaust``          unary ``Authorize`` with a large amount, so limits bite under load before the check
``ledger``           the ledger writer's entries/s into PostgreSQL against the server's one-shot calls/s, and the
                     lag under load (:mod:`spendgate.bench.ledger_phase`; runs last, on servers of its own)

Every phase warms up, then measures for ``duration_s``; the generator processes, the server and
redis-server report their CPU time over the measured window.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import os
import pathlib
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING, Any

from rich.console import Console

from spendgate.bench.check import CheckResult, check_budgets, wallets_lifetime_micros
from spendgate.bench.fleet import Fleet, find_example_fleet, generate_fleet, load_fleet
from spendgate.bench.loadgen import CLIENTS, GeneratorPool, LoadJob
from spendgate.bench.profile import summarise
from spendgate.bench.servers import (
    RedisServer,
    ServerProcess,
    empty_server,
    find_redis_server,
    free_port,
    machine_busy_cpu_s,
    process_rss_bytes,
    spendgate_server,
)
from spendgate.bench.stats import PhaseResult
from spendgate.settings import STANDALONE_LEDGER_WRITERS

if TYPE_CHECKING:
    from spendgate.bench.ledger_phase import LedgerFigures

ALL_PHASES = (
    "empty-unary",
    "unary",
    "unary-half",
    "empty-stream",
    "stream",
    "redis",
    "redis-pipelined",
    "exhaust",
    "ledger",
    "empty-unary-metrics",
)
DEFAULT_PHASES = ALL_PHASES[:-1]
# Phases that spend on the server under test (the others hit the empty server or the benchmark's Redis).
SERVER_PHASES = frozenset({"unary", "unary-half", "stream", "exhaust"})
REDIS_PHASES = frozenset({"redis", "redis-pipelined"})
EMPTY_PHASES = frozenset({"empty-unary", "empty-stream", "empty-unary-metrics"})
# Seconds between sending the jobs and the phase starting (every process must have its job by then).
PHASE_LEAD_S = 0.3
# Seconds a generator process may take beyond the phase to drain its calls and answer.
PHASE_DRAIN_S = 30.0
OPEN_LOOP_IN_FLIGHT_MIN = 256
# Bounds on what a run may ask for.
CONCURRENCY_MAX = 100_000
PROCESSES_MAX = 64
STREAMS_MAX = 256
BATCH_SIZE_MAX = 10_000
LEDGER_WRITERS_MAX = 64
# Other load (cores busy outside the benchmark) above which a phase's figures are called noisy.
OTHER_CORES_NOISY = 0.25
# py-spy's sampling rate: enough samples in a few seconds, few enough pauses to leave the server's speed alone.
PY_SPY_RATE_HZ = 100


@dataclasses.dataclass(frozen=True, slots=True)
class BenchOptions:
    """Everything a benchmark run can be told (see ``spendgate bench --help``)."""

    target: str = ""
    token: str = ""
    embedded: bool = False
    plans: tuple[str, ...] = ()
    accounts: int = 0
    pools: int = 0
    wallets: int = 0
    apply_plan: bool = False
    concurrency: int = 64
    stream_concurrency: int = 0
    rate: float = 0.0
    one_shot: bool = True
    duration_s: float = 5.0
    warmup_s: float = 1.0
    processes: int = 2
    streams: int = 4
    amount_micros: int = 1
    exhaust_amount_micros: int = 250_000
    batch_size: int = 64
    phases: tuple[str, ...] = DEFAULT_PHASES
    timeout_s: float = 5.0
    redis_server: str = ""
    # Whether the server and the generators reach the benchmark's Redis over a Unix socket (else TCP).
    redis_unix_socket: bool = False
    json_path: str = ""
    work_dir: str = ""
    py_spy_dir: str = ""
    # SPENDGATE_* settings for the server this run starts (not for --target).
    server_environment: tuple[tuple[str, str], ...] = ()
    # The ledger phase: a PostgreSQL URL it may create (and drop) a database through, and its writer loops.
    database_url: str = ""
    ledger_writers: int = STANDALONE_LEDGER_WRITERS
    # The gRPC client of the unary and stream phases: the benchmark's own HTTP/2 client, or grpcio.
    client: str = "h2"

    def __post_init__(self) -> None:
        unknown = [phase for phase in self.phases if phase not in ALL_PHASES]
        if unknown:
            raise ValueError(f"unknown phase(s) {', '.join(unknown)}; the phases are {', '.join(ALL_PHASES)}")
        if self.client not in CLIENTS:
            raise ValueError(f"unknown client {self.client!r}; the clients are {', '.join(CLIENTS)}")
        if self.target and self.embedded:
            raise ValueError("--target drives a running server and --embedded starts one: pick one")
        for name in ("concurrency", "processes", "streams", "amount_micros", "batch_size", "ledger_writers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        for name, bound in (
            ("concurrency", CONCURRENCY_MAX),
            ("stream_concurrency", CONCURRENCY_MAX),
            ("processes", PROCESSES_MAX),
            ("streams", STREAMS_MAX),
            ("batch_size", BATCH_SIZE_MAX),
            ("ledger_writers", LEDGER_WRITERS_MAX),
        ):
            if getattr(self, name) > bound:
                raise ValueError(f"{name} must be at most {bound:,}")
        if self.duration_s <= 0 or self.warmup_s < 0 or self.rate < 0:
            raise ValueError("the duration must be positive, the warm-up and the rate not negative")
        if (self.accounts or self.pools or self.wallets) and self.plans:
            raise ValueError("give plan files or a generated fleet (--accounts/--pools/--wallets), not both")
        if self.database_url and not self.database_url.startswith(("postgresql://", "postgres://")):
            raise ValueError("--database-url must be a postgresql://user@host:port/database URL")

    @property
    def generated(self) -> bool:
        """Whether the fleet is generated."""
        return bool(self.accounts or self.pools or self.wallets)

    @property
    def mode(self) -> str:
        """How the server under test runs: target, embedded or subprocess."""
        return "target" if self.target else "embedded" if self.embedded else "subprocess"


@dataclasses.dataclass(slots=True)
class BenchReport:
    """Everything a run measured."""

    options: BenchOptions
    system: dict[str, Any] = dataclasses.field(default_factory=dict)
    phases: dict[str, PhaseResult] = dataclasses.field(default_factory=dict)
    amounts: dict[str, int] = dataclasses.field(default_factory=dict)
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)
    check: CheckResult | None = None
    # py-spy summaries of the server per phase (with --py-spy).
    profiles: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)
    # The ledger phase's figures, when it ran.
    ledger: LedgerFigures | None = None

    def throughput(self, phase: str) -> float | None:
        """A phase's calls per second, if it ran."""
        result = self.phases.get(phase)
        return result.throughput if result is not None and result.calls else None

    def ratios(self) -> dict[str, float | None]:
        """The headline ratios: spendgate against its ceilings."""

        def ratio(numerator: str, denominator: str, scale: float = 100.0) -> float | None:
            top, bottom = self.throughput(numerator), self.throughput(denominator)
            return round(scale * top / bottom, 1 if scale == 100.0 else 2) if top and bottom else None

        return {
            "unary_vs_empty_unary_pct": ratio("unary", "empty-unary"),
            "stream_vs_empty_stream_pct": ratio("stream", "empty-stream"),
            "stream_vs_unary_x": ratio("stream", "unary", 1.0),
            "empty_stream_vs_empty_unary_x": ratio("empty-stream", "empty-unary", 1.0),
            "unary_vs_redis_unpipelined_pct": ratio("unary", "redis"),
            "redis_pipelined_vs_unpipelined_x": ratio("redis-pipelined", "redis", 1.0),
            "empty_unary_metrics_vs_empty_unary_pct": ratio("empty-unary-metrics", "empty-unary"),
        }

    @property
    def passed(self) -> bool:
        """Whether the end-of-run check (and the ledger phase's exactly-once check) passed; none run passes."""
        return (self.check is None or self.check.passed) and (self.ledger is None or self.ledger.passed)

    def to_json(self) -> dict[str, Any]:
        """Every figure, for ``--json``."""
        options = dataclasses.asdict(self.options)
        options["token"] = "<set>" if self.options.token else ""
        return {
            "version": 1,
            "options": options,
            "system": self.system,
            "phases": {name: result.to_json() for name, result in self.phases.items()},
            "skipped": self.skipped,
            "ratios": self.ratios(),
            "check": self.check.to_json() if self.check else None,
            "profiles": self.profiles,
            "ledger": self.ledger.to_json() if self.ledger else None,
            "passed": self.passed,
            "notes": self.notes,
        }


@dataclasses.dataclass(slots=True)
class _ServerUnderTest:
    """The spendgate server the phases drive, however it runs."""

    target: str
    token: str
    cpu_s: Callable[[], float | None]
    rss_bytes: Callable[[], int | None]
    pid: int | None
    # Whether the server's budgets started from nothing this run (so the money check needs no snapshot).
    fresh: bool


def _own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _apply_directly(redis_url: str, fleet: Fleet, plans: slice, *, key_prefix: str = "sg") -> float:
    """Apply plans straight into the benchmark's own Redis with the server's own code; returns seconds."""
    from spendgate.admin import AdminCore
    from spendgate.app import build_store
    from spendgate.clock import SystemClock
    from spendgate.core import SpendCore
    from spendgate.settings import Settings

    store = build_store(Settings(redis_url=redis_url, redis_timeout_s=30.0, key_prefix=key_prefix))
    clock = SystemClock()
    admin = AdminCore(store, SpendCore(store, clock), clock)
    started = time.perf_counter()
    try:
        for plan in fleet.plans[plans]:
            await admin.apply_plan(plan, actor="spendgate bench")
    finally:
        await store.close()
    return time.perf_counter() - started


class Bench:
    """One benchmark run."""

    def __init__(self, options: BenchOptions, console: Console) -> None:
        self.options = options
        self.console = console
        self.report = BenchReport(options)
        self.run_id = uuid.uuid4().hex[:8]
        self.redis: RedisServer | None = None
        self.pool: GeneratorPool | None = None
        self.fleet: Fleet | None = None
        self.work_dir = pathlib.Path(options.work_dir or tempfile.mkdtemp(prefix="spendgate-bench-"))
        self.work_dir.mkdir(parents=True, exist_ok=True)

    @property
    def _pool(self) -> GeneratorPool:
        if self.pool is None:
            raise RuntimeError("the generator processes start before any phase runs")
        return self.pool

    def say(self, message: str) -> None:
        """Progress, for the person watching."""
        self.console.print(f"[dim]{time.strftime('%H:%M:%S')}[/] {message}", highlight=False)

    # ------------------------------------------------------------------------------------------------
    # Set-up.

    def _fleet(self) -> Fleet:
        options = self.options
        if options.generated:
            fleet = generate_fleet(
                self.work_dir / "fleet", max(1, options.accounts), max(1, options.pools), max(1, options.wallets)
            )
        elif options.plans:
            fleet = load_fleet([pathlib.Path(path) for path in options.plans])
        else:
            example = find_example_fleet()
            if example is None:
                raise ValueError("no examples/fleet.yaml here: pass --plan FILE or generate a fleet with --wallets")
            fleet = load_fleet([example])
        return fleet

    def _describe_system(self, fleet: Fleet) -> None:
        self.report.system.update(
            {
                "started_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                "machine": {
                    "cpus": os.cpu_count(),
                    "python": platform.python_version(),
                    "platform": platform.platform(terse=True),
                },
                "mode": self.options.mode,
                "fleet": {"source": fleet.source, **fleet.counts()},
                "work_dir": str(self.work_dir),
            }
        )

    @contextlib.asynccontextmanager
    async def _server_under_test(self, fleet: Fleet) -> AsyncIterator[_ServerUnderTest]:
        options = self.options
        system = self.report.system
        if options.target:
            system["target"] = options.target
            if options.apply_plan:
                system["plan_apply_s"] = round(await self._apply_over_api(fleet), 3)
            yield _ServerUnderTest(options.target, options.token, lambda: None, lambda: None, None, fresh=False)
            return
        if options.embedded:
            async with self._embedded(fleet) as server:
                yield server
            return
        if self.redis is None:
            raise RuntimeError("starting a server needs a redis-server binary (--redis-server PATH), or --embedded")
        if len(fleet.plans) > 1:
            self.say(f"applying {len(fleet.plans) - 1} more account plan(s) straight into the benchmark's Redis")
            system["plan_apply_s"] = round(await _apply_directly(self.redis.url, fleet, slice(1, None)), 3)
        port = free_port()
        self.say(f"starting spendgate serve on port {port} (plan {fleet.plan_paths[0].name})")
        process = spendgate_server(
            port,
            self.redis.url,
            str(fleet.plan_paths[0]),
            self.work_dir / "server.log",
            extra_environment=self._server_environment(),
        )
        try:
            wallets = len(fleet.wallet_ids)
            await asyncio.get_running_loop().run_in_executor(None, process.wait_serving, 60.0 + wallets / 500)
            system["server_start_s"] = round(process.start_s, 3)
            system["server_pid"] = process.pid
            yield _ServerUnderTest(process.target, "", process.cpu_s, process.rss_bytes, process.pid, fresh=True)
        finally:
            process.stop()

    def _server_environment(self) -> dict[str, str]:
        """The server's SPENDGATE_* settings: its own data directory (its ledger), then the user's.

        The server runs no ledger writer of its own, as the README advises for a busy deployment: writers run
        as `spendgate ledger` processes, and the ledger phase measures them. (A writer inside the server would
        take its CPU from the hot path measured here; ``--server-env SPENDGATE_LEDGER_WRITERS=1`` puts it back.)
        """
        return {
            "SPENDGATE_DATA_DIR": str(self.work_dir / "data"),
            "SPENDGATE_LEDGER_WRITERS": "0",
            **dict(self.options.server_environment),
        }

    @contextlib.asynccontextmanager
    async def _embedded(self, fleet: Fleet) -> AsyncIterator[_ServerUnderTest]:
        from spendgate.app import running_server
        from spendgate.settings import load_settings

        redis_url = self.redis.url if self.redis is not None else ""
        # The settings `spendgate serve` would have (load_settings), with auth off like the subprocess server.
        environment = {"SPENDGATE_AUTH": "off", **self._server_environment()}
        settings = load_settings(
            environment, host="127.0.0.1", port=free_port(), plan=str(fleet.plan_paths[0]), redis_url=redis_url
        )
        self.report.system["store"] = "redis" if redis_url else "fakeredis (in-process)"
        self.say(f"starting an embedded server on port {settings.port} ({self.report.system['store']})")
        started = time.perf_counter()
        async with running_server(settings) as server:
            self.report.system["server_start_s"] = round(time.perf_counter() - started, 3)
            if len(fleet.plans) > 1:
                applied = time.perf_counter()
                for plan in fleet.plans[1:]:
                    await server.admin.apply_plan(plan, actor="spendgate bench")
                self.report.system["plan_apply_s"] = round(time.perf_counter() - applied, 3)
            # The server shares this process: its CPU is this process's (the generators run elsewhere).
            yield _ServerUnderTest(server.address, "", _own_cpu_s, lambda: process_rss_bytes(os.getpid()), None, True)

    async def _apply_over_api(self, fleet: Fleet) -> float:
        from spendgate.client import AdminClient

        def apply() -> float:
            started = time.perf_counter()
            with AdminClient(self.options.target, token=self.options.token or None, timeout_s=600.0) as admin:
                for path in fleet.plan_paths:
                    for _ in admin.apply_plan(path.read_text()):
                        pass
            return time.perf_counter() - started

        self.say(f"applying {len(fleet.plan_paths)} plan(s) to {self.options.target}")
        return await asyncio.get_running_loop().run_in_executor(None, apply)

    # ------------------------------------------------------------------------------------------------
    # Phases.

    def _jobs(self, name: str, template: LoadJob, concurrency: int, rate: float) -> list[LoadJob]:
        """One job per generator process, the concurrency and the rate split evenly."""
        processes = min(self._pool.size, concurrency)
        start_at = time.time() + PHASE_LEAD_S
        jobs = []
        for index in range(processes):
            share = concurrency // processes + (1 if index < concurrency % processes else 0)
            jobs.append(
                dataclasses.replace(
                    template,
                    process_index=index,
                    processes=processes,
                    key_prefix=f"b{self.run_id}-{name}-{index}-",
                    concurrency=share,
                    rate_per_s=rate / processes,
                    start_at=start_at,
                    warmup_s=self.options.warmup_s,
                    duration_s=self.options.duration_s,
                )
            )
        return jobs

    async def _phase(
        self,
        name: str,
        description: str,
        template: LoadJob,
        *,
        concurrency: int,
        rate: float = 0.0,
        server_cpu: Callable[[], float | None] | None = None,
        server_pid: int | None = None,
    ) -> PhaseResult:
        options = self.options
        jobs = self._jobs(name, template, concurrency, rate)
        loop_kind = f"open loop at {rate:,.0f}/s" if rate else "closed loop"
        self.say(f"phase [bold]{name}[/]: {description} ({loop_kind}, {concurrency} in flight)")
        result = PhaseResult(name=name, description=description, concurrency=concurrency, rate_target=rate)
        result.batch_size = template.batch_size
        timeout_s = PHASE_LEAD_S + options.warmup_s + options.duration_s + options.timeout_s + PHASE_DRAIN_S
        running = asyncio.ensure_future(self._pool.run(jobs, timeout_s))
        measure_from = jobs[0].start_at + options.warmup_s
        redis_cpu = self.redis.cpu_s if self.redis is not None else (lambda: None)
        server_cpu = server_cpu or (lambda: None)
        await asyncio.sleep(max(0.0, measure_from - time.time()))
        if self.redis is not None:
            self.redis.reset_stats()
        server_before, redis_before, machine_before = server_cpu(), redis_cpu(), machine_busy_cpu_s()
        with self._profile(name, server_pid):
            await asyncio.sleep(max(0.0, measure_from + options.duration_s - time.time()))
        server_after, redis_after, machine_after = server_cpu(), redis_cpu(), machine_busy_cpu_s()
        if self.redis is not None:
            result.redis_scripts, result.redis_script_usec = self.redis.script_stats()
            # Only where the calls ran scripts in this Redis: the empty-handler phases send it none.
            result.redis_round_trips = self.redis.round_trips() if result.redis_scripts else None
        for worker_result in await running:
            result.add(worker_result)
        if server_before is not None and server_after is not None:
            result.server_cpu_s = server_after - server_before
        if redis_before is not None and redis_after is not None:
            result.redis_cpu_s = redis_after - redis_before
        if machine_before is not None and machine_after is not None:
            result.machine_cpu_s = machine_after - machine_before
        for failure in result.failures:
            self.console.print(f"  [red]generator failed:[/] {failure}", highlight=False)
        self.report.phases[name] = result
        self.report.amounts[name] = template.amount_micros
        return result

    @contextlib.contextmanager
    def _profile(self, phase: str, pid: int | None) -> Iterator[None]:
        """Sample the server with py-spy over the measured window (with ``--py-spy DIR``).

        Writes py-spy's collapsed stacks (``server-<phase>.txt``; speedscope and flamegraph.pl read them) and
        keeps a per-function summary for the report.
        """
        py_spy = str(pathlib.Path(sys.executable).parent / "py-spy")
        py_spy = py_spy if os.access(py_spy, os.X_OK) else shutil.which("py-spy") or ""
        if not self.options.py_spy_dir or pid is None or not py_spy:
            yield
            return
        directory = pathlib.Path(self.options.py_spy_dir)
        directory.mkdir(parents=True, exist_ok=True)
        output = directory / f"server-{phase}.txt"
        # --native shows the time in gRPC's C core and Cython, where most of it goes; it pauses the server for
        # each sample, so a profiled phase runs a little slower than an unprofiled one.
        command = [py_spy, "record", "--pid", str(pid), "--output", str(output), "--format", "raw", "--native"]
        command += ["--rate", str(PY_SPY_RATE_HZ), "--duration", str(max(1, int(self.options.duration_s)))]
        recorder = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # noqa: S603
        try:
            yield
        finally:
            try:
                recorder.wait(self.options.duration_s + 30)
            except subprocess.TimeoutExpired:
                recorder.kill()
                recorder.wait()
            if output.is_file():
                self.report.profiles[phase] = {"file": str(output), **summarise(output.read_text())}

    def _template(self, kind: str, target: str, token: str, amount_micros: int) -> LoadJob:
        if self.fleet is None:
            raise RuntimeError("the fleet is loaded before any phase runs")
        return LoadJob(
            kind=kind,
            process_index=0,
            key_prefix="",
            wallets=self.fleet.wallet_ids,
            amount_micros=amount_micros,
            one_shot=self.options.one_shot,
            currency=self.fleet.plans[0].currency,
            timeout_s=self.options.timeout_s,
            target=target,
            token=token,
            streams=self.options.streams,
            redis_url=self.redis.url if self.redis is not None else "",
            client=self.options.client,
        )

    async def _empty_phases(self, phases: list[str]) -> None:
        options = self.options
        for metrics, names in ((False, ("empty-unary", "empty-stream")), (True, ("empty-unary-metrics",))):
            wanted = [name for name in names if name in phases]
            if not wanted:
                continue
            port = free_port()
            process = empty_server(port, self.work_dir / f"empty-server-{port}.log", metrics_interceptor=metrics)
            try:
                await asyncio.get_running_loop().run_in_executor(None, process.wait_serving, 30.0)
                for name in wanted:
                    await self._empty_phase(name, process, options.amount_micros)
            finally:
                process.stop()

    async def _empty_phase(self, name: str, process: ServerProcess, amount_micros: int) -> None:
        stream = name == "empty-stream"
        template = self._template("stream" if stream else "unary", process.target, "", amount_micros)
        description = {
            "empty-unary": "empty unary handler (the ceiling)",
            "empty-stream": "empty AuthorizeStream handler (the streaming ceiling)",
            "empty-unary-metrics": "empty unary handler with the metrics interceptor",
        }[name]
        concurrency = self._stream_concurrency() if stream else self.options.concurrency
        await self._phase(
            name, description, template, concurrency=concurrency, server_cpu=process.cpu_s, server_pid=process.pid
        )

    def _stream_concurrency(self) -> int:
        return self.options.stream_concurrency or self.options.concurrency

    async def _server_phases(self, phases: list[str], server: _ServerUnderTest) -> None:
        options = self.options
        flow = "one-shot" if options.one_shot else "authorize+capture"
        cpu, pid = server.cpu_s, server.pid
        if "unary" in phases:
            template = self._template("unary", server.target, server.token, options.amount_micros)
            await self._phase(
                "unary",
                f"unary Authorize, {flow}",
                template,
                concurrency=options.concurrency,
                rate=options.rate,
                server_cpu=cpu,
                server_pid=pid,
            )
        if "unary-half" in phases:
            reached = self.report.throughput("unary")
            if reached:
                template = self._template("unary", server.target, server.token, options.amount_micros)
                await self._phase(
                    "unary-half",
                    f"unary Authorize, {flow}, at half the unary throughput",
                    template,
                    concurrency=max(options.concurrency, OPEN_LOOP_IN_FLIGHT_MIN),
                    rate=reached / 2,
                    server_cpu=cpu,
                    server_pid=pid,
                )
            else:
                self.report.skipped["unary-half"] = "needs the unary phase's throughput"

    async def _stream_phase(self, server: _ServerUnderTest) -> None:
        flow = "one-shot" if self.options.one_shot else "authorize+capture"
        template = self._template("stream", server.target, server.token, self.options.amount_micros)
        await self._phase(
            "stream",
            f"AuthorizeStream, {flow}",
            template,
            concurrency=self._stream_concurrency(),
            rate=self.options.rate,
            server_cpu=server.cpu_s,
            server_pid=server.pid,
        )

    async def _redis_phases(self, phases: list[str]) -> None:
        options = self.options
        for name in ("redis", "redis-pipelined"):
            if name not in phases:
                continue
            if self.redis is None:
                self.report.skipped[name] = "needs a redis-server binary (--redis-server PATH)"
                continue
            batch = options.batch_size if name == "redis-pipelined" else 1
            template = dataclasses.replace(
                self._template("redis", "", "", options.amount_micros), batch_size=batch, one_shot=True
            )
            description = (
                f"authorize script straight at Redis, pipelines of {batch}"
                if batch > 1
                else "authorize script straight at Redis, one EVALSHA per round trip"
            )
            concurrency = max(1, min(options.concurrency, 8)) if batch > 1 else options.concurrency
            await self._phase(name, description, template, concurrency=concurrency)

    async def _exhaust_phase(self, server: _ServerUnderTest) -> None:
        options = self.options
        template = self._template("unary", server.target, server.token, options.exhaust_amount_micros)
        await self._phase(
            "exhaust",
            "unary Authorize with a large amount, until limits bite",
            template,
            concurrency=options.concurrency,
            server_cpu=server.cpu_s,
            server_pid=server.pid,
        )

    # ------------------------------------------------------------------------------------------------
    # The run.

    async def run(self) -> BenchReport:
        """Run the whole benchmark and return what it measured."""
        options = self.options
        phases = list(options.phases)
        if options.target and options.phases == DEFAULT_PHASES:
            # Spending a server's budgets to their limits is for servers this run started, unless asked for.
            phases.remove("exhaust")
            self.report.skipped["exhaust"] = "not run against --target unless named in --phases"
            if "ledger" in phases:
                # The ledger phase never touches the target: it measures servers of its own, on this machine.
                phases.remove("ledger")
                self.report.skipped["ledger"] = "not run against --target unless named in --phases"
        self.fleet = fleet = self._fleet()
        self._describe_system(fleet)
        binary = find_redis_server(options.redis_server)
        if binary:
            self.redis = RedisServer(binary, unix_socket=options.redis_unix_socket)
            self.report.system["redis_server"] = {
                "binary": binary,
                "port": self.redis.port,
                "pid": self.redis.pid,
                "url": self.redis.url,
            }
        self.pool = GeneratorPool(options.processes)
        finished = False
        try:
            self.say(f"starting {options.processes} load generator process(es)")
            await asyncio.get_running_loop().run_in_executor(None, self.pool.start)
            await self._run_phases(fleet, phases)
            finished = True
        finally:
            self.pool.close()
            if self.redis is not None:
                self.redis.stop()
            if finished and self.report.passed and not options.work_dir:
                # A temporary directory of a run that went well holds nothing worth keeping.
                shutil.rmtree(self.work_dir, ignore_errors=True)
                self.report.system.pop("work_dir", None)
            else:
                self.say(f"plans, server logs and the server's ledger are in {self.work_dir}")
        return self.report

    async def _run_phases(self, fleet: Fleet, phases: list[str]) -> None:
        options = self.options
        system = self.report.system
        if self.redis is not None:
            system["redis_used_memory_empty_bytes"] = self.redis.used_memory_bytes()
        await self._empty_phases(phases)
        async with self._server_under_test(fleet) as server:
            if self.redis is not None and options.target:
                # The Redis ceilings need the fleet in the benchmark's own Redis.
                await _apply_directly(self.redis.url, fleet, slice(None))
            if self.redis is not None:
                used = self.redis.used_memory_bytes()
                system["redis_used_memory_idle_fleet_bytes"] = used
                grown = used - system["redis_used_memory_empty_bytes"]
                system["redis_bytes_per_node"] = round(grown / max(1, fleet.counts()["nodes"]), 1)
            lifetime_before: int | None = 0 if server.fresh else None
            if not server.fresh and any(phase in SERVER_PHASES for phase in phases):
                try:
                    lifetime_before = await wallets_lifetime_micros(server.target, server.token, fleet.wallet_ids)
                except RuntimeError as error:
                    self.report.notes.append(f"money check skipped: {error}")
            await self._server_phases(phases, server)
            if "stream" in phases:
                await self._stream_phase(server)
            await self._redis_phases(phases)
            if "exhaust" in phases:
                await self._exhaust_phase(server)
            rss = server.rss_bytes()
            if rss is not None:
                system["server_rss_bytes"] = rss
            self.say(f"checking the budgets of {len(fleet.node_ids):,} nodes")
            counted = SERVER_PHASES | (REDIS_PHASES if server.fresh and not options.target else frozenset())
            approved = sum(result.approved_micros for name, result in self.report.phases.items() if name in counted)
            unknown = sum(
                result.unknown_outcomes * self.report.amounts[name]
                for name, result in self.report.phases.items()
                if name in counted
            )
            self.report.check = await check_budgets(
                server.target,
                server.token,
                fleet.node_ids,
                fleet.wallet_ids,
                shadow_node_ids=fleet.shadow_node_ids,
                approved_micros=approved,
                lifetime_before_micros=lifetime_before,
                unknown_micros_max=unknown,
            )
        if "ledger" in phases:
            # After the server under test has stopped: the phase starts servers and a writer of its own (and
            # imports psycopg, which the generator processes need not).
            from spendgate.bench.ledger_phase import run_ledger_phase

            self.report.ledger = await run_ledger_phase(self, fleet)
        noisy = [
            name
            for name, result in self.report.phases.items()
            # In ledger-lag, PostgreSQL (under test there) is part of the "other" load.
            if name != "ledger-lag"
            and (other := result.cores(result.other_cpu_s)) is not None
            and other > OTHER_CORES_NOISY
        ]
        if noisy:
            self.report.notes.append(
                f"other processes kept more than {OTHER_CORES_NOISY} cores busy during {', '.join(noisy)}: "
                "those figures are noisy; run again on a quiet machine"
            )


def run_bench(options: BenchOptions, console: Console) -> BenchReport:
    """Run a benchmark on a fresh event loop (uvloop, like the server) and return its report."""
    bench = Bench(options, console)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on every platform we support
        return asyncio.run(bench.run())
    return uvloop.run(bench.run())
