"""The hot path's Redis pipe: RESP encoding, pipelining in order, deadlines, lost connections, NOSCRIPT.

The deadline and connection tests talk to a scripted fake Redis (an asyncio TCP server of the test's own) so
they can make Redis stall, hang up or answer NOSCRIPT on cue; ordering and error replies run against the
suite's real Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import hiredis
import pytest
import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.connection import Connection

from helpers import new_prefix
from spendgate import timerfd
from spendgate.app import redis_pipe
from spendgate.domain import InvalidArgumentError, UnavailableError
from spendgate.metrics import Metrics
from spendgate.settings import load_settings
from spendgate.store.keys import Keys
from spendgate.store.pipe import (
    BATCH_SIZE_MAX,
    Encoded,
    Endpoint,
    LoopLoad,
    PipeUnsupportedError,
    RedisPipe,
    encode_command,
    flatten,
)
from spendgate.store.redis_store import RedisStore

TIMEOUT_S = 0.2

# What the fake Redis answers a command with: RESP bytes, or None to stay silent, or CLOSE to hang up.
CLOSE = b"<close>"
Answer = Callable[[list[str], int], bytes | None]


class FakeRedis:
    """A TCP server that reads RESP commands and answers each as ``answer(command, connection_number)`` says."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.commands: list[list[str]] = []
        self.connections = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> FakeRedis:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await close_writers(self._writers)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._server.wait_closed(), 2)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.append(writer)
        number = self.connections
        parser = hiredis.Reader(encoding="utf-8")
        try:
            while data := await reader.read(65536):
                parser.feed(data)
                while (command := parser.gets()) is not False:
                    self.commands.append(command)
                    answer = self.answer(command, number)
                    if answer == CLOSE:
                        writer.close()
                        return
                    if answer is not None:
                        writer.write(answer)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()


async def close_writers(writers: list[asyncio.StreamWriter]) -> None:
    """Close the server side of every connection (Python 3.11's wait_closed does not wait for them)."""
    for writer in writers:
        writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writer.wait_closed(), 2)


def pong_after_first_connection(command: list[str], connection: int) -> bytes | None:
    """The first connection never answers; later ones answer every command with +PONG."""
    return None if connection == 1 else b"+PONG\r\n"


@pytest.fixture
async def real_pipe(redis_url: str) -> AsyncIterator[RedisPipe]:
    pipe = RedisPipe.from_url(redis_url, timeout_s=2.0)
    try:
        yield pipe
    finally:
        await pipe.close()


@pytest.mark.parametrize(
    "args",
    [
        ["PING"],
        ["SET", "k", "v", "PX", 100],
        ["EVALSHA", "abc", 2, "key:{a}:1", "key:{a}:2", "", "ünïcode", -5, b"\x00\xffraw"],
        # Around the sizes whose headers are made once.
        ["SET", "k" * 1023, "v" * 1024, "m" * 5000],
    ],
)
def test_encoding_is_what_redis_py_sends(args: list[Any]) -> None:
    assert encode_command(args) == b"".join(Connection().pack_command(*args))


def test_urls_parse_like_redis_py_and_tls_is_left_to_it() -> None:
    parsed = Endpoint.from_url("redis://alice:s3cret@10.0.0.2:6380/3")
    assert (parsed.host, parsed.port, parsed.username, parsed.password, parsed.db) == (
        "10.0.0.2",
        6380,
        "alice",
        "s3cret",
        3,
    )
    assert Endpoint.from_url("unix:///run/redis.sock?db=2") == Endpoint(path="/run/redis.sock", db=2)
    with pytest.raises(PipeUnsupportedError):
        Endpoint.from_url("rediss://10.0.0.2:6380/0")


@pytest.mark.redis
async def test_concurrent_commands_are_answered_in_order(real_pipe: RedisPipe, redis_url: str) -> None:
    key = f"{new_prefix()}:counter"
    try:
        replies = await asyncio.gather(*(real_pipe.execute("INCR", key) for _ in range(2000)))
        assert replies == list(range(1, 2001))
        assert await real_pipe.execute("GET", key) == "2000"
    finally:
        await real_pipe.execute("DEL", key)


@pytest.mark.redis
async def test_error_replies_raise_redis_py_errors_and_the_pipe_goes_on(real_pipe: RedisPipe) -> None:
    with pytest.raises(redis.exceptions.NoScriptError):
        await real_pipe.execute("EVALSHA", "0" * 40, 0)
    with pytest.raises(redis.exceptions.ResponseError, match="unknown command"):
        await real_pipe.execute("NOT-A-COMMAND")
    assert await real_pipe.execute("EVAL", "return {1, 'two', {3}}", 0) == [1, "two", [3]]
    assert await real_pipe.execute("PING") == "PONG"


