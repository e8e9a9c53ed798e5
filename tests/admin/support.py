"""Helpers of the control-plane tests: in-process servers on a thread of their own, and live-feed watchers.

Each server runs on an event loop in a thread of its own (:class:`Harness`), so a test is plain blocking code
that talks to it over real gRPC with :class:`spendgate.Client` and :class:`spendgate.client.AdminClient`, and
moves its :class:`~spendgate.clock.ManualClock` between calls.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime
import io
import os
import pathlib
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import fakeredis
import pytest
import redis
import redis.asyncio as aioredis

from spendgate.app import SpendgateServer, running_server
from spendgate.client import AdminClient, Client, Event
from spendgate.clock import ManualClock
from spendgate.domain import SpendgateError, Window
from spendgate.settings import Settings

T = TypeVar("T")

REPO = pathlib.Path(__file__).resolve().parents[2]
FLEET = REPO / "examples" / "fleet.yaml"
# Tuesday 2026-03-10 12:00 UTC: mid-day, mid-week and mid-month, so a test's minutes stay in one window.
START_MS = int(datetime.datetime(2026, 3, 10, 12, 0, tzinfo=datetime.UTC).timestamp() * 1000)
MINUTE_MS = 60_000
DAY_MS = 86_400_000
USD = 1_000_000
CALL_TIMEOUT_S = 30.0


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for(predicate: Callable[[], T | None], *, timeout_s: float = 15.0, what: str = "a condition") -> T:
    """Poll until ``predicate`` returns something truthy; fail with ``what`` after the deadline.

    For things that happen in the background (deliveries, collections); never used to measure speed.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.02)


def delete_prefix(url: str, prefix: str) -> None:
    """Delete the keys under one test's prefix (and nothing else)."""
    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        for start in range(0, len(keys), 500):
            client.delete(*keys[start : start + 500])
    finally:
        client.close()


def write_plan(directory: pathlib.Path, text: str, name: str = "plan.yaml") -> pathlib.Path:
    """Write a plan file and return its path."""
    path = directory / name
    path.write_text(text)
    return path


class Harness:
    """One spendgate server on an event loop in a thread of its own."""

    def __init__(self, settings: Settings, clock: ManualClock | None, redis_url: str | None) -> None:
        self.settings = settings
        self.clock = clock
        self._redis_url = redis_url
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="spendgate-harness", daemon=True)
        self._context: Any = None
        self._clients: list[Client | AdminClient] = []
        self.server: SpendgateServer

    def start(self) -> Harness:
        """Start the loop and the server (its plan applied)."""
        self._thread.start()
        self.server = self.run(self._enter())
        return self

    async def _enter(self) -> SpendgateServer:
        if self._redis_url is None:
            client: aioredis.Redis = fakeredis.FakeAsyncRedis(decode_responses=True)
        else:
            client = aioredis.Redis.from_url(self._redis_url, decode_responses=True, socket_timeout=10)
        context = running_server(self.settings, clock=self.clock, client=client)
        server: SpendgateServer = await context.__aenter__()
        self._context = context
        return server

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine on the server's loop (for looking at the store) and return its result."""
        future: concurrent.futures.Future[T] = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        try:
            return future.result(timeout=CALL_TIMEOUT_S)
        except concurrent.futures.TimeoutError:
            stacks = []
            for task in asyncio.all_tasks(self._loop):
                out = io.StringIO()
                task.print_stack(file=out)
                stacks.append(out.getvalue())
            pytest.fail(f"the server's loop did not finish within {CALL_TIMEOUT_S} s; its tasks:\n" + "\n".join(stacks))

    @property
    def address(self) -> str:
        """host:port of the server."""
        return self.server.address

    def spend_client(self) -> Client:
        """A blocking SpendService client, closed with the harness."""
        client = Client(self.address, timeout_s=CALL_TIMEOUT_S)
        self._clients.append(client)
        return client

    def admin_client(self) -> AdminClient:
        """A blocking AdminService client, closed with the harness."""
        client = AdminClient(self.address, timeout_s=CALL_TIMEOUT_S)
        self._clients.append(client)
        return client

    def stop(self) -> None:
        """Stop the server, every task left on the loop, and the loop (once; later calls do nothing)."""
        if self._loop.is_closed():
            return
        for client in self._clients:
            client.close()
        try:
            if self._context is not None:
                self.run(self._context.__aexit__(None, None, None))
            self.run(self._cancel_rest())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=30)
            self._loop.close()

    async def _cancel_rest(self) -> None:
        current = asyncio.current_task()
        rest = [task for task in asyncio.all_tasks() if task is not current]
        pending = rest
        while pending:
            for task in pending:
                task.cancel()
            await asyncio.wait(pending, timeout=0.1)
            pending = [task for task in pending if not task.done()]
        await asyncio.gather(*rest, return_exceptions=True)


