"""Helpers shared by the test suites: a redis-server process of our own, key snapshots, plans and commands.

Import them from any test module with ``from helpers import ...`` (``tests/`` is on ``sys.path`` because the
root ``conftest.py`` lives there).

The Redis helpers start and stop *our own* ``redis-server`` process, never anybody else's: API tests use
:class:`RedisServer` to kill Redis and bring it back on the same port for outage tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import pytest
import redis
import redis.asyncio as aioredis

from spendgate.bench.servers import UNIX_SOCKET_PATH_MAX, redis_server_options
from spendgate.domain import AccountPlan, AuthorizeCommand
from spendgate.plan import load_plan, parse_plan

T = TypeVar("T")

ROOT = pathlib.Path(__file__).resolve().parent.parent
FLEET_YAML = ROOT / "examples" / "fleet.yaml"
REDIS_SERVER_BINARY = shutil.which("redis-server") or "/usr/bin/redis-server"

USD = 1_000_000
# Monday 2026-11-30 10:00:00 UTC: the start of every test clock unless a test needs another instant.
START = datetime.datetime(2026, 11, 30, 10, 0, 0, tzinfo=datetime.UTC)
START_MS = int(START.timestamp() * 1000)


def ms(moment: datetime.datetime) -> int:
    """Milliseconds since the epoch of an aware datetime."""
    assert moment.tzinfo is not None, "pass an aware datetime"
    return int(moment.timestamp() * 1000)


def in_ci() -> bool:
    """Whether the run is in CI (``CI=true``), where a missing server fails instead of skipping."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


# ---------------------------------------------------------------------------------------------------------
# A redis-server process of our own.


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class RedisServerError(RuntimeError):
    """redis-server could not be started (missing binary, port taken, crashed at start)."""


