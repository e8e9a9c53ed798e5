"""The open-loop schedule: every start in order, none before its time, late ones at once."""

from __future__ import annotations

import contextlib
import os
import sys
import time

import pytest

from spendgate import timerfd
from spendgate.bench import schedule


async def _collect(first_s: float, interval_s: float, end_s: float) -> list[tuple[float, float]]:
    """(scheduled start, perf_counter when it was yielded) for each start."""
    return [(intended, time.perf_counter()) async for intended in schedule.starts(first_s, interval_s, end_s)]


@pytest.mark.parametrize("use_timerfd", [True, False], ids=["timerfd", "sleep"])
async def test_yields_every_start_in_order_and_never_early(monkeypatch: pytest.MonkeyPatch, use_timerfd: bool) -> None:
    if use_timerfd and not timerfd.available():
        pytest.skip("timerfd needs Linux")
    if not use_timerfd:
        monkeypatch.setattr(timerfd, "available", lambda: False)
    first = time.perf_counter() + 0.01
    starts = await _collect(first, 0.0005, first + 0.05)
    assert [round(intended - first, 6) for intended, _ in starts] == [round(k * 0.0005, 6) for k in range(100)]
    # Never before its scheduled time (the schedule waits; how promptly it wakes is the machine's business).
    assert all(yielded >= intended for intended, yielded in starts)


async def test_starts_already_due_come_at_once() -> None:
    # A schedule that began 1 s ago: all its starts are due, so none is skipped and none waits.
    first = time.perf_counter() - 1.0
    started = time.perf_counter()
    starts = await _collect(first, 0.01, first + 0.5)
    assert len(starts) == 50
    assert time.perf_counter() - started < 0.5


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="timerfd is Linux's")
def test_linux_uses_timerfd() -> None:
    assert timerfd.available()


def _timerfds() -> int:
    """How many timerfds this process has open (other files come and go as earlier tests' objects are freed)."""
    count = 0
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # Closed since the listing.
            count += os.readlink(f"/proc/self/fd/{name}") == "anon_inode:[timerfd]"
    return count


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts open files through /proc")
async def test_timer_is_closed_when_the_consumer_stops_early() -> None:
    before = _timerfds()
    first = time.perf_counter()
    iterator = schedule.starts(first, 0.001, first + 10.0)
    async for _ in iterator:
        break
    assert _timerfds() == before + (1 if timerfd.available() else 0)
    await iterator.aclose()
    assert _timerfds() == before
