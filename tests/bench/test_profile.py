"""The server profile's summary: waits are idle, work is shared out by area and function."""

from __future__ import annotations

from spendgate.bench.profile import IDLE, area_of, summarise, waiting

_LOOP = "Runner.run (asyncio/runners.py:118);run_forever (loop.c:33192)"
_WORKER = (
    "Thread.run (threading.py:982);_worker (concurrent/futures/thread.py:81);"
    "_queue_SimpleQueue_get (_queuemodule.c.h:177);PyThread_acquire_lock_timed (libpython3.11.so.1.0)"
)


def test_a_wait_under_unnamed_libc_frames_is_idle() -> None:
    frames = [*_WORKER.split(";"), "0x7f6675aaed90 (libc.so.6)", "0x7f6675aa3f16 (libc.so.6)"]
    assert waiting(frames)
    assert area_of(frames) == IDLE


def test_a_named_wait_leaf_is_idle_and_a_system_call_that_works_is_not() -> None:
    assert waiting([*_LOOP.split(";"), "epoll_wait (libc.so.6)"])
    write = [*_LOOP.split(";"), "_flush (spendgate/store/pipe.py:373)", "write (libc.so.6)"]
    assert not waiting(write)
    assert area_of(write) == "spendgate store (script args, replies, batching)"


def test_idle_samples_count_in_no_share_of_the_busy_ones() -> None:
    raw = "\n".join(
        [
            f"{_WORKER};0x7f6675aa3f16 (libc.so.6) 80",
            f"{_LOOP};epoll_wait (libc.so.6) 10",
            f"{_LOOP};_flush (spendgate/store/pipe.py:373);write (libc.so.6) 30",
            f"{_LOOP};encode_command (spendgate/store/pipe.py:150) 10",
        ]
    )
    summary = summarise(raw)
    assert summary["samples"] == 130
    assert summary["idle_percent"] == round(100 * 90 / 130, 1)
    assert summary["areas"] == [("spendgate store (script args, replies, batching)", 100.0)]
    assert summary["self"] == [("write (libc.so.6)", 75.0), ("encode_command (spendgate/store/pipe.py)", 25.0)]
    inclusive = dict(summary["inclusive"])  # type: ignore[arg-type]
    assert inclusive["Runner.run (asyncio/runners.py)"] == 100.0
    assert "_worker (concurrent/futures/thread.py)" not in inclusive
