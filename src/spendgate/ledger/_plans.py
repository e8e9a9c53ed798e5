"""Plans and audit values as JSON, for the configuration history and the audit table."""

from __future__ import annotations

import json
from typing import Any

from spendgate.domain import AccountPlan


def plan_to_json(plan: AccountPlan) -> str:
    """A plan as the JSON form of its plan document (what an operator would write, amounts in units)."""
    # The control plane owns the document form; importing it lazily keeps the ledger importable on its own.
    from spendgate.admin import plan_to_document

    return json.dumps(plan_to_document(plan), sort_keys=True, separators=(",", ":"))


def plan_from_json(text: str | dict[str, Any], source: str) -> AccountPlan:
    """Read a plan recorded by :func:`plan_to_json` (text, or the object psycopg decoded from jsonb)."""
    from spendgate.plan import parse_plan

    document = json.loads(text) if isinstance(text, str) else text
    return parse_plan(document, source)


def value_to_json(value: dict[str, Any] | None) -> str | None:
    """An audit value as JSON text; values JSON cannot hold (enums, tuples) are written as text or lists."""
    if value is None:
        return None
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def value_from_json(text: str | dict[str, Any] | None) -> dict[str, Any] | None:
    """Read an audit value written by :func:`value_to_json`."""
    if text is None:
        return None
    value = json.loads(text) if isinstance(text, str) else text
    if not isinstance(value, dict):
        raise ValueError("an audit value is not a JSON object")
    return value
