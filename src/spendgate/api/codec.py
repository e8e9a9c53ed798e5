"""Conversions between proto messages and domain values, both ways (the server encodes, the client decodes)."""

from __future__ import annotations

from spendgate._gen.spendgate.v1 import spend_pb2
from spendgate.domain import (
    AuthorizeResult,
    CaptureResult,
    Decision,
    DenyReason,
    HoldState,
    NodeBudget,
    NodeKind,
    NodeWindow,
    RemainingBudget,
    VoidResult,
    Window,
    WindowBudget,
)


def encode_authorize(result: AuthorizeResult) -> spend_pb2.AuthorizeResponse:
    """Encode a decision."""
    response = spend_pb2.AuthorizeResponse(
        decision=int(result.decision),  # type: ignore[arg-type]
        authorization_id=result.authorization_id,
        deny_reason=int(result.deny_reason),  # type: ignore[arg-type]
        hold_expires_at_ms=result.hold_expires_at_ms,
        hold_state=int(result.hold_state),  # type: ignore[arg-type]
        message=result.message,
        captured_micros=result.captured_micros,
    )
    if result.denied_by is not None:
        response.denied_by.node_id = result.denied_by.node_id
        response.denied_by.window = int(result.denied_by.window)  # type: ignore[assignment]
    if result.would_deny_by is not None:
        response.would_deny_reason = int(result.would_deny_reason)  # type: ignore[assignment]
        response.would_deny_by.node_id = result.would_deny_by.node_id
        response.would_deny_by.window = int(result.would_deny_by.window)  # type: ignore[assignment]
    if result.remaining is not None:
        response.remaining.node_id = result.remaining.node_id
        response.remaining.window = int(result.remaining.window)  # type: ignore[assignment]
        response.remaining.limit_micros = result.remaining.limit_micros
        response.remaining.remaining_micros = result.remaining.remaining_micros
    return response


def encode_budget(budget: NodeBudget) -> spend_pb2.GetBudgetResponse:
    """Encode a node's budget."""
    return spend_pb2.GetBudgetResponse(
        node_id=budget.node_id,
        kind=int(budget.kind),  # type: ignore[arg-type]
        parent_id=budget.parent_id or "",
        account_id=budget.account_id,
        currency=budget.currency,
        time_zone=budget.time_zone,
        frozen=budget.frozen,
        frozen_reason=budget.frozen_reason,
        per_transaction_limit_micros=budget.per_transaction_micros or 0,
        velocity_per_minute=budget.velocity_per_minute or 0,
        velocity_used=budget.velocity_used,
        allowed_services=list(budget.allowed_services),
        windows=[
            spend_pb2.WindowBudget(
                window=int(window.window),  # type: ignore[arg-type]
                window_id=window.window_id,
                limited=window.limit_micros is not None,
                limit_micros=window.limit_micros or 0,
                spent_micros=window.spent_micros,
                held_micros=window.held_micros,
                remaining_micros=window.remaining_micros or 0,
                ends_at_ms=window.ends_at_ms,
            )
            for window in budget.windows
        ],
    )


def decode_authorize(response: spend_pb2.AuthorizeResponse) -> AuthorizeResult:
    """Decode a decision."""
    return AuthorizeResult(
        decision=Decision(response.decision),
        authorization_id=response.authorization_id,
        deny_reason=DenyReason(response.deny_reason),
        denied_by=NodeWindow(response.denied_by.node_id, Window(response.denied_by.window))
        if response.HasField("denied_by")
        else None,
        remaining=RemainingBudget(
            response.remaining.node_id,
            Window(response.remaining.window),
            response.remaining.limit_micros,
            response.remaining.remaining_micros,
        )
        if response.HasField("remaining")
        else None,
        hold_expires_at_ms=response.hold_expires_at_ms,
        hold_state=HoldState(response.hold_state),
        captured_micros=response.captured_micros,
        message=response.message,
        would_deny_reason=DenyReason(response.would_deny_reason),
        would_deny_by=NodeWindow(response.would_deny_by.node_id, Window(response.would_deny_by.window))
        if response.HasField("would_deny_by")
        else None,
    )


def decode_capture(response: spend_pb2.CaptureResponse) -> CaptureResult:
    """Decode a capture."""
    return CaptureResult(
        response.authorization_id,
        response.captured_micros,
        response.released_micros,
        HoldState(response.hold_state),
    )


def decode_void(response: spend_pb2.VoidResponse) -> VoidResult:
    """Decode a void."""
    return VoidResult(response.authorization_id, response.released_micros, HoldState(response.hold_state))


def decode_budget(response: spend_pb2.GetBudgetResponse) -> NodeBudget:
    """Decode a node's budget."""
    return NodeBudget(
        node_id=response.node_id,
        kind=NodeKind(response.kind),
        parent_id=response.parent_id or None,
        account_id=response.account_id,
        currency=response.currency,
        time_zone=response.time_zone,
        frozen_reason=response.frozen_reason,
        per_transaction_micros=response.per_transaction_limit_micros or None,
        velocity_per_minute=response.velocity_per_minute or None,
        velocity_used=response.velocity_used,
        allowed_services=tuple(response.allowed_services),
        windows=tuple(
            WindowBudget(
                window=Window(window.window),
                window_id=window.window_id,
                limit_micros=window.limit_micros if window.limited else None,
                spent_micros=window.spent_micros,
                held_micros=window.held_micros,
                ends_at_ms=window.ends_at_ms,
            )
            for window in response.windows
        ),
    )