@pytest.mark.redis
async def test_a_cancelled_caller_does_not_shift_the_replies_of_the_others(real_pipe: RedisPipe) -> None:
    key = f"{new_prefix()}:list"
    await real_pipe.execute("PING")  # Connected, so all three commands are buffered in the same turn.
    try:
        first = asyncio.ensure_future(real_pipe.execute("RPUSH", key, "a"))
        cancelled = asyncio.ensure_future(real_pipe.execute("RPUSH", key, "b"))
        third = asyncio.ensure_future(real_pipe.execute("RPUSH", key, "c"))
        await asyncio.sleep(0)
        cancelled.cancel()
        assert await first == 1
        assert await third == 3
        assert await real_pipe.execute("LRANGE", key, 0, -1) == ["a", "b", "c"]
    finally:
        await real_pipe.execute("DEL", key)


async def test_a_redis_that_stops_answering_fails_callers_within_the_deadline_then_reconnects() -> None:
    async with FakeRedis(pong_after_first_connection) as fake:
        pipe = RedisPipe.from_url(fake.url, timeout_s=TIMEOUT_S)
        try:
            started = time.monotonic()
            calls = [asyncio.ensure_future(pipe.execute("PING")) for _ in range(5)]
            outcomes = await asyncio.gather(*calls, return_exceptions=True)
            waited_s = time.monotonic() - started
            assert all(isinstance(outcome, TimeoutError) for outcome in outcomes), outcomes
            assert TIMEOUT_S <= waited_s < TIMEOUT_S * 3
            # The dead connection is dropped; the next call opens another, which answers.
            assert await pipe.execute("PING") == "PONG"
            assert fake.connections == 2
        finally:
            await pipe.close()


async def test_a_connection_lost_mid_call_fails_its_callers_and_the_next_call_reconnects() -> None:
    def hang_up_first(command: list[str], connection: int) -> bytes | None:
        return CLOSE if connection == 1 else b"+PONG\r\n"

    async with FakeRedis(hang_up_first) as fake:
        pipe = RedisPipe.from_url(fake.url, timeout_s=5.0)
        try:
            with pytest.raises(ConnectionError):
                await asyncio.wait_for(pipe.execute("PING"), 2.0)
            assert await pipe.execute("PING") == "PONG"
        finally:
            await pipe.close()


async def test_a_loading_redis_is_an_outage_for_the_store() -> None:
    async with FakeRedis(lambda command, connection: b"-LOADING Redis is loading the dataset in memory\r\n") as fake:
        pipe = RedisPipe.from_url(fake.url, timeout_s=2.0)
        try:
            with pytest.raises(redis.exceptions.BusyLoadingError):
                await pipe.execute("PING")
            store = RedisStore(aioredis.Redis.from_url(fake.url), keys=Keys(new_prefix()), pipe=pipe)
            with pytest.raises(UnavailableError, match="BusyLoadingError"):
                await store.expire_holds("acme", 0)
            await store.close()
        finally:
            await pipe.close()


async def test_credentials_and_database_are_sent_on_connect() -> None:
    async with FakeRedis(lambda command, connection: b"+OK\r\n") as fake:
        pipe = RedisPipe.from_url(f"redis://alice:s3cret@127.0.0.1:{fake.port}/4", timeout_s=2.0)
        try:
            assert await pipe.execute("PING") == "OK"
        finally:
            await pipe.close()
    assert fake.commands == [["AUTH", "alice", "s3cret"], ["SELECT", "4"], ["PING"]]


async def test_a_refused_connection_is_an_outage_not_a_hang() -> None:
    async with FakeRedis(lambda command, connection: None) as fake:
        port = fake.port
    pipe = RedisPipe.from_url(f"redis://127.0.0.1:{port}/0", timeout_s=TIMEOUT_S)
    try:
        with pytest.raises(ConnectionRefusedError):
            await asyncio.wait_for(pipe.execute("PING"), 2.0)
    finally:
        await pipe.close()


