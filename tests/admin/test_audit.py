"""The audit log: every admin change is recorded with who, when, and the state before and after, and can be read
back through BillingService (and `spendgate audit`)."""

from __future__ import annotations

import pathlib
import uuid

import pytest

from spendgate.client import BillingClient, TokenClient
from spendgate.domain import Limits, PermissionDeniedError

from .conftest import StartFleet


def test_every_admin_change_is_in_the_audit_log(start_fleet: StartFleet, tmp_path: pathlib.Path) -> None:
    fleet = start_fleet(ledger=True, data_dir=str(tmp_path))
    fleet.admin.freeze("sales-agent-02", "runaway loop", void_holds=True)
    fleet.admin.set_limits("research-agent-03", Limits(day_micros=5_000_000))
    fleet.admin.unfreeze("sales-agent-02")
    with BillingClient(fleet.address) as billing:
        records = billing.audit()
    actions = [(r["action"], r["node_id"]) for r in records]
    # The plan the server started with, then the three changes, in order.
    assert ("plan.added", "acme") in actions
    assert actions[-3:] == [
        ("node.freeze", "sales-agent-02"),
        ("node.set_limits", "research-agent-03"),
        ("node.unfreeze", "sales-agent-02"),
    ]
    freeze = records[-3]
    assert freeze["before"]["frozen_reason"] == ""
    assert freeze["after"]["frozen_reason"] == "runaway loop"
    limits = records[-2]
    assert limits["before"]["limits"]["day_micros"] == 50_000_000
    assert limits["after"]["limits"]["day_micros"] == 5_000_000
    assert all(r["actor"] for r in records)
    assert [r["at_ms"] for r in records] == sorted(r["at_ms"] for r in records)


ROOT = uuid.uuid4().hex


def test_agents_cannot_read_the_audit_log(start_fleet: StartFleet, tmp_path: pathlib.Path) -> None:
    fleet = start_fleet(ledger=True, data_dir=str(tmp_path), auth=True, admin_token=ROOT)
    with BillingClient(fleet.address, token=ROOT) as billing:
        assert billing.audit()
    with TokenClient(fleet.address, token=ROOT) as tokens:
        secret, _ = tokens.create_token("agent", "research-agent-01", "agent one")
    with BillingClient(fleet.address, token=secret) as billing, pytest.raises(PermissionDeniedError):
        billing.audit()
