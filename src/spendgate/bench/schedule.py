"""Open-loop schedules that start calls on time, to a fraction of a millisecond.

An open loop starts call k at ``first + k * interval`` and measures its latency from that moment, so whatever
delays the start counts as latency. ``asyncio.sleep`` cannot keep such a schedule: event loops (asyncio's
own and uvloop, whose libuv timers count whole milliseconds) round a timer to the millisecond, so a call due
in 0.4 ms starts up to a millisecond late, and that lateness, which is the generator's own, lands in the
server's percentiles. On Linux a schedule therefore waits on a ``timerfd`` armed at the exact start (the
kernel's high-resolution timers, nanoseconds; no busy waiting); elsewhere it falls back to ``asyncio.sleep``.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import functools
import os
import sys
import time
from collections.abc import AsyncGenerator

_CLOCK_MONOTONIC = 1
_TFD_CLOEXEC = 0o2000000
_TFD_NONBLOCK = 0o4000
_TFD_TIMER_ABSTIME = 1
_NS_PER_S = 1_000_000_000


class _Timespec(ctypes.Structure):
    _fields_ = (("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long))


class _Itimerspec(ctypes.Structure):
    _fields_ = (("it_interval", _Timespec), ("it_value", _Timespec))


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """The C library, where it has timerfd and ``time.perf_counter`` reads CLOCK_MONOTONIC (Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    if "CLOCK_MONOTONIC" not in time.get_clock_info("perf_counter").implementation:
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    except OSError:
        return None
    return libc if hasattr(libc, "timerfd_create") else None


class _TimerFd:
    """A CLOCK_MONOTONIC timerfd, armed once per wait at an absolute time, read by the event loop."""

    def __init__(self, libc: ctypes.CDLL, loop: asyncio.AbstractEventLoop) -> None:
        self._libc = libc
        self._loop = loop
        self._fd = libc.timerfd_create(_CLOCK_MONOTONIC, _TFD_NONBLOCK | _TFD_CLOEXEC)
        if self._fd < 0:
            error = ctypes.get_errno()
            raise OSError(error, f"timerfd_create: {os.strerror(error)}")
        self._waiter: asyncio.Future[None] | None = None
        loop.add_reader(self._fd, self._fired)

    def _fired(self) -> None:
        try:
            os.read(self._fd, 8)  # The count of expiries; reading it clears the readiness.
        except BlockingIOError:
            return  # Not expired after all (re-armed since): keep waiting.
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def wait_until(self, moment_s: float) -> None:
        """Return at ``moment_s`` on the ``perf_counter`` clock (at once if it has passed)."""
        nanoseconds = max(1, round(moment_s * _NS_PER_S))
        spec = _Itimerspec(_Timespec(0, 0), _Timespec(nanoseconds // _NS_PER_S, nanoseconds % _NS_PER_S))
        self._waiter = self._loop.create_future()
        if self._libc.timerfd_settime(self._fd, _TFD_TIMER_ABSTIME, ctypes.byref(spec), None) != 0:
            error = ctypes.get_errno()
            raise OSError(error, f"timerfd_settime: {os.strerror(error)}")
        await self._waiter

    def close(self) -> None:
        try:
            self._loop.remove_reader(self._fd)
        finally:
            os.close(self._fd)


async def starts(first_s: float, interval_s: float, end_s: float) -> AsyncGenerator[float, None]:
    """Yield each scheduled start ``first_s + k * interval_s`` before ``end_s``, once it is due.

    Starts already due (the consumer fell behind) are yielded at once, so a late generator shows as latency
    rather than as a lower rate.
    """
    libc = _libc()
    timer = _TimerFd(libc, asyncio.get_running_loop()) if libc is not None else None
    try:
        k = 0
        while (intended := first_s + k * interval_s) < end_s:
            if intended > time.perf_counter():
                if timer is not None:
                    await timer.wait_until(intended)
                else:
                    await asyncio.sleep(intended - time.perf_counter())
            yield intended
            k += 1
    finally:
        if timer is not None:
            timer.close()
