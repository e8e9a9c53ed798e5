"""The hot path's Redis transport: one connection that pipelines every command issued in one event-loop turn.

redis-py pays for a pool checkout, a command object, a timeout context and a reply parser per call, several
times what a decision costs in Lua. Here a call encodes its command (RESP2) into a write buffer and gets a
future, and replies come back in order, parsed by hiredis in C, each handed to the next waiting future.

Batching adapts to the load, as Nagle's algorithm does: with nothing out, what a turn of the event loop buffers
is written at the end of that turn (a lone call waits for nothing); while a write is out, new commands wait
in the buffer and leave together, in one write, when its last reply is in (or at once when a batch is full).
So under load, concurrent decisions share round trips; every batch's replies arrive together too, and the
callers they wake answer together.

That alone batches little when calls reach the loop one at a time, as unary gRPC calls do: each finds nothing
out and leaves alone, and every lone write costs a system call here, a wake-up of Redis and a wake-up of the
loop for the reply. So while the loop's own thread is busy (:class:`LoopLoad`: the share of its time on a
CPU, with hysteresis), a write that would leave alone waits up to ``linger_s`` for company first, on a
``timerfd`` (the loop's own timers count whole milliseconds). A busy loop trades that wait for the CPU the
lone writes would cost. The load is sampled every 100 ms, so calls just after a burst may still wait; at a
steady low load none does. It is off unless asked
for (``linger_s``; SPENDGATE_REDIS_LINGER_US): in `make bench` it raised the closed-loop unary rate, but a load
near the loop's limit switches it on and off, and that raised the p99 at half load (README, Performance).

A deadline covers the whole connection rather than each call: a watchdog looks at the oldest unanswered
command, and once it has waited ``timeout_s`` the connection is declared dead, every waiting caller gets
:class:`TimeoutError` and the next call reconnects. So a Redis that stops answering costs callers at most
about ``timeout_s`` and never hangs them, without a timer per call. A lost connection fails its waiting
callers with :class:`ConnectionError` (their outcome is unknown: the scripts may or may not have run, which
idempotency keys make safe to retry).

Only plain TCP and Unix-socket URLs are handled (with AUTH and SELECT); the composition root keeps redis-py
for TLS and for the embedded fakeredis.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import time
import typing
from collections.abc import Sequence
from typing import Any

import hiredis
from redis._parsers.base import BaseParser
from redis.asyncio.connection import SSLConnection, parse_url

from spendgate import timerfd

# Commands one write carries at most while an earlier write is still unanswered (a full batch goes out anyway).
BATCH_SIZE_MAX = 256
# How often, as a share of the deadline, the watchdog looks at the oldest unanswered command.
_WATCH_SHARE = 0.25
# The loop's thread counts as busy from this share of its time on a CPU, and as idle again below the second
# (a gap, so the linger, which lowers the share, does not switch itself off); sampled every period.
BUSY_FROM = 0.6
IDLE_BELOW = 0.45
LOAD_PERIOD_S = 0.1


class PipeUnsupportedError(ValueError):
    """The URL needs a transport this module does not implement (TLS); use redis-py for it."""


@dataclasses.dataclass(frozen=True, slots=True)
class Endpoint:
    """Where and how to connect: TCP host and port, or a Unix socket path; credentials; database."""

    host: str = "127.0.0.1"
    port: int = 6379
    path: str = ""
    username: str = ""
    password: str = ""
    db: int = 0

    @classmethod
    def from_url(cls, url: str) -> Endpoint:
        """Parse a ``redis://`` or ``unix://`` URL (as redis-py does); ``rediss://`` raises PipeUnsupportedError."""
        options = parse_url(url)
        if options.get("connection_class") is SSLConnection:
            raise PipeUnsupportedError("TLS (rediss://) is served by redis-py, not the pipe")
        return cls(
            host=str(options.get("host") or "127.0.0.1"),
            port=int(options.get("port") or 6379),
            path=str(options.get("path") or ""),
            username=str(options.get("username") or ""),
            password=str(options.get("password") or ""),
            db=int(options.get("db") or 0),
        )


def _bulk(arg: str | bytes | int) -> bytes:
    data = arg.encode() if isinstance(arg, str) else b"%d" % arg if isinstance(arg, int) else arg
    return b"$%d\r\n%s\r\n" % (len(data), data)


