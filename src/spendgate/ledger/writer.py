"""The ledger writer: moves settled transactions from the accounts' Redis outbox streams into the ledger.

Every capture appends its settlement to its account's outbox stream in the same Lua script that counts it
(see ``outbox_append`` in ``_lib.lua``). The writer drains those streams through one Redis consumer group,
so several writers share the work without reading an entry twice:

1. ``XREADGROUP`` delivers up to ``batch_size_max`` new entries (waiting up to ``linger_ms`` to fill a batch);
   entries a crashed writer left pending are taken over with ``XAUTOCLAIM`` once idle for ``claim_idle_ms``.
2. The batch is inserted into the ledger in one database transaction, idempotently on the transaction id,
   so an entry delivered twice (after a crash between commit and acknowledgement) is written once.
3. Only after the commit are the entries acknowledged (``XACK``), and the stream is trimmed, never past the
   oldest entry that is pending or not yet delivered.

While the database is down the batch in hand is retried with bounded exponential back-off and nothing else
is read: the outbox keeps growing in Redis, nothing is dropped, and the writer catches up when the database
returns. :meth:`LedgerWriter.lag` reports how far behind it is.

An entry that cannot be read as a transaction (it would fail forever) is moved to a dead-letter stream next
to the outbox and acknowledged, so it neither blocks the ledger nor gets lost.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import random
import socket
from collections.abc import Awaitable, Iterable, Sequence
from typing import Any, TypeVar

import redis.asyncio as aioredis
import redis.exceptions

from spendgate.clock import Clock, SystemClock
from spendgate.ledger.sink import INSERT_BATCH_SIZE_MAX, LedgerSink, LedgerTransaction, MalformedEntryError
from spendgate.store.keys import Keys
from spendgate.store.redis_store import REDIS_OUTAGES

log = logging.getLogger("spendgate.ledger")

T = TypeVar("T")

# Failures that mean "Redis is not answering right now" (the store's list); the writer backs off and retries.
_REDIS_OUTAGES = REDIS_OUTAGES
# How many entries the lag report counts one by one when Redis cannot say (a lower bound beyond that).
LAG_COUNT_MAX = 10_000
# How many XAUTOCLAIM calls one claim pass makes per stream (each scans at most 10 x COUNT pending entries).
CLAIM_CALLS_PER_STREAM_MAX = 16
# How many times an acknowledgement is retried before the entries are left pending (they are delivered
# again later and skipped by the idempotent insert, so giving up is safe).
ACK_ATTEMPTS_MAX = 5


def dead_letter_key(keys: Keys, account_id: str) -> str:
    """The stream where an account's unreadable outbox entries are kept, in the account's hash slot."""
    # Built from Keys.outbox so it shares the account's hash tag; it belongs in keys.py with the others.
    return f"{keys.outbox(account_id)}:dead"


def entry_ms(entry_id: str) -> int:
    """The Redis server time (ms since the epoch) at which a stream entry was added."""
    return int(entry_id.split("-", 1)[0])


def next_entry_id(entry_id: str) -> str:
    """The smallest stream id greater than ``entry_id``."""
    ms, _, sequence = entry_id.partition("-")
    return f"{ms}-{int(sequence or 0) + 1}"


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, _, sequence = entry_id.partition("-")
    return int(ms), int(sequence or 0)


@dataclasses.dataclass(frozen=True, slots=True)
class OutboxLag:
    """How far the ledger is behind the outbox streams, over all accounts."""

    # Entries delivered to a writer and not yet acknowledged (being written, or left by a crashed writer).
    pending_entries: int
    # Entries no writer has read yet.
    undelivered_entries: int
    # The age of the oldest entry not yet acknowledged, by the injected clock; 0 when there is none.
    oldest_age_ms: int

    @property
    def entries(self) -> int:
        """Every entry not yet committed to the ledger and acknowledged."""
        return self.pending_entries + self.undelivered_entries


@dataclasses.dataclass(slots=True)
class WriterStats:
    """Counters of one writer since it started (for metrics and logs)."""

    batches: int = 0
    # Stream entries acknowledged after their batch committed.
    entries: int = 0
    # Transactions new to the ledger.
    inserted: int = 0
    # Entries whose transaction was already in the ledger (delivered again after a crash).
    duplicates: int = 0
    # Entries taken over from another writer (or from this one's earlier life).
    claimed: int = 0
    dead_lettered: int = 0
    sink_failures: int = 0
    redis_failures: int = 0
    last_error: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class _Entry:
    stream: str
    entry_id: str
    # None for an entry that was deleted from the stream while pending (Redis answers a bare id).
    fields: dict[str, str] | None


class _Backoff:
    """Exponential back-off with jitter, bounded by ``maximum_s``."""

    def __init__(self, initial_s: float, maximum_s: float) -> None:
        self._initial_s = initial_s
        self._maximum_s = maximum_s
        self.attempt = 0

    def next_delay_s(self) -> float:
        # The exponent is capped so the arithmetic stays small however long an outage lasts.
        delay = min(self._maximum_s, self._initial_s * float(1 << min(self.attempt, 30)))
        self.attempt += 1
        # Jitter spreads out several writers retrying against one database; it is not for security.
        return delay * (0.5 + random.random() / 2)  # noqa: S311

    def reset(self) -> None:
        self.attempt = 0


class _Stopping(Exception):
    """Raised inside a step to give up a batch when the writer is asked to stop (the batch stays pending)."""


class LedgerWriter:
    """Drains every account's outbox stream into a :class:`~spendgate.ledger.sink.LedgerSink`.

    ``client`` must decode responses (``decode_responses=True``, as the store's does) and answer blocking
    reads: its socket timeout must exceed ``block_ms`` (the hot path's client, with its sub-second timeout,
    needs ``block_ms`` below that or a client of its own). Several writers may run at once against one
    Redis and one ledger if each has its own ``consumer`` name, in one process (they overlap reading Redis
    with waiting on the database) or in several; a stable name per host lets a restarted writer resume its
    own pending entries at once.
    """

    def __init__(
        self,
        client: aioredis.Redis,
        sink: LedgerSink,
        *,
        keys: Keys | None = None,
        group: str = "ledger",
        consumer: str | None = None,
        clock: Clock | None = None,
        batch_size_max: int = 1000,
        linger_ms: int = 20,
        block_ms: int = 1000,
        claim_idle_ms: int = 30_000,
        claim_interval_ms: int = 5_000,
        accounts_refresh_ms: int = 1_000,
        backoff_initial_ms: int = 50,
        backoff_max_ms: int = 5_000,
        streams_per_read_max: int = 256,
        redis_timeout_s: float = 5.0,
        trim: bool = True,
        trim_approximate: bool = True,
        trim_interval_ms: int = 1_000,
    ) -> None:
        if not 1 <= batch_size_max <= INSERT_BATCH_SIZE_MAX:
            raise ValueError(f"batch_size_max must be within 1..{INSERT_BATCH_SIZE_MAX}")
        if min(linger_ms, block_ms, claim_idle_ms, claim_interval_ms, accounts_refresh_ms, trim_interval_ms) < 0:
            raise ValueError("linger, block, claim, refresh and trim times must not be negative")
        if not 0 < backoff_initial_ms <= backoff_max_ms:
            raise ValueError("back-off must satisfy 0 < backoff_initial_ms <= backoff_max_ms")
        if streams_per_read_max < 1 or redis_timeout_s <= 0:
            raise ValueError("streams_per_read_max and redis_timeout_s must be positive")
        self._client = client
        self._sink = sink
        self.keys = keys or Keys()
        self.group = group
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}"
        self._clock: Clock = clock or SystemClock()
        self.batch_size_max = batch_size_max
        self._linger_ms = linger_ms
        self._block_ms = block_ms
        self._claim_idle_ms = claim_idle_ms
        self._claim_interval_ms = claim_interval_ms
        self._accounts_refresh_ms = accounts_refresh_ms
        self._backoff_initial_s = backoff_initial_ms / 1000
        self._backoff_max_s = backoff_max_ms / 1000
        self._streams_per_read_max = streams_per_read_max
        self._redis_timeout_s = redis_timeout_s
        self._trim = trim
        self._trim_approximate = trim_approximate
        # Trimming costs two round trips per stream; once a second is plenty to keep the outboxes short.
        self._trim_interval_ms = trim_interval_ms
        self._trim_due_at = 0.0
        self._untrimmed: set[str] = set()
        # fakeredis emulates blocking reads in-process (other tasks keep running meanwhile); capping the block
        # keeps stop() and an embedded server's shutdown prompt.
        self._embedded = type(client).__module__.startswith("fakeredis")
        self.stats = WriterStats()
        self._stopping = asyncio.Event()
        # Stream key -> account id, for every stream this writer drains; and the streams whose group exists.
        self._streams: dict[str, str] = {}
        self._grouped: set[str] = set()
        self._accounts_due_at = 0.0
        self._claim_due_at = 0.0
        # Per stream, where the last XAUTOCLAIM scan stopped (so a long pending list is walked, not rescanned).
        self._claim_cursors: dict[str, str] = {}
        # On start the writer first re-reads the entries pending under its own name (a restart with a stable
        # consumer name), without waiting for them to become idle.
        self._own_history_done = False
        self._read_offset = 0

    # ------------------------------------------------------------------------------------------------
    # Running.

    async def run(self) -> None:
        """Drain the outboxes until :meth:`stop` is called or the task is cancelled.

        Redis outages are retried with bounded back-off; database outages are retried inside a batch.
        Cancelling is safe at any point: entries not yet acknowledged stay pending and are written later.
        """
        self._stopping.clear()
        backoff = _Backoff(self._backoff_initial_s, self._backoff_max_s)
        log.info("ledger writer %s started (group %s)", self.consumer, self.group)
        while not self._stopping.is_set():
            try:
                await self.step()
                backoff.reset()
            except _Stopping:
                break
            except _REDIS_OUTAGES as error:
                self._redis_failed(error, backoff.attempt)
                await self._sleep_unless_stopping(backoff.next_delay_s())
            except redis.exceptions.ResponseError as error:
                # NOGROUP after Redis lost its data (restart without persistence, FLUSHALL): make the groups
                # again. Anything else is unexpected; back off rather than spin.
                if "NOGROUP" in str(error):
                    self._grouped.clear()
                    self._accounts_due_at = 0.0
                self._redis_failed(error, backoff.attempt)
                await self._sleep_unless_stopping(backoff.next_delay_s())
            except Exception as error:  # The writer must outlive a bug in one batch; it logs and backs off.
                self.stats.last_error = f"{type(error).__name__}: {error}"
                if backoff.attempt & (backoff.attempt - 1) == 0:
                    log.exception("ledger writer %s failed (attempt %d)", self.consumer, backoff.attempt + 1)
                await self._sleep_unless_stopping(backoff.next_delay_s())
        log.info("ledger writer %s stopped", self.consumer)

    def stop(self) -> None:
        """Ask :meth:`run` to return after the batch in hand (a batch that cannot commit stays pending)."""
        self._stopping.set()

    async def drain(self, *, timeout_s: float = 60.0) -> int:
        """Write until nothing is pending or undelivered; return how many entries were acknowledged.

        Entries pending under another consumer are taken over once idle for ``claim_idle_ms``. Raises
        ``TimeoutError`` if the outboxes are not empty within ``timeout_s``.
        """
        total = 0
        # First take back what is pending under this writer's own name (the batch its run() loop held when it
        # was stopped): no other writer would claim it before claim_idle_ms.
        self._own_history_done = False
        async with asyncio.timeout(timeout_s):
            while True:
                handled = await self.step(wait=False)
                total += handled
                if handled:
                    continue
                if (await self.lag()).entries == 0:
                    await self._trim_if_due(now=True)
                    return total
                # What is left is pending under someone else: look for claimable entries on every pass.
                self._claim_due_at = 0.0
                await asyncio.sleep(min(0.05, self._claim_idle_ms / 1000 / 4 or 0.001))

    async def step(self, *, wait: bool = True) -> int:
        """Write one batch (claimed or new entries); return how many entries were acknowledged.

        With ``wait`` the read blocks up to ``block_ms`` for new entries; without it, it returns at once.
        """
        loop = asyncio.get_running_loop()
        if loop.time() >= self._accounts_due_at:
            await self._refresh_accounts()
            self._accounts_due_at = loop.time() + self._accounts_refresh_ms / 1000
        if not self._streams:
            if wait:
                await self._sleep_unless_stopping(min(self._block_ms, self._accounts_refresh_ms) / 1000)
            return 0
        entries: list[_Entry] = []
        if not self._own_history_done:
            entries = await self._read_own_history()
            if not entries:
                self._own_history_done = True
        if not entries and loop.time() >= self._claim_due_at:
            entries, more = await self._claim()
            self.stats.claimed += len(entries)
            # With more left to claim, claim again on the next step; otherwise after the interval.
            self._claim_due_at = loop.time() if more else loop.time() + self._claim_interval_ms / 1000
        if not entries:
            entries = await self._read_new(wait=wait)
        handled = 0
        for start in range(0, len(entries), self.batch_size_max):
            handled += await self._commit(entries[start : start + self.batch_size_max])
        return handled

    # ------------------------------------------------------------------------------------------------
    # Reading.

    async def _redis(self, call: Awaitable[T], extra_s: float = 0.0) -> T:
        async with asyncio.timeout(self._redis_timeout_s + extra_s):
            return await call

    async def _refresh_accounts(self) -> None:
        accounts = await self._redis(self._client.smembers(self.keys.accounts()))
        for account in sorted(str(a) for a in accounts):
            self._streams.setdefault(self.keys.outbox(account), account)
        missing = sorted(set(self._streams) - self._grouped)
        for start in range(0, len(missing), self._streams_per_read_max):
            chunk = missing[start : start + self._streams_per_read_max]
            pipe = self._client.pipeline(transaction=False)
            for stream in chunk:
                # From id 0, so entries appended before the group existed are written too.
                pipe.xgroup_create(stream, self.group, id="0", mkstream=True)
            replies = await self._redis(pipe.execute(raise_on_error=False))
            for stream, reply in zip(chunk, replies, strict=True):
                if isinstance(reply, BaseException) and "BUSYGROUP" not in str(reply):
                    raise reply
                self._grouped.add(stream)

    def _stream_chunks(self) -> list[list[str]]:
        streams = sorted(self._streams)
        size = self._streams_per_read_max
        return [streams[i : i + size] for i in range(0, len(streams), size)]

    async def _xreadgroup(self, streams: Sequence[str], start: str, count: int, block_ms: int | None) -> list[_Entry]:
        reply = await self._redis(
            self._client.xreadgroup(
                self.group, self.consumer, dict.fromkeys(streams, start), count=count, block=block_ms
            ),
            extra_s=(block_ms or 0) / 1000,
        )
        return _entries(reply)

    async def _read_own_history(self) -> list[_Entry]:
        """Entries delivered to this consumer name before and never acknowledged (a restart)."""
        entries: list[_Entry] = []
        for chunk in self._stream_chunks():
            entries += await self._xreadgroup(chunk, "0", self.batch_size_max, None)
            if len(entries) >= self.batch_size_max:
                break
        return entries

    async def _claim(self) -> tuple[list[_Entry], bool]:
        """Take over entries idle for ``claim_idle_ms`` under any consumer; return them and whether more wait."""
        entries: list[_Entry] = []
        more = False
        for stream in sorted(self._streams):
            cursor = self._claim_cursors.get(stream, "0-0")
            for _ in range(CLAIM_CALLS_PER_STREAM_MAX):
                capacity = self.batch_size_max - len(entries)
                if capacity <= 0:
                    more = True
                    break
                reply = await self._redis(
                    self._client.xautoclaim(
                        stream, self.group, self.consumer, self._claim_idle_ms, start_id=cursor, count=capacity
                    )
                )
                cursor = str(reply[0])
                for entry_id, fields in reply[1]:
                    entries.append(_Entry(stream, str(entry_id), _fields(fields)))
                for entry_id in reply[2] if len(reply) > 2 else ():
                    # Redis 7 drops pending entries that were deleted from the stream; they cannot be written.
                    log.error("outbox %s lost pending entry %s before it was written", stream, entry_id)
                if cursor == "0-0":
                    break
            else:
                more = True
            self._claim_cursors[stream] = cursor
            if len(entries) >= self.batch_size_max:
                more = True
                break
        if entries:
            log.info("ledger writer %s claimed %d idle outbox entries", self.consumer, len(entries))
        return entries, more

    async def _read_new(self, *, wait: bool) -> list[_Entry]:
        """Read new entries: block for the first, then linger up to ``linger_ms`` to fill the batch.

        XREADGROUP's COUNT applies per stream, so each stream is asked for its share of the room left (room
        divided by streams, rounded up): a read delivers less than room + streams entries, however many
        accounts there are. A stream that filled its share probably holds more, so the lingering reads go
        to such streams first and without waiting; only when none is left does the writer wait for more.
        """
        loop = asyncio.get_running_loop()
        block_ms = self._block_ms if wait else None
        if self._embedded and block_ms is not None:
            block_ms = min(block_ms, 100)
        streams = sorted(self._streams)
        entries, hot = await self._read_some(streams, self.batch_size_max, block_ms)
        if not entries:
            return entries
        deadline = loop.time() + self._linger_ms / 1000
        while len(entries) < self.batch_size_max:
            remaining_ms = int((deadline - loop.time()) * 1000)
            if remaining_ms <= 0:
                break
            room = self.batch_size_max - len(entries)
            if hot:
                more, hot = await self._read_some(hot, room, None)
                if more:
                    entries += more
                    continue
            more, hot = await self._read_some(streams, room, remaining_ms)
            if not more:
                break
            entries += more
        return entries

    async def _read_some(
        self, streams: Sequence[str], room: int, block_ms: int | None
    ) -> tuple[list[_Entry], list[str]]:
        """One read of ``streams``; return the entries and the streams that filled their share.

        With few streams one blocking XREADGROUP covers them all. With more than ``streams_per_read_max``
        a blocking read on one group of streams would sleep while another has entries, so the groups are
        read without blocking, in turn, and an empty round sleeps instead.
        """
        share = -(-room // len(streams))
        size = self._streams_per_read_max
        chunks = [streams[i : i + size] for i in range(0, len(streams), size)]
        entries: list[_Entry] = []
        if len(chunks) == 1:
            entries = await self._xreadgroup(chunks[0], ">", share, block_ms or None)
        else:
            for index in range(len(chunks)):
                chunk = chunks[(self._read_offset + index) % len(chunks)]
                entries += await self._xreadgroup(chunk, ">", share, None)
                if len(entries) >= room:
                    break
            # Start with the next group next time, so one busy group cannot starve the others.
            self._read_offset = (self._read_offset + 1) % len(chunks)
            if not entries and block_ms:
                await self._sleep_unless_stopping(min(block_ms, max(self._linger_ms, 10)) / 1000)
        delivered: dict[str, int] = {}
        for entry in entries:
            delivered[entry.stream] = delivered.get(entry.stream, 0) + 1
        return entries, sorted(stream for stream, count in delivered.items() if count >= share)

    # ------------------------------------------------------------------------------------------------
    # Writing.

    async def _commit(self, batch: list[_Entry]) -> int:
        """Insert one batch (retrying while the database is down), then acknowledge it and trim."""
        good: list[tuple[_Entry, LedgerTransaction]] = []
        bad: list[tuple[_Entry, str]] = []
        for entry in batch:
            if entry.fields is None:
                bad.append((entry, "the entry was deleted from the stream while pending"))
                continue
            try:
                good.append((entry, LedgerTransaction.from_stream_fields(entry.fields)))
            except MalformedEntryError as error:
                bad.append((entry, str(error)))
        transactions = [txn for _, txn in good]
        backoff = _Backoff(self._backoff_initial_s, self._backoff_max_s)
        while True:
            try:
                inserted = await self._sink.insert_transactions(transactions) if transactions else 0
                break
            except asyncio.CancelledError:
                raise
            except Exception as error:  # Any database failure is retried: dropping a batch is no option.
                # Attempts are not capped: giving the batch up would only leave it pending and read more
                # entries that fail the same way. The delay is capped; the outbox holds the backlog.
                self.stats.sink_failures += 1
                self.stats.last_error = f"{type(error).__name__}: {error}"
                if backoff.attempt == 0 or backoff.attempt & (backoff.attempt - 1) == 0:
                    log.warning(
                        "ledger write of %d transactions failed (attempt %d), retrying: %s",
                        len(transactions),
                        backoff.attempt + 1,
                        self.stats.last_error,
                    )
                if self._stopping.is_set():
                    raise _Stopping from error
                await self._sleep_unless_stopping(backoff.next_delay_s())
        await self._acknowledge(good, bad)
        self.stats.batches += 1
        self.stats.entries += len(batch)
        self.stats.inserted += inserted
        self.stats.duplicates += len(transactions) - inserted
        self.stats.dead_lettered += len(bad)
        self._untrimmed.update(entry.stream for entry in batch)
        await self._trim_if_due()
        return len(batch)

    async def _trim_if_due(self, *, now: bool = False) -> None:
        loop = asyncio.get_running_loop()
        if not self._trim or not self._untrimmed or (not now and loop.time() < self._trim_due_at):
            return
        streams, self._untrimmed = self._untrimmed, set()
        self._trim_due_at = loop.time() + self._trim_interval_ms / 1000
        try:
            await self._trim_streams(streams)
        except _REDIS_OUTAGES as error:
            # Trimming is housekeeping; the streams are trimmed with the next batch that touches them.
            log.debug("outbox trim skipped: %s", error)

    async def _acknowledge(self, good: list[tuple[_Entry, LedgerTransaction]], bad: list[tuple[_Entry, str]]) -> None:
        """XACK the committed entries; move the unreadable ones to the dead-letter stream and XACK them."""
        ids: dict[str, list[str]] = {}
        for entry, _ in good:
            ids.setdefault(entry.stream, []).append(entry.entry_id)
        backoff = _Backoff(self._backoff_initial_s, self._backoff_max_s)
        for attempt in range(ACK_ATTEMPTS_MAX):
            try:
                for entry, reason in bad:
                    await self._dead_letter(entry, reason)
                bad = []
                if ids:
                    pipe = self._client.pipeline(transaction=False)
                    for stream, entry_ids in ids.items():
                        pipe.xack(stream, self.group, *entry_ids)
                    await self._redis(pipe.execute())
                return
            except _REDIS_OUTAGES as error:
                self._redis_failed(error, attempt)
                await self._sleep_unless_stopping(backoff.next_delay_s())
        # The entries stay pending: they will be claimed and skipped as duplicates. Nothing is lost.
        log.warning("ledger writer %s could not acknowledge a committed batch; it will be re-read", self.consumer)

    async def _dead_letter(self, entry: _Entry, reason: str) -> None:
        account = self._streams.get(entry.stream, "")
        log.error("outbox entry %s %s is unreadable and set aside: %s", entry.stream, entry.entry_id, reason)
        fields = {f"field:{name}": value for name, value in (entry.fields or {}).items()}
        fields |= {"source_stream": entry.stream, "source_id": entry.entry_id, "error": reason[:1000]}
        # One MULTI: the copy and the acknowledgement happen together or not at all (same hash slot).
        pipe = self._client.pipeline(transaction=True)
        pipe.xadd(dead_letter_key(self.keys, account), fields)  # type: ignore[arg-type]
        pipe.xack(entry.stream, self.group, entry.entry_id)
        await self._redis(pipe.execute())

    async def _trim_streams(self, streams: Iterable[str]) -> None:
        """Trim acknowledged entries, never an entry that is pending or not yet delivered.

        For each stream the group's last-delivered id L is read first and the oldest pending id P after it
        (one pipeline, in that order). An entry pending at trim time with an id at or below L was delivered
        before L was read and cannot have become pending again, so it was pending when P was read: its id
        is at least P. Entries delivered later have ids above L. So trimming below min(P, L + 1) removes
        only acknowledged entries. Only spendgate's group is considered: the outbox has no other readers.
        """
        ordered = sorted(streams)
        pipe = self._client.pipeline(transaction=False)
        for stream in ordered:
            pipe.xinfo_groups(stream)
            pipe.xpending(stream, self.group)
        replies = await self._redis(pipe.execute(raise_on_error=False))
        trims: list[tuple[str, str]] = []
        for index, stream in enumerate(ordered):
            groups, pending = replies[2 * index], replies[2 * index + 1]
            if isinstance(groups, BaseException) or isinstance(pending, BaseException):
                continue
            ours = next((g for g in groups if str(g.get("name")) == self.group), None)
            if ours is None:
                continue
            last_delivered = str(ours["last-delivered-id"])
            if last_delivered in ("0-0", "0"):
                continue
            minimum = next_entry_id(last_delivered)
            if int(pending.get("pending") or 0) > 0 and pending.get("min"):
                minimum = min(minimum, str(pending["min"]), key=_id_key)
            trims.append((stream, minimum))
        if trims:
            pipe = self._client.pipeline(transaction=False)
            for stream, minimum in trims:
                pipe.xtrim(stream, minid=minimum, approximate=self._trim_approximate)
            await self._redis(pipe.execute())

    # ------------------------------------------------------------------------------------------------
    # Lag.

    async def lag(self) -> OutboxLag:
        """Report entries pending, entries not yet delivered, and the age of the oldest of them.

        Ages are measured by the injected clock against the entry ids, which carry the Redis server's time.
        """
        accounts = await self._redis(self._client.smembers(self.keys.accounts()))
        streams = sorted(self.keys.outbox(str(a)) for a in accounts)
        if not streams:
            return OutboxLag(0, 0, 0)
        pipe = self._client.pipeline(transaction=False)
        for stream in streams:
            pipe.xinfo_groups(stream)
            pipe.xpending(stream, self.group)
            pipe.xlen(stream)
            pipe.xrange(stream, "-", "+", count=1)
        replies = await self._redis(pipe.execute(raise_on_error=False))
        pending_total = 0
        undelivered_total = 0
        oldest: list[str] = []
        follow_up: list[tuple[str, str, Any]] = []
        for index, stream in enumerate(streams):
            groups, pending, length, first = replies[4 * index : 4 * index + 4]
            if isinstance(length, BaseException) or isinstance(first, BaseException):
                raise length if isinstance(length, BaseException) else first
            ours = None
            if not isinstance(groups, BaseException):
                ours = next((g for g in groups if str(g.get("name")) == self.group), None)
            if ours is None:
                # No group yet: every entry in the stream is waiting for its first delivery.
                undelivered_total += int(length)
                if first:
                    oldest.append(str(first[0][0]))
                continue
            if not isinstance(pending, BaseException) and int(pending.get("pending") or 0) > 0:
                pending_total += int(pending["pending"])
                oldest.append(str(pending["min"]))
            follow_up.append((stream, str(ours["last-delivered-id"]), ours.get("lag")))
        if follow_up:
            pipe = self._client.pipeline(transaction=False)
            for stream, last_delivered, known_lag in follow_up:
                # The first undelivered entry gives the age; the entries are counted only when Redis (< 7, or
                # after deletions) cannot give the group's lag itself, and then at most LAG_COUNT_MAX of them.
                count = 1 if known_lag is not None else LAG_COUNT_MAX
                pipe.xrange(stream, f"({last_delivered}", "+", count=count)
            ranges = await self._redis(pipe.execute())
            for (_, _, known_lag), undelivered in zip(follow_up, ranges, strict=True):
                undelivered_total += int(known_lag) if known_lag is not None else len(undelivered)
                if undelivered:
                    oldest.append(str(undelivered[0][0]))
        oldest_age_ms = 0
        if oldest:
            oldest_age_ms = max(0, self._clock.now_ms() - min(entry_ms(entry_id) for entry_id in oldest))
        return OutboxLag(pending_total, undelivered_total, oldest_age_ms)

    # ------------------------------------------------------------------------------------------------
    # Helpers.

    def _redis_failed(self, error: BaseException, attempt: int) -> None:
        self.stats.redis_failures += 1
        self.stats.last_error = f"{type(error).__name__}: {error}"
        # Log the first failure and then ever more rarely (attempts 1, 2, 4, 8, ...), not every retry.
        if attempt == 0 or attempt & (attempt - 1) == 0:
            log.warning("ledger writer %s: redis failed (attempt %d): %s", self.consumer, attempt + 1, error)

    async def _sleep_unless_stopping(self, delay_s: float) -> None:
        try:
            async with asyncio.timeout(delay_s):
                await self._stopping.wait()
        except TimeoutError:
            pass


def _fields(raw: Any) -> dict[str, str] | None:
    if raw is None:
        return None
    return {str(k): str(v) for k, v in dict(raw).items()}


def _entries(reply: Any) -> list[_Entry]:
    """Flatten an XREADGROUP reply (a list of [stream, [(id, fields), ...]], or a dict under RESP3)."""
    if not reply:
        return []
    items = reply.items() if isinstance(reply, dict) else reply
    entries: list[_Entry] = []
    for stream, raw_entries in items:
        # RESP3 wraps each stream's entries in one more list.
        unwrapped = (
            raw_entries[0]
            if isinstance(reply, dict) and raw_entries and isinstance(raw_entries[0], list)
            else raw_entries
        )
        for entry_id, fields in unwrapped:
            entries.append(_Entry(str(stream), str(entry_id), _fields(fields)))
    return entries


async def read_outbox(
    client: aioredis.Redis,
    keys: Keys,
    account_id: str,
    *,
    count_max: int = 100_000,
    page_size: int = 1000,
) -> list[LedgerTransaction]:
    """Return the transactions still in an account's outbox (written or not), oldest first.

    The stream holds only what the writer has not trimmed yet: entries pending, undelivered, or acknowledged
    but not yet trimmed. Reconciliation and rebuild add those missing from the ledger. Reads at most
    ``count_max`` entries; unreadable entries are skipped (the writer sets them aside).
    """
    stream = keys.outbox(account_id)
    transactions: list[LedgerTransaction] = []
    start = "-"
    read = 0
    while read < count_max:
        page = await client.xrange(stream, start, "+", count=min(page_size, count_max - read))
        if not page:
            break
        read += len(page)
        for entry_id, fields in page:
            try:
                transactions.append(LedgerTransaction.from_stream_fields(_fields(fields) or {}))
            except MalformedEntryError as error:
                log.warning("outbox entry %s %s skipped: %s", stream, entry_id, error)
        last_id = page[-1][0]
        start = "(" + (last_id.decode() if isinstance(last_id, bytes) else str(last_id))
    return transactions
