"""Helpers of the API tests: request builders, waiting, and the environment of spendgate subprocesses.

The redis-server processes, key prefixes and snapshots come from the shared ``tests/helpers.py``.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import pathlib
import sys
from collections.abc import Awaitable
from typing import Any, TypeVar

import grpc
import pytest

from helpers import FLEET_YAML, START, START_MS, USD, in_ci, snapshot
from spendgate._gen.spendgate.v1 import spend_pb2
from spendgate.app import SpendgateServer
from spendgate.clock import ManualClock

T = TypeVar("T")

FLEET = FLEET_YAML
# The spendgate command of the environment running the tests (the project's virtualenv).
SPENDGATE = pathlib.Path(sys.executable).parent / "spendgate"
HOLD_TTL_S = 60
HOLD_EXPIRES_AT_MS = START_MS + HOLD_TTL_S * 1000
TODAY = START.strftime("%Y-%m-%d")
WALLET = "research-agent-01"
# A deadline on raw stub calls: far above anything a healthy call needs, so it only stops a hang.
CALL_TIMEOUT_S = 10.0


def utc_text(ms: int) -> str:
    """A time as the CLI shows it."""
    return datetime.datetime.fromtimestamp(ms / 1000, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def missing(what: str) -> None:
    """Fail in CI, skip loudly elsewhere."""
    if in_ci():
        pytest.fail(f"{what} (CI=true: a missing service fails the run)")
    pytest.skip(f"{what}; install redis-server to run these tests")


@dataclasses.dataclass
class Gate:
    """A running spendgate with the example fleet, a raw stub of SpendService, and a view of its Redis keys."""

    server: SpendgateServer
    channel: grpc.aio.Channel
    stub: Any
    prefix: str
    clock: ManualClock

    @property
    def address(self) -> str:
        """The address clients dial."""
        return self.server.address

    async def snapshot(self) -> dict[str, Any]:
        """Every key of this server (its prefix) with its value."""
        return await snapshot(self.server.store.client, self.prefix)

    async def budget(self, node_id: str) -> spend_pb2.GetBudgetResponse:
        """A node's budget over the API."""
        response: spend_pb2.GetBudgetResponse = await self.stub.GetBudget(
            spend_pb2.GetBudgetRequest(node_id=node_id), timeout=CALL_TIMEOUT_S
        )
        return response


def authorize_request(
    wallet_id: str = WALLET,
    amount_micros: int = USD // 4,
    *,
    currency: str = "USD",
    idempotency_key: str = "key-1",
    service: str = "",
    capture: bool = False,
    metadata: dict[str, str] | None = None,
) -> spend_pb2.AuthorizeRequest:
    """An AuthorizeRequest that is valid unless a test changes a field."""
    return spend_pb2.AuthorizeRequest(
        wallet_id=wallet_id,
        amount_micros=amount_micros,
        currency=currency,
        idempotency_key=idempotency_key,
        service=service,
        capture=capture,
        metadata=metadata or {},
    )


async def rpc_error(call: Awaitable[Any]) -> grpc.aio.AioRpcError:
    """Await a call that must fail; return its error."""
    try:
        response = await call
    except grpc.aio.AioRpcError as error:
        return error
    pytest.fail(f"the call succeeded but should have failed: {response}")


def clean_env() -> dict[str, str]:
    """The environment for a spendgate subprocess: ours, without any SPENDGATE_* setting that could leak in."""
    return {name: value for name, value in os.environ.items() if not name.startswith("SPENDGATE_")}