class Encoded:
    """Arguments encoded once and sent many times: a run of them goes into a command as one piece of bytes.

    A decision's command is mostly such runs (a chain's keys and node ids, the store's settings); encoding
    only the rest per call is what keeps a 45-argument EVALSHA cheap to build. Only the bytes are kept (a
    server may cache one per wallet); :meth:`values` reads them back, once, for clients that encode
    themselves (redis-py, the embedded fakeredis).
    """

    __slots__ = ("_values", "count", "data")

    def __init__(self, *values: str | bytes | int) -> None:
        self.count = len(values)
        self.data = b"".join(_bulk(value) for value in values)
        self._values: tuple[str | bytes, ...] | None = None

    def values(self) -> tuple[str | bytes, ...]:
        """The arguments back from their encoding: text where it is UTF-8 (integers come back as text)."""
        if self._values is not None:
            return self._values
        values: list[str | bytes] = []
        at = 0
        for _ in range(self.count):
            end = self.data.index(b"\r\n", at)
            size = int(self.data[at + 1 : end])
            raw = self.data[end + 2 : end + 2 + size]
            try:
                values.append(raw.decode())
            except UnicodeDecodeError:
                values.append(raw)
            at = end + 4 + size
        self._values = tuple(values)
        return self._values

    def __repr__(self) -> str:
        return f"Encoded{tuple(self.values())!r}"


Argument = str | bytes | int | Encoded


# The RESP header of every bulk-string length a command argument usually has, made once.
_BULK_HEADERS = tuple(b"$%d\r\n" % size for size in range(1024))


def encode_command(args: Sequence[Argument]) -> bytes:
    """One command as a RESP2 array of bulk strings (an :class:`Encoded` stands for its values)."""
    parts = [b""]
    append = parts.append
    count = 0
    for arg in args:
        # The common types first: this runs for every argument of every decision.
        if isinstance(arg, str):
            data = arg.encode()
        elif isinstance(arg, Encoded):
            append(arg.data)
            count += arg.count
            continue
        elif isinstance(arg, int):
            data = b"%d" % arg
        else:
            data = arg
        size = len(data)
        append(_BULK_HEADERS[size] if size < 1024 else b"$%d\r\n" % size)
        append(data)
        append(b"\r\n")
        count += 1
    parts[0] = b"*%d\r\n" % count
    return b"".join(parts)


def flatten(args: Sequence[Argument]) -> list[str | bytes | int]:
    """The arguments with every :class:`Encoded` run spelled out (for clients that encode themselves)."""
    flat: list[str | bytes | int] = []
    for arg in args:
        if isinstance(arg, Encoded):
            flat.extend(arg.values())
        else:
            flat.append(arg)
    return flat


@dataclasses.dataclass(slots=True)
class PipeStats:
    """What a pipe has sent: commands, and writes (round trips) that carried them. Metrics read these."""

    commands: int = 0
    writes: int = 0
    # Writes that waited for company (the loop was busy).
    lingered: int = 0


