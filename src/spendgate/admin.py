"""The control plane's core: plans as code (diff, dry run, apply), single-node edits, freezes and the tree.

Like :mod:`spendgate.core` it holds no limit logic and no driver. Every change is written to the audit log
(who, when, what before and after) and announced on the account's live event feed.
"""

from __future__ import annotations

import dataclasses
import decimal
import enum
import json
from collections.abc import Callable
from typing import Any, Protocol

from spendgate.clock import Clock
from spendgate.core import SpendCore
from spendgate.domain import (
    AccountPlan,
    FailedPreconditionError,
    InvalidArgumentError,
    Limits,
    NodeBudget,
    NodeKind,
    NodeSpec,
    NotFoundError,
    check_id,
    with_article,
)
from spendgate.ledger.sink import TransactionFilter, TransactionPage
from spendgate.money import format_amount, plan_amount
from spendgate.recommend import Recommendation, Spend, Stage, recommend
from spendgate.store.protocol import AdminStore, TokenRecord
from spendgate.windows import windows_at

EVENT_CONFIG = "7"
DAYS_MAX = 366
RECOMMEND_TRANSACTIONS_MAX = 1_000_000


class ChangeKind(enum.IntEnum):
    """How a plan changes a node (values match spendgate.v1.ChangeKind)."""

    ADDED = 1
    CHANGED = 2
    MOVED = 3
    REMOVED = 4


@dataclasses.dataclass(frozen=True, slots=True)
class PlanChange:
    """One node's change in a plan diff."""

    node_id: str
    kind: ChangeKind
    before: NodeSpec | None
    after: NodeSpec | None
    unsafe_reason: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class TreeEntry:
    """One node of a tree report."""

    depth: int
    budget: NodeBudget
    shadow: bool


class AuditLog(Protocol):
    """Where admin changes are recorded (the ledger's audit table)."""

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
        """Record one change."""
        ...


class ConfigLog(Protocol):
    """Where every version of an account's configuration is kept (the ledger), for history and rebuilds."""

    async def record_config(self, plan: AccountPlan, *, actor: str, at_ms: int) -> int:
        """Record the account's whole configuration after a change; return its version."""
        ...


class TransactionSource(Protocol):
    """Where settled transactions are read from (the ledger), for recommendations."""

    async def list_transactions(
        self, filters: TransactionFilter, cursor: str | None = None, limit: int = 100
    ) -> TransactionPage:
        """One page of transactions."""
        ...


class NoAuditLog:
    """An audit log that keeps nothing (for tests and for a server without a ledger)."""

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
        """Drop the record."""


def node_record(spec: NodeSpec | None) -> dict[str, Any] | None:
    """A node's configuration as plain JSON-able data (for the audit log)."""
    if spec is None:
        return None
    record = dataclasses.asdict(spec)
    record["kind"] = spec.kind.name.lower()
    return record


def describe_node(spec: NodeSpec, currency: str = "USD") -> str:
    """One line that says what a node is: kind, parent, limits, flags."""
    limits = spec.limits
    parts = [spec.kind.name.lower() + (f" in {spec.parent_id}" if spec.parent_id else "")]
    for name, value in (
        ("per transaction", limits.per_transaction_micros),
        ("day", limits.day_micros),
        ("week", limits.week_micros),
        ("month", limits.month_micros),
        ("total", limits.total_micros),
    ):
        if value is not None:
            parts.append(f"{name} {format_amount(value, currency)}")
    if limits.velocity_per_minute is not None:
        parts.append(f"{limits.velocity_per_minute}/min")
    if limits.allowed_services:
        parts.append("services " + ",".join(limits.allowed_services))
    if spec.shadow:
        parts.append("shadow")
    if spec.breaker is not None:
        parts.append(f"breaker x{spec.breaker.multiplier:g}/{spec.breaker.recent_minutes}m")
    if spec.frozen_reason:
        parts.append(f"FROZEN ({spec.frozen_reason})")
    return ", ".join(parts)


