"""The ledger's interface: what settled transactions look like, and what a ledger database must do with them.

The ledger is the truth for money that settled. Transactions reach it from the accounts' outbox streams
(see :mod:`spendgate.ledger.writer`), are inserted idempotently on their id, and are never changed
afterwards. Two implementations keep the same contract: :mod:`spendgate.ledger.sqlite` (the embedded
default) and :mod:`spendgate.ledger.postgres` (production).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import enum
import json
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from spendgate.domain import AccountPlan, InvalidArgumentError, Window

# Bounds on what a caller may ask of a ledger in one call.
LIST_LIMIT_MAX = 1000
LIST_LIMIT_DEFAULT = 100
REPORT_ROWS_MAX = 100_000
INSERT_BATCH_SIZE_MAX = 10_000
CONFIG_HISTORY_LIMIT_MAX = 1000
AUDIT_LIMIT_MAX = 1000
TXN_ID_LOOKUP_MAX = 10_000
# The largest amount a stream entry may carry: the core refuses anything above 1e15 micro-units, so a bigger
# value means a corrupted entry, not money.
_AMOUNT_MICROS_MAX = 10**15
# The window kinds that carry money, in the order the ledger stores and reports them.
LEDGER_WINDOWS = (Window.DAY, Window.WEEK, Window.MONTH, Window.TOTAL)
TOTAL_WINDOW_ID = "all"


class MalformedEntryError(ValueError):
    """An outbox entry that cannot be read as a transaction; the writer sets it aside, it never drops it."""


@dataclasses.dataclass(frozen=True, slots=True)
class LedgerTransaction:
    """One settled transaction, exactly as the capture appended it to its account's outbox.

    Money is in integer micro-units. ``chain`` runs from the wallet (first) up to the account (last), as
    it was when the spend was authorized; ``day``, ``week`` and ``month`` are the ids of the windows the
    spend counted in (the authorization's windows, in the account's time zone).
    """

    txn_id: str
    account_id: str
    wallet_id: str
    chain: tuple[str, ...]
    amount_micros: int
    authorized_micros: int
    currency: str
    service: str
    metadata: Mapping[str, str] = dataclasses.field(hash=False)
    authorized_at_ms: int
    captured_at_ms: int
    day: str
    week: str
    month: str
    idempotency_key: str
    capture_idempotency_key: str

    @property
    def pool_id(self) -> str:
        """The wallet's parent: its pool (or the account, for a wallet directly under it)."""
        return self.chain[1] if len(self.chain) > 1 else self.chain[0]

    def window_id(self, window: Window) -> str:
        """Return the id of the window of kind ``window`` this transaction counted in."""
        match window:
            case Window.DAY:
                return self.day
            case Window.WEEK:
                return self.week
            case Window.MONTH:
                return self.month
            case Window.TOTAL:
                return TOTAL_WINDOW_ID
        raise ValueError(f"window {window!r} carries no money")

    @classmethod
    def from_stream_fields(cls, fields: Mapping[str, str]) -> LedgerTransaction:
        """Read an outbox stream entry (the fields ``outbox_append`` in ``_lib.lua`` writes).

        Raises :class:`MalformedEntryError` naming the first field that is missing or wrong.
        """

        def text(name: str, *, required: bool = True) -> str:
            value = fields.get(name)
            if value is None:
                if required:
                    raise MalformedEntryError(f"outbox entry has no {name!r} field")
                return ""
            return str(value)

        def integer(name: str, low: int, high: int) -> int:
            raw = text(name)
            try:
                value = int(raw)
            except ValueError:
                raise MalformedEntryError(f"outbox entry field {name!r} = {raw[:40]!r} is not an integer") from None
            if not low <= value <= high:
                raise MalformedEntryError(f"outbox entry field {name!r} = {value} is outside {low}..{high}")
            return value

        chain = tuple(text("chain").split(","))
        wallet_id = text("wallet_id")
        account_id = text("account_id")
        if len(chain) < 2 or chain[0] != wallet_id or chain[-1] != account_id or not all(chain):
            raise MalformedEntryError(
                f"outbox entry chain {text('chain')[:200]!r} does not run from wallet {wallet_id!r} "
                f"to account {account_id!r}"
            )
        raw_metadata = text("metadata", required=False) or "{}"
        try:
            metadata = json.loads(raw_metadata)
        except ValueError:
            raise MalformedEntryError(f"outbox entry metadata {raw_metadata[:80]!r} is not JSON") from None
        if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
        ):
            raise MalformedEntryError("outbox entry metadata is not an object of strings")
        txn_id = text("txn_id")
        if not txn_id:
            raise MalformedEntryError("outbox entry has an empty 'txn_id'")
        # Timestamps: any instant from the epoch to year 9999 is plausible; anything else is corruption.
        time_max_ms = 253_402_300_799_999
        return cls(
            txn_id=txn_id,
            account_id=account_id,
            wallet_id=wallet_id,
            chain=chain,
            amount_micros=integer("amount_micros", 0, _AMOUNT_MICROS_MAX),
            authorized_micros=integer("authorized_micros", 0, _AMOUNT_MICROS_MAX),
            currency=text("currency"),
            service=text("service", required=False),
            metadata=dict(sorted(metadata.items())),
            authorized_at_ms=integer("authorized_at_ms", 0, time_max_ms),
            captured_at_ms=integer("captured_at_ms", 0, time_max_ms),
            day=text("day"),
            week=text("week"),
            month=text("month"),
            idempotency_key=text("idempotency_key", required=False),
            capture_idempotency_key=text("capture_idempotency_key", required=False),
        )

    def to_stream_fields(self) -> dict[str, str]:
        """The outbox entry this transaction was read from (the inverse of :meth:`from_stream_fields`)."""
        return {
            "txn_id": self.txn_id,
            "account_id": self.account_id,
            "wallet_id": self.wallet_id,
            "chain": ",".join(self.chain),
            "amount_micros": str(self.amount_micros),
            "authorized_micros": str(self.authorized_micros),
            "currency": self.currency,
            "service": self.service,
            "metadata": metadata_json(self.metadata),
            "authorized_at_ms": str(self.authorized_at_ms),
            "captured_at_ms": str(self.captured_at_ms),
            "day": self.day,
            "week": self.week,
            "month": self.month,
            "idempotency_key": self.idempotency_key,
            "capture_idempotency_key": self.capture_idempotency_key,
        }


