"""SQL shared by the SQLite and PostgreSQL ledgers: the queries are the same, only the schema types differ.

Queries are written with ``%s`` placeholders (psycopg's style); the SQLite ledger turns them into ``?``.
Column and table names in the f-strings below come from fixed tables in this module, never from callers.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from spendgate.domain import InvalidArgumentError, Window
from spendgate.ledger._plans import plan_from_json, value_from_json
from spendgate.ledger.sink import (
    AuditRecord,
    ConfigVersion,
    Cursor,
    LedgerTransaction,
    ReportGroup,
    ReportPeriod,
    TransactionFilter,
    TransactionPage,
)

# The columns of the transactions table, in the order every SELECT returns them.
TRANSACTION_COLUMNS = (
    "txn_id",
    "account_id",
    "wallet_id",
    "pool_id",
    "chain",
    "amount_micros",
    "authorized_micros",
    "currency",
    "service",
    "metadata",
    "authorized_at_ms",
    "captured_at_ms",
    "day",
    "week",
    "month",
    "idempotency_key",
    "capture_idempotency_key",
)
WINDOW_NAMES = {Window.DAY: "day", Window.WEEK: "week", Window.MONTH: "month", Window.TOTAL: "total"}
WINDOWS_BY_NAME = {name: window for window, name in WINDOW_NAMES.items()}
_GROUP_COLUMNS = {
    ReportGroup.WALLET: "wallet_id",
    ReportGroup.POOL: "pool_id",
    ReportGroup.ACCOUNT: "account_id",
    ReportGroup.SERVICE: "service",
}
_PERIOD_COLUMNS = {ReportPeriod.DAY: "day", ReportPeriod.MONTH: "month"}


def transaction_row(txn: LedgerTransaction) -> tuple[Any, ...]:
    """A transaction as the values of :data:`TRANSACTION_COLUMNS` (metadata as JSON text)."""
    return (
        txn.txn_id,
        txn.account_id,
        txn.wallet_id,
        txn.pool_id,
        ",".join(txn.chain),
        txn.amount_micros,
        txn.authorized_micros,
        txn.currency,
        txn.service,
        json.dumps(dict(txn.metadata), sort_keys=True, separators=(",", ":")),
        txn.authorized_at_ms,
        txn.captured_at_ms,
        txn.day,
        txn.week,
        txn.month,
        txn.idempotency_key,
        txn.capture_idempotency_key,
    )


def transaction_from_row(row: Sequence[Any]) -> LedgerTransaction:
    """Rebuild a transaction from a row of :data:`TRANSACTION_COLUMNS`."""
    metadata = row[9]
    if isinstance(metadata, str):
        # SQLite keeps metadata as JSON text; psycopg already decodes jsonb.
        metadata = json.loads(metadata)
    return LedgerTransaction(
        txn_id=str(row[0]),
        account_id=str(row[1]),
        wallet_id=str(row[2]),
        chain=tuple(str(row[4]).split(",")),
        amount_micros=int(row[5]),
        authorized_micros=int(row[6]),
        currency=str(row[7]),
        service=str(row[8]),
        metadata=dict(sorted((str(k), str(v)) for k, v in dict(metadata).items())),
        authorized_at_ms=int(row[10]),
        captured_at_ms=int(row[11]),
        day=str(row[12]),
        week=str(row[13]),
        month=str(row[14]),
        idempotency_key=str(row[15]),
        capture_idempotency_key=str(row[16]),
    )


def _where(filters: TransactionFilter, after: Cursor | None) -> tuple[str, str, str, list[Any]]:
    """Return (FROM clause, WHERE clause, ordering prefix, params) for a filter and an optional cursor.

    With a node, the query walks the txn_nodes index (node_id, captured_at_ms, txn_id): every transaction
    under the node, already in page order. Without one it walks the transactions' own time index.
    """
    params: list[Any] = []
    clauses: list[str] = []
    if filters.node_id is not None:
        source = "txn_nodes n JOIN transactions t ON t.txn_id = n.txn_id"
        order = "n"
        clauses.append("n.node_id = %s")
        params.append(filters.node_id)
    else:
        source = "transactions t"
        order = "t"
    if filters.since_ms is not None:
        clauses.append(f"{order}.captured_at_ms >= %s")
        params.append(filters.since_ms)
    if filters.until_ms is not None:
        clauses.append(f"{order}.captured_at_ms < %s")
        params.append(filters.until_ms)
    if filters.service is not None:
        clauses.append("t.service = %s")
        params.append(filters.service)
    if after is not None:
        clauses.append(f"({order}.captured_at_ms, {order}.txn_id) > (%s, %s)")
        params += [after.captured_at_ms, after.txn_id]
    where = " AND ".join(clauses) if clauses else "TRUE"
    return source, where, order, params


def list_query(filters: TransactionFilter, cursor: str | None, limit: int) -> tuple[str, list[Any]]:
    """The query of one page; it fetches one row more than the page, to tell whether another page follows."""
    after = Cursor.decode(cursor) if cursor else None
    source, where, order, params = _where(filters, after)
    columns = ", ".join(f"t.{c}" for c in TRANSACTION_COLUMNS)
    sql = (
        f"SELECT {columns} FROM {source} WHERE {where} "  # noqa: S608 - names from fixed tables above
        f"ORDER BY {order}.captured_at_ms, {order}.txn_id LIMIT %s"
    )
    return sql, [*params, limit + 1]


def report_query(
    group_by: ReportGroup, period: ReportPeriod, filters: TransactionFilter, rows_max: int
) -> tuple[str, list[Any]]:
    """The query of a spend report; it fetches one row more than allowed, to tell when it is too large."""
    try:
        group_column = _GROUP_COLUMNS[ReportGroup(group_by)]
        period_column = _PERIOD_COLUMNS[ReportPeriod(period)]
    except (KeyError, ValueError):
        raise InvalidArgumentError(f"cannot report by {group_by!r} per {period!r}") from None
    source, where, _, params = _where(filters, None)
    sql = (
        f"SELECT t.{period_column}, t.{group_column}, t.currency, SUM(t.amount_micros), COUNT(*) "  # noqa: S608
        f"FROM {source} WHERE {where} "
        f"GROUP BY t.{period_column}, t.{group_column}, t.currency "
        f"ORDER BY t.{period_column}, t.{group_column}, t.currency LIMIT %s"
    )
    return sql, [*params, rows_max + 1]


def window_totals_query(account_id: str, windows: Mapping[Window, str] | None) -> tuple[str, list[Any]]:
    """The query of an account's window totals, optionally restricted to one window id per kind."""
    sql = (
        "SELECT node_id, window_kind, window_id, spent_micros, transaction_count FROM window_spend "
        "WHERE account_id = %s"
    )
    params: list[Any] = [account_id]
    if windows is not None:
        if not windows:
            # No window asked for: an always-false condition keeps the query shape simple.
            return sql + " AND FALSE", params
        alternatives = []
        for window, window_id in sorted(windows.items()):
            if window not in WINDOW_NAMES:
                raise InvalidArgumentError(f"window {window!r} carries no money")
            alternatives.append("(window_kind = %s AND window_id = %s)")
            params += [WINDOW_NAMES[window], window_id]
        sql += " AND (" + " OR ".join(alternatives) + ")"
    return sql, params


