"""The durable ledger: settled transactions, spend reports, configuration history, audit, and the writer.

:class:`LedgerSink` is the interface (SQLite and PostgreSQL implement it); :class:`LedgerWriter` drains the
accounts' Redis outbox streams into a sink; :func:`open_ledger` picks the sink a database URL names.
"""

from __future__ import annotations

import pathlib
from typing import TYPE_CHECKING

from spendgate.domain import InvalidArgumentError
from spendgate.ledger.sink import (
    Cursor,
    LedgerSink,
    LedgerTransaction,
    MalformedEntryError,
    ReportGroup,
    ReportPeriod,
    ReportRow,
    TransactionFilter,
    TransactionPage,
    WindowKey,
    WindowTotal,
)
from spendgate.ledger.writer import LedgerWriter, OutboxLag, WriterStats, read_outbox

SQLITE_FILE_NAME = "ledger.sqlite3"

__all__ = [
    "SQLITE_FILE_NAME",
    "Cursor",
    "LedgerSink",
    "LedgerTransaction",
    "LedgerWriter",
    "MalformedEntryError",
    "OutboxLag",
    "ReportGroup",
    "ReportPeriod",
    "ReportRow",
    "TransactionFilter",
    "TransactionPage",
    "WindowKey",
    "WindowTotal",
    "WriterStats",
    "open_ledger",
    "read_outbox",
]


def open_ledger(database_url: str, *, data_dir: str | pathlib.Path = ".spendgate") -> LedgerSink:
    """Return the ledger a URL names; call ``migrate()`` on it before use.

    ``postgresql://...`` (or ``postgres://``) is PostgreSQL; ``sqlite:///path/to/file`` is a SQLite file;
    an empty URL is the embedded default, a SQLite file ``ledger.sqlite3`` under ``data_dir``.
    """
    if not database_url:
        from spendgate.ledger.sqlite import SqliteLedger

        return SqliteLedger(pathlib.Path(data_dir) / SQLITE_FILE_NAME)
    if database_url.startswith(("postgresql://", "postgres://")):
        # Imported here so the embedded default never loads psycopg.
        from spendgate.ledger.postgres import PostgresLedger

        return PostgresLedger(database_url)
    if database_url.startswith("sqlite:///"):
        from spendgate.ledger.sqlite import SqliteLedger

        return SqliteLedger(database_url.removeprefix("sqlite:///"))
    raise InvalidArgumentError(
        f"database URL {database_url[:40]!r} is neither postgresql://... nor sqlite:///path; leave it empty for "
        "the embedded SQLite ledger"
    )


if TYPE_CHECKING:
    from spendgate.admin import AuditLog
    from spendgate.ledger.postgres import PostgresLedger
    from spendgate.ledger.sqlite import SqliteLedger

    def _conforms(sqlite: SqliteLedger, postgres: PostgresLedger) -> tuple[LedgerSink, LedgerSink, AuditLog, AuditLog]:
        """Make mypy check that both ledgers keep the sink contract and serve as the control plane's audit log."""
        return sqlite, postgres, sqlite, postgres