def metadata_json(metadata: Mapping[str, str]) -> str:
    """The canonical JSON of a transaction's metadata (sorted keys, no spaces), as the core writes it."""
    return json.dumps(dict(metadata), sort_keys=True, separators=(",", ":"))


# ---------------------------------------------------------------------------------------------------------
# Queries.


@dataclasses.dataclass(frozen=True, slots=True)
class TransactionFilter:
    """Which transactions to list or report on. Every bound is optional.

    ``node_id`` selects a wallet's transactions, or every transaction under a pool or an account (any
    transaction whose chain contains the node). ``since_ms`` is inclusive and ``until_ms`` exclusive, both
    on the capture time.
    """

    node_id: str | None = None
    since_ms: int | None = None
    until_ms: int | None = None
    service: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class TransactionPage:
    """One page of transactions, ordered by (captured_at_ms, txn_id), and the cursor of the next page."""

    transactions: tuple[LedgerTransaction, ...]
    # None on the last page.
    next_cursor: str | None


@dataclasses.dataclass(frozen=True, order=True, slots=True)
class Cursor:
    """A position in the ledger's (captured_at_ms, txn_id) order: a page starts just after it."""

    captured_at_ms: int
    txn_id: str

    def encode(self) -> str:
        """An opaque, URL-safe token."""
        raw = json.dumps([self.captured_at_ms, self.txn_id], separators=(",", ":")).encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @classmethod
    def decode(cls, token: str) -> Cursor:
        """Read a token made by :meth:`encode`; raise :class:`InvalidArgumentError` for anything else."""
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
            captured_at_ms, txn_id = json.loads(raw)
        except (binascii.Error, ValueError, TypeError):
            raise InvalidArgumentError(
                "page token is malformed: pass the next_page_token of the previous page unchanged"
            ) from None
        if not isinstance(captured_at_ms, int) or not isinstance(txn_id, str):
            raise InvalidArgumentError("page token is malformed: pass the next_page_token of the previous page")
        return cls(captured_at_ms, txn_id)


class ReportGroup(enum.IntEnum):
    """What a spend report groups by (values match ``spendgate.v1.ReportGroup``)."""

    WALLET = 1
    POOL = 2
    ACCOUNT = 3
    SERVICE = 4


class ReportPeriod(enum.IntEnum):
    """How a spend report buckets time (values match ``spendgate.v1.ReportPeriod``).

    Periods are the window ids the spend counted in: the account's calendar day or month.
    """

    DAY = 1
    MONTH = 2


@dataclasses.dataclass(frozen=True, slots=True)
class ReportRow:
    """The total of one group in one period."""

    period: str
    group: str
    currency: str
    amount_micros: int
    transaction_count: int


@dataclasses.dataclass(frozen=True, order=True, slots=True)
class WindowKey:
    """One window of one node: the unit Redis counts spend in."""

    node_id: str
    window: Window
    window_id: str


@dataclasses.dataclass(frozen=True, slots=True)
class WindowTotal:
    """What settled in one window of one node, according to the ledger."""

    spent_micros: int
    transaction_count: int


@dataclasses.dataclass(frozen=True, slots=True)
class ConfigVersion:
    """One recorded configuration of an account's whole tree."""

    account_id: str
    version: int
    at_ms: int
    actor: str
    plan: AccountPlan


