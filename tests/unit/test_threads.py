"""The helper threads' scheduling policy (spendgate/threads.py), checked in a process of its own.

The calls change every thread of the process they run in, so they run in a child Python, never in pytest's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    not hasattr(os, "SCHED_BATCH") or not os.path.isdir("/proc/self/task"), reason="SCHED_BATCH is Linux's"
)

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
os.sched_setscheduler(ids["idle"], os.SCHED_IDLE, os.sched_param(0))
first = batch_other_threads()
second = batch_other_threads()
policies = {name: os.sched_getscheduler(tid) for name, tid in ids.items()}
policies["caller"] = os.sched_getscheduler(0)
stop.set()
for thread in threads:
    thread.join()
print(json.dumps({"first": first, "second": second, "policies": policies}))
"""


def test_other_threads_go_batch_and_the_caller_and_chosen_policies_stay() -> None:
    done = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, timeout=60, check=True)
    seen = json.loads(done.stdout)
    assert seen["policies"] == {"plain": os.SCHED_BATCH, "idle": os.SCHED_IDLE, "caller": os.SCHED_OTHER}
    # Only the plain helper was changed (the idle one is an operator's choice); a second pass changes nothing.
    assert seen["first"] == 1
    assert seen["second"] == 0
