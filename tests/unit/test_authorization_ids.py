"""Authorization ids: unique, in the format captures parse, and never shared with a forked child."""

from __future__ import annotations

import os
import sys

import pytest

from spendgate.core import _RandomTokens, new_authorization_id, parse_authorization_id


def test_ids_are_unique_and_parse_back_to_their_account() -> None:
    # More than one buffer's worth, so the refill is crossed.
    ids = [new_authorization_id("acct_1") for _ in range(_RandomTokens._BATCH * 3 + 7)]
    assert len(set(ids)) == len(ids)
    assert all(parse_authorization_id(i) == "acct_1" for i in ids)


def test_tokens_are_32_hex_digits_from_the_whole_buffer() -> None:
    tokens = _RandomTokens()
    batch = [tokens.next() for _ in range(_RandomTokens._BATCH)]
    assert all(len(t) == 32 and int(t, 16) >= 0 for t in batch)
    assert len(set(batch)) == len(batch)


@pytest.mark.skipif(not hasattr(os, "fork") or sys.platform == "darwin", reason="needs fork")
# Python 3.12+ warns about fork() in a process with threads; the child here only writes to a pipe and exits.
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_a_forked_child_does_not_repeat_its_parents_tokens() -> None:
    tokens = _RandomTokens()
    tokens.next()  # A buffer is filled; the parent's next tokens are in it.
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(read)
        os.write(write, tokens.next().encode())
        os._exit(0)
    os.close(write)
    child = os.read(read, 64).decode()
    os.close(read)
    os.waitpid(pid, 0)
    assert len(child) == 32
    assert child != tokens.next()
