"""The load generator: a few processes, each running many asyncio clients, driven phase by phase.

A Python gRPC client costs about as much CPU per call as the server, so one process cannot load a server
to its limit: the parent starts ``processes`` generator processes (``spawn``, so no gRPC state is forked),
sends each the same :class:`LoadJob` with its share of the concurrency or rate, and adds up the
:class:`~spendgate.bench.stats.WorkerResult` each sends back. Requests are pre-encoded bytes
(:mod:`spendgate.bench.wire`) and responses are parsed by the C protobuf runtime, so the generator's CPU
goes to gRPC itself. Every process measures the same wall-clock window and reports its own CPU time over it
(``getrusage``), so the report can show whether the generator kept up.

A job runs closed-loop (``rate_per_s == 0``: ``concurrency`` callers, each sending its next call when the
last one is answered) or open-loop (calls start on a fixed schedule, at most ``concurrency`` in flight;
latency is measured from the scheduled start, so a generator or server that falls behind shows in it).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import math
import multiprocessing
import multiprocessing.connection
import resource
import time
import traceback
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc
import redis.asyncio as aioredis
import redis.exceptions

from spendgate._gen.spendgate.v1 import spend_pb2
from spendgate.bench.stats import LATE_START_US, Recorder, WorkerResult, record_us
from spendgate.bench.wire import (
    AUTHORIZE_METHOD,
    CAPTURE_METHOD,
    STREAM_METHOD,
    authorize_prefix,
    authorize_request,
    capture_request,
    stream_request,
)
from spendgate.core import fingerprint
from spendgate.domain import AuthorizeCommand
from spendgate.store.keys import Keys
from spendgate.store.protocol import Chain
from spendgate.store.redis_store import RedisStore, load_script_source
from spendgate.windows import windows_at

# One HTTP/2 connection carries at most this many of a process's concurrent unary calls; more get another
# connection (the server allows 256 streams per connection by default).
CALLS_PER_CONNECTION_MAX = 128
# Redis connections one generator process opens at most (one per unpipelined caller or pipeline in flight).
REDIS_CONNECTIONS_MAX = 512
# Statuses after which the server may or may not have applied the call.
_UNKNOWN_OUTCOME = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
    }
)
_STATUS_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}
_DENY_LABELS = {
    value: "denied: " + name.removeprefix("DENY_REASON_").lower() for name, value in spend_pb2.DenyReason.items()
}
APPROVED = "approved"
# The end-of-stream marker of grpc.aio reads (missing from the grpc stubs).
_EOF: Any = grpc.aio.EOF  # type: ignore[attr-defined]


def decision_label(decision: int, deny_reason: int) -> str:
    """How decisions are counted: ``approved`` or ``denied: <reason>``."""
    if decision == spend_pb2.DECISION_APPROVED:
        return APPROVED
    return _DENY_LABELS.get(deny_reason, f"denied: {deny_reason}")


@dataclasses.dataclass(frozen=True, slots=True)
class LoadJob:
    """What one generator process does in one phase."""

    # "unary" (Authorize), "stream" (AuthorizeStream), "redis" (EVALSHA of the authorize script).
    kind: str
    # Which process this is (0-based); it keeps idempotency keys and authorization ids apart.
    process_index: int
    # A run-unique text that starts every idempotency key of this phase.
    key_prefix: str
    wallets: tuple[str, ...]
    amount_micros: int
    # True: one-shot authorizations (capture=true); False: authorize, then capture each approval.
    one_shot: bool = True
    currency: str = "USD"
    # Calls in flight at once (this process's share); for an open loop, the bound on calls in flight.
    concurrency: int = 1
    # Calls per second (this process's share) for an open loop; 0 for a closed loop.
    rate_per_s: float = 0.0
    # Wall-clock time (time.time()) every process starts at, so they measure the same window.
    start_at: float = 0.0
    warmup_s: float = 1.0
    duration_s: float = 5.0
    timeout_s: float = 5.0
    target: str = ""
    token: str = ""
    # AuthorizeStream: how many streams this process opens (the concurrency is split over them).
    streams: int = 1
    redis_url: str = ""
    redis_key_prefix: str = "sg"
    # Redis: scripts per pipelined round trip (1: unpipelined, one EVALSHA per round trip).
    batch_size: int = 1
    # How many processes share the phase: each starts at its own place in the wallet list.
    processes: int = 1

    @property
    def first_wallet(self) -> int:
        """Where in the wallet list this process starts (then it goes round-robin)."""
        return self.process_index * len(self.wallets) // max(1, self.processes)


class _Window:
    """The phase's timeline in this process's ``perf_counter`` time: start, end of warm-up, end."""

    def __init__(self, job: LoadJob) -> None:
        now = time.perf_counter()
        self.begin = now + max(0.0, job.start_at - time.time())
        self.measure_from = self.begin + job.warmup_s
        self.end = self.measure_from + job.duration_s

    def measuring(self, moment: float) -> bool:
        """Whether a call that completed at ``moment`` counts."""
        return self.measure_from <= moment < self.end

    async def wait_for_start(self) -> None:
        """Sleep until the phase begins."""
        await asyncio.sleep(max(0.0, self.begin - time.perf_counter()))


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _measure_cpu(window: _Window, recorder: Recorder, duration_s: float) -> None:
    """Record this process's CPU seconds over the measured window (callbacks at its start and end)."""
    loop = asyncio.get_running_loop()
    marks: dict[str, float] = {}

    def start() -> None:
        marks["cpu"] = _cpu_s()

    def stop() -> None:
        recorder.cpu_s = _cpu_s() - marks.get("cpu", _cpu_s())

    recorder.window_s = duration_s
    loop.call_later(max(0.0, window.measure_from - time.perf_counter()), start)
    loop.call_later(max(0.0, window.end - time.perf_counter()), stop)


