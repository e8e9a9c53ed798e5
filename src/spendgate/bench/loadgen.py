"""The load generator: a few processes, each running many asyncio clients, driven phase by phase.

The parent starts ``processes`` generator processes (``spawn``, so no gRPC state is forked), sends each the
same :class:`LoadJob` with its share of the concurrency or rate, and adds up the
:class:`~spendgate.bench.stats.WorkerResult` each sends back. Requests are pre-encoded bytes
(:mod:`spendgate.bench.wire`) and responses are parsed by the C protobuf runtime. Every process measures the
same wall-clock window and reports its own CPU time over it (``getrusage``), so the report can show whether
the generator kept up.

The unary and stream phases speak gRPC through :mod:`spendgate.bench.h2client` (``client="h2"``, the
default): a grpcio Python client costs about as much CPU per call as the server, which on a small machine
makes the generator the bottleneck and distorts the ratios; the hand-written HTTP/2 client costs a fraction
of that. ``client="grpc"`` drives them with grpcio, as a cross-check.

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
import typing
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

import grpc
import redis.asyncio as aioredis
import redis.exceptions

from spendgate._gen.spendgate.v1 import spend_pb2
from spendgate.bench import h2client, schedule
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
from spendgate.store.pipe import Argument, flatten
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
_STATUS_CODES = {code.value[0]: code for code in grpc.StatusCode}
_DENY_LABELS = {
    value: "denied: " + name.removeprefix("DENY_REASON_").lower() for name, value in spend_pb2.DenyReason.items()
}
APPROVED = "approved"
# The end-of-stream marker of grpc.aio reads (missing from the grpc stubs).
_EOF: Any = grpc.aio.EOF  # type: ignore[attr-defined]
# The gRPC clients a job can drive the server with: the benchmark's own HTTP/2 client, or grpcio.
CLIENTS = ("h2", "grpc")
# How long a caller waits after UNAVAILABLE: a server that is down should not turn the generator into a spin.
UNAVAILABLE_PAUSE_S = 0.01
# In a closed loop a process's HTTP/2 connections read at most once per READ_PAUSE_S, together, while at
# least READ_PAUSE_AWAITED_MIN answers are awaited on a connection (h2client.ReadPacer): the process wakes
# once for the answers of a millisecond rather than once for each (on two cores a wake-up costs more than
# the call's own work, and the generator's CPU is the server's loss). A closed loop's latency is its calls in
# flight over its throughput (Little's law), whoever holds the answers; an open loop, whose latency at a
# given rate is the figure, never pauses. The bound keeps enough calls at the server that it never waits
# for the generator.
READ_PAUSE_S = 0.001
READ_PAUSE_AWAITED_MIN = 4


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
    # The gRPC client of the unary and stream phases (one of CLIENTS).
    client: str = "h2"

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
        # Open loops: where in its interval this process's schedule starts. Each process runs the same rate,
        # so without this their calls would arrive in simultaneous bursts instead of evenly spaced.
        self.stagger = job.process_index / max(1, job.processes)

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


def _status(code: int) -> grpc.StatusCode:
    return _STATUS_CODES.get(code, grpc.StatusCode.UNKNOWN)


class _Calls(Protocol):
    """Unary calls with pre-encoded requests, spread round-robin over a few connections."""

    async def call(self, method: str, request: bytes) -> tuple[grpc.StatusCode, bytes]:
        """Make one call: its status and, when it is OK, the encoded response."""
        ...

    async def close(self) -> None:
        """Close the connections."""
        ...


class _GrpcCalls:
    """Unary calls over grpcio channels (``client="grpc"``)."""

    def __init__(self, job: LoadJob, connections: int) -> None:
        self._channels = [_channel(job.target) for _ in range(connections)]
        self._methods: dict[str, list[Any]] = {}
        self._turn = itertools.count()
        self._timeout_s = job.timeout_s
        self._metadata = _metadata(job.token)

    def _add(self, method: str) -> list[Any]:
        callables = [
            channel.unary_unary(method, request_serializer=None, response_deserializer=None)
            for channel in self._channels
        ]
        self._methods[method] = callables
        return callables

    async def call(self, method: str, request: bytes) -> tuple[grpc.StatusCode, bytes]:
        """Make one call (grpcio raises on failure; the error becomes the status)."""
        callables = self._methods.get(method) or self._add(method)
        try:
            response = await callables[next(self._turn) % len(callables)](
                request, timeout=self._timeout_s, metadata=self._metadata
            )
        except grpc.aio.AioRpcError as error:
            return error.code(), b""
        return grpc.StatusCode.OK, response

    async def close(self) -> None:
        """Close the channels."""
        for channel in self._channels:
            await channel.close(None)


class _H2Calls:
    """Unary calls over connections of :mod:`spendgate.bench.h2client` (``client="h2"``).

    Each connection is dialled on first use and dialled again when it was lost or the server sent GOAWAY.
    """

    def __init__(self, job: LoadJob, connections: int, pacer: h2client.ReadPacer | None) -> None:
        self._host, self._port = h2client.parse_target(job.target)
        self._token = job.token
        self._timeout_s = job.timeout_s
        self._pacer = pacer
        self._clients: list[h2client.H2Client | None] = [None] * connections
        self._dialling = [asyncio.Lock() for _ in range(connections)]
        self._turn = itertools.count()

    async def _dial(self, index: int) -> h2client.H2Client | None:
        async with self._dialling[index]:
            client = self._clients[index]
            if client is not None and client.usable:
                return client  # Another caller dialled it meanwhile.
            try:
                client = await h2client.connect(
                    self._host,
                    self._port,
                    token=self._token,
                    timeout_s=self._timeout_s,
                    pacer=self._pacer,
                )
            except (OSError, TimeoutError, h2client.H2Error):
                return None
            self._clients[index] = client
            return client

    async def call(self, method: str, request: bytes) -> tuple[grpc.StatusCode, bytes]:
        """Make one call on the next connection."""
        index = next(self._turn) % len(self._clients)
        client = self._clients[index]
        if client is None or not client.usable:
            client = await self._dial(index)
            if client is None:
                return grpc.StatusCode.UNAVAILABLE, b""
        code, _, response = await client.unary(method, request)
        if response is None:
            return _status(code), b""
        return grpc.StatusCode.OK, response

    async def close(self) -> None:
        """Close the connections."""
        for client in self._clients:
            if client is not None:
                await client.aclose()


def _pacer(job: LoadJob) -> h2client.ReadPacer | None:
    """The read pacer of a job's HTTP/2 connections: closed loops only."""
    return h2client.ReadPacer(READ_PAUSE_S, READ_PAUSE_AWAITED_MIN) if job.rate_per_s <= 0 else None


