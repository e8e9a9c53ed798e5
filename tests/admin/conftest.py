"""Fixtures of the control-plane tests: spendgate servers in process, on the embedded fakeredis and a real Redis.

The real Redis is the root conftest's ``redis_url`` (a redis-server process of the test session's own, or
SPENDGATE_TEST_REDIS_URL; missing, it fails the run with CI=true and is skipped loudly elsewhere). Every server
here uses a key prefix of its own, and a test deletes only the keys under its prefixes.
"""

from __future__ import annotations

import pathlib
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from spendgate.clock import ManualClock
from spendgate.settings import Settings

from .support import (
    FLEET,
    START_MS,
    Fleet,
    Harness,
    OpenWatcher,
    StartFleet,
    Watcher,
    delete_prefix,
)


@pytest.fixture
def start_fleet(request: pytest.FixtureRequest) -> Iterator[StartFleet]:
    """Start servers: ``start_fleet(backend="fakeredis"|"redis", plan=..., prefix=..., **settings)``.

    Every server it starts is stopped at the end of the test, and a real Redis loses this test's keys. By
    default a server runs on a ManualClock at START_MS (or ``clock``); ``system_clock=True`` gives it the
    machine's clock.
    """
    harnesses: list[Harness] = []
    prefixes: set[tuple[str, str]] = set()

    def start(
        backend: str = "fakeredis",
        *,
        plan: str | pathlib.Path | None = FLEET,
        prefix: str | None = None,
        clock: ManualClock | None = None,
        system_clock: bool = False,
        **overrides: Any,
    ) -> Fleet:
        redis_url = None
        key_prefix = prefix or f"sgadm{uuid.uuid4().hex[:10]}"
        if clock is None and not system_clock:
            clock = ManualClock(START_MS)
        if backend == "redis":
            redis_url = request.getfixturevalue("redis_url")
            prefixes.add((redis_url, key_prefix))
            # These tests check behaviour, not latency: a generous per-call deadline keeps a pause of the busy
            # test process (which runs the server, its clients and Redis's other users) from failing a call.
            overrides.setdefault("redis_timeout_s", 5.0)
        settings = Settings(port=0, plan=str(plan) if plan else "", key_prefix=key_prefix, **overrides)
        harness = Harness(settings, clock, redis_url)
        harnesses.append(harness)
        harness.start()
        return Fleet(harness)

    yield start
    for harness in reversed(harnesses):
        harness.stop()
    for url, key_prefix in prefixes:
        delete_prefix(url, key_prefix)


@pytest.fixture
def fleet(start_fleet: StartFleet) -> Fleet:
    """The example fleet (examples/fleet.yaml) on the embedded fakeredis, at START_MS."""
    return start_fleet()


@pytest.fixture
def any_fleet(start_fleet: StartFleet, backend_kind: str) -> Fleet:
    """The example fleet on each backend in turn (``backend_kind`` is the root conftest's)."""
    return start_fleet(backend_kind)


@pytest.fixture
def watch() -> Iterator[OpenWatcher]:
    """Open watchers: ``watch(address, node_id="", kinds=())``; all closed at the end of the test."""
    watchers: list[Watcher] = []

    def open_watcher(address: str, node_id: str = "", kinds: tuple[str, ...] = ()) -> Watcher:
        watcher = Watcher(address, node_id, kinds)
        watchers.append(watcher)
        return watcher

    yield open_watcher
    for watcher in watchers:
        watcher.close()