@dataclasses.dataclass(frozen=True, slots=True)
class AuditRecord:
    """One admin action, with the state before and after it."""

    audit_id: int
    at_ms: int
    actor: str
    action: str
    node_id: str
    before: dict[str, Any] | None
    after: dict[str, Any] | None


def window_deltas(transactions: Sequence[LedgerTransaction]) -> dict[WindowKey, WindowTotal]:
    """Sum transactions into the windows of every node on their chains (how Redis counts them)."""
    # Plain tuples while summing: this runs for every node and window of every transaction of a batch, and
    # a batch has few distinct keys, so the dataclasses are built once per key at the end.
    totals: dict[tuple[str, Window, str], list[int]] = {}
    for txn in transactions:
        windows = (
            (Window.DAY, txn.day),
            (Window.WEEK, txn.week),
            (Window.MONTH, txn.month),
            (Window.TOTAL, TOTAL_WINDOW_ID),
        )
        amount = txn.amount_micros
        for node_id in txn.chain:
            for window, window_id in windows:
                key = (node_id, window, window_id)
                slot = totals.get(key)
                if slot is None:
                    totals[key] = [amount, 1]
                else:
                    slot[0] += amount
                    slot[1] += 1
    return {WindowKey(*key): WindowTotal(spent, count) for key, (spent, count) in totals.items()}


def check_limit(limit: int) -> int:
    """Return a page size within bounds (zero means the default)."""
    if limit == 0:
        return LIST_LIMIT_DEFAULT
    if not 1 <= limit <= LIST_LIMIT_MAX:
        raise InvalidArgumentError(f"page size {limit} is outside 1..{LIST_LIMIT_MAX}")
    return limit


class LedgerSink(Protocol):
    """A durable ledger database: settled transactions, window totals, configuration history and audit.

    Every method is a coroutine and every failure to reach the database raises
    :class:`~spendgate.domain.UnavailableError` (safe to retry: inserts are idempotent).
    """

    async def migrate(self) -> int:
        """Create or upgrade the schema (idempotent; safe to run from several processes at once).

        Returns the schema version now in force.
        """
        ...

    async def insert_transactions(self, batch: Sequence[LedgerTransaction]) -> int:
        """Insert a batch in one database transaction; ids already present are skipped.

        Returns how many transactions were new. The window totals of the new ones are added in the same
        transaction, so totals always agree with the transactions.
        """
        ...

    async def existing_txn_ids(self, txn_ids: Sequence[str]) -> set[str]:
        """Return which of ``txn_ids`` (at most ``TXN_ID_LOOKUP_MAX``) are in the ledger."""
        ...

    async def list_transactions(
        self, filters: TransactionFilter, cursor: str | None = None, limit: int = LIST_LIMIT_DEFAULT
    ) -> TransactionPage:
        """Return one page of matching transactions in (captured_at_ms, txn_id) order.

        Pages are stable: a transaction is on exactly one page of a walk, whatever else is inserted. (A
        transaction written late with a capture time before the cursor is not seen by a walk already past
        that time; the writer keeps this rare by draining continuously.)
        """
        ...

    async def count_transactions(self) -> int:
        """Return how many transactions the ledger holds."""
        ...

    async def spend_report(
        self,
        group_by: ReportGroup,
        period: ReportPeriod,
        filters: TransactionFilter,
        *,
        rows_max: int = REPORT_ROWS_MAX,
    ) -> list[ReportRow]:
        """Sum matching transactions per (period, group, currency), ordered by period, group, currency.

        Raises :class:`InvalidArgumentError` when the report would have more than ``rows_max`` rows.
        """
        ...

    async def window_totals(
        self, account_id: str, windows: Mapping[Window, str] | None = None
    ) -> dict[WindowKey, WindowTotal]:
        """Return the settled spend of every node of an account per window.

        ``windows`` restricts the answer to one window id per kind (for example the windows open now,
        ``{Window.DAY: "2026-11-29", ...}``; kinds left out are not returned); ``None`` returns every
        window ever counted.
        """
        ...

    async def record_config(self, plan: AccountPlan, *, actor: str, at_ms: int) -> int:
        """Record an account's whole tree as its new configuration; return the version number."""
        ...

    async def config_history(self, account_id: str, limit: int = 100) -> list[ConfigVersion]:
        """Return an account's recorded configurations, newest first."""
        ...

    async def latest_plans(self) -> list[AccountPlan]:
        """Return the newest recorded configuration of every account (to restore Redis from)."""
        ...

    async def record_audit(
        self,
        *,
        actor: str,
        action: str,
        node_id: str,
        before: dict[str, Any] | None,
        after: dict[str, Any] | None,
        at_ms: int,
    ) -> None:
        """Record one admin action (matches :class:`spendgate.admin.AuditLog`)."""
        ...

    async def list_audit(self, *, since_ms: int = 0, limit: int = 100) -> list[AuditRecord]:
        """Return audit records at or after ``since_ms``, oldest first."""
        ...

    async def close(self) -> None:
        """Release the connections."""
        ...