class RedisServer:
    """A ``redis-server`` process started by the tests: no persistence, bound to 127.0.0.1, in its own dir.

    ``stop()`` shuts it down gracefully, ``kill()`` pulls the plug (SIGKILL), and ``start()`` brings it back on
    the same port (empty: nothing is persisted), which is what outage tests need.
    """

    def __init__(
        self, port: int | None = None, directory: pathlib.Path | None = None, *, unix_socket: bool = False
    ) -> None:
        self.port = port or free_port()
        self._own_directory = directory is None
        self.directory = directory or pathlib.Path(tempfile.mkdtemp(prefix="spendgate-redis-"))
        # With unix_socket it listens on a socket in its directory too.
        self.socket_path = self.directory / "redis.sock" if unix_socket else None
        if self.socket_path is not None and len(str(self.socket_path).encode()) > UNIX_SOCKET_PATH_MAX:
            if self._own_directory:
                shutil.rmtree(self.directory, ignore_errors=True)
            raise ValueError(f"{self.socket_path} is too long for a Unix socket")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The server's URL (database 0)."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def socket_url(self) -> str:
        """The URL of its Unix socket (database 0); only with ``unix_socket``."""
        if self.socket_path is None:
            raise ValueError("this redis-server has no Unix socket")
        return f"unix://{self.socket_path}?db=0"

    @property
    def running(self) -> bool:
        """Whether the process is alive."""
        return self.process is not None and self.process.poll() is None

    def start(self, ready_timeout_s: float = 10.0) -> RedisServer:
        """Start the process and wait until it answers PING; raise :class:`RedisServerError` otherwise."""
        if self.running:
            return self
        if not os.path.exists(REDIS_SERVER_BINARY):
            raise RedisServerError(f"no redis-server binary at {REDIS_SERVER_BINARY}")
        log = self.directory / "redis.log"
        self.process = subprocess.Popen(
            [
                REDIS_SERVER_BINARY,
                *redis_server_options(self.port, socket_path=str(self.socket_path or "")),
                "--dir",
                str(self.directory),
                "--logfile",
                str(log),
            ],
            cwd=self.directory,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + ready_timeout_s
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1, socket_connect_timeout=1)
        try:
            while True:
                if self.process.poll() is not None:
                    tail = log.read_text(errors="replace")[-500:] if log.exists() else ""
                    self.process = None
                    raise RedisServerError(f"redis-server exited at start on port {self.port}: {tail}")
                try:
                    client.ping()
                    return self
                except redis.exceptions.ConnectionError:
                    if time.monotonic() > deadline:
                        self.kill()
                        raise RedisServerError(f"redis-server did not answer on port {self.port}") from None
                    time.sleep(0.02)
        finally:
            client.close()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Shut the server down (SIGTERM, then SIGKILL if it lingers) and wait for it."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=timeout_s)
        self.process = None

    def kill(self) -> None:
        """Pull the plug: SIGKILL, as a crash would."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)
        self.process = None

    def restart(self) -> RedisServer:
        """Stop and start again on the same port (the data is gone: nothing is persisted)."""
        self.stop()
        return self.start()

    def cleanup(self) -> None:
        """Stop the server and remove its directory if this object made it."""
        self.stop()
        if self._own_directory:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.cleanup()


def start_redis_server(port: int | None = None, directory: pathlib.Path | None = None) -> RedisServer:
    """Start a redis-server of our own (on ``port``, or a free one) and return it once it answers PING.

    Retries on another port if a free port was taken in the meantime (only when no port was asked for).
    """
    attempts = 1 if port is not None else 3
    for attempt in range(attempts):
        server = RedisServer(port, directory)
        try:
            return server.start()
        except RedisServerError:
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


def stop_redis_server(server: RedisServer) -> None:
    """Stop a server started by :func:`start_redis_server` and remove its directory."""
    server.cleanup()


# ---------------------------------------------------------------------------------------------------------
# Keys: unique prefixes, snapshots, deletion of exactly what a test created.


def new_prefix() -> str:
    """A key prefix no other test uses (``spendgate.store.keys.Keys`` accepts at most 32 characters)."""
    return f"t{uuid.uuid4().hex[:16]}"


async def delete_prefix(client: aioredis.Redis, prefix: str) -> int:
    """Delete every key under ``prefix:`` (and nothing else); return how many were deleted."""
    keys = [key async for key in client.scan_iter(match=f"{prefix}:*", count=1000)]
    for start in range(0, len(keys), 500):
        await client.delete(*keys[start : start + 500])
    return len(keys)


async def snapshot(client: aioredis.Redis, prefix: str) -> dict[str, Any]:
    """Every key under ``prefix:`` with its type, its whole value and whether it has a TTL.

    Two snapshots compare equal exactly when nothing under the prefix changed (TTLs are compared by presence:
    their remaining time moves on its own).
    """
    out: dict[str, Any] = {}
    async for key in client.scan_iter(match=f"{prefix}:*", count=1000):
        kind = await client.type(key)
        value: Any
        if kind == "hash":
            value = await client.hgetall(key)
        elif kind == "string":
            value = await client.get(key)
        elif kind == "set":
            value = sorted(await client.smembers(key))
        elif kind == "zset":
            value = await client.zrange(key, 0, -1, withscores=True)
        elif kind == "stream":
            value = await client.xrange(key)
        elif kind == "list":
            value = await client.lrange(key, 0, -1)
        else:
            raise AssertionError(f"unexpected key type {kind!r} of {key}")
        out[key] = (kind, value, await client.pttl(key) > 0)
    return out


# ---------------------------------------------------------------------------------------------------------
# Plans and commands.


def plan_from(source: Mapping[str, Any] | str | os.PathLike[str] | AccountPlan) -> AccountPlan:
    """A plan from a dict (as YAML would give), a plan file path, or a plan."""
    if isinstance(source, AccountPlan):
        return source
    if isinstance(source, str | os.PathLike):
        return load_plan(pathlib.Path(source))
    return parse_plan(dict(source))


def command(
    wallet_id: str,
    amount_micros: int,
    *,
    key: str | None = None,
    capture: bool = False,
    service: str = "",
    currency: str = "USD",
    metadata: Mapping[str, str] | None = None,
) -> AuthorizeCommand:
    """An authorization request; a fresh idempotency key unless one is given."""
    return AuthorizeCommand(
        wallet_id=wallet_id,
        amount_micros=amount_micros,
        currency=currency,
        idempotency_key=key or f"k-{uuid.uuid4().hex}",
        service=service,
        capture=capture,
        metadata=dict(metadata or {}),
    )


@dataclasses.dataclass(frozen=True)
class Usage:
    """Spent and held money of one window of one node."""

    spent: int
    held: int


def nested_plan(depth: int, account: str = "deep") -> dict[str, Any]:
    """A plan whose single wallet sits ``depth`` levels below and including the account (depth >= 2)."""
    assert depth >= 2
    wallet: dict[str, Any] = {"id": f"{account}-wallet"}
    node: dict[str, Any] = {"wallets": [wallet]}
    # Pools are nested depth - 2 times between the account and the wallet.
    for level in range(depth - 2, 0, -1):
        node = {"pools": [{"id": f"{account}-pool-{level}", **node}]}
    return {"account": {"id": account}, **node}


def with_pool_of_wallets(account: str, pool_month: int, wallets: int, wallet_day: int) -> dict[str, Any]:
    """An account with one pool of ``wallets`` wallets (amounts in currency units)."""
    return {
        "account": {"id": account},
        "pools": [
            {
                "id": f"{account}-pool",
                "limits": {"month": pool_month},
                "wallets": [{"id": f"{account}-w{i}", "limits": {"day": wallet_day}} for i in range(wallets)],
            }
        ],
    }


def suppress_connection_errors() -> contextlib.AbstractContextManager[None]:
    """For teardown against a server a test may have killed: nothing to delete there any more."""
    return contextlib.suppress(redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)


async def eventually(check: Callable[[], Awaitable[T]], *, timeout_s: float = 10.0, what: str = "a condition") -> T:
    """Poll an async check until it returns something truthy; fail after the deadline (never measures speed)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what} (last value {value!r})")
        await asyncio.sleep(0.05)
