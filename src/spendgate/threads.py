"""Keep the event loop's thread first in line for a CPU: the process's other threads run as SCHED_BATCH.

grpc's completion-queue poller and its event-engine threads wake up several times for every call. Under
Linux's default policy each wake-up may preempt the thread that runs the event loop, where all of spendgate's
work happens: in a 5 s unary run of `make bench` the loop's thread was preempted about 51,000 times, four
times per call, and each preemption costs two context switches and a cold cache. A thread under SCHED_BATCH
never preempts a running thread when it wakes (it waits for a free CPU or the next tick), so the loop's thread
keeps its CPU; the other threads still get their share. The README's Performance section has the figures.

Every thread but the loop's is changed: grpc's, and the few of spendgate's own (the /metrics endpoint, the
executor threads of blocking calls). SCHED_BATCH needs no privilege. Threads under any other policy than the
default (an operator's choice) are left alone. Where the policy cannot be set (not Linux, or a sandbox that
forbids it) nothing changes, and the server says so once in its log.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading

log = logging.getLogger("spendgate.threads")
# grpc starts some of its threads lazily: the process's threads are looked at again this often.
RECHECK_INTERVAL_S = 30.0
_TASKS = "/proc/self/task"


def supported() -> bool:
    """Whether this platform has SCHED_BATCH and lists a process's threads in /proc."""
    return hasattr(os, "SCHED_BATCH") and os.path.isdir(_TASKS)


def batch_other_threads(keep: int | None = None) -> tuple[int, int]:
    """Put every thread of this process but ``keep`` (default: the calling thread) under SCHED_BATCH.

    Only threads under the default policy (SCHED_OTHER) are changed. Returns how many were changed and how many
    refused the change. A thread id is read from this process's own task list and used at once; a thread that
    ended in between is skipped. (Were its id taken by a new thread of another process of the same user in
    those microseconds, that thread would be the one changed: harmless, and unlikely.)
    """
    if not supported():
        return 0, 0
    keep = threading.get_native_id() if keep is None else keep
    changed = refused = 0
    try:
        names = os.listdir(_TASKS)
    except OSError:  # Out of file descriptors, say: the next check tries again.
        return 0, 0
    for name in names:
        thread_id = int(name)
        if thread_id == keep:
            continue
        try:
            if os.sched_getscheduler(thread_id) == os.SCHED_OTHER:
                os.sched_setscheduler(thread_id, os.SCHED_BATCH, os.sched_param(0))
                changed += 1
        except ProcessLookupError:  # The thread ended after the listing.
            continue
        except OSError:  # A sandbox that forbids the call.
            refused += 1
    return changed, refused


async def keep_other_threads_batch(interval_s: float = RECHECK_INTERVAL_S) -> None:
    """Apply :func:`batch_other_threads` for the event loop's thread now and every ``interval_s`` after.

    Says once in the log what it did; stops at once where the policy is not available, or refused.
    """
    if not supported():
        log.info("helper threads keep the default scheduling policy: SCHED_BATCH is Linux's")
        return
    loop_thread = threading.get_native_id()
    changed, refused = batch_other_threads(loop_thread)
    if refused and not changed:
        log.info("helper threads keep the default scheduling policy: setting SCHED_BATCH was refused")
        return
    log.info("%d helper threads put under SCHED_BATCH (the event loop's thread keeps the default)", changed)
    while True:
        await asyncio.sleep(interval_s)
        try:
            batch_other_threads(loop_thread)
        except Exception:  # serve() awaits this task at shutdown: it must never end with an error.
            log.warning("could not recheck the helper threads' scheduling policy", exc_info=True)
