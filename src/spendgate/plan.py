"""Plan files: an account's tree and limits as YAML.

A plan looks like this (amounts are in currency units and may be written ``50``, ``0.25`` or ``"$3,000"``)::

    account:
      id: acme
      currency: USD          # optional, USD by default
      time_zone: UTC         # optional, UTC by default; day/week/month windows are counted in it
      limits: {month: 10000}
    pools:
      - id: research-agents
        limits: {month: 3000}
        wallets:
          - id: research-agent-01
            limits: {day: 50, per_transaction: 1, velocity_per_minute: 60, allowed_services: [api.example.com]}
            shadow: true     # optional: evaluate and report the limits, do not enforce them (ramp-up)
            breaker: {multiplier: 5, recent_minutes: 5, trailing_minutes: 60, min_spend: 1}   # optional
        pools: []            # pools may nest

Every mistake is reported with where it is (``pools[0].wallets[2].limits.day``) and nothing is applied.
"""

from __future__ import annotations

import pathlib
from typing import Any

import yaml

from spendgate.domain import (
    ALLOWED_SERVICES_MAX,
    AccountPlan,
    Breaker,
    InvalidArgumentError,
    Limits,
    NodeKind,
    NodeSpec,
    check_currency,
    check_id,
    check_service,
)
from spendgate.money import MoneyError, parse_amount
from spendgate.windows import zone

# The scripts walk at most 32 levels from a wallet to its account.
DEPTH_MAX = 32
_MONEY_LIMITS = {
    "per_transaction": "per_transaction_micros",
    "day": "day_micros",
    "week": "week_micros",
    "month": "month_micros",
    "total": "total_micros",
}
_LIMIT_KEYS = {*_MONEY_LIMITS, "velocity_per_minute", "allowed_services"}
VELOCITY_MAX = 1_000_000


class PlanError(InvalidArgumentError):
    """A plan that cannot be applied; the message says where and what."""


def _mapping(value: Any, where: str, allowed: set[str]) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise PlanError(f"{where}: expected a mapping, got {type(value).__name__}")
    unknown = sorted(str(k) for k in value if k not in allowed)
    if unknown:
        raise PlanError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")
    return value