def _metadata(token: str) -> tuple[tuple[str, str], ...] | None:
    return (("authorization", f"Bearer {token}"),) if token else None


def _channel(target: str) -> grpc.aio.Channel:
    # A local subchannel pool gives every channel its own connection (channels to one target otherwise
    # share one), so a process's calls spread over several HTTP/2 connections.
    return grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])


async def _paced(
    window: _Window, recorder: Recorder, concurrency: int, rate_per_s: float, call: Callable[[float], Awaitable[None]]
) -> None:
    """Drive ``call(start)`` closed-loop (``rate_per_s == 0``) or open-loop until the window ends."""
    await window.wait_for_start()
    if rate_per_s <= 0:

        async def caller() -> None:
            while (now := time.perf_counter()) < window.end:
                await call(now)

        await asyncio.gather(*(caller() for _ in range(concurrency)))
        return
    slots = asyncio.Semaphore(concurrency)
    tasks: set[asyncio.Task[None]] = set()
    interval_s = 1.0 / rate_per_s

    async def run(intended: float) -> None:
        try:
            await call(intended)
        finally:
            slots.release()

    intended = window.begin
    while intended < window.end:
        delay_s = intended - time.perf_counter()
        if delay_s > 0:
            await asyncio.sleep(delay_s)
        await slots.acquire()
        if window.measuring(intended) and (time.perf_counter() - intended) * 1e6 > LATE_START_US:
            recorder.late_starts += 1
        task = asyncio.create_task(run(intended))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        intended += interval_s
    while tasks:
        await asyncio.gather(*tasks)