def diff_plans(current: AccountPlan | None, new: AccountPlan) -> list[PlanChange]:
    """Return what applying ``new`` over ``current`` changes: new plan order first, removals last, leaves first."""
    before = {node.node_id: node for node in current.nodes} if current else {}
    after_ids = {node.node_id for node in new.nodes}
    changes: list[PlanChange] = []
    for node in new.nodes:
        old = before.get(node.node_id)
        if old is None:
            changes.append(PlanChange(node.node_id, ChangeKind.ADDED, None, node))
        elif old.kind is not node.kind:
            raise InvalidArgumentError(
                f"node {node.node_id!r} is {with_article(old.kind.name.lower())} and cannot become "
                f"{with_article(node.kind.name.lower())}; "
                "remove it in one plan and add it in another"
            )
        elif old.parent_id != node.parent_id:
            changes.append(PlanChange(node.node_id, ChangeKind.MOVED, old, node))
        elif old != node:
            changes.append(PlanChange(node.node_id, ChangeKind.CHANGED, old, node))
    if current is not None:
        for node in reversed(current.nodes):
            if node.node_id not in after_ids:
                changes.append(PlanChange(node.node_id, ChangeKind.REMOVED, node, None))
    return changes


def subtree(plan: AccountPlan, root_id: str) -> list[NodeSpec]:
    """The node and everything under it, parents first."""
    children: dict[str | None, list[NodeSpec]] = {}
    for node in plan.nodes:
        children.setdefault(node.parent_id, []).append(node)
    by_id = {node.node_id: node for node in plan.nodes}
    out: list[NodeSpec] = []
    stack = [by_id[root_id]]
    while stack:
        node = stack.pop()
        out.append(node)
        stack.extend(reversed(children.get(node.node_id, [])))
    return out


