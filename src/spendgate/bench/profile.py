"""Where the server's time goes: py-spy's collapsed stacks summed per function.

``py-spy record --format raw`` writes one line per distinct stack, ``frame;frame;...;leaf count``, each frame
``function (file:line)``. Summed per function (lines dropped): *self* is the share of samples with the
function as the leaf, *inclusive* the share with it anywhere on the stack. The raw file itself loads into
speedscope or flamegraph.pl for a picture.
"""

from __future__ import annotations

import collections
import re

_LINE = re.compile(r":\d+\)$")
TOP_DEFAULT = 15


def _function(frame: str) -> str:
    """A frame without its line number: ``function (file)``."""
    return _LINE.sub(")", frame.strip())


def summarise(raw: str, top: int = TOP_DEFAULT) -> dict[str, object]:
    """The samples, and the functions with the most self and inclusive time (percent of samples)."""
    own: collections.Counter[str] = collections.Counter()
    anywhere: collections.Counter[str] = collections.Counter()
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
        own[frames[-1]] += count
        for function in set(frames):
            anywhere[function] += count

    def share(counter: collections.Counter[str]) -> list[tuple[str, float]]:
        return [(name, round(100 * count / samples, 1)) for name, count in counter.most_common(top)]

    return {"samples": samples, "self": share(own) if samples else [], "inclusive": share(anywhere) if samples else []}