def too_many_rows(rows_max: int) -> InvalidArgumentError:
    """The error of a report larger than allowed."""
    return InvalidArgumentError(
        f"the report has more than {rows_max} rows: narrow the time range, pick a node lower in the tree, "
        "or group by month"
    )


def page(rows: list[Any], limit: int) -> TransactionPage:
    """A page from up to ``limit + 1`` rows: the extra row only says that another page follows."""
    transactions = tuple(transaction_from_row(row) for row in rows[:limit])
    if len(rows) > limit and transactions:
        last = transactions[-1]
        return TransactionPage(transactions, Cursor(last.captured_at_ms, last.txn_id).encode())
    return TransactionPage(transactions, None)


def config_version(row: Sequence[Any]) -> ConfigVersion:
    """A configuration version from a row (account_id, version, at_ms, actor, plan)."""
    account_id, version, at_ms, actor, plan = row
    return ConfigVersion(
        account_id=str(account_id),
        version=int(version),
        at_ms=int(at_ms),
        actor=str(actor),
        plan=plan_from_json(plan, f"ledger config of {account_id} v{version}"),
    )


def audit_record(row: Sequence[Any]) -> AuditRecord:
    """An audit record from a row (audit_id, at_ms, actor, action, node_id, before, after)."""
    audit_id, at_ms, actor, action, node_id, before, after = row
    return AuditRecord(
        audit_id=int(audit_id),
        at_ms=int(at_ms),
        actor=str(actor),
        action=str(action),
        node_id=str(node_id),
        before=value_from_json(before),
        after=value_from_json(after),
    )