def _list(value: Any, where: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise PlanError(f"{where}: expected a list, got {type(value).__name__}")
    return value


def parse_limits(value: Any, where: str) -> Limits:
    """Read a ``limits`` mapping."""
    raw = _mapping(value, where, _LIMIT_KEYS)
    fields: dict[str, Any] = {}
    for key, field in _MONEY_LIMITS.items():
        if key in raw and raw[key] is not None:
            try:
                fields[field] = parse_amount(raw[key])
            except MoneyError as error:
                raise PlanError(f"{where}.{key}: {error}") from error
    velocity = raw.get("velocity_per_minute")
    if velocity is not None:
        if isinstance(velocity, bool) or not isinstance(velocity, int) or not 1 <= velocity <= VELOCITY_MAX:
            raise PlanError(f"{where}.velocity_per_minute: expected a whole number from 1 to {VELOCITY_MAX}")
        fields["velocity_per_minute"] = velocity
    services = _list(raw.get("allowed_services"), f"{where}.allowed_services")
    if len(services) > ALLOWED_SERVICES_MAX:
        raise PlanError(f"{where}.allowed_services: at most {ALLOWED_SERVICES_MAX} services")
    for index, service in enumerate(services):
        if not isinstance(service, str) or not service:
            raise PlanError(f"{where}.allowed_services[{index}]: expected a non-empty string")
        try:
            check_service(service)
        except InvalidArgumentError as error:
            raise PlanError(f"{where}.allowed_services[{index}]: {error}") from error
    fields["allowed_services"] = tuple(services)
    return Limits(**fields)


_BREAKER_KEYS = {"multiplier", "recent_minutes", "trailing_minutes", "min_spend"}
_NODE_KEYS = {"id", "limits", "frozen", "shadow", "breaker"}
MINUTES_MAX = 24 * 60


def parse_breaker(value: Any, where: str) -> Breaker | None:
    """Read a ``breaker`` mapping (``None`` when absent: the breaker is off by default)."""
    if value is None or value is False:
        return None
    raw = _mapping({} if value is True else value, where, _BREAKER_KEYS)
    multiplier = raw.get("multiplier", 5)
    if isinstance(multiplier, bool) or not isinstance(multiplier, int | float) or not 1 <= multiplier <= 1000:
        raise PlanError(f"{where}.multiplier: expected a number from 1 to 1000")
    minutes = {}
    for key, default in (("recent_minutes", 5), ("trailing_minutes", 60)):
        number = raw.get(key, default)
        if isinstance(number, bool) or not isinstance(number, int) or not 1 <= number <= MINUTES_MAX:
            raise PlanError(f"{where}.{key}: expected whole minutes from 1 to {MINUTES_MAX}")
        minutes[key] = number
    try:
        min_spend = parse_amount(raw.get("min_spend", 0))
    except MoneyError as error:
        raise PlanError(f"{where}.min_spend: {error}") from error
    return Breaker(multiplier=float(multiplier), min_spend_micros=min_spend, **minutes)


def _flag(value: Any, where: str) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise PlanError(f"{where}: expected true or false")
    return value


def _node(raw: Any, kind: NodeKind, parent: str, where: str, depth: int, nodes: list[NodeSpec]) -> None:
    allowed = _NODE_KEYS | ({"pools", "wallets"} if kind is NodeKind.POOL else set())
    node = _mapping(raw, where, allowed)
    node_id = _check_id(node.get("id"), f"{where}.id")
    if depth > DEPTH_MAX:
        raise PlanError(f"{where}: the tree is deeper than {DEPTH_MAX} levels")
    nodes.append(
        NodeSpec(
            node_id=node_id,
            kind=kind,
            parent_id=parent,
            limits=parse_limits(node.get("limits"), f"{where}.limits"),
            frozen_reason=_frozen(node.get("frozen"), f"{where}.frozen"),
            shadow=_flag(node.get("shadow"), f"{where}.shadow"),
            breaker=parse_breaker(node.get("breaker"), f"{where}.breaker"),
        )
    )
    for index, child in enumerate(_list(node.get("pools"), f"{where}.pools")):
        _node(child, NodeKind.POOL, node_id, f"{where}.pools[{index}]", depth + 1, nodes)
    for index, child in enumerate(_list(node.get("wallets"), f"{where}.wallets")):
        _node(child, NodeKind.WALLET, node_id, f"{where}.wallets[{index}]", depth + 1, nodes)


def _check_id(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise PlanError(f"{where}: expected an id (a string)")
    try:
        return check_id(value, where)
    except InvalidArgumentError as error:
        raise PlanError(str(error)) from error


def _frozen(value: Any, where: str) -> str:
    if value is None or value is False:
        return ""
    if value is True:
        return "frozen in plan"
    if not isinstance(value, str):
        raise PlanError(f"{where}: expected a reason (a string) or true")
    return value


def parse_plan(document: Any, source: str = "plan") -> AccountPlan:
    """Validate a parsed YAML document and return the plan, parents before children."""
    top = _mapping(document, source, {"account", "pools", "wallets"})
    account = _mapping(top.get("account"), f"{source}: account", {"currency", "time_zone", *_NODE_KEYS})
    account_id = _check_id(account.get("id"), "account.id")
    currency = account.get("currency", "USD")
    try:
        check_currency(str(currency))
        time_zone = str(account.get("time_zone", "UTC"))
        zone(time_zone)
    except InvalidArgumentError as error:
        raise PlanError(f"account: {error}") from error
    nodes = [
        NodeSpec(
            node_id=account_id,
            kind=NodeKind.ACCOUNT,
            parent_id=None,
            limits=parse_limits(account.get("limits"), "account.limits"),
            frozen_reason=_frozen(account.get("frozen"), "account.frozen"),
            shadow=_flag(account.get("shadow"), "account.shadow"),
            breaker=parse_breaker(account.get("breaker"), "account.breaker"),
        )
    ]
    for index, pool in enumerate(_list(top.get("pools"), "pools")):
        _node(pool, NodeKind.POOL, account_id, f"pools[{index}]", 2, nodes)
    for index, wallet in enumerate(_list(top.get("wallets"), "wallets")):
        _node(wallet, NodeKind.WALLET, account_id, f"wallets[{index}]", 2, nodes)
    seen: set[str] = set()
    for node in nodes:
        if node.node_id in seen:
            raise PlanError(f"node id {node.node_id!r} appears more than once; ids are unique across a deployment")
        seen.add(node.node_id)
    return AccountPlan(account_id=account_id, currency=str(currency), time_zone=time_zone, nodes=tuple(nodes))


def parse_plan_text(text: str, source: str = "plan") -> AccountPlan:
    """Parse and validate a plan's YAML text (with the C loader where PyYAML has one); ``source`` names it."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        document = yaml.load(text, Loader=loader)  # noqa: S506 -- a safe loader, chosen above
    except yaml.YAMLError as error:
        raise PlanError(f"{source} is not valid YAML: {error}") from error
    return parse_plan(document, source)


def load_plan(path: str | pathlib.Path) -> AccountPlan:
    """Read and validate a plan file."""
    path = pathlib.Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise PlanError(f"cannot read plan {path}: {error.strerror}") from error
    return parse_plan_text(text, str(path))