class AdminCore:
    """Shape the hierarchy, freeze nodes and report the tree."""

    def __init__(
        self,
        store: AdminStore,
        spend: SpendCore,
        clock: Clock,
        audit: AuditLog | None = None,
        config_log: ConfigLog | None = None,
        transactions: TransactionSource | None = None,
    ) -> None:
        self.store = store
        self._spend = spend
        self._clock = clock
        self._audit: AuditLog = audit or NoAuditLog()
        self._config_log = config_log
        self._transactions = transactions

    async def _record_config(self, account_id: str, actor: str) -> None:
        """Keep the account's configuration as it is now in the configuration history."""
        if self._config_log is None:
            return
        plan = await self.store.read_plan(account_id)
        if plan is not None:
            await self._config_log.record_config(plan, actor=actor, at_ms=self._clock.now_ms())

    async def _record(
        self,
        actor: str,
        action: str,
        account_id: str,
        node_id: str,
        before: NodeSpec | None,
        after: NodeSpec | None,
        message: str,
    ) -> None:
        now_ms = self._clock.now_ms()
        await self._audit.record_audit(
            actor=actor,
            action=action,
            node_id=node_id,
            before=node_record(before),
            after=node_record(after),
            at_ms=now_ms,
        )
        await self.store.append_events(
            account_id,
            [{"k": EVENT_CONFIG, "at": str(now_ms), "node": node_id, "chain": node_id, "amt": "0", "msg": message}],
        )

    async def _plan_of(self, node_id: str) -> tuple[AccountPlan, NodeSpec]:
        check_id(node_id, "node_id")
        account_id = await self.store.account_of(node_id)
        plan = await self.store.read_plan(account_id)
        if plan is not None:
            for node in plan.nodes:
                if node.node_id == node_id:
                    return plan, node
        raise NotFoundError(f"no node {node_id!r}")

    async def _unsafe(self, plan: AccountPlan, node_id: str) -> str:
        held, spent = await self.store.node_activity(
            plan.account_id, node_id, windows_at(self._clock.now_ms(), plan.time_zone)
        )
        if held or spent:
            return (
                f"{node_id} holds {format_amount(held, plan.currency)} and spent "
                f"{format_amount(spent, plan.currency)} in open windows"
            )
        return ""

    # ------------------------------------------------------------------------------------------------
    # Plans.

    async def plan_changes(self, plan: AccountPlan) -> list[PlanChange]:
        """Diff a plan against what is configured, with the unsafe removals and moves marked."""
        current = await self.store.read_plan(plan.account_id)
        if current is not None and (current.currency, current.time_zone) != (plan.currency, plan.time_zone):
            raise InvalidArgumentError(
                f"account {plan.account_id!r} uses {current.currency} in {current.time_zone}; a plan cannot change "
                "its currency or time zone"
            )
        if current is not None:
            # A plan freezes a node when it says so, but never unfreezes one: an incident freeze stays until an
            # operator lifts it, however often the plan is re-applied.
            frozen = {node.node_id: node.frozen_reason for node in current.nodes if node.frozen_reason}
            plan = dataclasses.replace(
                plan,
                nodes=tuple(
                    dataclasses.replace(node, frozen_reason=node.frozen_reason or frozen.get(node.node_id, ""))
                    for node in plan.nodes
                ),
            )
        changes = diff_plans(current, plan)
        marked = []
        for change in changes:
            if change.kind in (ChangeKind.REMOVED, ChangeKind.MOVED) and current is not None:
                marked.append(dataclasses.replace(change, unsafe_reason=await self._unsafe(current, change.node_id)))
            else:
                marked.append(change)
        return marked

    async def apply_plan(
        self,
        plan: AccountPlan,
        *,
        dry_run: bool = False,
        force: bool = False,
        actor: str = "",
        progress: Callable[[int, int], None] | None = None,
    ) -> list[PlanChange]:
        """Make the account's tree match ``plan``; return the changes (only computed for a dry run).

        Removing or moving a node with held money or spend in open windows is refused unless ``force``.
        ``progress(done, total)`` is called as nodes are written.
        """
        changes = await self.plan_changes(plan)
        if dry_run or not changes:
            return changes
        unsafe = [change.unsafe_reason for change in changes if change.unsafe_reason]
        if unsafe and not force:
            raise FailedPreconditionError(
                "refusing to remove or move nodes that carry money: "
                + "; ".join(unsafe)
                + " (pass force, --force in the CLI, to do it anyway)"
            )
        writes = [change.after for change in changes if change.after is not None]
        removals = [change for change in changes if change.kind is ChangeKind.REMOVED]
        total = len(writes) + len(removals)
        await self.store.put_plan(
            plan, nodes=writes, progress=(lambda done: progress(done, total)) if progress else None
        )
        # A first call on a wallet of the plan need not look up its account.
        self._spend.learn(plan, [node.node_id for node in plan.nodes])
        windows = windows_at(self._clock.now_ms(), plan.time_zone)
        for index, change in enumerate(removals, start=1):
            await self.store.delete_node(plan.account_id, change.node_id, force=force, windows=windows)
            if progress is not None:
                progress(len(writes) + index, total)
        await self._retire_tokens(plan.account_id, {c.node_id for c in removals}, actor)
        now_ms = self._clock.now_ms()
        for change in changes:
            await self._audit.record_audit(
                actor=actor,
                action=f"plan.{change.kind.name.lower()}",
                node_id=change.node_id,
                before=node_record(change.before),
                after=node_record(change.after),
                at_ms=now_ms,
            )
        # One pipelined write for the feed, however large the plan.
        await self.store.append_events(
            plan.account_id,
            [
                {
                    "k": EVENT_CONFIG,
                    "at": str(now_ms),
                    "node": change.node_id,
                    "chain": change.node_id,
                    "amt": "0",
                    "msg": f"plan {change.kind.name.lower()} {change.node_id}",
                }
                for change in changes
            ],
        )
        await self._record_config(plan.account_id, actor)
        return changes

    # ------------------------------------------------------------------------------------------------
    # Single-node edits.

    async def set_limits(self, node_id: str, limits: Limits, *, shadow: bool, actor: str = "") -> NodeBudget:
        """Replace a node's limits and shadow flag."""
        plan, node = await self._plan_of(node_id)
        updated = dataclasses.replace(node, limits=limits, shadow=shadow)
        await self.store.put_plan(plan, nodes=[updated])
        await self._record(
            actor,
            "node.set_limits",
            plan.account_id,
            node_id,
            node,
            updated,
            f"limits of {node_id}: {describe_node(updated, plan.currency)}",
        )
        await self._record_config(plan.account_id, actor)
        return await self._spend.get_budget(node_id)

    async def create_node(
        self, node_id: str, parent_id: str, kind: NodeKind, limits: Limits, *, actor: str = ""
    ) -> NodeBudget:
        """Add a pool or a wallet under an account or a pool."""
        check_id(node_id, "node_id")
        if kind not in (NodeKind.POOL, NodeKind.WALLET):
            raise InvalidArgumentError("kind must be pool or wallet; accounts come from plans")
        plan, parent = await self._plan_of(parent_id)
        if parent.kind is NodeKind.WALLET:
            raise InvalidArgumentError(f"{parent_id} is a wallet; wallets have no children")
        if any(node.node_id == node_id for node in plan.nodes):
            raise InvalidArgumentError(f"node {node_id!r} already exists")
        node = NodeSpec(node_id=node_id, kind=kind, parent_id=parent_id, limits=limits)
        await self.store.put_plan(plan, nodes=[node])
        self._spend.learn(plan, [node_id])
        await self._record(
            actor, "node.create", plan.account_id, node_id, None, node, f"created {describe_node(node, plan.currency)}"
        )
        await self._record_config(plan.account_id, actor)
        return await self._spend.get_budget(node_id)

    async def move_node(self, node_id: str, new_parent_id: str, *, force: bool = False, actor: str = "") -> NodeBudget:
        """Give a pool or a wallet another parent in the same account."""
        plan, node = await self._plan_of(node_id)
        if node.kind is NodeKind.ACCOUNT:
            raise InvalidArgumentError("an account cannot be moved")
        check_id(new_parent_id, "new_parent_id")
        by_id = {n.node_id: n for n in plan.nodes}
        parent = by_id.get(new_parent_id)
        if parent is None:
            raise NotFoundError(f"no node {new_parent_id!r} in account {plan.account_id!r}")
        if parent.kind is NodeKind.WALLET:
            raise InvalidArgumentError(f"{new_parent_id} is a wallet; wallets have no children")
        if any(n.node_id == new_parent_id for n in subtree(plan, node_id)):
            raise InvalidArgumentError(f"{new_parent_id} is under {node_id}; a node cannot move under itself")
        unsafe = await self._unsafe(plan, node_id)
        if unsafe and not force:
            raise FailedPreconditionError(
                f"refusing to move: {unsafe} (pass force, --force in the CLI, to move it anyway)"
            )
        moved = dataclasses.replace(node, parent_id=new_parent_id)
        await self.store.put_plan(plan, nodes=[moved])
        await self._record(
            actor,
            "node.move",
            plan.account_id,
            node_id,
            node,
            moved,
            f"moved {node_id} from {node.parent_id} to {new_parent_id}",
        )
        await self._record_config(plan.account_id, actor)
        return await self._spend.get_budget(node_id)

    async def delete_node(self, node_id: str, *, force: bool = False, actor: str = "") -> list[str]:
        """Remove a pool or a wallet with its subtree; refused while any of it carries money, unless forced."""
        plan, node = await self._plan_of(node_id)
        if node.kind is NodeKind.ACCOUNT:
            raise InvalidArgumentError("an account cannot be deleted node by node; apply an empty plan instead")
        doomed = subtree(plan, node_id)
        if not force:
            reasons = [reason for reason in [await self._unsafe(plan, n.node_id) for n in doomed] if reason]
            if reasons:
                raise FailedPreconditionError(
                    "refusing to delete: " + "; ".join(reasons) + " (pass force, --force in the CLI)"
                )
        windows = windows_at(self._clock.now_ms(), plan.time_zone)
        for doomed_node in reversed(doomed):
            await self.store.delete_node(plan.account_id, doomed_node.node_id, force=force, windows=windows)
            await self._record(
                actor,
                "node.delete",
                plan.account_id,
                doomed_node.node_id,
                doomed_node,
                None,
                f"deleted {doomed_node.node_id}",
            )
        await self._retire_tokens(plan.account_id, {n.node_id for n in doomed}, actor)
        await self._record_config(plan.account_id, actor)
        return [n.node_id for n in doomed]

    # ------------------------------------------------------------------------------------------------
    # Incidents.

    async def freeze(self, node_id: str, reason: str, *, void_holds: bool = False, actor: str = "") -> tuple[int, int]:
        """Freeze a node from the very next authorization; return (holds voided, money released)."""
        if not reason.strip():
            raise InvalidArgumentError("a freeze needs a reason (it is shown in the audit log and the feed)")
        plan, node = await self._plan_of(node_id)
        _, voided, released = await self.store.freeze(
            plan.account_id, node_id, reason, void_holds=void_holds, now_ms=self._clock.now_ms()
        )
        await self._audit.record_audit(
            actor=actor,
            action="node.freeze",
            node_id=node_id,
            before=node_record(node),
            after=node_record(dataclasses.replace(node, frozen_reason=reason)),
            at_ms=self._clock.now_ms(),
        )
        await self._record_config(plan.account_id, actor)
        return voided, released

    async def unfreeze(self, node_id: str, *, actor: str = "") -> bool:
        """Let a frozen node spend again; return whether it was frozen."""
        plan, node = await self._plan_of(node_id)
        was_frozen, _, _ = await self.store.freeze(
            plan.account_id, node_id, "", void_holds=False, now_ms=self._clock.now_ms()
        )
        await self._audit.record_audit(
            actor=actor,
            action="node.unfreeze",
            node_id=node_id,
            before=node_record(node),
            after=node_record(dataclasses.replace(node, frozen_reason="")),
            at_ms=self._clock.now_ms(),
        )
        await self._record_config(plan.account_id, actor)
        return was_frozen

    async def _retire_tokens(self, account_id: str, node_ids: set[str], actor: str) -> None:
        """Revoke the tokens scoped to removed nodes, which a node created later with the same id must not inherit."""
        for record in await self.store.list_tokens():
            if record.account_id == account_id and record.scope_node_id in node_ids:
                await self.store.revoke_token(record)
                await self.audit_token(actor, "token.revoke", record)

    async def audit_token(self, actor: str, action: str, record: TokenRecord) -> None:
        """Record the issue or revocation of a token (its hash and secret stay out of the log)."""
        described = {
            "token_id": record.token_id,
            "role": record.role,
            "scope": record.scope_node_id,
            "name": record.name,
        }
        await self._audit.record_audit(
            actor=actor,
            action=action,
            node_id=record.scope_node_id,
            before=described if action.endswith("revoke") else None,
            after=None if action.endswith("revoke") else described,
            at_ms=self._clock.now_ms(),
        )

    async def recommend_plan(
        self, account_id: str, *, stage: Stage | None, multiplier: decimal.Decimal | None, days: int
    ) -> tuple[list[Recommendation], AccountPlan, list[PlanChange]]:
        """Size every wallet that spent in the last ``days`` days from the ledger's actuals.

        Returns the per-wallet figures, the account's plan with the recommended day and per-transaction
        limits, and what applying that plan would change.
        """
        if self._transactions is None:
            raise FailedPreconditionError("recommendations need the ledger; this server runs without one")
        if not 1 <= days <= DAYS_MAX:
            raise InvalidArgumentError(f"days must be from 1 to {DAYS_MAX}")
        check_id(account_id, "account_id")
        plan = await self.store.read_plan(account_id)
        if plan is None:
            raise NotFoundError(f"no account {account_id!r}")
        until_ms = self._clock.now_ms()
        since_ms = until_ms - days * 86_400_000
        spend: list[Spend] = []
        cursor: str | None = None
        while True:
            page = await self._transactions.list_transactions(
                TransactionFilter(node_id=account_id, since_ms=since_ms, until_ms=until_ms), cursor, 1000
            )
            spend += [Spend(t.wallet_id, t.day, t.amount_micros) for t in page.transactions]
            if len(spend) > RECOMMEND_TRANSACTIONS_MAX:
                raise InvalidArgumentError(f"more than {RECOMMEND_TRANSACTIONS_MAX} transactions: ask for fewer days")
            cursor = page.next_cursor
            if cursor is None:
                break
        recommendations = recommend(spend, days=days, stage=stage, multiplier=multiplier)
        by_wallet = {r.wallet_id: r for r in recommendations}
        nodes = []
        for node in plan.nodes:
            advice = by_wallet.get(node.node_id)
            if advice is None or node.kind is not NodeKind.WALLET:
                nodes.append(node)
                continue
            limits = dataclasses.replace(
                node.limits, day_micros=advice.day_limit_micros, per_transaction_micros=advice.per_transaction_micros
            )
            nodes.append(dataclasses.replace(node, limits=limits))
        proposed = dataclasses.replace(plan, nodes=tuple(nodes))
        return recommendations, proposed, await self.plan_changes(proposed)

    # ------------------------------------------------------------------------------------------------
    # Reports.

    async def tree(self, node_id: str = "") -> list[TreeEntry]:
        """The subtree of ``node_id`` (every account when empty), parents first, with budgets."""
        if node_id:
            plan, _ = await self._plan_of(node_id)
            roots = [(plan, node_id)]
        else:
            roots = []
            for account_id in await self.store.account_ids():
                account_plan = await self.store.read_plan(account_id)
                if account_plan is not None:
                    roots.append((account_plan, account_id))
        entries = []
        for plan, root in roots:
            depth_of = {root: 0}
            for node in subtree(plan, root):
                if node.node_id != root:
                    depth_of[node.node_id] = depth_of[str(node.parent_id)] + 1
                budget = await self._spend.get_budget(node.node_id)
                entries.append(TreeEntry(depth=depth_of[node.node_id], budget=budget, shadow=node.shadow))
        return entries