async def test_the_store_reloads_a_script_redis_forgot_and_runs_it_once_more() -> None:
    evalshas: list[str] = []

    def forget_once(command: list[str], connection: int) -> bytes | None:
        if command[0] == "EVALSHA":
            evalshas.append(command[1])
            if len(evalshas) == 1:
                return b"-NOSCRIPT No matching script. Please use EVAL.\r\n"
            return b"*2\r\n$2\r\nOK\r\n$1\r\n7\r\n"
        if command[:2] == ["SCRIPT", "LOAD"]:
            return b"$40\r\n" + b"0" * 40 + b"\r\n"
        return b"-ERR unexpected\r\n"

    async with FakeRedis(forget_once) as fake:
        pipe = RedisPipe.from_url(fake.url, timeout_s=2.0)
        client = aioredis.Redis.from_url(fake.url, decode_responses=True)
        store = RedisStore(client, keys=Keys(new_prefix()), pipe=pipe)
        try:
            assert await store._run("expire", ["holds"], [1, 10, 1000]) == ["OK", "7"]
        finally:
            await store.close()
    assert [command[:2] for command in fake.commands] == [
        ["EVALSHA", evalshas[0]],
        ["SCRIPT", "LOAD"],
        ["EVALSHA", evalshas[0]],
    ]
    assert fake.commands[1][2].startswith("-- _lib.lua")


@pytest.mark.redis
async def test_commands_issued_in_one_turn_share_one_write_and_metrics_count_both(real_pipe: RedisPipe) -> None:
    metrics = Metrics()
    metrics.watch_pipe(real_pipe.stats)
    await real_pipe.execute("PING")  # Connected: the next commands are buffered, not waiting for a connection.
    before = (real_pipe.stats.commands, real_pipe.stats.writes)

    assert await asyncio.gather(*(real_pipe.execute("PING") for _ in range(500))) == ["PONG"] * 500

    assert (real_pipe.stats.commands - before[0], real_pipe.stats.writes - before[1]) == (500, 1)
    assert metrics.registry.get_sample_value("spendgate_redis_pipe_commands_total") == before[0] + 500
    assert metrics.registry.get_sample_value("spendgate_redis_pipe_writes_total") == before[1] + 1


async def test_commands_wait_for_the_batch_that_is_out_then_leave_together() -> None:
    """Nagle-like batching: one write out at a time; what queues meanwhile leaves as one write when it returns."""
    received: list[int] = []
    release = asyncio.Event()
    first_arrived = asyncio.Event()
    writers: list[asyncio.StreamWriter] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        parser = hiredis.Reader(encoding="utf-8")
        while data := await reader.read(65536):
            parser.feed(data)
            commands = 0
            while parser.gets() is not False:
                commands += 1
            received.append(commands)
            first_arrived.set()
            if len(received) == 1:
                await release.wait()  # Hold the first reply back while more commands queue up.
            writer.write(b"+PONG\r\n" * commands)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    pipe = RedisPipe.from_url(f"redis://127.0.0.1:{server.sockets[0].getsockname()[1]}/0", timeout_s=5.0)
    try:
        first = asyncio.ensure_future(pipe.execute("PING"))
        await asyncio.wait_for(first_arrived.wait(), 5.0)
        queued = [asyncio.ensure_future(pipe.execute("PING")) for _ in range(10)]
        await asyncio.sleep(0.05)
        assert received == [1]  # Nothing else left while the first write was unanswered.
        release.set()
        assert await asyncio.gather(first, *queued) == ["PONG"] * 11
        assert received == [1, 10]
        assert (pipe.stats.commands, pipe.stats.writes) == (11, 2)
    finally:
        await pipe.close()
        server.close()
        await close_writers(writers)


def test_encoded_runs_encode_as_their_values() -> None:
    run = Encoded("key:{a}:1", 7, b"\x00raw")
    args: list[Any] = ["EVALSHA", "abc", 4, run, "", -5, Encoded(), "ünïcode"]
    flat = ["EVALSHA", "abc", 4, "key:{a}:1", 7, b"\x00raw", "", -5, "ünïcode"]
    assert encode_command(args) == b"".join(Connection().pack_command(*flat))
    # Read back, integers are text (as Redis sees every argument); bytes that are not UTF-8 stay bytes.
    assert flatten(args) == ["EVALSHA", "abc", 4, "key:{a}:1", "7", "\x00raw", "", -5, "ünïcode"]
    assert Encoded(b"\xff\xfe", "").values() == (b"\xff\xfe", "")
    assert encode_command(flatten(args)) == encode_command(args)


# Lingering: while the event loop is busy, a lone write waits for company.


def pong(command: list[str], connection: int) -> bytes | None:
    return b"+PONG\r\n"


async def _busy_pipe(url: str, linger_s: float) -> RedisPipe:
    """A connected pipe whose loop counts as busy for the rest of the test (sampling stopped)."""
    pipe = RedisPipe.from_url(url, timeout_s=5.0, linger_s=linger_s)
    assert await pipe.execute("PING") == "PONG"
    assert pipe.load is not None
    pipe.load.close()
    pipe.load.busy = True
    return pipe