def _calls(job: LoadJob, connections: int, pacer: h2client.ReadPacer | None) -> _Calls:
    return _H2Calls(job, connections, pacer) if job.client == "h2" else _GrpcCalls(job, connections)


def _record_start(window: _Window, recorder: Recorder, intended: float) -> None:
    """Record how late a scheduled call starts (open loops; measured calls only)."""
    if window.measuring(intended):
        late_us = (time.perf_counter() - intended) * 1e6
        record_us(recorder.start_histogram, late_us)
        if late_us > LATE_START_US:
            recorder.late_starts += 1


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

    starts = schedule.starts(window.begin + interval_s * window.stagger, interval_s, window.end)
    async with contextlib.aclosing(starts) as due:
        async for intended in due:
            await slots.acquire()
            _record_start(window, recorder, intended)
            task = asyncio.create_task(run(intended))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
    while tasks:
        await asyncio.gather(*tasks)


class _Spender:
    """Builds authorization requests and counts their answers (shared by the unary and stream drivers)."""

    def __init__(self, job: LoadJob, window: _Window, recorder: Recorder, calls: _Calls) -> None:
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
        self._calls = calls
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
        code, _ = await self._calls.call(CAPTURE_METHOD, request)
        if code is not grpc.StatusCode.OK:
            # A failed capture leaves the hold in place: the money stays counted (held), so it is not an
            # unknown outcome for the money check.
            self.recorder.errors[f"capture {code.name}"] += 1
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
    calls = _calls(job, max(1, math.ceil(job.concurrency / CALLS_PER_CONNECTION_MAX)), _pacer(job))
    spender = _Spender(job, window, recorder, calls)

    async def call(started: float) -> None:
        sequence, request = spender.next_request()
        code, encoded = await calls.call(AUTHORIZE_METHOD, request)
        if code is not grpc.StatusCode.OK:
            spender.failed(code)
            if code is grpc.StatusCode.UNAVAILABLE:
                await asyncio.sleep(UNAVAILABLE_PAUSE_S)
            return
        response = spend_pb2.AuthorizeResponse.FromString(encoded)
        # An agent captures before its next call (in a closed loop the capture is part of the flow).
        if spender.answered(response, started, sequence, capture_later=False):
            await spender.capture(response.authorization_id, sequence)

    try:
        _measure_cpu(window, recorder, job.duration_s)
        await _paced(window, recorder, job.concurrency, job.rate_per_s, call)
        await spender.drain()
    finally:
        await calls.close()