class LoopLoad:
    """Whether the event loop's thread is busy: the share of each period it spent on a CPU.

    The share comes from the thread's own CPU clock (``time.thread_time``), read on the loop's thread every
    ``period_s``; ``busy`` turns on from ``busy_from`` and off below ``idle_below``. Create it on the loop.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        *,
        period_s: float = LOAD_PERIOD_S,
        busy_from: float = BUSY_FROM,
        idle_below: float = IDLE_BELOW,
        cpu_clock: typing.Callable[[], float] = time.thread_time,
        wall_clock: typing.Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0 < idle_below <= busy_from:
            raise ValueError("LoopLoad needs 0 < idle_below <= busy_from")
        self.busy = False
        self.share = 0.0
        self._loop = loop
        self._period_s = period_s
        self._busy_from = busy_from
        self._idle_below = idle_below
        self._cpu_clock = cpu_clock
        self._wall_clock = wall_clock
        self._cpu = cpu_clock()
        self._wall = wall_clock()
        self._handle = loop.call_later(period_s, self.sample)

    def sample(self) -> None:
        """Measure the share since the last sample, and schedule the next one."""
        cpu, wall = self._cpu_clock(), self._wall_clock()
        # A window much shorter than the period (a sample asked for just after the timer's) says little: its
        # time goes into the next one.
        if wall - self._wall >= self._period_s / 2:
            self.share = (cpu - self._cpu) / (wall - self._wall)
            self.busy = self.share >= (self._idle_below if self.busy else self._busy_from)
            self._cpu, self._wall = cpu, wall
        self._handle.cancel()
        self._handle = self._loop.call_later(self._period_s, self.sample)

    def close(self) -> None:
        """Stop sampling."""
        self._handle.cancel()


class _Connection(asyncio.Protocol):
    """One TCP or Unix connection: a FIFO of waiting futures matched to replies in order."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        timeout_s: float,
        stats: PipeStats,
        load: LoopLoad | None = None,
        linger_s: float = 0.0,
    ) -> None:
        self._loop = loop
        self._timeout_s = timeout_s
        self._stats = stats
        self._load = load
        self._linger_s = linger_s
        # While a write waits for company: the buffer leaves when the timer fires (or at once when full).
        self._lingering = False
        self._timer: timerfd.TimerFd | None = None
        # The loop's timer, where there is no timerfd.
        self._linger_handle: asyncio.TimerHandle | None = None
        self._transport: asyncio.Transport | None = None
        # Error replies become redis-py's exception classes by redis-py's own table, as its hiredis parser does
        # (NOSCRIPT: NoScriptError; LOADING, READONLY: errors the store treats as an outage).
        self._reader = hiredis.Reader(encoding="utf-8", errors="replace", replyError=BaseParser.parse_error)
        # (future, monotonic time the command was buffered), oldest first.
        self._waiting: collections.deque[tuple[asyncio.Future[Any], float]] = collections.deque()
        self._buffer: list[bytes] = []
        self._flush_scheduled = False
        # Commands written whose replies have not all come back: while there are some, new commands wait in
        # the buffer (up to a full batch) and leave together when the replies are in.
        self._unanswered = 0
        self._watchdog: asyncio.TimerHandle | None = None
        self.closed = False

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Keep the transport (uvloop's transports do not subclass asyncio's, hence the cast)."""
        self._transport = typing.cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        """Hand every complete reply to the oldest waiting future."""
        self._reader.feed(data)
        waiting = self._waiting
        while True:
            try:
                reply = self._reader.gets()
            except hiredis.ProtocolError as error:
                self._fail(ConnectionError(f"redis protocol error: {error}"))
                return
            if reply is False:
                break
            if not waiting:
                self._fail(ConnectionError("redis sent a reply nobody asked for"))
                return
            self._unanswered -= 1
            future = waiting.popleft()[0]
            if future.done():  # The caller gave up (cancelled); the reply is dropped.
                continue
            if isinstance(reply, Exception):
                future.set_exception(reply)
            else:
                future.set_result(reply)
        if self._unanswered == 0 and self._buffer and not self._flush_scheduled:
            # What queued up while the last batch was out leaves now, as one write.
            self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        """Fail every waiting caller: their commands may or may not have run."""
        self._fail(ConnectionError(f"redis connection lost: {exc}" if exc else "redis closed the connection"))

    # The pipe's side

    def send(self, command: bytes) -> asyncio.Future[Any]:
        """Buffer one encoded command; the returned future gets its reply."""
        if self.closed:
            raise ConnectionError("redis connection is closed")
        future = self._loop.create_future()
        self._waiting.append((future, time.monotonic()))
        buffer = self._buffer
        buffer.append(command)
        if not self._flush_scheduled:
            if self._unanswered == 0 and len(buffer) < BATCH_SIZE_MAX and self._load is not None and self._load.busy:
                # Nothing out and the loop busy: wait up to the linger for more commands to share the write.
                self._flush_scheduled = True
                self._linger()
            elif self._unanswered == 0 or len(buffer) >= BATCH_SIZE_MAX:
                # Nothing out (or a full batch): write at the end of this turn, with whatever else the turn adds.
                # Otherwise the replies of the batch that is out will flush this one (see data_received).
                self._flush_scheduled = True
                self._loop.call_soon(self._flush)
        elif self._lingering and len(buffer) >= BATCH_SIZE_MAX:
            # A full batch does not wait out the linger.
            self._lingering = False
            self._loop.call_soon(self._flush)
        if self._watchdog is None:
            self._watchdog = self._loop.call_later(self._timeout_s * _WATCH_SHARE, self._watch)
        return future

    def _linger(self) -> None:
        self._lingering = True
        if self._timer is None and timerfd.available():
            # Out of file descriptors, say: the loop's own (coarser) timer will do.
            with contextlib.suppress(OSError):
                self._timer = timerfd.TimerFd(self._loop, self._lingered)
        if self._timer is not None:
            try:
                self._timer.arm_in(self._linger_s)
                return
            except OSError:
                self._timer.close()
                self._timer = None
        self._linger_handle = self._loop.call_later(self._linger_s, self._lingered)

    def _lingered(self) -> None:
        if self._lingering:
            self._stats.lingered += 1
            self._flush()

    def _end_linger(self) -> None:
        self._lingering = False
        if self._linger_handle is not None:
            self._linger_handle.cancel()
            self._linger_handle = None

    def _flush(self) -> None:
        self._flush_scheduled = False
        self._end_linger()
        if self._buffer and self._transport is not None and not self.closed:
            self._stats.commands += len(self._buffer)
            self._stats.writes += 1
            self._unanswered += len(self._buffer)
            data = b"".join(self._buffer)
            self._buffer.clear()
            self._transport.write(data)

    def _watch(self) -> None:
        self._watchdog = None
        if self.closed or not self._waiting:
            return
        waited_s = time.monotonic() - self._waiting[0][1]
        if waited_s >= self._timeout_s:
            self._fail(TimeoutError(f"redis did not answer within {self._timeout_s:.3g} s"))
            return
        self._watchdog = self._loop.call_later(self._timeout_s * _WATCH_SHARE, self._watch)

    def _fail(self, error: Exception) -> None:
        self.closed = True
        self._end_linger()
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if self._timer is not None:
            self._timer.close()
            self._timer = None
        waiting, self._waiting = self._waiting, collections.deque()
        self._buffer.clear()
        for future, _ in waiting:
            if not future.done():
                future.set_exception(error)
        if self._transport is not None:
            self._transport.abort()

    def close(self) -> None:
        """Close the connection; waiting callers fail."""
        self._fail(ConnectionError("redis pipe closed"))


class RedisPipe:
    """Pipelined commands over one connection, reconnected on demand; see the module docstring."""

    def __init__(self, endpoint: Endpoint, *, timeout_s: float = 0.25, linger_s: float = 0.0) -> None:
        if linger_s < 0:
            raise ValueError("linger_s must not be negative")
        self._endpoint = endpoint
        self._timeout_s = timeout_s
        self._linger_s = linger_s
        # Made on the loop at the first connection when lingering is on; kept across reconnections.
        self.load: LoopLoad | None = None
        self._connection: _Connection | None = None
        self._connecting: asyncio.Future[_Connection] | None = None
        # Set by close(): the pipe neither reconnects nor samples the loop again.
        self._closed = False
        self.stats = PipeStats()

    @classmethod
    def from_url(cls, url: str, *, timeout_s: float = 0.25, linger_s: float = 0.0) -> RedisPipe:
        """A pipe to the Redis at ``url``."""
        return cls(Endpoint.from_url(url), timeout_s=timeout_s, linger_s=linger_s)

    async def execute(self, *args: str | bytes | int) -> Any:
        """Run one command and return its reply (redis-py's exception classes for error replies)."""
        return await self.send(encode_command(args))

    async def send(self, command: bytes) -> Any:
        """Run one command already encoded with :func:`encode_command`."""
        connection = self._connection
        if connection is None or connection.closed:
            if self._closed:
                raise ConnectionError("redis pipe closed")
            connection = await self._connect()
        return await connection.send(command)

    async def _connect(self) -> _Connection:
        # One connection attempt at a time; callers arriving meanwhile wait for the same one.
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._open())
        connecting = self._connecting
        try:
            return await asyncio.shield(connecting)
        finally:
            if connecting.done():
                self._connecting = None

    async def _open(self) -> _Connection:
        if self._closed:  # Closed before this attempt began.
            raise ConnectionError("redis pipe closed")
        loop = asyncio.get_running_loop()
        endpoint = self._endpoint
        if self._linger_s > 0 and self.load is None:
            self.load = LoopLoad(loop)

        def protocol() -> _Connection:
            return _Connection(loop, self._timeout_s, self.stats, self.load, self._linger_s)

        async with asyncio.timeout(self._timeout_s * 4):
            if endpoint.path:
                _, connection = await loop.create_unix_connection(protocol, endpoint.path)
            else:
                _, connection = await loop.create_connection(protocol, endpoint.host, endpoint.port)
            try:
                if endpoint.password:
                    auth = [endpoint.username, endpoint.password] if endpoint.username else [endpoint.password]
                    await connection.send(encode_command(["AUTH", *auth]))
                if endpoint.db:
                    await connection.send(encode_command(["SELECT", endpoint.db]))
            except BaseException:
                connection.close()
                raise
        if self._closed:  # Closed while the connection was being made (close() stopped the sampler).
            connection.close()
            raise ConnectionError("redis pipe closed")
        self._connection = connection
        return connection

    async def close(self) -> None:
        """Close the connection (callers still waiting fail) and stop sampling the loop's load; later calls fail."""
        self._closed = True
        if self._connection is not None:
            self._connection.close()
            self._connection = None
        if self.load is not None:
            self.load.close()
            self.load = None
