"""BillingService: the ledger's transactions, spend reports and lag. Proto types never leave this module."""

from __future__ import annotations

import json
from typing import Any

import grpc

from spendgate._gen.spendgate.v1 import billing_pb2, billing_pb2_grpc
from spendgate.api.auth import Authenticator
from spendgate.api.errors import grpc_errors
from spendgate.domain import InvalidArgumentError, NotFoundError, PermissionDeniedError, UnavailableError, check_id
from spendgate.ledger import LedgerSink, LedgerTransaction, LedgerWriter, ReportGroup, ReportPeriod, TransactionFilter
from spendgate.store.redis_store import RedisStore

Context = grpc.aio.ServicerContext[Any, Any]
PAGE_SIZE_DEFAULT = 100
PAGE_SIZE_MAX = 1000


def encode_transaction(txn: LedgerTransaction) -> billing_pb2.Transaction:
    """Encode one ledger transaction."""
    return billing_pb2.Transaction(
        txn_id=txn.txn_id,
        account_id=txn.account_id,
        wallet_id=txn.wallet_id,
        chain=list(txn.chain),
        amount_micros=txn.amount_micros,
        authorized_micros=txn.authorized_micros,
        currency=txn.currency,
        service=txn.service,
        metadata=dict(txn.metadata),
        authorized_at_ms=txn.authorized_at_ms,
        captured_at_ms=txn.captured_at_ms,
        day=txn.day,
        week=txn.week,
        month=txn.month,
    )


def _filter(node_id: str, since_ms: int, until_ms: int, service: str) -> TransactionFilter:
    check_id(node_id, "node_id")
    if since_ms < 0 or until_ms < 0:
        raise InvalidArgumentError("since_ms and until_ms are milliseconds since the Unix epoch (or 0 for no bound)")
    if since_ms and until_ms and until_ms <= since_ms:
        raise InvalidArgumentError("until_ms must be after since_ms")
    return TransactionFilter(
        node_id=node_id, since_ms=since_ms or None, until_ms=until_ms or None, service=service or None
    )


AUDIT_LIMIT_MAX = 1000


async def _visible(store: RedisStore, account_id: str, node_id: str) -> bool:
    try:
        return await store.account_of(node_id) == account_id
    except NotFoundError:
        # A node since deleted: its account can no longer be told, so only the root sees its records.
        return False


class AuditListingBase:
    """ListAuditLog, mixed into the billing servicer (both read the ledger)."""

    _ledger: LedgerSink
    _store: RedisStore
    _auth: Authenticator

    @grpc_errors
    async def ListAuditLog(
        self, request: billing_pb2.ListAuditLogRequest, context: Context
    ) -> billing_pb2.ListAuditLogResponse:
        """Admin changes, oldest first: every one for the root, one account's for its admins and readers."""
        if not 0 <= request.limit <= AUDIT_LIMIT_MAX or request.since_ms < 0:
            raise InvalidArgumentError(f"limit must be from 1 to {AUDIT_LIMIT_MAX} (0 means 100); since_ms >= 0")
        caller = await self._auth.principal(context)
        if caller.role == "agent":
            raise PermissionDeniedError("agent tokens cannot read the audit log")
        records = await self._ledger.list_audit(since_ms=request.since_ms, limit=request.limit or 100)
        if not caller.root:
            records = [r for r in records if await _visible(self._store, caller.account_id, r.node_id)]
        return billing_pb2.ListAuditLogResponse(
            records=[
                billing_pb2.AuditRecord(
                    audit_id=r.audit_id,
                    at_ms=r.at_ms,
                    actor=r.actor,
                    action=r.action,
                    node_id=r.node_id,
                    before_json=json.dumps(r.before, sort_keys=True) if r.before is not None else "",
                    after_json=json.dumps(r.after, sort_keys=True) if r.after is not None else "",
                )
                for r in records
            ]
        )


class BillingServicer(AuditListingBase, billing_pb2_grpc.BillingServiceServicer):
    """The gRPC face of the ledger."""

    def __init__(
        self, ledger: LedgerSink, store: RedisStore, auth: Authenticator, lag_source: LedgerWriter | None
    ) -> None:
        self._ledger = ledger
        self._store = store
        self._auth = auth
        self._lag_source = lag_source

    async def _require(self, context: Context, node_id: str) -> None:
        check_id(node_id, "node_id")
        if self._auth.enabled:
            await self._auth.require_node(context, node_id, write=False)

    @grpc_errors
    async def ListTransactions(
        self, request: billing_pb2.ListTransactionsRequest, context: Context
    ) -> billing_pb2.ListTransactionsResponse:
        """One page of settled transactions under a node."""
        filters = _filter(request.node_id, request.since_ms, request.until_ms, request.service)
        if not 0 <= request.page_size <= PAGE_SIZE_MAX:
            raise InvalidArgumentError(f"page_size must be from 1 to {PAGE_SIZE_MAX} (0 means {PAGE_SIZE_DEFAULT})")
        await self._require(context, request.node_id)
        page = await self._ledger.list_transactions(
            filters, request.page_token or None, request.page_size or PAGE_SIZE_DEFAULT
        )
        return billing_pb2.ListTransactionsResponse(
            transactions=[encode_transaction(txn) for txn in page.transactions], next_page_token=page.next_cursor or ""
        )

    @grpc_errors
    async def SpendReport(
        self, request: billing_pb2.SpendReportRequest, context: Context
    ) -> billing_pb2.SpendReportResponse:
        """Spend totals grouped by node level or service, per day or month."""
        filters = _filter(request.node_id, request.since_ms, request.until_ms, "")
        await self._require(context, request.node_id)
        # Enums are open on the wire: a number the proto does not define is refused, not looked up blindly.
        try:
            group = ReportGroup(request.group_by) if request.group_by else ReportGroup.WALLET
            period = ReportPeriod(request.period) if request.period else ReportPeriod.MONTH
        except ValueError as error:
            raise InvalidArgumentError(
                f"group_by {request.group_by} or period {request.period} is not a value the API defines"
            ) from error
        rows = await self._ledger.spend_report(group, period, filters)
        return billing_pb2.SpendReportResponse(
            rows=[
                billing_pb2.SpendReportRow(
                    period=row.period,
                    group=row.group,
                    amount_micros=row.amount_micros,
                    transaction_count=row.transaction_count,
                    currency=row.currency,
                )
                for row in rows
            ]
        )

    @grpc_errors
    async def GetLedgerStatus(
        self, request: billing_pb2.GetLedgerStatusRequest, context: Context
    ) -> billing_pb2.GetLedgerStatusResponse:
        """How far the ledger lags behind the outbox (deployment-wide, so for the root token)."""
        await self._auth.require(context, account_id=None, write=False)
        pending, oldest_ms = 0, 0
        if self._lag_source is not None:
            lag = await self._lag_source.lag()
            pending, oldest_ms = lag.entries, lag.oldest_age_ms
        ledger_transactions, ledger_unavailable = 0, False
        try:
            ledger_transactions = await self._ledger.count_transactions()
        except UnavailableError:
            # The lag is what an operator looks at while the database is down: report it, and say the count is
            # unknown, rather than fail the whole call.
            ledger_unavailable = True
        return billing_pb2.GetLedgerStatusResponse(
            pending_entries=pending,
            oldest_pending_age_ms=oldest_ms,
            ledger_transactions=ledger_transactions,
            ledger_unavailable=ledger_unavailable,
        )