async def _pings_in_separate_turns(pipe: RedisPipe, count: int) -> list[Any]:
    """``count`` PINGs, each issued in a turn of the loop of its own (as unary calls reach a server)."""
    calls = []
    for _ in range(count):
        calls.append(asyncio.ensure_future(pipe.execute("PING")))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
    return await asyncio.gather(*calls)


def test_the_loop_counts_as_busy_from_one_share_and_idle_below_another() -> None:
    clock = {"cpu": 0.0, "wall": 0.0}
    loop = asyncio.new_event_loop()
    try:
        load = LoopLoad(
            loop, busy_from=0.6, idle_below=0.45, cpu_clock=lambda: clock["cpu"], wall_clock=lambda: clock["wall"]
        )
        seen = []
        for share in (0.5, 0.7, 0.5, 0.4, 0.5, 0.6):
            clock["cpu"] += share * 0.1
            clock["wall"] += 0.1
            load.sample()
            seen.append((round(load.share, 3), load.busy))
        load.close()
        with pytest.raises(ValueError, match="idle_below"):
            LoopLoad(loop, busy_from=0.4, idle_below=0.5)
    finally:
        loop.close()
    # Busy from 0.6; busy still at 0.5 (the gap); idle below 0.45, and idle still at 0.5.
    assert seen == [(0.5, False), (0.7, True), (0.5, True), (0.4, False), (0.5, False), (0.6, True)]


async def test_an_idle_loop_sends_each_lone_write_at_once() -> None:
    async with FakeRedis(pong) as fake:
        pipe = RedisPipe.from_url(fake.url, timeout_s=5.0, linger_s=1.0)
        try:
            await pipe.execute("PING")
            # Idle for the rest of the test, whatever else this machine runs (sampling stopped).
            assert pipe.load is not None
            pipe.load.close()
            pipe.load.busy = False
            before = (pipe.stats.writes, pipe.stats.lingered)
            started = time.monotonic()
            assert await _pings_in_separate_turns(pipe, 3) == ["PONG"] * 3
            # No linger: a second's linger would show in the time, and the writes are not shared.
            assert time.monotonic() - started < 0.5
            assert pipe.stats.writes - before[0] >= 2
            assert pipe.stats.lingered == before[1]
        finally:
            await pipe.close()


@pytest.mark.parametrize("use_timerfd", [True, False], ids=["timerfd", "loop-timer"])
async def test_a_busy_loop_holds_a_lone_write_until_the_linger_ends(
    monkeypatch: pytest.MonkeyPatch, use_timerfd: bool
) -> None:
    if use_timerfd and not timerfd.available():
        pytest.skip("timerfd needs Linux")
    if not use_timerfd:
        monkeypatch.setattr(timerfd, "available", lambda: False)
    linger_s = 0.3
    async with FakeRedis(pong) as fake:
        pipe = await _busy_pipe(fake.url, linger_s)
        try:
            before = (pipe.stats.commands, pipe.stats.writes, pipe.stats.lingered)
            started = time.monotonic()
            assert await _pings_in_separate_turns(pipe, 5) == ["PONG"] * 5
            waited_s = time.monotonic() - started
            # Five commands from five turns shared one write, which left when the linger ended. (The loop's
            # own timers may fire up to a millisecond early.)
            assert (pipe.stats.commands - before[0], pipe.stats.writes - before[1]) == (5, 1)
            assert pipe.stats.lingered - before[2] == 1
            assert linger_s - 0.002 <= waited_s < 2.0
            assert pipe._connection is not None
            assert (pipe._connection._timer is not None) == use_timerfd
        finally:
            await pipe.close()


async def test_a_full_batch_does_not_wait_out_the_linger() -> None:
    async with FakeRedis(pong) as fake:
        pipe = await _busy_pipe(fake.url, linger_s=5.0)
        try:
            lingered = pipe.stats.lingered
            started = time.monotonic()
            replies = await asyncio.gather(*(pipe.execute("PING") for _ in range(BATCH_SIZE_MAX)))
            assert replies == ["PONG"] * BATCH_SIZE_MAX
            assert time.monotonic() - started < 2.0
            assert pipe.stats.lingered == lingered
        finally:
            await pipe.close()