class _Spender:
    """Builds authorization requests and counts their answers (shared by the unary and stream drivers)."""

    def __init__(self, job: LoadJob, window: _Window, recorder: Recorder, channel: grpc.aio.Channel) -> None:
        self.job = job
        self.window = window
        self.recorder = recorder
        self.metadata = _metadata(job.token)
        self._prefixes = [
            authorize_prefix(wallet, job.amount_micros, job.currency, "", job.one_shot) for wallet in job.wallets
        ]
        self._key_prefix = job.key_prefix.encode()
        # Each process starts at its own place in the wallet list, so processes spread over the fleet.
        self._counter = itertools.count(job.first_wallet)
        self._capture = channel.unary_unary(
            CAPTURE_METHOD, request_serializer=None, response_deserializer=spend_pb2.CaptureResponse.FromString
        )
        self.captures: set[asyncio.Task[None]] = set()

    def next_request(self) -> tuple[bytes, bytes]:
        """A fresh encoded AuthorizeRequest and its sequence number (hex), round-robin over the wallets."""
        number = next(self._counter)
        sequence = b"%x" % number
        self.recorder.calls_total += 1
        return sequence, authorize_request(self._prefixes[number % len(self._prefixes)], self._key_prefix + sequence)

    def answered(
        self, response: spend_pb2.AuthorizeResponse, started: float, sequence: bytes, *, capture_later: bool = True
    ) -> bool:
        """Count one answer; returns whether it is an approval to capture (authorize+capture).

        With ``capture_later`` the capture runs in the background (a stream's reader must not wait for it).
        """
        done = time.perf_counter()
        approved = response.decision == spend_pb2.DECISION_APPROVED
        if approved:
            self.recorder.approved_micros += self.job.amount_micros
        if self.window.measuring(done):
            record_us(self.recorder.histogram, (done - started) * 1e6)
            self.recorder.calls += 1
            self.recorder.decisions[decision_label(response.decision, response.deny_reason)] += 1
        to_capture = approved and not self.job.one_shot
        if to_capture and capture_later:
            task = asyncio.create_task(self.capture(response.authorization_id, sequence))
            self.captures.add(task)
            task.add_done_callback(self.captures.discard)
        return to_capture

    def failed(self, code: grpc.StatusCode) -> None:
        """Count one failed call."""
        self.recorder.errors[code.name] += 1
        if code in _UNKNOWN_OUTCOME:
            self.recorder.unknown_outcomes += 1

    async def capture(self, authorization_id: str, sequence: bytes) -> None:
        """Settle a hold in full."""
        request = capture_request(
            authorization_id, self.job.amount_micros, f"{self.job.key_prefix}{sequence.decode()}c"
        )
        started = time.perf_counter()
        try:
            await self._capture(request, timeout=self.job.timeout_s, metadata=self.metadata)
        except grpc.aio.AioRpcError as error:
            # A failed capture leaves the hold in place: the money stays counted (held), so it is not an
            # unknown outcome for the money check.
            self.recorder.errors[f"capture {error.code().name}"] += 1
            return
        done = time.perf_counter()
        if self.window.measuring(done):
            record_us(self.recorder.capture_histogram, (done - started) * 1e6)
            self.recorder.captures += 1

    async def drain(self) -> None:
        """Wait for the captures still running."""
        while self.captures:
            await asyncio.gather(*self.captures)


async def run_unary(job: LoadJob, recorder: Recorder) -> None:
    """Unary Authorize (and Capture) calls."""
    window = _Window(job)
    channels = [_channel(job.target) for _ in range(max(1, math.ceil(job.concurrency / CALLS_PER_CONNECTION_MAX)))]
    methods = [
        channel.unary_unary(
            AUTHORIZE_METHOD, request_serializer=None, response_deserializer=spend_pb2.AuthorizeResponse.FromString
        )
        for channel in channels
    ]
    spender = _Spender(job, window, recorder, channels[0])
    turn = itertools.count()

    async def call(started: float) -> None:
        sequence, request = spender.next_request()
        method = methods[next(turn) % len(methods)]
        try:
            response = await method(request, timeout=job.timeout_s, metadata=spender.metadata)
        except grpc.aio.AioRpcError as error:
            spender.failed(error.code())
            if error.code() is grpc.StatusCode.UNAVAILABLE:
                await asyncio.sleep(0.01)  # A server that is down should not turn the generator into a spin.
            return
        # An agent captures before its next call (in a closed loop the capture is part of the flow).
        if spender.answered(response, started, sequence, capture_later=False):
            await spender.capture(response.authorization_id, sequence)

    try:
        _measure_cpu(window, recorder, job.duration_s)
        await _paced(window, recorder, job.concurrency, job.rate_per_s, call)
        await spender.drain()
    finally:
        for channel in channels:
            await channel.close(None)