class Fleet:
    """A started server with its clock and clients: what most tests need."""

    def __init__(self, harness: Harness) -> None:
        self.harness = harness
        self.clock = harness.clock
        self.spend = harness.spend_client()
        self.admin = harness.admin_client()

    @property
    def address(self) -> str:
        """host:port of the server."""
        return self.harness.address

    def advance_ms(self, milliseconds: int) -> None:
        """Move the server's clock forward."""
        assert self.clock is not None, "this server runs on the system clock"
        self.clock.advance(milliseconds)

    def advance_minutes(self, minutes: int) -> None:
        """Move the server's clock forward by whole minutes."""
        self.advance_ms(minutes * MINUTE_MS)

    def now_ms(self) -> int:
        """The server's clock."""
        assert self.clock is not None, "this server runs on the system clock"
        return self.clock.now_ms()

    def held(self, node_id: str, window: Window = Window.DAY) -> int:
        """Money a node holds in a window now."""
        return self.spend.get_budget(node_id).window(window).held_micros

    def spent(self, node_id: str, window: Window = Window.DAY) -> int:
        """Money a node spent in a window now."""
        return self.spend.get_budget(node_id).window(window).spent_micros


StartFleet = Callable[..., Fleet]


class Watcher:
    """A WatchEvents stream read by a thread into a queue, with helpers to line events up with actions.

    A watch starts at the newest event when the server takes the call, so a test first *syncs*: it repeats a
    harmless marker action until the marker shows up on the stream, and only then acts. It ends with another
    marker: everything the test did happened before it, so the events seen up to it are all there will be.
    """

    def __init__(self, address: str, node_id: str = "", kinds: tuple[str, ...] = ()) -> None:
        self._admin = AdminClient(address, timeout_s=CALL_TIMEOUT_S)
        self._events: queue.Queue[Event | BaseException | None] = queue.Queue()
        self._thread = threading.Thread(target=self._pump, args=(node_id, kinds), daemon=True)
        self._thread.start()

    def _pump(self, node_id: str, kinds: tuple[str, ...]) -> None:
        try:
            for event in self._admin.watch(node_id, kinds):
                self._events.put(event)
        except BaseException as error:  # Handed to the test thread, which re-raises it.
            self._events.put(error)
        finally:
            self._events.put(None)

    def next(self, timeout_s: float = 15.0) -> Event | None:
        """The next event, or ``None`` when none comes within ``timeout_s``."""
        try:
            item = self._events.get(timeout=timeout_s)
        except queue.Empty:
            return None
        if isinstance(item, BaseException):
            raise item
        if item is None:
            pytest.fail("the watch stream ended")
        return item

    def sync(self, marker: Callable[[], object], is_marker: Callable[[Event], bool]) -> None:
        """Repeat ``marker()`` until its event arrives, then drop everything received so far."""
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            marker()
            wait_until = time.monotonic() + 0.3
            while time.monotonic() < wait_until:
                event = self.next(timeout_s=0.05)
                if event is not None and is_marker(event):
                    self._drain()
                    return
        pytest.fail("the watch never saw the marker event")

    def _drain(self) -> None:
        while True:
            try:
                item = self._events.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, BaseException):
                raise item

    def until(self, is_last: Callable[[Event], bool], timeout_s: float = 15.0) -> list[Event]:
        """Every event up to and including the first that ``is_last`` accepts."""
        seen: list[Event] = []
        deadline = time.monotonic() + timeout_s
        while True:
            event = self.next(timeout_s=max(0.01, deadline - time.monotonic()))
            if event is None:
                pytest.fail(f"the closing event never came; saw {seen}")
            seen.append(event)
            if is_last(event):
                return seen

    def close(self) -> None:
        """End the stream (closing the channel cancels it) and the thread."""
        self._admin.close()
        self._thread.join(timeout=10)


OpenWatcher = Callable[..., Watcher]
SPENDGATE = pathlib.Path(sys.executable).with_name("spendgate")


class ServeProcess:
    """``spendgate serve`` in a subprocess on a free port; its log goes to a file shown when it fails."""

    def __init__(self, directory: pathlib.Path, *args: str, env: dict[str, str] | None = None) -> None:
        port = free_port()
        self.target = f"127.0.0.1:{port}"
        self.log_path = directory / f"serve-{port}.log"
        self.env = {**os.environ, **(env or {})}
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [str(SPENDGATE), "serve", "--port", str(port), "--log-format", "text", *args],
                cwd=directory,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def wait_ready(self, node_id: str, token: str | None = None) -> None:
        """Wait until the server answers GetBudget for ``node_id`` (its plan is applied)."""
        deadline = time.monotonic() + 30
        with Client(self.target, token=token, timeout_s=2.0) as client:
            while True:
                if self.process.poll() is not None:
                    pytest.fail(f"spendgate serve exited with {self.process.returncode}:\n{self.log()}")
                try:
                    client.get_budget(node_id)
                    return
                except SpendgateError:
                    if time.monotonic() > deadline:
                        pytest.fail(f"spendgate serve did not answer within 30 s:\n{self.log()}")
                    time.sleep(0.1)

    def log(self) -> str:
        """What the server wrote so far."""
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        """SIGTERM, then wait for the graceful shutdown (kill if it hangs)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