async def test_a_lost_connection_closes_its_linger_timer_and_the_next_one_lingers_too() -> None:
    def hang_up_on_bye(command: list[str], connection: int) -> bytes | None:
        return CLOSE if connection == 1 and command == ["ECHO", "bye"] else b"+PONG\r\n"

    async with FakeRedis(hang_up_on_bye) as fake:
        pipe = await _busy_pipe(fake.url, linger_s=0.01)
        try:
            first = pipe._connection
            assert first is not None
            with pytest.raises(ConnectionError):
                await asyncio.wait_for(pipe.execute("ECHO", "bye"), 2.0)
            # The ECHO lingered, so the first connection had a timer; it closed with the connection.
            assert first.closed
            assert first._timer is None
            assert first._linger_handle is None
            assert await _pings_in_separate_turns(pipe, 3) == ["PONG"] * 3
            assert pipe._connection is not first
            assert pipe.stats.lingered >= 2
        finally:
            await pipe.close()
        assert pipe.load is None


async def test_a_timer_that_cannot_be_armed_falls_back_to_the_loop_s_timer(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self: timerfd.TimerFd, delay_s: float) -> None:
        raise OSError("timerfd_settime refused")

    monkeypatch.setattr(timerfd.TimerFd, "arm_in", refuse)
    async with FakeRedis(pong) as fake:
        pipe = await _busy_pipe(fake.url, linger_s=0.05)
        try:
            before = pipe.stats.writes
            assert await _pings_in_separate_turns(pipe, 4) == ["PONG"] * 4
            assert await _pings_in_separate_turns(pipe, 4) == ["PONG"] * 4
            # Each four still shared a write; nothing was stranded.
            assert pipe.stats.writes - before == 2
            assert pipe._connection is not None
            assert pipe._connection._timer is None
        finally:
            await pipe.close()


async def test_the_real_cpu_clock_makes_a_spinning_loop_busy_and_a_sleeping_one_idle() -> None:
    load = LoopLoad(asyncio.get_running_loop(), period_s=0.05, busy_from=0.3, idle_below=0.1)
    try:
        end = time.monotonic() + 0.3
        while time.monotonic() < end:  # The loop's own thread on a CPU all the while.
            pass
        load.sample()
        assert load.busy, load.share
        await asyncio.sleep(0.3)
        load.sample()
        assert not load.busy, load.share
    finally:
        load.close()


def test_the_linger_setting_is_bounded_and_reaches_the_pipe() -> None:
    with pytest.raises(InvalidArgumentError, match="redis_linger_us"):
        load_settings({"SPENDGATE_REDIS_LINGER_US": "20000"})
    with pytest.raises(InvalidArgumentError, match="redis_linger_us"):
        load_settings({"SPENDGATE_REDIS_LINGER_US": "-1"})
    with pytest.raises(ValueError, match="linger_s"):
        RedisPipe.from_url("redis://127.0.0.1:6379/0", linger_s=-0.001)


async def test_a_pipe_without_linger_never_samples_the_loop() -> None:
    async with FakeRedis(pong) as fake:
        # Off by default.
        pipe = redis_pipe(load_settings({"SPENDGATE_REDIS_URL": fake.url}))
        assert pipe is not None
        try:
            assert await pipe.execute("PING") == "PONG"
            assert pipe.load is None
        finally:
            await pipe.close()
        lingering = redis_pipe(load_settings({"SPENDGATE_REDIS_URL": fake.url, "SPENDGATE_REDIS_LINGER_US": "1000"}))
        assert lingering is not None
        try:
            assert await lingering.execute("PING") == "PONG"
            assert lingering.load is not None
        finally:
            await lingering.close()


async def test_a_closed_pipe_refuses_calls_and_samples_no_more() -> None:
    async with FakeRedis(pong) as fake:
        pipe = RedisPipe.from_url(fake.url, timeout_s=5.0, linger_s=0.001)
        assert await pipe.execute("PING") == "PONG"
        connections = fake.connections
        await pipe.close()
        with pytest.raises(ConnectionError, match="closed"):
            await pipe.execute("PING")
        # Neither a new connection nor a new load sampler.
        assert fake.connections == connections
        assert pipe.load is None


@pytest.mark.parametrize("turns", [0, 1, 2], ids=["before-the-attempt", "as-it-starts", "while-connecting"])
async def test_a_pipe_closed_while_connecting_drops_the_new_connection(turns: int) -> None:
    async with FakeRedis(pong) as fake:
        pipe = RedisPipe.from_url(fake.url, timeout_s=5.0, linger_s=0.001)
        call = asyncio.ensure_future(pipe.execute("PING"))
        for _ in range(turns):
            await asyncio.sleep(0)
        await pipe.close()
        with pytest.raises(ConnectionError, match="closed"):
            await call
        with pytest.raises(ConnectionError, match="closed"):
            await pipe.execute("PING")
        # No load sampler is left running.
        assert pipe.load is None
