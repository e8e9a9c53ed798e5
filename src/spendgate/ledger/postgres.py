"""The production ledger: PostgreSQL through psycopg 3's async connection pool.

A batch is one statement in one transaction, whatever its size: the transactions go as one array per column
(``unnest``), sent in binary (several times cheaper for the server than parsing array text), and the server
itself expands the chains into chain rows and window totals, so the writer's process does little per row.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, LiteralString

import psycopg
import psycopg.rows
import psycopg_pool
from psycopg import sql

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
)

_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
# Any constant works; it only keeps two processes from migrating the same database at once.
_MIGRATION_LOCK_KEY = 0x5370_656E_6467_6174 & 0x7FFF_FFFF_FFFF_FFFF
_NOW_MS = "(EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::bigint"
# Ids compare byte-wise ("C" collation), as in SQLite, so both ledgers page in the same order and the
# btree comparisons stay cheap.
_ID = 'TEXT COLLATE "C" NOT NULL'

# Numbered migrations, applied in order, each in its own transaction; same numbers as sqlite.py.
MIGRATIONS: tuple[tuple[int, str, tuple[LiteralString, ...]], ...] = (
    (
        1,
        "transactions, their chains and window totals",
        (
            f"""CREATE TABLE transactions (
                txn_id {_ID} PRIMARY KEY,
                account_id {_ID},
                wallet_id {_ID},
                pool_id {_ID},
                chain TEXT NOT NULL,
                amount_micros BIGINT NOT NULL CHECK (amount_micros >= 0),
                authorized_micros BIGINT NOT NULL CHECK (authorized_micros >= 0),
                currency TEXT NOT NULL,
                service {_ID},
                metadata JSONB NOT NULL,
                authorized_at_ms BIGINT NOT NULL,
                captured_at_ms BIGINT NOT NULL,
                day {_ID},
                week {_ID},
                month {_ID},
                idempotency_key TEXT NOT NULL,
                capture_idempotency_key TEXT NOT NULL,
                inserted_at_ms BIGINT NOT NULL DEFAULT {_NOW_MS}
            )""",
            "CREATE INDEX transactions_by_time ON transactions (captured_at_ms, txn_id)",
            # One row per node of each transaction's chain: "everything under a pool" is one index range,
            # already in page order.
            f"""CREATE TABLE txn_nodes (
                node_id {_ID},
                captured_at_ms BIGINT NOT NULL,
                txn_id {_ID},
                depth SMALLINT NOT NULL,
                PRIMARY KEY (node_id, captured_at_ms, txn_id)
            )""",
            # Settled spend per node and window, kept in the same transaction as the inserts.
            f"""CREATE TABLE window_spend (
                account_id {_ID},
                node_id {_ID},
                window_kind {_ID},
                window_id {_ID},
                spent_micros BIGINT NOT NULL,
                transaction_count BIGINT NOT NULL,
                PRIMARY KEY (account_id, node_id, window_kind, window_id)
            )""",
        ),
    ),
    (
        2,
        "configuration history and audit log",
        (
            f"""CREATE TABLE config_versions (
                account_id {_ID},
                version INTEGER NOT NULL,
                at_ms BIGINT NOT NULL,
                actor TEXT NOT NULL,
                plan JSONB NOT NULL,
                PRIMARY KEY (account_id, version)
            )""",
            """CREATE TABLE audit_log (
                audit_id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                at_ms BIGINT NOT NULL,
                actor TEXT NOT NULL,
                action TEXT NOT NULL,
                node_id TEXT NOT NULL,
                before_value JSONB,
                after_value JSONB
            )""",
            "CREATE INDEX audit_log_by_time ON audit_log (at_ms, audit_id)",
        ),
    ),
)

# One statement per batch: the new transactions (ids already present are skipped), then their chain rows and
# the window totals of just those, expanded from the chains by the server. The data-modifying CTEs all run
# to completion whether or not the final SELECT reads them. Rows go in sorted order (transactions by id,
# totals by key), so concurrent writers take row locks in one order and cannot deadlock each other.
_INSERT_BATCH: LiteralString = """
WITH new AS (
    INSERT INTO transactions (txn_id, account_id, wallet_id, pool_id, chain, amount_micros, authorized_micros,
        currency, service, metadata, authorized_at_ms, captured_at_ms, day, week, month, idempotency_key,
        capture_idempotency_key)
    SELECT u.txn_id, u.account_id, u.wallet_id, u.pool_id, u.chain, u.amount_micros, u.authorized_micros,
        u.currency, u.service, u.metadata::jsonb, u.authorized_at_ms, u.captured_at_ms, u.day, u.week, u.month,
        u.idempotency_key, u.capture_idempotency_key
    FROM unnest(%b::text[], %b::text[], %b::text[], %b::text[], %b::text[], %b::bigint[], %b::bigint[],
        %b::text[], %b::text[], %b::text[], %b::bigint[], %b::bigint[], %b::text[], %b::text[], %b::text[],
        %b::text[], %b::text[])
        AS u(txn_id, account_id, wallet_id, pool_id, chain, amount_micros, authorized_micros, currency, service,
            metadata, authorized_at_ms, captured_at_ms, day, week, month, idempotency_key, capture_idempotency_key)
    ORDER BY u.txn_id
    ON CONFLICT (txn_id) DO NOTHING
    RETURNING txn_id, account_id, chain, amount_micros, captured_at_ms, day, week, month
), nodes AS (
    INSERT INTO txn_nodes (node_id, captured_at_ms, txn_id, depth)
    SELECT c.node_id, n.captured_at_ms, n.txn_id, c.position - 1
    FROM new n CROSS JOIN LATERAL unnest(string_to_array(n.chain, ',')) WITH ORDINALITY AS c(node_id, position)
), spend AS (
    INSERT INTO window_spend AS w (account_id, node_id, window_kind, window_id, spent_micros, transaction_count)
    SELECT n.account_id, c.node_id, k.kind, k.id, SUM(n.amount_micros), COUNT(*)
    FROM new n
        CROSS JOIN LATERAL unnest(string_to_array(n.chain, ',')) AS c(node_id)
        CROSS JOIN LATERAL (VALUES ('day', n.day), ('week', n.week), ('month', n.month), ('total', 'all'))
            AS k(kind, id)
    GROUP BY n.account_id, c.node_id, k.kind, k.id
    ORDER BY n.account_id, c.node_id, k.kind, k.id
    ON CONFLICT (account_id, node_id, window_kind, window_id) DO UPDATE SET
        spent_micros = w.spent_micros + excluded.spent_micros,
        transaction_count = w.transaction_count + excluded.transaction_count
)
SELECT COUNT(*) FROM new
"""


def _columns(rows: Sequence[Sequence[Any]], width: int) -> list[list[Any]]:
    """Turn rows into one list per column (the arrays ``unnest`` takes)."""
    return [[row[i] for row in rows] for i in range(width)]


class PostgresLedger:
    """A :class:`~spendgate.ledger.sink.LedgerSink` in PostgreSQL.

    ``url`` is a libpq connection string or ``postgresql://`` URL. The ledger's tables live in ``schema``
    (created by :meth:`migrate`). Every call waits at most ``timeout_s`` for a connection and every
    statement at most ``statement_timeout_ms``; beyond that it raises ``UnavailableError``.
    """

    def __init__(
        self,
        url: str,
        *,
        schema: str = "public",
        pool_size_min: int = 1,
        pool_size_max: int = 8,
        timeout_s: float = 5.0,
        statement_timeout_ms: int = 30_000,
    ) -> None:
        if not _SCHEMA_NAME.match(schema):
            raise InvalidArgumentError(f"ledger schema {schema!r} must be a lower-case SQL identifier")
        self.schema = schema
        self._timeout_s = timeout_s
        self._pool = psycopg_pool.AsyncConnectionPool(
            url,
            min_size=pool_size_min,
            max_size=pool_size_max,
            # autocommit: reads need no transaction, and writes open one explicitly with conn.transaction().
            kwargs={
                "autocommit": True,
                "options": f"-c search_path={schema} -c statement_timeout={int(statement_timeout_ms)}",
            },
            # Opened on first use, so a writer can start while the database is still down.
            open=False,
            timeout=timeout_s,
            # A connection from before a database restart is found dead here, not half-way through a batch.
            check=psycopg_pool.AsyncConnectionPool.check_connection,
            name="spendgate-ledger",
        )
        self._opened = False
        self._closed = False

    async def _connection(self) -> psycopg_pool.AsyncConnectionPool[psycopg.AsyncConnection[tuple[Any, ...]]]:
        if self._closed:
            raise UnavailableError("the ledger is closed")
        if not self._opened:
            # wait=False: connecting happens in the background and is retried by the pool itself.
            await self._pool.open(wait=False)
            self._opened = True
        return self._pool

    async def _fetch(self, query: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        # Queries are this module's constants or _sql.py's builds, which join only fixed names and %s
        # placeholders; mypy reads psycopg's LiteralString as str, so the type says no more than that.
        pool = await self._connection()
        try:
            async with pool.connection() as connection:
                cursor = await connection.execute(query, params)
                return await cursor.fetchall()
        except (psycopg.OperationalError, psycopg.InterfaceError) as error:
            raise _unavailable(error) from error

    # ------------------------------------------------------------------------------------------------
    # Schema.

    async def migrate(self) -> int:
        """Apply the migrations this database has not had yet, in order; return the schema version."""
        pool = await self._connection()
        try:
            async with pool.connection() as connection, connection.transaction():
                # Two processes starting at once: the second waits here, then finds nothing left to do.
                await connection.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK_KEY,))
                await connection.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(self.schema)))
                await connection.execute(
                    "CREATE TABLE IF NOT EXISTS schema_migrations ("
                    "version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at_ms BIGINT NOT NULL)"
                )
                cursor = await connection.execute("SELECT version FROM schema_migrations")
                applied = {int(row[0]) for row in await cursor.fetchall()}
                for version, name, statements in MIGRATIONS:
                    if version in applied:
                        continue
                    for statement in statements:
                        await connection.execute(statement)
                    await connection.execute(
                        "INSERT INTO schema_migrations (version, name, applied_at_ms) VALUES (%s, %s, "
                        "(EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::bigint)",
                        (version, name),
                    )
                    applied.add(version)
                return max(applied)
        except (psycopg.OperationalError, psycopg.InterfaceError) as error:
            raise _unavailable(error) from error

    # ------------------------------------------------------------------------------------------------
    # Transactions.

    async def insert_transactions(self, batch: Sequence[LedgerTransaction]) -> int:
        """Insert a batch in one transaction, skipping ids already present; return how many were new."""
        if len(batch) > INSERT_BATCH_SIZE_MAX:
            raise InvalidArgumentError(f"a batch holds at most {INSERT_BATCH_SIZE_MAX} transactions")
        if not batch:
            return 0
        unique = {txn.txn_id: txn for txn in reversed(batch)}
        rows = [_sql.transaction_row(txn) for txn in unique.values()]
        pool = await self._connection()
        try:
            async with pool.connection() as connection, connection.transaction():
                cursor = await connection.execute(_INSERT_BATCH, _columns(rows, len(_sql.TRANSACTION_COLUMNS)))
                row = await cursor.fetchone()
                return int(row[0]) if row is not None else 0
        except (psycopg.OperationalError, psycopg.InterfaceError) as error:
            raise _unavailable(error) from error

    async def existing_txn_ids(self, txn_ids: Sequence[str]) -> set[str]:
        """Return which of the ids are in the ledger."""
        if len(txn_ids) > TXN_ID_LOOKUP_MAX:
            raise InvalidArgumentError(f"look up at most {TXN_ID_LOOKUP_MAX} transaction ids at once")
        if not txn_ids:
            return set()
        rows = await self._fetch("SELECT txn_id FROM transactions WHERE txn_id = ANY(%s::text[])", [list(txn_ids)])
        return {str(row[0]) for row in rows}

    async def list_transactions(
        self, filters: TransactionFilter, cursor: str | None = None, limit: int = LIST_LIMIT_DEFAULT
    ) -> TransactionPage:
        """Return one page of matching transactions in (captured_at_ms, txn_id) order."""
        limit = check_limit(limit)
        query, params = _sql.list_query(filters, cursor, limit)
        # The shared builder only joins fixed names and %s placeholders (see _sql.py).
        rows = await self._fetch(query, params)
        return _sql.page(rows, limit)

    async def count_transactions(self) -> int:
        """Return how many transactions the ledger holds."""
        rows = await self._fetch("SELECT COUNT(*) FROM transactions", [])
        return int(rows[0][0])

    async def spend_report(
        self,
        group_by: ReportGroup,
        period: ReportPeriod,
        filters: TransactionFilter,
        *,
        rows_max: int = REPORT_ROWS_MAX,
    ) -> list[ReportRow]:
        """Sum matching transactions per (period, group, currency)."""
        query, params = _sql.report_query(group_by, period, filters, rows_max)
        rows = await self._fetch(query, params)
        if len(rows) > rows_max:
            raise _sql.too_many_rows(rows_max)
        # SUM over bigint is numeric in PostgreSQL (a Decimal here); int() keeps it exact.
        return [ReportRow(str(p), str(g), str(c), int(a), int(n)) for p, g, c, a, n in rows]

    async def window_totals(
        self, account_id: str, windows: Mapping[Window, str] | None = None
    ) -> dict[WindowKey, WindowTotal]:
        """Return the settled spend of every node of an account per window."""
        query, params = _sql.window_totals_query(account_id, windows)
        rows = await self._fetch(query, params)
        return {
            WindowKey(str(node), _sql.WINDOWS_BY_NAME[str(kind)], str(window_id)): WindowTotal(int(spent), int(count))
            for node, kind, window_id, spent, count in rows
        }

    # ------------------------------------------------------------------------------------------------
    # Configuration history and audit.

    async def record_config(self, plan: AccountPlan, *, actor: str, at_ms: int) -> int:
        """Record an account's whole tree as its new configuration; return the version number."""
        document = plan_to_json(plan)
        pool = await self._connection()
        try:
            async with pool.connection() as connection, connection.transaction():
                # Versions are numbered per account; the lock serializes two recordings of one account.
                await connection.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (plan.account_id,))
                cursor = await connection.execute(
                    "INSERT INTO config_versions (account_id, version, at_ms, actor, plan) "
                    "SELECT %s, COALESCE(MAX(version), 0) + 1, %s, %s, %s::jsonb FROM config_versions "
                    "WHERE account_id = %s RETURNING version",
                    (plan.account_id, at_ms, actor, document, plan.account_id),
                )
                row = await cursor.fetchone()
                assert row is not None  # noqa: S101 - INSERT ... RETURNING always returns the row.
                return int(row[0])
        except (psycopg.OperationalError, psycopg.InterfaceError) as error:
            raise _unavailable(error) from error

    async def config_history(self, account_id: str, limit: int = 100) -> list[ConfigVersion]:
        """Return an account's recorded configurations, newest first."""
        limit = max(1, min(limit, CONFIG_HISTORY_LIMIT_MAX))
        rows = await self._fetch(
            "SELECT account_id, version, at_ms, actor, plan FROM config_versions WHERE account_id = %s "
            "ORDER BY version DESC LIMIT %s",
            (account_id, limit),
        )
        return [_sql.config_version(row) for row in rows]

    async def latest_plans(self) -> list[AccountPlan]:
        """Return the newest recorded configuration of every account, by account id."""
        rows = await self._fetch(
            "SELECT DISTINCT ON (account_id) account_id, version, at_ms, actor, plan FROM config_versions "
            "ORDER BY account_id, version DESC",
            [],
        )
        return [_sql.config_version(row).plan for row in rows]

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
        pool = await self._connection()
        try:
            async with pool.connection() as connection:
                await connection.execute(
                    "INSERT INTO audit_log (at_ms, actor, action, node_id, before_value, after_value) "
                    "VALUES (%s, %s, %s, %s, %s::jsonb, %s::jsonb)",
                    (at_ms, actor, action, node_id, value_to_json(before), value_to_json(after)),
                )
        except (psycopg.OperationalError, psycopg.InterfaceError) as error:
            raise _unavailable(error) from error

    async def list_audit(self, *, since_ms: int = 0, limit: int = 100) -> list[AuditRecord]:
        """Return audit records at or after ``since_ms``, oldest first."""
        limit = max(1, min(limit, AUDIT_LIMIT_MAX))
        rows = await self._fetch(
            "SELECT audit_id, at_ms, actor, action, node_id, before_value, after_value FROM audit_log "
            "WHERE at_ms >= %s ORDER BY at_ms, audit_id LIMIT %s",
            (since_ms, limit),
        )
        return [_sql.audit_record(row) for row in rows]

    async def close(self) -> None:
        """Close the pool."""
        if self._closed:
            return
        self._closed = True
        if self._opened:
            await self._pool.close()


def _unavailable(error: Exception) -> UnavailableError:
    return UnavailableError(f"the PostgreSQL ledger is unavailable: {type(error).__name__}: {error}")
