"""The helper threads' scheduling policy (spendgate/threads.py), checked in a process of its own.

The calls change every thread of the process they run in, so they run in a child Python, never in pytest's.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys

import pytest

from spendgate import threads

linux_only = pytest.mark.skipif(not threads.supported(), reason="SCHED_BATCH is Linux's")

_CHILD = """
import json, os, threading
from spendgate.threads import batch_other_threads

started, stop = threading.Barrier(3), threading.Event()
ids = {}

def helper(name):
    ids[name] = threading.get_native_id()
    started.wait()
    stop.wait()

threads = [threading.Thread(target=helper, args=(name,)) for name in ("plain", "idle")]
for thread in threads:
    thread.start()
started.wait()
try:
    os.sched_setscheduler(ids["idle"], os.SCHED_IDLE, os.sched_param(0))
except OSError:
    seen = {"refused": True}
else:
    first = batch_other_threads()
    second = batch_other_threads()
    policies = {name: os.sched_getscheduler(tid) for name, tid in ids.items()}
    policies["caller"] = os.sched_getscheduler(0)
    seen = {"first": first, "second": second, "policies": policies}
stop.set()
for thread in threads:
    thread.join()
print(json.dumps(seen))
"""


@linux_only
def test_other_threads_go_batch_and_the_caller_and_chosen_policies_stay() -> None:
    done = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, timeout=60, check=True)
    seen = json.loads(done.stdout)
    if seen.get("refused"):
        pytest.skip("this sandbox refuses sched_setscheduler")
    assert seen["policies"] == {"plain": os.SCHED_BATCH, "idle": os.SCHED_IDLE, "caller": os.SCHED_OTHER}
    # Only the plain helper was changed (the idle one is an operator's choice); a second pass changes nothing.
    assert seen["first"] == [1, 0]
    assert seen["second"] == [0, 0]


async def test_the_recheck_outlives_a_failing_pass_and_says_so(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="spendgate.threads")
    passes: list[int] = []

    def fake(keep: int | None = None) -> tuple[int, int]:
        passes.append(1)
        if len(passes) > 1:
            raise OSError("out of file descriptors")
        return 2, 0

    monkeypatch.setattr(threads, "batch_other_threads", fake)
    monkeypatch.setattr(threads, "supported", lambda: True)
    task = asyncio.create_task(threads.keep_other_threads_batch(interval_s=0.001))
    for _ in range(1000):
        if len(passes) >= 3:
            break
        await asyncio.sleep(0.005)
    assert len(passes) >= 3
    assert not task.done()  # serve() awaits it at shutdown: an error would cut the graceful stop short.
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert "2 helper threads put under SCHED_BATCH" in caplog.text
    assert "could not recheck" in caplog.text


@pytest.mark.parametrize(
    ("supported", "result", "said"),
    [(False, (0, 0), "SCHED_BATCH is Linux's"), (True, (0, 3), "setting SCHED_BATCH was refused")],
)
async def test_without_the_policy_the_recheck_says_so_once_and_ends(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    supported: bool,
    result: tuple[int, int],
    said: str,
) -> None:
    caplog.set_level(logging.INFO, logger="spendgate.threads")
    monkeypatch.setattr(threads, "batch_other_threads", lambda keep=None: result)
    monkeypatch.setattr(threads, "supported", lambda: supported)
    await asyncio.wait_for(threads.keep_other_threads_batch(interval_s=0.001), timeout=10)
    assert said in caplog.text
