"""Linux ``timerfd`` timers for the event loop: waits of a fraction of a millisecond, without busy waiting.

Event loops round their timers to the millisecond (uvloop's libuv timers count whole milliseconds and start
from the loop's cached time), so ``call_later(0.0004, ...)`` runs anywhere from at once to a millisecond or
more later. A ``timerfd`` is the kernel's high-resolution timer as a file descriptor: armed for an exact
moment, it becomes readable then, and the loop's reader callback runs. Python 3.11 has no ``os.timerfd_*``,
so the C library is called through ctypes; where it has no timerfd (not Linux), :func:`available` says so and
callers fall back to the loop's own timers.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import functools
import os
import sys
import time
from collections.abc import Callable

_CLOCK_MONOTONIC = 1
_TFD_CLOEXEC = 0o2000000
_TFD_NONBLOCK = 0o4000
_TFD_TIMER_ABSTIME = 1
_NS_PER_S = 1_000_000_000


class _Timespec(ctypes.Structure):
    _fields_ = (("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long))


class _Itimerspec(ctypes.Structure):
    _fields_ = (("it_interval", _Timespec), ("it_value", _Timespec))


def _spec(seconds: float) -> _Itimerspec:
    nanoseconds = max(1, round(seconds * _NS_PER_S))  # 0 would disarm the timer.
    return _Itimerspec(_Timespec(0, 0), _Timespec(nanoseconds // _NS_PER_S, nanoseconds % _NS_PER_S))


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


def available() -> bool:
    """Whether this platform has timerfd (Linux)."""
    return _libc() is not None


class TimerFd:
    """A CLOCK_MONOTONIC timerfd watched by ``loop``: ``on_fire()`` runs on the loop when it expires.

    Arming it again before it fires moves the expiry (one pending expiry at a time). Raises OSError where
    :func:`available` is false or the kernel refuses a timer.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, on_fire: Callable[[], None]) -> None:
        libc = _libc()
        if libc is None:
            raise OSError("timerfd is not available on this platform")
        self._libc = libc
        self._loop = loop
        self._on_fire = on_fire
        self._fd = libc.timerfd_create(_CLOCK_MONOTONIC, _TFD_NONBLOCK | _TFD_CLOEXEC)
        if self._fd < 0:
            error = ctypes.get_errno()
            raise OSError(error, f"timerfd_create: {os.strerror(error)}")
        self._delay_s = 0.0
        self._delay_spec = _spec(0.0)
        try:
            loop.add_reader(self._fd, self._fired)
        except BaseException:
            os.close(self._fd)
            raise

    def _fired(self) -> None:
        try:
            os.read(self._fd, 8)  # The count of expiries; reading it clears the readiness.
        except BlockingIOError:
            return  # Re-armed since it became readable: not expired after all.
        self._on_fire()

    def _set(self, flags: int, spec: _Itimerspec) -> None:
        if self._libc.timerfd_settime(self._fd, flags, ctypes.byref(spec), None) != 0:
            error = ctypes.get_errno()
            raise OSError(error, f"timerfd_settime: {os.strerror(error)}")

    def arm_at(self, moment_s: float) -> None:
        """Fire at ``moment_s`` on the ``perf_counter`` clock (at once if it has passed)."""
        self._set(_TFD_TIMER_ABSTIME, _spec(moment_s))

    def arm_in(self, delay_s: float) -> None:
        """Fire ``delay_s`` seconds from now."""
        if delay_s != self._delay_s:  # A caller usually waits the same delay every time: made once.
            self._delay_s, self._delay_spec = delay_s, _spec(delay_s)
        self._set(0, self._delay_spec)

    def close(self) -> None:
        """Stop watching the timer and close it (again: nothing; its number may belong to another file by then)."""
        if self._fd < 0:
            return
        fd, self._fd = self._fd, -1
        try:
            self._loop.remove_reader(fd)
        finally:
            os.close(fd)
