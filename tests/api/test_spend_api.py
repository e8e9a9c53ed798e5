"""Authorize, Capture, Void and GetBudget over real gRPC: the raw stubs, on the embedded store and real Redis."""

from __future__ import annotations

import asyncio

import grpc

from spendgate._gen.spendgate.v1 import admin_pb2, admin_pb2_grpc, spend_pb2

from .support import (
    CALL_TIMEOUT_S,
    HOLD_EXPIRES_AT_MS,
    HOLD_TTL_S,
    TODAY,
    USD,
    WALLET,
    Gate,
    authorize_request,
    rpc_error,
)

APPROVED = spend_pb2.DECISION_APPROVED
DENIED = spend_pb2.DECISION_DENIED


def window(budget: spend_pb2.GetBudgetResponse, which: int) -> spend_pb2.WindowBudget:
    """One window of a budget."""
    (found,) = [w for w in budget.windows if w.window == which]
    return found


async def test_authorize_holds_the_money_and_reports_the_tightest_window(gate: Gate) -> None:
    response = await gate.stub.Authorize(
        authorize_request(amount_micros=USD // 4, metadata={"task": "t-1"}), timeout=CALL_TIMEOUT_S
    )

    assert response.decision == APPROVED
    assert response.authorization_id.startswith("acme:")
    assert response.deny_reason == spend_pb2.DENY_REASON_UNSPECIFIED
    assert not response.HasField("denied_by")
    assert response.hold_state == spend_pb2.HOLD_STATE_HELD
    assert response.hold_expires_at_ms == HOLD_EXPIRES_AT_MS
    assert response.captured_micros == 0
    # The wallet's $50 day is tighter than the pool's $3,000 month and the account's $10,000 month.
    assert response.remaining.node_id == WALLET
    assert response.remaining.window == spend_pb2.WINDOW_DAY
    assert response.remaining.limit_micros == 50 * USD
    assert response.remaining.remaining_micros == 50 * USD - USD // 4
    assert "$0.25" in response.message

    # The hold counts at every level of the chain, in every window, and nowhere else.
    wallet = await gate.budget(WALLET)
    assert wallet.kind == spend_pb2.NODE_KIND_WALLET
    assert (wallet.parent_id, wallet.account_id, wallet.currency) == ("research-agents", "acme", "USD")
    assert wallet.per_transaction_limit_micros == USD
    day = window(wallet, spend_pb2.WINDOW_DAY)
    assert (day.window_id, day.limited, day.limit_micros) == (TODAY, True, 50 * USD)
    assert (day.spent_micros, day.held_micros, day.remaining_micros) == (0, USD // 4, 50 * USD - USD // 4)
    assert [w.held_micros for w in wallet.windows] == [USD // 4] * 4
    pool_month = window(await gate.budget("research-agents"), spend_pb2.WINDOW_MONTH)
    assert (pool_month.held_micros, pool_month.remaining_micros) == (USD // 4, 3000 * USD - USD // 4)
    account_month = window(await gate.budget("acme"), spend_pb2.WINDOW_MONTH)
    assert (account_month.held_micros, account_month.remaining_micros) == (USD // 4, 10_000 * USD - USD // 4)
    other_pool = window(await gate.budget("sales-agents"), spend_pb2.WINDOW_MONTH)
    assert other_pool.held_micros == 0
    assert window(await gate.budget("research-agent-02"), spend_pb2.WINDOW_DAY).held_micros == 0


async def test_capture_settles_part_of_the_hold_and_releases_the_rest(gate: Gate) -> None:
    held = await gate.stub.Authorize(authorize_request(amount_micros=USD // 2), timeout=CALL_TIMEOUT_S)
    request = spend_pb2.CaptureRequest(
        authorization_id=held.authorization_id, amount_micros=300_000, idempotency_key="capture-1"
    )

    captured = await gate.stub.Capture(request, timeout=CALL_TIMEOUT_S)

    assert captured.authorization_id == held.authorization_id
    assert (captured.captured_micros, captured.released_micros) == (300_000, 200_000)
    assert captured.hold_state == spend_pb2.HOLD_STATE_CAPTURED
    for node in (WALLET, "research-agents", "acme"):
        budget = await gate.budget(node)
        assert [(w.spent_micros, w.held_micros) for w in budget.windows] == [(300_000, 0)] * 4, node
    # A retried capture (same key, same amount) answers the same and settles nothing more.
    assert await gate.stub.Capture(request, timeout=CALL_TIMEOUT_S) == captured
    assert window(await gate.budget(WALLET), spend_pb2.WINDOW_DAY).spent_micros == 300_000


async def test_void_releases_the_hold_and_a_repeated_void_answers_the_same(gate: Gate) -> None:
    held = await gate.stub.Authorize(authorize_request(amount_micros=USD), timeout=CALL_TIMEOUT_S)
    request = spend_pb2.VoidRequest(authorization_id=held.authorization_id)

    voided = await gate.stub.Void(request, timeout=CALL_TIMEOUT_S)

    assert voided.authorization_id == held.authorization_id
    assert voided.released_micros == USD
    assert voided.hold_state == spend_pb2.HOLD_STATE_VOIDED
    for node in (WALLET, "research-agents", "acme"):
        budget = await gate.budget(node)
        assert [(w.spent_micros, w.held_micros) for w in budget.windows] == [(0, 0)] * 4, node
    assert await gate.stub.Void(request, timeout=CALL_TIMEOUT_S) == voided


async def test_one_shot_authorization_settles_at_once(gate: Gate) -> None:
    response = await gate.stub.Authorize(
        authorize_request(amount_micros=USD // 10, capture=True), timeout=CALL_TIMEOUT_S
    )

    assert response.decision == APPROVED
    assert response.hold_state == spend_pb2.HOLD_STATE_CAPTURED
    assert response.captured_micros == USD // 10
    assert response.hold_expires_at_ms == 0
    assert response.remaining.remaining_micros == 50 * USD - USD // 10
    day = window(await gate.budget(WALLET), spend_pb2.WINDOW_DAY)
    assert (day.spent_micros, day.held_micros) == (USD // 10, 0)
    # Nothing is left to capture or void.
    error = await rpc_error(
        gate.stub.Void(spend_pb2.VoidRequest(authorization_id=response.authorization_id), timeout=CALL_TIMEOUT_S)
    )
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_per_transaction_denial_names_the_wallet_and_holds_nothing(gate: Gate) -> None:
    response = await gate.stub.Authorize(authorize_request(amount_micros=USD + 1), timeout=CALL_TIMEOUT_S)

    assert response.decision == DENIED
    assert response.deny_reason == spend_pb2.DENY_REASON_PER_TRANSACTION_LIMIT
    assert response.denied_by.node_id == WALLET
    assert response.denied_by.window == spend_pb2.WINDOW_UNSPECIFIED
    assert response.authorization_id == ""
    assert response.hold_state == spend_pb2.HOLD_STATE_UNSPECIFIED
    assert response.hold_expires_at_ms == 0
    assert response.remaining.remaining_micros == 50 * USD
    assert "per-transaction limit" in response.message
    assert [w.held_micros + w.spent_micros for w in (await gate.budget(WALLET)).windows] == [0] * 4


async def test_concurrent_spend_stops_exactly_at_the_wallets_day_limit(gate: Gate) -> None:
    # content-agent-01 may spend $20 a day, at most $1 at a time: 25 concurrent $1 one-shots, 20 approved.
    responses = await asyncio.gather(
        *(
            gate.stub.Authorize(
                authorize_request("content-agent-01", USD, capture=True, idempotency_key=f"k{i}"),
                timeout=CALL_TIMEOUT_S,
            )
            for i in range(25)
        )
    )

    approved = [r for r in responses if r.decision == APPROVED]
    denied = [r for r in responses if r.decision == DENIED]
    assert len(approved) == 20
    assert len({r.authorization_id for r in approved}) == 20
    for response in denied:
        assert response.deny_reason == spend_pb2.DENY_REASON_WINDOW_LIMIT
        assert (response.denied_by.node_id, response.denied_by.window) == ("content-agent-01", spend_pb2.WINDOW_DAY)
        assert response.remaining.remaining_micros == 0
    day = window(await gate.budget("content-agent-01"), spend_pb2.WINDOW_DAY)
    assert (day.spent_micros, day.remaining_micros) == (20 * USD, 0)
    pool_month = window(await gate.budget("content-agents"), spend_pb2.WINDOW_MONTH)
    assert pool_month.spent_micros == 20 * USD


async def test_expired_holds_stop_counting_against_new_authorizations(gate: Gate) -> None:
    for i in range(20):
        held = await gate.stub.Authorize(
            authorize_request("content-agent-02", USD, idempotency_key=f"hold-{i}"), timeout=CALL_TIMEOUT_S
        )
        assert held.decision == APPROVED
    blocked = await gate.stub.Authorize(
        authorize_request("content-agent-02", USD, idempotency_key="blocked"), timeout=CALL_TIMEOUT_S
    )
    assert (blocked.decision, blocked.deny_reason) == (DENIED, spend_pb2.DENY_REASON_WINDOW_LIMIT)

    gate.clock.advance(HOLD_TTL_S * 1000 + 1)

    after = await gate.stub.Authorize(
        authorize_request("content-agent-02", USD, idempotency_key="after-expiry"), timeout=CALL_TIMEOUT_S
    )
    assert after.decision == APPROVED
    day = window(await gate.budget("content-agent-02"), spend_pb2.WINDOW_DAY)
    assert (day.spent_micros, day.held_micros) == (0, USD)


async def test_a_frozen_pool_denies_its_wallets(gate: Gate) -> None:
    admin = admin_pb2_grpc.AdminServiceStub(gate.channel)
    await admin.FreezeNode(
        admin_pb2.FreezeNodeRequest(node_id="research-agents", reason="incident 42"), timeout=CALL_TIMEOUT_S
    )

    response = await gate.stub.Authorize(authorize_request(), timeout=CALL_TIMEOUT_S)

    assert response.decision == DENIED
    assert response.deny_reason == spend_pb2.DENY_REASON_FROZEN
    assert response.denied_by.node_id == "research-agents"
    assert "frozen" in response.message
    assert (await gate.stub.Authorize(authorize_request("sales-agent-01"), timeout=CALL_TIMEOUT_S)).decision == APPROVED


async def test_a_replayed_request_returns_the_first_answer_and_charges_once(gate: Gate) -> None:
    request = authorize_request(amount_micros=USD // 2, idempotency_key="replay-me", metadata={"a": "b"})
    first = await gate.stub.Authorize(request, timeout=CALL_TIMEOUT_S)

    replays = await asyncio.gather(*(gate.stub.Authorize(request, timeout=CALL_TIMEOUT_S) for _ in range(5)))

    assert first.decision == APPROVED
    assert all(replay == first for replay in replays)
    day = window(await gate.budget(WALLET), spend_pb2.WINDOW_DAY)
    assert day.held_micros == USD // 2
    # The key is scoped to its wallet: another wallet may use the same key for its own request.
    other = await gate.stub.Authorize(
        authorize_request("research-agent-02", USD // 2, idempotency_key="replay-me", metadata={"a": "b"}),
        timeout=CALL_TIMEOUT_S,
    )
    assert other.decision == APPROVED
    assert other.authorization_id != first.authorization_id
