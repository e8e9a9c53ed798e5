"""Keep the event loop's thread first in line for a CPU: the process's other threads run as SCHED_BATCH.

grpc's completion-queue poller and its event-engine threads wake up several times for every call. Under
Linux's default policy each wake-up may preempt the thread that runs the event loop, where all of spendgate's
work happens: in a 5 s unary run of `make bench` the loop's thread was preempted about 51,000 times, four
times per call, and each preemption costs two context switches and a cold cache. A thread under SCHED_BATCH
never preempts a running thread when it wakes (it waits for a free CPU or the next tick), so the loop's thread
keeps its CPU; the helper threads still get their share. The README's Performance section has the figures.

SCHED_BATCH needs no privilege. Threads under any other policy than the default (an operator's choice) are
left alone, and so is everything where the policy cannot be set (not Linux, or a sandbox that forbids it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading

log = logging.getLogger("spendgate.threads")
# grpc starts some of its threads lazily: the process's threads are looked at again this often.
RECHECK_INTERVAL_S = 30.0
_TASKS = "/proc/self/task"


def batch_other_threads(keep: int | None = None) -> int:
    """Put every thread of this process but ``keep`` (default: the calling thread) under SCHED_BATCH.

    Only threads under the default policy (SCHED_OTHER) are changed. Returns how many were changed.
    """
    batch = getattr(os, "SCHED_BATCH", None)
    if batch is None or not os.path.isdir(_TASKS):
        return 0
    keep = threading.get_native_id() if keep is None else keep
    changed = 0
    for name in os.listdir(_TASKS):
        thread_id = int(name)
        if thread_id == keep:
            continue
        # A thread may end between the listing and the call; a sandbox may refuse the call.
        with contextlib.suppress(OSError):
            if os.sched_getscheduler(thread_id) == os.SCHED_OTHER:
                os.sched_setscheduler(thread_id, batch, os.sched_param(0))
                changed += 1
    return changed


async def keep_other_threads_batch(interval_s: float = RECHECK_INTERVAL_S) -> None:
    """Apply :func:`batch_other_threads` for the event loop's thread now and every ``interval_s`` after."""
    loop_thread = threading.get_native_id()
    changed = batch_other_threads(loop_thread)
    log.debug("%d helper threads put under SCHED_BATCH", changed)
    while True:
        await asyncio.sleep(interval_s)
        batch_other_threads(loop_thread)
