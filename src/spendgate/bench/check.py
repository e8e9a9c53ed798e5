"""The end-of-run check: no limit anywhere was exceeded, and every approved micro-unit is accounted for.

``GetBudget`` on every node of the fleet: in every window with a limit, spent + held must be at most the
limit, and transactions this minute at most the velocity limit (nodes in shadow mode are skipped: their
limits are reported, not enforced). Then the money: the wallets' lifetime (total window) spent + held must
have grown by exactly what the generators saw approved, give or take the calls whose outcome they could
not know (failed calls, which the server may or may not have applied).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Sequence
from typing import Any

from spendgate.client import AsyncClient
from spendgate.domain import NodeBudget, SpendgateError, Window

BUDGET_CALLS_IN_FLIGHT_MAX = 32
VIOLATIONS_SHOWN_MAX = 20


@dataclasses.dataclass(slots=True)
class CheckResult:
    """What the check found."""

    nodes_checked: int = 0
    windows_checked: int = 0
    violations: list[str] = dataclasses.field(default_factory=list)
    errors: list[str] = dataclasses.field(default_factory=list)
    # The money check; None where it was not made (for example against a server this run did not start and
    # without a snapshot taken before the load).
    approved_micros: int | None = None
    spent_held_delta_micros: int | None = None
    unknown_micros_max: int = 0

    @property
    def limits_ok(self) -> bool:
        """Every node was read and none is over a limit."""
        return not self.violations and not self.errors

    @property
    def money_ok(self) -> bool | None:
        """Whether the wallets' spend matches the approvals (None when not checked)."""
        if self.approved_micros is None or self.spent_held_delta_micros is None:
            return None
        low = self.approved_micros
        return low <= self.spent_held_delta_micros <= low + self.unknown_micros_max

    @property
    def passed(self) -> bool:
        """Whether the whole check passed."""
        return self.limits_ok and self.money_ok is not False

    def to_json(self) -> dict[str, Any]:
        """The check's figures for ``--json``."""
        return {
            "passed": self.passed,
            "no_limit_exceeded": self.limits_ok,
            "nodes_checked": self.nodes_checked,
            "windows_checked": self.windows_checked,
            "violations": self.violations,
            "errors": self.errors,
            "money": {
                "ok": self.money_ok,
                "approved_micros": self.approved_micros,
                "wallets_spent_plus_held_delta_micros": self.spent_held_delta_micros,
                "unknown_outcomes_micros_max": self.unknown_micros_max,
            },
        }


def violations_of(budget: NodeBudget) -> list[str]:
    """Each way a node's budget is over one of its limits, in words."""
    found = []
    for window in budget.windows:
        if window.limit_micros is not None and window.spent_micros + window.held_micros > window.limit_micros:
            found.append(
                f"{budget.node_id} {window.window.name.lower()} {window.window_id}: spent {window.spent_micros} + "
                f"held {window.held_micros} > limit {window.limit_micros} micros"
            )
    if budget.velocity_per_minute is not None and budget.velocity_used > budget.velocity_per_minute:
        found.append(f"{budget.node_id} velocity: {budget.velocity_used} > {budget.velocity_per_minute} this minute")
    return found


def limited_windows(budget: NodeBudget) -> int:
    """How many of a node's windows have a limit (the velocity limit counts as one)."""
    return sum(window.limit_micros is not None for window in budget.windows) + (budget.velocity_per_minute is not None)


def lifetime_micros(budget: NodeBudget) -> int:
    """What a node has spent and holds over its lifetime (the total window)."""
    total = budget.window(Window.TOTAL)
    return total.spent_micros + total.held_micros


async def read_budgets(client: AsyncClient, node_ids: Sequence[str]) -> tuple[dict[str, NodeBudget], list[str]]:
    """``GetBudget`` of each node (a bounded number in flight); returns the budgets and the errors."""
    slots = asyncio.Semaphore(BUDGET_CALLS_IN_FLIGHT_MAX)
    budgets: dict[str, NodeBudget] = {}
    errors: list[str] = []

    async def read(node_id: str) -> None:
        async with slots:
            try:
                budgets[node_id] = await client.get_budget(node_id)
            except SpendgateError as error:
                errors.append(f"GetBudget {node_id}: {type(error).__name__}: {error}")

    await asyncio.gather(*(read(node_id) for node_id in node_ids))
    return budgets, errors


async def wallets_lifetime_micros(target: str, token: str, wallet_ids: Sequence[str]) -> int:
    """The sum over the wallets of their lifetime spent + held (a snapshot to compare against later)."""
    async with AsyncClient(target, token=token or None, timeout_s=10.0) as client:
        budgets, errors = await read_budgets(client, wallet_ids)
    if errors:
        raise RuntimeError(f"could not read the wallets' budgets before the load: {errors[0]}")
    return sum(lifetime_micros(budget) for budget in budgets.values())


async def check_budgets(
    target: str,
    token: str,
    node_ids: Sequence[str],
    wallet_ids: Sequence[str],
    *,
    shadow_node_ids: frozenset[str] = frozenset(),
    approved_micros: int | None = None,
    lifetime_before_micros: int | None = None,
    unknown_micros_max: int = 0,
) -> CheckResult:
    """Read every node's budget and check it (see the module's docstring)."""
    result = CheckResult(unknown_micros_max=unknown_micros_max)
    async with AsyncClient(target, token=token or None, timeout_s=10.0) as client:
        budgets, result.errors = await read_budgets(client, node_ids)
    for node_id, budget in budgets.items():
        result.nodes_checked += 1
        if node_id in shadow_node_ids:
            continue
        result.windows_checked += limited_windows(budget)
        result.violations.extend(violations_of(budget))
    if approved_micros is not None and lifetime_before_micros is not None and not result.errors:
        result.approved_micros = approved_micros
        lifetime = sum(lifetime_micros(budgets[wallet_id]) for wallet_id in wallet_ids)
        result.spent_held_delta_micros = lifetime - lifetime_before_micros
    return result