class _StreamFeed:
    """One AuthorizeStream's requests and the counting of its answers, whichever client carries it.

    At most ``in_flight_max`` requests are unanswered at once; with a rate they start on a schedule.
    """

    def __init__(self, spender: _Spender, in_flight_max: int, rate_per_s: float) -> None:
        self.spender = spender
        self.pending: dict[str, tuple[float, bytes]] = {}
        # Requests that may still be sent before an answer: a counter and the writer's wake-up (one writer,
        # so this is a semaphore at a fraction of asyncio.Semaphore's cost per message).
        self.free = in_flight_max
        self._room: asyncio.Future[None] | None = None
        self.interval_s = 1.0 / rate_per_s if rate_per_s > 0 else 0.0

    async def _slot(self) -> None:
        while self.free <= 0:
            self._room = asyncio.get_running_loop().create_future()
            await self._room
        self.free -= 1

    async def write(self, send: Callable[[bytes], Awaitable[None] | None]) -> None:
        """Send requests with ``send`` until the window ends (awaiting what it returns, if anything)."""
        window, recorder = self.spender.window, self.spender.recorder
        interval_s = self.interval_s
        if interval_s:
            starts = schedule.starts(window.begin + interval_s * window.stagger, interval_s, window.end)
            async with contextlib.aclosing(starts) as due:
                async for intended in due:
                    await self._slot()
                    _record_start(window, recorder, intended)
                    await self._send(send, intended)
            return
        while True:
            await self._slot()
            now = time.perf_counter()
            if now >= window.end:
                return
            await self._send(send, now)

    async def _send(self, send: Callable[[bytes], Awaitable[None] | None], started: float) -> None:
        sequence, request = self.spender.next_request()
        self.pending[sequence.decode()] = (started, sequence)
        sent = send(stream_request(sequence, request))
        if sent is not None:
            await sent

    def answered(self, answer: spend_pb2.AuthorizeStreamResponse) -> None:
        """Count one answer."""
        self.free += 1
        if self._room is not None and not self._room.done():
            self._room.set_result(None)
        entry = self.pending.pop(answer.request_id, None)
        if entry is None:
            self.spender.recorder.errors["stream: unknown request_id"] += 1
        elif answer.error_code:
            self.spender.failed(_status(answer.error_code))
        else:
            self.spender.answered(answer.response, *entry)

    def received(self, message: bytes) -> None:
        """Count one encoded answer (the HTTP/2 client's message callback)."""
        self.answered(spend_pb2.AuthorizeStreamResponse.FromString(message))

    def broke(self, code: str) -> None:
        """The stream failed: every request still on it has an unknown outcome."""
        self.spender.recorder.errors[f"stream {code}"] += 1
        self.spender.recorder.unknown_outcomes += len(self.pending)