def plan_to_document(plan: AccountPlan) -> dict[str, Any]:
    """The YAML document of a plan (the inverse of :func:`spendgate.plan.parse_plan`); amounts in units."""
    amount = plan_amount

    def body(node: NodeSpec) -> dict[str, Any]:
        limits: dict[str, Any] = {}
        for key, value in (
            ("per_transaction", node.limits.per_transaction_micros),
            ("day", node.limits.day_micros),
            ("week", node.limits.week_micros),
            ("month", node.limits.month_micros),
            ("total", node.limits.total_micros),
        ):
            if value is not None:
                limits[key] = amount(value)
        if node.limits.velocity_per_minute is not None:
            limits["velocity_per_minute"] = node.limits.velocity_per_minute
        if node.limits.allowed_services:
            limits["allowed_services"] = list(node.limits.allowed_services)
        out: dict[str, Any] = {"id": node.node_id}
        if limits:
            out["limits"] = limits
        if node.frozen_reason:
            out["frozen"] = node.frozen_reason
        if node.shadow:
            out["shadow"] = True
        if node.breaker is not None:
            out["breaker"] = {
                "multiplier": node.breaker.multiplier,
                "recent_minutes": node.breaker.recent_minutes,
                "trailing_minutes": node.breaker.trailing_minutes,
                "min_spend": amount(node.breaker.min_spend_micros),
            }
        return out

    children: dict[str | None, list[NodeSpec]] = {}
    for node in plan.nodes:
        children.setdefault(node.parent_id, []).append(node)

    def fill(node: NodeSpec, out: dict[str, Any]) -> dict[str, Any]:
        pools = [fill(c, body(c)) for c in children.get(node.node_id, []) if c.kind is NodeKind.POOL]
        wallets = [body(c) for c in children.get(node.node_id, []) if c.kind is NodeKind.WALLET]
        if pools:
            out["pools"] = pools
        if wallets:
            out["wallets"] = wallets
        return out

    account = plan.nodes[0]
    document: dict[str, Any] = {"account": {**body(account), "currency": plan.currency, "time_zone": plan.time_zone}}
    rest = fill(account, {})
    document.update(rest)
    return document


def dump_json(value: Any) -> str:
    """JSON for audit records and CLI output."""
    return json.dumps(value, sort_keys=True, default=str)