async def run_stream(job: LoadJob, recorder: Recorder) -> None:
    """Authorizations over AuthorizeStream: ``streams`` streams, the concurrency split over them."""
    window = _Window(job)
    streams = max(1, job.streams)
    channels = [_channel(job.target) for _ in range(streams)]
    spender = _Spender(job, window, recorder, channels[0])

    async def drive(channel: grpc.aio.Channel, in_flight_max: int, rate_per_s: float) -> None:
        method = channel.stream_stream(
            STREAM_METHOD,
            request_serializer=None,
            response_deserializer=spend_pb2.AuthorizeStreamResponse.FromString,
        )
        # Without a request iterator a grpc.aio stream call is written to and read from directly; the grpc
        # stubs know only the iterator form.
        stream: Any = method(metadata=spender.metadata)  # type: ignore[call-arg]
        pending: dict[str, tuple[float, bytes]] = {}
        slots = asyncio.Semaphore(in_flight_max)

        async def write() -> None:
            intended = window.begin
            interval_s = 1.0 / rate_per_s if rate_per_s > 0 else 0.0
            try:
                while True:
                    if interval_s:
                        if intended >= window.end:
                            break
                        delay_s = intended - time.perf_counter()
                        if delay_s > 0:
                            await asyncio.sleep(delay_s)
                    await slots.acquire()
                    now = time.perf_counter()
                    if interval_s:
                        started = intended
                        intended += interval_s
                        if window.measuring(started) and (now - started) * 1e6 > LATE_START_US:
                            recorder.late_starts += 1
                    elif now >= window.end:
                        break
                    else:
                        started = now
                    sequence, request = spender.next_request()
                    pending[sequence.decode()] = (started, sequence)
                    await stream.write(stream_request(sequence, request))
            finally:
                await stream.done_writing()

        async def read() -> None:
            while True:
                answer: Any = await stream.read()
                if answer is _EOF:
                    return
                slots.release()
                entry = pending.pop(answer.request_id, None)
                if entry is None:
                    recorder.errors["stream: unknown request_id"] += 1
                elif answer.error_code:
                    code = _STATUS_NAMES.get(answer.error_code, "UNKNOWN")
                    spender.failed(grpc.StatusCode[code])
                else:
                    spender.answered(answer.response, *entry)

        await window.wait_for_start()
        outcomes = await asyncio.gather(write(), read(), return_exceptions=True)
        failures = [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
        if failures:
            # The stream failed: every request still on it has an unknown outcome.
            stream.cancel()
            failure = failures[0]
            code = failure.code().name if isinstance(failure, grpc.aio.AioRpcError) else type(failure).__name__
            recorder.errors[f"stream {code}"] += 1
            recorder.unknown_outcomes += len(pending)

    share = max(1, math.ceil(job.concurrency / streams))
    try:
        _measure_cpu(window, recorder, job.duration_s)
        await asyncio.gather(*(drive(channel, share, job.rate_per_s / streams) for channel in channels))
        await spender.drain()
    finally:
        for channel in channels:
            await channel.close(None)


class _Recorded(Exception):
    """Raised by :class:`_RecordingStore` once it has the script call it was after."""


class _RecordingStore(RedisStore):
    """A RedisStore that records the authorize script call it would make instead of making it.

    The benchmark sends exactly the keys and arguments the server would, built by the server's own code.
    """

    recorded: tuple[list[str], list[str | int]] = ([], [])

    async def _run(self, script: str, keys: Sequence[str], args: Sequence[str | int]) -> list[Any]:
        if script == "authorize":
            self.recorded = (list(keys), list(args))
            raise _Recorded
        return await super()._run(script, keys, args)


_PLACEHOLDER_KEY = "bench-placeholder-key"
_PLACEHOLDER_TOKEN = "f" * 32


@dataclasses.dataclass(frozen=True, slots=True)
class ScriptTemplate:
    """One wallet's EVALSHA command with the places a fresh idempotency key and authorization id go."""

    command: tuple[str | int, ...]
    account_id: str
    idempotency_key_slot: int
    idempotency_arg_slot: int
    hold_key_slot: int
    authorization_arg_slot: int
    idempotency_key_prefix: str
    hold_key_prefix: str

    def fresh(self, idempotency_key: str, token: str) -> list[str | int]:
        """The command with a new idempotency key and a new authorization id (``<account>:<token>``)."""
        command = list(self.command)
        authorization_id = f"{self.account_id}:{token}"
        command[self.idempotency_key_slot] = self.idempotency_key_prefix + idempotency_key
        command[self.idempotency_arg_slot] = idempotency_key
        command[self.hold_key_slot] = self.hold_key_prefix + authorization_id
        command[self.authorization_arg_slot] = authorization_id
        return command


async def script_templates(client: aioredis.Redis, job: LoadJob, sha: str, now_ms: int) -> list[ScriptTemplate]:
    """Record, through the store's own code, the authorize script call of each wallet."""
    keys = Keys(job.redis_key_prefix)
    store = _RecordingStore(client, keys=keys, batching=False)
    templates = []
    for wallet in job.wallets:
        chain: Chain = await store.resolve_wallet(wallet)
        command = AuthorizeCommand(
            wallet_id=wallet,
            amount_micros=job.amount_micros,
            currency=job.currency,
            idempotency_key=_PLACEHOLDER_KEY,
            service="",
            capture=job.one_shot,
            metadata={},
        )
        authorization_id = f"{chain.account_id}:{_PLACEHOLDER_TOKEN}"
        with contextlib.suppress(_Recorded):
            await store.authorize(
                chain,
                command,
                authorization_id=authorization_id,
                fingerprint=fingerprint(command),
                windows=windows_at(now_ms, chain.time_zone),
                now_ms=now_ms,
            )
        script_keys, script_args = store.recorded
        head: list[str | int] = ["EVALSHA", sha, len(script_keys)]
        offset = len(head) + len(script_keys)
        idempotency_key = keys.idempotency(chain.account_id, wallet, _PLACEHOLDER_KEY)
        hold_key = keys.hold(chain.account_id, authorization_id)
        templates.append(
            ScriptTemplate(
                command=(*head, *script_keys, *script_args),
                account_id=chain.account_id,
                idempotency_key_slot=len(head) + script_keys.index(idempotency_key),
                idempotency_arg_slot=offset + script_args.index(_PLACEHOLDER_KEY),
                hold_key_slot=len(head) + script_keys.index(hold_key),
                authorization_arg_slot=offset + script_args.index(authorization_id),
                idempotency_key_prefix=idempotency_key.removesuffix(_PLACEHOLDER_KEY),
                hold_key_prefix=hold_key.removesuffix(authorization_id),
            )
        )
    return templates


async def run_redis(job: LoadJob, recorder: Recorder) -> None:
    """EVALSHA of the real authorize script straight at Redis.

    ``concurrency`` callers, each sending one script per round trip (``batch_size == 1``) or a pipeline of
    ``batch_size`` scripts.
    """
    client = aioredis.Redis.from_url(job.redis_url, decode_responses=True, max_connections=REDIS_CONNECTIONS_MAX)
    try:
        sha = str(await client.script_load(load_script_source("authorize")))
        templates = await script_templates(client, job, sha, int(time.time() * 1000))
        window = _Window(job)
        counter = itertools.count(job.first_wallet)
        batch_size = max(1, job.batch_size)

        def next_command() -> list[str | int]:
            number = next(counter)
            recorder.calls_total += 1
            template = templates[number % len(templates)]
            return template.fresh(f"{job.key_prefix}{number:x}", f"{job.process_index:08x}{number:024x}")

        def answered(reply: Any, started: float, done: float) -> None:
            if isinstance(reply, Exception):
                recorder.errors[type(reply).__name__] += 1
                recorder.unknown_outcomes += 1
                return
            if reply[0] != "OK":
                recorder.errors[f"script {reply[1]}"] += 1
                return
            decision = int(reply[1])
            if decision == spend_pb2.DECISION_APPROVED:
                recorder.approved_micros += job.amount_micros
            if window.measuring(done):
                record_us(recorder.histogram, (done - started) * 1e6)
                recorder.calls += 1
                recorder.decisions[decision_label(decision, int(reply[3]))] += 1

        async def call(started: float) -> None:
            try:
                if batch_size == 1:
                    replies = [await client.execute_command(*next_command())]  # type: ignore[no-untyped-call]
                else:
                    pipe = client.pipeline(transaction=False)
                    for _ in range(batch_size):
                        pipe.execute_command(*next_command())
                    replies = await pipe.execute(raise_on_error=False)
            except (redis.exceptions.RedisError, OSError) as error:
                recorder.errors[type(error).__name__] += batch_size
                recorder.unknown_outcomes += batch_size
                return
            done = time.perf_counter()
            for reply in replies:
                answered(reply, started, done)

        _measure_cpu(window, recorder, job.duration_s)
        await _paced(window, recorder, job.concurrency, 0.0, call)
    finally:
        await client.aclose()


_RUNNERS: dict[str, Callable[[LoadJob, Recorder], Awaitable[None]]] = {
    "unary": run_unary,
    "stream": run_stream,
    "redis": run_redis,
}


async def run_job(job: LoadJob) -> WorkerResult:
    """Run one job in this process and return its measurements."""
    recorder = Recorder()
    await _RUNNERS[job.kind](job, recorder)
    return recorder.finish()


def _failure(error: BaseException) -> WorkerResult:
    return WorkerResult(
        calls=0,
        captures=0,
        calls_total=0,
        decisions={},
        errors={},
        approved_micros=0,
        unknown_outcomes=0,
        late_starts=0,
        cpu_s=0.0,
        window_s=0.0,
        histogram=b"",
        capture_histogram=b"",
        failure="".join(traceback.format_exception_only(error)).strip(),
    )


async def _serve(connection: multiprocessing.connection.Connection) -> None:
    loop = asyncio.get_running_loop()
    connection.send("ready")
    while (job := await loop.run_in_executor(None, connection.recv)) is not None:
        try:
            result = await run_job(job)
        except Exception as error:  # Reported to the parent, which shows it with the phase.
            result = _failure(error)
        connection.send(result)


def generator_main(connection: multiprocessing.connection.Connection) -> None:
    """A generator process: run the jobs the parent sends until it sends ``None``."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on every platform we support
        asyncio.run(_serve(connection))
        return
    uvloop.run(_serve(connection))


class GeneratorPool:
    """Generator processes that stay up for the whole benchmark and run one job per phase each."""

    def __init__(self, processes: int) -> None:
        context = multiprocessing.get_context("spawn")
        self._connections: list[multiprocessing.connection.Connection] = []
        self._processes: list[multiprocessing.process.BaseProcess] = []
        for _ in range(processes):
            parent, child = context.Pipe()
            process = context.Process(target=generator_main, args=(child,), daemon=True, name="spendgate-bench-gen")
            self._connections.append(parent)
            self._processes.append(process)

    @property
    def size(self) -> int:
        """How many generator processes there are."""
        return len(self._processes)

    def start(self, timeout_s: float = 60.0) -> None:
        """Start the processes and wait until each has imported everything and is ready."""
        for process in self._processes:
            process.start()
        for connection in self._connections:
            if not connection.poll(timeout_s) or connection.recv() != "ready":
                raise RuntimeError("a load generator process did not start")

    async def run(self, jobs: Sequence[LoadJob], timeout_s: float) -> list[WorkerResult]:
        """Give the first ``len(jobs)`` processes a job each and return their measurements."""
        if len(jobs) > len(self._connections):
            raise ValueError(f"{len(jobs)} jobs for {len(self._connections)} generator processes")
        busy = self._connections[: len(jobs)]
        for connection, job in zip(busy, jobs, strict=True):
            connection.send(job)
        loop = asyncio.get_running_loop()

        def receive(connection: multiprocessing.connection.Connection) -> WorkerResult:
            if not connection.poll(timeout_s):
                return _failure(TimeoutError(f"a load generator process did not answer within {timeout_s:.0f} s"))
            result: WorkerResult = connection.recv()
            return result

        return list(await asyncio.gather(*(loop.run_in_executor(None, receive, c) for c in busy)))

    def close(self) -> None:
        """Stop the processes."""
        for connection in self._connections:
            with contextlib.suppress(OSError):
                connection.send(None)
        for process in self._processes:
            process.join(5.0)
            if process.is_alive():
                process.terminate()
                process.join(5.0)