async def _grpc_stream(feed: _StreamFeed, channel: grpc.aio.Channel) -> None:
    method = channel.stream_stream(
        STREAM_METHOD, request_serializer=None, response_deserializer=spend_pb2.AuthorizeStreamResponse.FromString
    )
    # Without a request iterator a grpc.aio stream call is written to and read from directly; the grpc stubs
    # know only the iterator form.
    stream: Any = method(metadata=feed.spender.metadata)  # type: ignore[call-arg]
    await feed.spender.window.wait_for_start()

    async def write() -> None:
        try:
            await feed.write(stream.write)
        finally:
            await stream.done_writing()

    async def read() -> None:
        while (answer := await stream.read()) is not _EOF:
            feed.answered(answer)

    outcomes = await asyncio.gather(write(), read(), return_exceptions=True)
    failures = [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
    if failures:
        stream.cancel()
        failure = failures[0]
        feed.broke(failure.code().name if isinstance(failure, grpc.aio.AioRpcError) else type(failure).__name__)


async def _h2_stream(feed: _StreamFeed, job: LoadJob, pacer: h2client.ReadPacer | None) -> None:
    host, port = h2client.parse_target(job.target)
    try:
        client = await h2client.connect(host, port, token=job.token, pacer=pacer)
    except (OSError, TimeoutError, h2client.H2Error):
        feed.broke(grpc.StatusCode.UNAVAILABLE.name)
        return
    try:
        await feed.spender.window.wait_for_start()
        stream = await client.open_stream(STREAM_METHOD, feed.received)

        async def write() -> None:
            try:
                await feed.write(stream.write)
            finally:
                stream.end()

        writer = asyncio.create_task(write())
        code, _, _ = await stream.finished
        if not writer.done():
            # The server ended the stream while requests were still to go: they never will.
            writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await writer
        if code:
            feed.broke(_status(code).name)
    finally:
        await client.aclose()


async def run_stream(job: LoadJob, recorder: Recorder) -> None:
    """Authorizations over AuthorizeStream: ``streams`` streams, the concurrency split over them.

    Each stream has a connection of its own; captures (authorize+capture) go over one more.
    """
    window = _Window(job)
    streams = max(1, job.streams)
    pacer = _pacer(job)
    calls = _calls(job, 1, pacer)
    spender = _Spender(job, window, recorder, calls)
    share = max(1, math.ceil(job.concurrency / streams))
    feeds = [_StreamFeed(spender, share, job.rate_per_s / streams) for _ in range(streams)]
    channels = [_channel(job.target) for _ in feeds] if job.client == "grpc" else []
    try:
        _measure_cpu(window, recorder, job.duration_s)
        if channels:
            await asyncio.gather(*(_grpc_stream(feed, channel) for feed, channel in zip(feeds, channels, strict=True)))
        else:
            await asyncio.gather(*(_h2_stream(feed, job, pacer) for feed in feeds))
        await spender.drain()
    finally:
        for channel in channels:
            await channel.close(None)
        await calls.close()


class _Recorded(Exception):
    """Raised by :class:`_RecordingStore` once it has the script call it was after."""


class _RecordingStore(RedisStore):
    """A RedisStore that records the authorize script call it would make instead of making it.

    The benchmark sends exactly the keys and arguments the server would, built by the server's own code.
    """

    recorded: tuple[list[str], list[str | int]] = ([], [])

    async def _run(self, script: str, keys: Sequence[Argument], args: Sequence[Argument]) -> list[Any]:
        if script == "authorize":
            # The store's keys are text and its arguments text or integers.
            self.recorded = (
                typing.cast(list[str], flatten(keys)),
                typing.cast(list[str | int], flatten(args)),
            )
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
        start_histogram=b"",
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
