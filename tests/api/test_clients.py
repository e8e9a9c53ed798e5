"""The typed clients (spendgate.Client and spendgate.AsyncClient) against a real server, and their retries."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from spendgate import AsyncClient, Client, RetryPolicy
from spendgate._gen.spendgate.v1 import spend_pb2_grpc
from spendgate.api.auth import Authenticator
from spendgate.api.spend import SpendServicer
from spendgate.domain import (
    AlreadyExistsError,
    AuthorizeResult,
    CaptureResult,
    DenyReason,
    FailedPreconditionError,
    HoldState,
    InvalidArgumentError,
    NodeKind,
    NodeWindow,
    NotFoundError,
    RemainingBudget,
    UnavailableError,
    VoidResult,
    Window,
)
from spendgate.money import MONEY_MICROS_MAX

from .support import HOLD_EXPIRES_AT_MS, USD, WALLET, Gate

FAST_RETRY = RetryPolicy(attempts_max=4, backoff_initial_s=0.01, backoff_max_s=0.05)


def check_approved_hold(result: AuthorizeResult, amount_micros: int) -> None:
    assert isinstance(result, AuthorizeResult)
    assert result.approved
    assert result.authorization_id.startswith("acme:")
    assert result.deny_reason is DenyReason.NONE
    assert result.denied_by is None
    assert result.hold_state is HoldState.HELD
    assert result.hold_expires_at_ms == HOLD_EXPIRES_AT_MS
    assert result.remaining == RemainingBudget(WALLET, Window.DAY, 50 * USD, 50 * USD - amount_micros)


async def test_async_client_round_trip(gate: Gate) -> None:
    async with AsyncClient(gate.address, timeout_s=10) as client:
        held = await client.authorize(WALLET, USD // 4, service="api.example.com", metadata={"task": "t-1"})
        check_approved_hold(held, USD // 4)

        captured = await client.capture(held.authorization_id, 200_000)
        assert captured == CaptureResult(held.authorization_id, 200_000, 50_000, HoldState.CAPTURED)

        denied = await client.authorize(WALLET, USD + 1)
        assert not denied.approved
        assert denied.deny_reason is DenyReason.PER_TRANSACTION_LIMIT
        assert denied.denied_by == NodeWindow(WALLET, Window.NONE)
        assert denied.authorization_id == ""

        to_void = await client.authorize(WALLET, USD // 10)
        voided = await client.void(to_void.authorization_id)
        assert voided == VoidResult(to_void.authorization_id, USD // 10, HoldState.VOIDED)

        one_shot = await client.authorize(WALLET, USD // 20, capture=True)
        assert (one_shot.hold_state, one_shot.captured_micros) == (HoldState.CAPTURED, USD // 20)

        budget = await client.get_budget(WALLET)
        assert (budget.node_id, budget.kind, budget.parent_id, budget.account_id) == (
            WALLET,
            NodeKind.WALLET,
            "research-agents",
            "acme",
        )
        assert budget.per_transaction_micros == USD
        day = budget.window(Window.DAY)
        assert (day.limit_micros, day.spent_micros, day.held_micros) == (50 * USD, 200_000 + USD // 20, 0)
        assert day.remaining_micros == 50 * USD - 200_000 - USD // 20
        assert budget.window(Window.WEEK).limit_micros is None

        # Errors come back as the core's exceptions, with the server's message.
        with pytest.raises(NotFoundError, match="no wallet 'ghost'"):
            await client.authorize("ghost", USD)
        with pytest.raises(InvalidArgumentError, match="above the largest amount"):
            await client.authorize(WALLET, MONEY_MICROS_MAX + 1)
        with pytest.raises(FailedPreconditionError, match="it was voided"):
            await client.capture(to_void.authorization_id, 1)
        await client.authorize(WALLET, USD // 4, idempotency_key="mine")
        with pytest.raises(AlreadyExistsError, match="use a new key"):
            await client.authorize(WALLET, USD // 2, idempotency_key="mine")


async def test_blocking_client_round_trip(gate: Gate) -> None:
    def scenario() -> None:
        with Client(gate.address, timeout_s=10) as client:
            held = client.authorize(WALLET, USD // 4)
            check_approved_hold(held, USD // 4)
            assert client.capture(held.authorization_id, USD // 4) == CaptureResult(
                held.authorization_id, USD // 4, 0, HoldState.CAPTURED
            )
            to_void = client.authorize(WALLET, USD // 10)
            assert client.void(to_void.authorization_id).released_micros == USD // 10
            denied = client.authorize("content-agent-01", USD, service="x", currency="USD", capture=True)
            assert denied.approved
            budget = client.get_budget("research-agents")
            assert budget.kind is NodeKind.POOL
            month = budget.window(Window.MONTH)
            assert (month.limit_micros, month.spent_micros, month.held_micros) == (3000 * USD, USD // 4, 0)
            with pytest.raises(NotFoundError, match="no node 'ghost'"):
                client.get_budget("ghost")
            with pytest.raises(InvalidArgumentError, match="'research-agents' is a pool, not a wallet"):
                client.authorize("research-agents", USD)
            with pytest.raises(FailedPreconditionError, match="already captured"):
                client.void(held.authorization_id)

    await asyncio.to_thread(scenario)


async def test_clients_use_a_fresh_key_per_call_and_replay_a_given_one(gate: Gate) -> None:
    async with AsyncClient(gate.address, timeout_s=10) as client:
        first = await client.authorize(WALLET, USD // 4)
        second = await client.authorize(WALLET, USD // 4)
        assert first.authorization_id != second.authorization_id
        keyed = await client.authorize(WALLET, USD // 4, idempotency_key="same")
        again = await client.authorize(WALLET, USD // 4, idempotency_key="same")
        assert again == keyed
    assert (await gate.budget(WALLET)).windows[0].held_micros == 3 * (USD // 4)


# ---------------------------------------------------------------------------------------------------------
# Retries: a server in front of the real one loses answers, and the test watches which keys arrive.


class LossyServicer(spend_pb2_grpc.SpendServiceServicer):
    """Decides every request with the real servicer, but for the first ``losses`` attempts loses the answer.

    The loss happens after the decision was made and stored, as when a connection drops on the way back: a
    retry with another key would then charge twice. With ``stall_s`` the answer is late instead of lost.
    """

    def __init__(self, real: SpendServicer, losses: int, stall_s: float = 0.0) -> None:
        self.real = real
        self.losses = losses
        self.stall_s = stall_s
        self.keys: list[str] = []

    async def _lossy(self, request: Any, context: Any, method: Any) -> Any:
        self.keys.append(request.idempotency_key)
        response = await method(request, context)
        if len(self.keys) <= self.losses:
            if self.stall_s:
                await asyncio.sleep(self.stall_s)
            else:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "injected: the answer was lost")
        return response

    async def Authorize(self, request: Any, context: Any) -> Any:
        return await self._lossy(request, context, self.real.Authorize)

    async def Capture(self, request: Any, context: Any) -> Any:
        return await self._lossy(request, context, self.real.Capture)


@contextlib.asynccontextmanager
async def lossy_server(gate: Gate, losses: int, stall_s: float = 0.0) -> AsyncIterator[tuple[str, LossyServicer]]:
    real = SpendServicer(gate.server.core, Authenticator(gate.server.store, enabled=False, root_token=""))
    servicer = LossyServicer(real, losses, stall_s)
    server = grpc.aio.server()
    spend_pb2_grpc.add_SpendServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        await server.stop(None)


@pytest.mark.parametrize("backend_kind", ["fakeredis"])
async def test_async_client_retries_unavailable_with_the_same_key_and_charges_once(gate: Gate) -> None:
    async with (
        lossy_server(gate, losses=2) as (address, servicer),
        AsyncClient(address, timeout_s=10, retry=FAST_RETRY) as client,
    ):
        held = await client.authorize(WALLET, USD // 2)
        servicer.keys.clear()
        captured = await client.capture(held.authorization_id, USD // 4)

    assert held.approved
    assert captured.captured_micros == USD // 4
    # Three capture attempts, one key: the first two answers were lost, the third replayed the stored one.
    assert len(servicer.keys) == 3
    assert len(set(servicer.keys)) == 1
    day = (await gate.budget(WALLET)).windows[0]
    assert (day.spent_micros, day.held_micros) == (USD // 4, 0)


@pytest.mark.parametrize("backend_kind", ["fakeredis"])
async def test_blocking_client_retries_unavailable_with_the_same_key_and_charges_once(gate: Gate) -> None:
    async with lossy_server(gate, losses=2) as (address, servicer):

        def authorize() -> AuthorizeResult:
            with Client(address, timeout_s=10, retry=FAST_RETRY) as client:
                return client.authorize(WALLET, USD // 2)

        result = await asyncio.to_thread(authorize)

    assert result.approved
    assert len(servicer.keys) == 3
    assert len(set(servicer.keys)) == 1
    assert servicer.keys[0]
    assert (await gate.budget(WALLET)).windows[0].held_micros == USD // 2


@pytest.mark.parametrize("backend_kind", ["fakeredis"])
async def test_a_late_answer_is_retried_after_the_deadline_with_the_same_key(gate: Gate) -> None:
    async with (
        lossy_server(gate, losses=1, stall_s=2.0) as (address, servicer),
        AsyncClient(address, timeout_s=0.5, retry=FAST_RETRY) as client,
    ):
        result = await client.authorize(WALLET, USD // 2, idempotency_key="late-1")

    assert result.approved
    assert servicer.keys == ["late-1", "late-1"]
    assert (await gate.budget(WALLET)).windows[0].held_micros == USD // 2


@pytest.mark.parametrize("backend_kind", ["fakeredis"])
async def test_retries_are_bounded_and_end_in_unavailable(gate: Gate) -> None:
    async with (
        lossy_server(gate, losses=100) as (address, servicer),
        AsyncClient(address, timeout_s=10, retry=FAST_RETRY) as client,
    ):
        with pytest.raises(UnavailableError, match="the answer was lost"):
            await client.authorize(WALLET, USD // 2)

    assert len(servicer.keys) == FAST_RETRY.attempts_max
    assert len(set(servicer.keys)) == 1
    # Every attempt reached the store, and still only one hold exists.
    assert (await gate.budget(WALLET)).windows[0].held_micros == USD // 2


@pytest.mark.parametrize("backend_kind", ["fakeredis"])
async def test_bad_input_is_not_retried(gate: Gate) -> None:
    async with (
        lossy_server(gate, losses=0) as (address, servicer),
        AsyncClient(address, timeout_s=10, retry=FAST_RETRY) as client,
    ):
        with pytest.raises(NotFoundError):
            await client.authorize("ghost", USD)
        with pytest.raises(InvalidArgumentError):
            await client.authorize(WALLET, 0)

    assert len(servicer.keys) == 2


def test_unreachable_server_is_unavailable_after_bounded_retries() -> None:
    # Nothing listens on port 1: every attempt fails to connect, and the client gives up with UNAVAILABLE.
    with (
        Client("127.0.0.1:1", timeout_s=2, retry=FAST_RETRY) as client,
        pytest.raises(UnavailableError),
    ):
        client.authorize(WALLET, USD)


def test_int64_overflow_is_refused_by_the_client_before_sending() -> None:
    # Beyond int64 a request cannot be encoded at all; the client says so instead of sending something else.
    with (
        Client("127.0.0.1:1", timeout_s=2, retry=FAST_RETRY) as client,
        pytest.raises(InvalidArgumentError, match="outside int64"),
    ):
        client.authorize(WALLET, 2**63)
