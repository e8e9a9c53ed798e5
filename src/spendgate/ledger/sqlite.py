"""The embedded ledger: one SQLite file, written from one dedicated thread.

SQLite's driver blocks, so every call runs on a single worker thread that owns the connection; the event
loop only awaits it. The file is in WAL mode, so the CLI can read reports while a server writes, and with
``synchronous=FULL``, so a committed batch survives a power cut (the writer acknowledges the outbox right
after a commit; a commit that could still roll back would lose money from the ledger).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import pathlib
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from spendgate.domain import AccountPlan, InvalidArgumentError, UnavailableError, Window
from spendgate.ledger import _sql
from spendgate.ledger._plans import plan_to_json, value_to_json
from spendgate.ledger.sink import (
    AUDIT_LIMIT_MAX,
    CONFIG_HISTORY_LIMIT_MAX,
    INSERT_BATCH_SIZE_MAX,
    LIST_LIMIT_DEFAULT,
    REPORT_ROWS_MAX,
    TXN_ID_LOOKUP_MAX,
    AuditRecord,
    ConfigVersion,
    LedgerTransaction,
    ReportGroup,
    ReportPeriod,
    ReportRow,
    TransactionFilter,
    TransactionPage,
    WindowKey,
    WindowTotal,
    check_limit,
    window_deltas,
)

T = TypeVar("T")

_NOW_MS = "CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)"

# Numbered migrations, applied in order, each in its own transaction. Never edit one that has shipped: add
# the next number. PostgreSQL's list (postgres.py) keeps the same numbers with the same meaning.
MIGRATIONS: tuple[tuple[int, str, tuple[str, ...]], ...] = (
    (
        1,
        "transactions, their chains and window totals",
        (
            f"""CREATE TABLE transactions (
                txn_id TEXT PRIMARY KEY,
                account_id TEXT NOT NULL,
                wallet_id TEXT NOT NULL,
                pool_id TEXT NOT NULL,
                chain TEXT NOT NULL,
                amount_micros INTEGER NOT NULL CHECK (amount_micros >= 0),
                authorized_micros INTEGER NOT NULL CHECK (authorized_micros >= 0),
                currency TEXT NOT NULL,
                service TEXT NOT NULL,
                metadata TEXT NOT NULL,
                authorized_at_ms INTEGER NOT NULL,
                captured_at_ms INTEGER NOT NULL,
                day TEXT NOT NULL,
                week TEXT NOT NULL,
                month TEXT NOT NULL,
                idempotency_key TEXT NOT NULL,
                capture_idempotency_key TEXT NOT NULL,
                inserted_at_ms INTEGER NOT NULL DEFAULT ({_NOW_MS})
            )""",
            "CREATE INDEX transactions_by_time ON transactions (captured_at_ms, txn_id)",
            # One row per node of each transaction's chain: "everything under a pool" is one index range,
            # already in page order.
            """CREATE TABLE txn_nodes (
                node_id TEXT NOT NULL,
                captured_at_ms INTEGER NOT NULL,
                txn_id TEXT NOT NULL,
                depth INTEGER NOT NULL,
                PRIMARY KEY (node_id, captured_at_ms, txn_id)
            ) WITHOUT ROWID""",
            # Settled spend per node and window, kept in the same transaction as the inserts, so recovery
            # and reconciliation read a few rows per node instead of summing all history.
            """CREATE TABLE window_spend (
                account_id TEXT NOT NULL,
                node_id TEXT NOT NULL,
                window_kind TEXT NOT NULL,
                window_id TEXT NOT NULL,
                spent_micros INTEGER NOT NULL,
                transaction_count INTEGER NOT NULL,
                PRIMARY KEY (account_id, node_id, window_kind, window_id)
            ) WITHOUT ROWID""",
        ),
    ),
    (
        2,
        "configuration history and audit log",
        (
            """CREATE TABLE config_versions (
                account_id TEXT NOT NULL,
                version INTEGER NOT NULL,
                at_ms INTEGER NOT NULL,
                actor TEXT NOT NULL,
                plan TEXT NOT NULL,
                PRIMARY KEY (account_id, version)
            )""",
            """CREATE TABLE audit_log (
                audit_id INTEGER PRIMARY KEY AUTOINCREMENT,
                at_ms INTEGER NOT NULL,
                actor TEXT NOT NULL,
                action TEXT NOT NULL,
                node_id TEXT NOT NULL,
                before_value TEXT,
                after_value TEXT
            )""",
            "CREATE INDEX audit_log_by_time ON audit_log (at_ms, audit_id)",
        ),
    ),
)

_INSERT_TRANSACTION = (
    f"INSERT INTO transactions ({', '.join(_sql.TRANSACTION_COLUMNS)}) "  # noqa: S608 - fixed column names
    f"VALUES ({', '.join('?' for _ in _sql.TRANSACTION_COLUMNS)}) ON CONFLICT (txn_id) DO NOTHING"
)
_ADD_WINDOW_SPEND = (
    "INSERT INTO window_spend (account_id, node_id, window_kind, window_id, spent_micros, transaction_count) "
    "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (account_id, node_id, window_kind, window_id) DO UPDATE SET "
    "spent_micros = spent_micros + excluded.spent_micros, "
    "transaction_count = transaction_count + excluded.transaction_count"
)


def _qmark(sql: str) -> str:
    """Turn the shared queries' ``%s`` placeholders into SQLite's ``?``."""
    return sql.replace("%s", "?")


class SqliteLedger:
    """A :class:`~spendgate.ledger.sink.LedgerSink` in one SQLite file (or ``":memory:"``)."""

    def __init__(self, path: str | pathlib.Path, *, busy_timeout_ms: int = 5_000) -> None:
        self.path = str(path)
        self._busy_timeout_ms = busy_timeout_ms
        # One thread owns the connection: sqlite3 connections must not be shared across threads, and one
        # writer at a time is all SQLite allows anyway.
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="spendgate-ledger")
        self._connection: sqlite3.Connection | None = None
        self._closed = False

    # ------------------------------------------------------------------------------------------------
    # Plumbing.

    def _connect(self) -> sqlite3.Connection:
        if self._connection is None:
            if self.path != ":memory:":
                pathlib.Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            # isolation_level=None: transactions are begun and ended explicitly, never implicitly.
            connection = sqlite3.connect(self.path, isolation_level=None, timeout=self._busy_timeout_ms / 1000)
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=FULL")
            connection.execute(f"PRAGMA busy_timeout={int(self._busy_timeout_ms)}")
            self._connection = connection
        return self._connection

    async def _run(self, function: Callable[[sqlite3.Connection], T]) -> T:
        if self._closed:
            raise UnavailableError("the ledger is closed")

        def call() -> T:
            return function(self._connect())

        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, call)
        except sqlite3.OperationalError as error:
            # Locked, busy, disk full, unreadable file: the database cannot take the call now.
            raise UnavailableError(f"the SQLite ledger {self.path} is unavailable: {error}") from error

    @staticmethod
    def _write(connection: sqlite3.Connection, body: Callable[[], T]) -> T:
        # BEGIN IMMEDIATE takes the write lock up front, so a transaction never fails half-way for want of it.
        connection.execute("BEGIN IMMEDIATE")
        try:
            result = body()
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        connection.execute("COMMIT")
        return result

    # ------------------------------------------------------------------------------------------------
    # Schema.

    async def migrate(self) -> int:
        """Apply the migrations this database has not had yet, in order; return the schema version."""
        return await self._run(self._migrate)

    def _migrate(self, connection: sqlite3.Connection) -> int:
        def body() -> int:
            connection.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                "version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at_ms INTEGER NOT NULL)"
            )
            applied = {row[0] for row in connection.execute("SELECT version FROM schema_migrations")}
            for version, name, statements in MIGRATIONS:
                if version in applied:
                    continue
                for statement in statements:
                    connection.execute(statement)
                connection.execute(
                    f"INSERT INTO schema_migrations (version, name, applied_at_ms) VALUES (?, ?, {_NOW_MS})",  # noqa: S608
                    (version, name),
                )
                applied.add(version)
            return int(max(applied))

        return self._write(connection, body)

    # ------------------------------------------------------------------------------------------------
    # Transactions.

    async def insert_transactions(self, batch: Sequence[LedgerTransaction]) -> int:
        """Insert a batch in one transaction, skipping ids already present; return how many were new."""
        if len(batch) > INSERT_BATCH_SIZE_MAX:
            raise InvalidArgumentError(f"a batch holds at most {INSERT_BATCH_SIZE_MAX} transactions")
        if not batch:
            return 0
        unique = sorted({txn.txn_id: txn for txn in reversed(batch)}.values(), key=lambda t: t.txn_id)
        return await self._run(functools.partial(self._insert, unique))

    def _insert(self, unique: list[LedgerTransaction], connection: sqlite3.Connection) -> int:
        def body() -> int:
            new = [
                txn
                for txn in unique
                if connection.execute(_INSERT_TRANSACTION, _sql.transaction_row(txn)).rowcount == 1
            ]
            connection.executemany(
                "INSERT INTO txn_nodes (node_id, captured_at_ms, txn_id, depth) VALUES (?, ?, ?, ?)",
                [(node, txn.captured_at_ms, txn.txn_id, depth) for txn in new for depth, node in enumerate(txn.chain)],
            )
            account_of = {node: txn.account_id for txn in new for node in txn.chain}
            connection.executemany(
                _ADD_WINDOW_SPEND,
                [
                    (
                        account_of[key.node_id],
                        key.node_id,
                        _sql.WINDOW_NAMES[key.window],
                        key.window_id,
                        total.spent_micros,
                        total.transaction_count,
                    )
                    for key, total in sorted(window_deltas(new).items())
                ],
            )
            return len(new)

        return self._write(connection, body)

    async def existing_txn_ids(self, txn_ids: Sequence[str]) -> set[str]:
        """Return which of the ids are in the ledger."""
        if len(txn_ids) > TXN_ID_LOOKUP_MAX:
            raise InvalidArgumentError(f"look up at most {TXN_ID_LOOKUP_MAX} transaction ids at once")
        ids = list(txn_ids)

        def query(connection: sqlite3.Connection) -> set[str]:
            found: set[str] = set()
            # SQLite bounds the number of parameters of one statement; 500 is well below every build's limit.
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                marks = ", ".join("?" for _ in chunk)
                sql = f"SELECT txn_id FROM transactions WHERE txn_id IN ({marks})"  # noqa: S608 - only '?' marks
                found.update(row[0] for row in connection.execute(sql, chunk))
            return found

        return await self._run(query)

    async def list_transactions(
        self, filters: TransactionFilter, cursor: str | None = None, limit: int = LIST_LIMIT_DEFAULT
    ) -> TransactionPage:
        """Return one page of matching transactions in (captured_at_ms, txn_id) order."""
        limit = check_limit(limit)
        sql, params = _sql.list_query(filters, cursor, limit)

        def query(connection: sqlite3.Connection) -> list[Any]:
            return connection.execute(_qmark(sql), params).fetchall()

        rows = await self._run(query)
        return _sql.page(rows, limit)

    async def count_transactions(self) -> int:
        """Return how many transactions the ledger holds."""

        def query(connection: sqlite3.Connection) -> int:
            return int(connection.execute("SELECT COUNT(*) FROM transactions").fetchone()[0])

        return await self._run(query)

    async def spend_report(
        self,
        group_by: ReportGroup,
        period: ReportPeriod,
        filters: TransactionFilter,
        *,
        rows_max: int = REPORT_ROWS_MAX,
    ) -> list[ReportRow]:
        """Sum matching transactions per (period, group, currency)."""
        sql, params = _sql.report_query(group_by, period, filters, rows_max)

        def query(connection: sqlite3.Connection) -> list[Any]:
            return connection.execute(_qmark(sql), params).fetchall()

        rows = await self._run(query)
        if len(rows) > rows_max:
            raise _sql.too_many_rows(rows_max)
        return [ReportRow(str(p), str(g), str(c), int(a), int(n)) for p, g, c, a, n in rows]

    async def window_totals(
        self, account_id: str, windows: Mapping[Window, str] | None = None
    ) -> dict[WindowKey, WindowTotal]:
        """Return the settled spend of every node of an account per window."""
        sql, params = _sql.window_totals_query(account_id, windows)

        def query(connection: sqlite3.Connection) -> list[Any]:
            return connection.execute(_qmark(sql), params).fetchall()

        return {
            WindowKey(str(node), _sql.WINDOWS_BY_NAME[str(kind)], str(window_id)): WindowTotal(int(spent), int(count))
            for node, kind, window_id, spent, count in await self._run(query)
        }

    # ------------------------------------------------------------------------------------------------
    # Configuration history and audit.

    async def record_config(self, plan: AccountPlan, *, actor: str, at_ms: int) -> int:
        """Record an account's whole tree as its new configuration; return the version number."""
        document = plan_to_json(plan)

        def write(connection: sqlite3.Connection) -> int:
            def body() -> int:
                row = connection.execute(
                    "SELECT COALESCE(MAX(version), 0) FROM config_versions WHERE account_id = ?", (plan.account_id,)
                ).fetchone()
                version = int(row[0]) + 1
                connection.execute(
                    "INSERT INTO config_versions (account_id, version, at_ms, actor, plan) VALUES (?, ?, ?, ?, ?)",
                    (plan.account_id, version, at_ms, actor, document),
                )
                return version

            return self._write(connection, body)

        return await self._run(write)

    async def config_history(self, account_id: str, limit: int = 100) -> list[ConfigVersion]:
        """Return an account's recorded configurations, newest first."""
        limit = max(1, min(limit, CONFIG_HISTORY_LIMIT_MAX))

        def query(connection: sqlite3.Connection) -> list[Any]:
            return connection.execute(
                "SELECT account_id, version, at_ms, actor, plan FROM config_versions WHERE account_id = ? "
                "ORDER BY version DESC LIMIT ?",
                (account_id, limit),
            ).fetchall()

        return [_sql.config_version(row) for row in await self._run(query)]

    async def latest_plans(self) -> list[AccountPlan]:
        """Return the newest recorded configuration of every account, by account id."""

        def query(connection: sqlite3.Connection) -> list[Any]:
            return connection.execute(
                "SELECT c.account_id, c.version, c.at_ms, c.actor, c.plan FROM config_versions c "
                "JOIN (SELECT account_id, MAX(version) AS version FROM config_versions GROUP BY account_id) m "
                "ON m.account_id = c.account_id AND m.version = c.version ORDER BY c.account_id"
            ).fetchall()

        return [_sql.config_version(row).plan for row in await self._run(query)]

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
        """Record one admin action."""
        row = (at_ms, actor, action, node_id, value_to_json(before), value_to_json(after))

        def write(connection: sqlite3.Connection) -> None:
            def body() -> None:
                connection.execute(
                    "INSERT INTO audit_log (at_ms, actor, action, node_id, before_value, after_value) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    row,
                )

            self._write(connection, body)

        await self._run(write)

    async def list_audit(self, *, since_ms: int = 0, limit: int = 100) -> list[AuditRecord]:
        """Return audit records at or after ``since_ms``, oldest first."""
        limit = max(1, min(limit, AUDIT_LIMIT_MAX))

        def query(connection: sqlite3.Connection) -> list[Any]:
            return connection.execute(
                "SELECT audit_id, at_ms, actor, action, node_id, before_value, after_value FROM audit_log "
                "WHERE at_ms >= ? ORDER BY at_ms, audit_id LIMIT ?",
                (since_ms, limit),
            ).fetchall()

        return [_sql.audit_record(row) for row in await self._run(query)]

    async def close(self) -> None:
        """Close the connection and stop the worker thread."""
        if self._closed:
            return

        def shut(connection: sqlite3.Connection) -> None:
            connection.close()

        if self._connection is not None:
            await self._run(shut)
        self._closed = True
        self._executor.shutdown(wait=True)
