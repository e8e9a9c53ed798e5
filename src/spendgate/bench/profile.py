"""Where the server's time goes: py-spy's collapsed stacks summed per function and per area.

``py-spy record --native --format raw`` writes one line per distinct stack, ``frame;frame;...;leaf count``, each
frame ``function (file:line)`` (native frames name their library). Summed per function (lines dropped):
*self* is the share of samples with the function as the leaf, *inclusive* the share with it anywhere on the
stack. Per *area*, each sample goes to the deepest frame that belongs to a known part of the stack (spendgate's
API, core or store, redis-py, gRPC, the ledger writer, metrics, asyncio...); stdlib helpers count for their
caller. The raw file itself loads into speedscope or flamegraph.pl for a picture.
"""

from __future__ import annotations

import collections
import re

_LINE = re.compile(r":\d+\)$")
TOP_DEFAULT = 15
# Leaves that mean a thread was waiting, not working.
_IDLE_LEAVES = ("epoll_wait", "epoll_pwait", "poll (", "select (", "pthread_cond_wait", "pthread_cond_timedwait")
# The same waits seen from above: py-spy often cannot name the libc frames under them (a bare address), so the
# first frame above the libc ones says it (a thread-pool worker blocked on its queue, say). Frames in libc are
# passed over, so only waits named outside it belong here.
_WAITS = (*_IDLE_LEAVES, "PyThread_acquire_lock_timed")
_LIBC = "(libc.so"
# Path fragments of frames, deepest match wins; the first entry that matches a frame names its area.
_AREAS = (
    ("(spendgate/ledger/", "spendgate ledger writer"),
    ("(prometheus_client/", "metrics"),
    ("(spendgate/metrics.py", "metrics"),
    ("(spendgate/store/", "spendgate store (script args, replies, batching)"),
    ("(spendgate/core.py", "spendgate core (validation, chain, windows)"),
    ("(spendgate/windows.py", "spendgate core (validation, chain, windows)"),
    ("(spendgate/domain.py", "spendgate core (validation, chain, windows)"),
    ("(spendgate/clock.py", "spendgate core (validation, chain, windows)"),
    ("(spendgate/api/", "spendgate API (decode, encode, guard)"),
    ("(spendgate/bench/", "benchmark empty handler"),
    ("(redis/", "redis-py client"),
    ("(asyncio/streams.py", "redis-py client"),
    ("(google/protobuf", "protobuf"),
    ("(_message.abi3", "protobuf"),
    ("(asyncio/", "asyncio tasks and futures"),
    ("(_asynciomodule", "asyncio tasks and futures"),
    ("cygrpc", "gRPC (C core, Cython, syscalls)"),
    ("(grpc/", "gRPC (C core, Cython, syscalls)"),
)
# Frames that never name an area (helpers count for whoever called them; the loop itself is the fallback).
_NEUTRAL = (
    "(uuid.py",
    "(json/",
    "(hashlib",
    "(enum.py",
    "(dataclasses.py",
    "(<frozen abc>",
    "(typing.py",
    "(re/",
    "(_datetimemodule",
    "(zoneinfo",
    "(libc.so",
    "(libpython",
    "(object.h",
    "(<string>",
)
_FALLBACK = "event loop and other native code"
IDLE = "idle (waiting for events)"


def _function(frame: str) -> str:
    """A frame without its line number: ``function (file)``."""
    return _LINE.sub(")", frame.strip())


def waiting(frames: list[str]) -> bool:
    """Whether a sample's thread was waiting (for events, a lock, a queue) rather than working."""
    if frames and frames[-1].startswith(_IDLE_LEAVES):
        return True
    for frame in reversed(frames):
        if _LIBC not in frame:
            return frame.startswith(_WAITS)
    return False


def area_of(frames: list[str]) -> str:
    """The area one sample's time belongs to (see the module's docstring)."""
    if waiting(frames):
        return IDLE
    for frame in reversed(frames):
        if any(part in frame for part in _NEUTRAL):
            continue
        for part, area in _AREAS:
            if part in frame:
                return area
    return _FALLBACK


def summarise(raw: str, top: int = TOP_DEFAULT) -> dict[str, object]:
    """The samples, the idle share, and per area and per function the share of the busy samples (percent)."""
    own: collections.Counter[str] = collections.Counter()
    anywhere: collections.Counter[str] = collections.Counter()
    areas: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_function(frame) for frame in stack.split(";") if frame.strip()]
        if not frames:
            continue
        samples += count
        area = area_of(frames)
        areas[area] += count
        if area == IDLE:
            continue
        own[frames[-1]] += count
        for function in set(frames):
            anywhere[function] += count

    idle = areas.pop(IDLE, 0)
    busy = samples - idle

    def share(counter: collections.Counter[str], limit: int | None = top) -> list[tuple[str, float]]:
        if not busy:
            return []
        return [(name, round(100 * count / busy, 1)) for name, count in counter.most_common(limit)]

    return {
        "samples": samples,
        "idle_percent": round(100 * idle / samples, 1) if samples else 0.0,
        # Shares of the busy samples (every thread's), in percent.
        "areas": share(areas, None),
        "self": share(own),
        "inclusive": share(anywhere),
    }
