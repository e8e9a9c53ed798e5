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
import time
from collections.abc import AsyncGenerator

from spendgate import timerfd


class _Waiter:
    """A timerfd the schedule awaits: each wait arms it at an absolute moment and waits for it to fire."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._waiter: asyncio.Future[None] | None = None
        self._timer = timerfd.TimerFd(loop, self._fired)

    def _fired(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def wait_until(self, moment_s: float) -> None:
        """Return at ``moment_s`` on the ``perf_counter`` clock (at once if it has passed)."""
        self._waiter = self._loop.create_future()
        self._timer.arm_at(moment_s)
        await self._waiter

    def close(self) -> None:
        self._timer.close()


async def starts(first_s: float, interval_s: float, end_s: float) -> AsyncGenerator[float, None]:
    """Yield each scheduled start ``first_s + k * interval_s`` before ``end_s``, once it is due.

    Starts already due (the consumer fell behind) are yielded at once, so a late generator shows as latency
    rather than as a lower rate.
    """
    timer = _Waiter(asyncio.get_running_loop()) if timerfd.available() else None
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
