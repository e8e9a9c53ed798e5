"""Clocks. The core never reads the time itself; it is handed a :class:`Clock`, so tests can move time."""

from __future__ import annotations

import asyncio
import time
from typing import Protocol


class Clock(Protocol):
    """A source of the current time."""

    def now_ms(self) -> int:
        """Return milliseconds since the Unix epoch."""
        ...


class SystemClock:
    """The machine's wall clock."""

    def now_ms(self) -> int:
        """Return milliseconds since the Unix epoch."""
        return time.time_ns() // 1_000_000


class ManualClock:
    """A clock that moves only when told to; for tests and simulations."""

    def __init__(self, start_ms: int) -> None:
        self._now_ms = start_ms

    def now_ms(self) -> int:
        """Return the clock's current time in milliseconds since the Unix epoch."""
        return self._now_ms

    def advance(self, milliseconds: int) -> None:
        """Move the clock forward."""
        if milliseconds < 0:
            raise ValueError("a clock does not go back")
        self._now_ms += milliseconds

    def set(self, now_ms: int) -> None:
        """Move the clock to an absolute time (forward only)."""
        self.advance(now_ms - self._now_ms)


async def pause(seconds: float) -> None:
    """Sleep between rounds of a background loop, unless the loop's task is being cancelled.

    A loop that swallows errors of one round (an outage, say) can also swallow a cancellation that a library
    turned into another exception; checking here makes every background loop stop when told to.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
    await asyncio.sleep(seconds)
