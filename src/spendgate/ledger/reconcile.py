"""Reconciliation: compare Redis's window counters with what the ledger (and the outbox) says settled.

Redis counts spend per node and window; the ledger holds every settled transaction. Once the outbox is
drained they agree exactly, so any difference is drift: a lost counter update, a counter restored from an
old snapshot, or a bug. The same expected figures are what a rebuild restores after Redis lost its data.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from spendgate.domain import MONEY_WINDOWS, AccountPlan, NotFoundError, Window
from spendgate.ledger.sink import TXN_ID_LOOKUP_MAX, LedgerSink, LedgerTransaction, WindowKey, window_deltas
from spendgate.store.protocol import AdminStore
from spendgate.windows import windows_at


@dataclasses.dataclass(frozen=True, slots=True)
class WindowDrift:
    """One window of one node: Redis's spent counter against the ledger plus the unwritten outbox."""

    node_id: str
    window: Window
    window_id: str
    redis_spent_micros: int
    ledger_spent_micros: int
    outbox_spent_micros: int

    @property
    def expected_micros(self) -> int:
        """What settled in this window: the ledger plus transactions still on their way to it."""
        return self.ledger_spent_micros + self.outbox_spent_micros

    @property
    def drift_micros(self) -> int:
        """Redis's counter less what settled; zero when they agree."""
        return self.redis_spent_micros - self.expected_micros


@dataclasses.dataclass(frozen=True, slots=True)
class ReconcileReport:
    """Every money window of every node of one account, as open now."""

    account_id: str
    windows: Mapping[Window, str]
    rows: tuple[WindowDrift, ...]

    @property
    def drifts(self) -> tuple[WindowDrift, ...]:
        """The rows where Redis and the ledger disagree."""
        return tuple(row for row in self.rows if row.drift_micros != 0)


async def unwritten(sink: LedgerSink, outbox: Sequence[LedgerTransaction]) -> list[LedgerTransaction]:
    """Return the outbox transactions the ledger does not hold yet."""
    missing: list[LedgerTransaction] = []
    for start in range(0, len(outbox), TXN_ID_LOOKUP_MAX):
        chunk = outbox[start : start + TXN_ID_LOOKUP_MAX]
        present = await sink.existing_txn_ids([txn.txn_id for txn in chunk])
        missing += [txn for txn in chunk if txn.txn_id not in present]
    return missing


async def expected_spend(
    sink: LedgerSink,
    account_id: str,
    windows: Mapping[Window, str],
    outbox: Sequence[LedgerTransaction] = (),
) -> tuple[dict[WindowKey, int], dict[WindowKey, int]]:
    """Return (ledger, unwritten outbox) spend per node window, for the given window ids.

    Their sum is what the Redis counters of those windows must hold: what reconcile compares with and what a
    rebuild restores.
    """
    ledger = {key: total.spent_micros for key, total in (await sink.window_totals(account_id, windows)).items()}
    pending: dict[WindowKey, int] = {}
    for key, total in window_deltas(await unwritten(sink, outbox)).items():
        if windows.get(key.window) == key.window_id:
            pending[key] = total.spent_micros
    return ledger, pending


async def reconcile_account(
    store: AdminStore,
    sink: LedgerSink,
    account_id: str,
    *,
    now_ms: int,
    outbox: Sequence[LedgerTransaction] = (),
) -> ReconcileReport:
    """Compare every node's open-window spent counters with the ledger plus ``outbox``.

    ``outbox`` is the account's outbox as :func:`spendgate.ledger.writer.read_outbox` returns it (entries
    already in the ledger are ignored). Reading the counters releases expired holds, as the sweeper would.
    """
    plan = await store.read_plan(account_id)
    if plan is None:
        raise NotFoundError(f"no account {account_id!r}")
    info = await store.account_info(account_id)
    requested = windows_at(now_ms, info.time_zone)
    # The account's own budget names the windows in force (it may already be in a later one than the clock
    # says); every node of the account counts in those.
    account_budget = await store.budget(account_id, account_id, requested, now_ms)
    windows = {window: account_budget.window(window).window_id for window in MONEY_WINDOWS}
    ledger, pending = await expected_spend(sink, account_id, windows, outbox)
    rows: list[WindowDrift] = []
    for node in plan.nodes:
        budget = await store.budget(account_id, node.node_id, requested, now_ms)
        for window in MONEY_WINDOWS:
            key = WindowKey(node.node_id, window, windows[window])
            rows.append(
                WindowDrift(
                    node_id=node.node_id,
                    window=window,
                    window_id=windows[window],
                    redis_spent_micros=budget.window(window).spent_micros,
                    ledger_spent_micros=ledger.get(key, 0),
                    outbox_spent_micros=pending.get(key, 0),
                )
            )
    return ReconcileReport(account_id=account_id, windows=windows, rows=tuple(rows))


async def rebuild_account(
    store: AdminStore,
    sink: LedgerSink,
    plan: AccountPlan,
    *,
    now_ms: int,
    outbox: Sequence[LedgerTransaction] = (),
) -> dict[WindowKey, int]:
    """Restore an account after Redis lost it; return the spent figures restored.

    The tree comes from the ledger's latest plan (when Redis has none), then every node's open-window spent
    counters from the ledger plus ``outbox``; held money is recounted from the open holds.
    """
    if await store.read_plan(plan.account_id) is None:
        await store.put_plan(plan)
    requested = windows_at(now_ms, plan.time_zone)
    account_budget = await store.budget(plan.account_id, plan.account_id, requested, now_ms)
    windows = {window: account_budget.window(window).window_id for window in MONEY_WINDOWS}
    ledger, pending = await expected_spend(sink, plan.account_id, windows, outbox)
    current = await store.read_plan(plan.account_id)
    spent: dict[str, dict[Window, int]] = {node.node_id: {} for node in (current or plan).nodes}
    restored: dict[WindowKey, int] = {}
    for key in {*ledger, *pending}:
        if key.node_id in spent:
            amount = ledger.get(key, 0) + pending.get(key, 0)
            spent[key.node_id][key.window] = amount
            restored[key] = amount
    await store.restore_counters(plan.account_id, windows, spent)
    return restored


async def missing_account_report(sink: LedgerSink, plan: AccountPlan, *, now_ms: int) -> ReconcileReport:
    """The report for an account the ledger knows but Redis lost: every window the ledger has spend in drifts."""
    requested = windows_at(now_ms, plan.time_zone)
    windows = {window: requested.id_of(window) for window in MONEY_WINDOWS}
    ledger, _ = await expected_spend(sink, plan.account_id, windows)
    rows = tuple(
        WindowDrift(
            node_id=key.node_id,
            window=key.window,
            window_id=key.window_id,
            redis_spent_micros=0,
            ledger_spent_micros=amount,
            outbox_spent_micros=0,
        )
        for key, amount in sorted(ledger.items())
        if amount
    )
    return ReconcileReport(account_id=plan.account_id, windows=windows, rows=rows)
