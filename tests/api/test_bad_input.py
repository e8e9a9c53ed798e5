"""Bad input over real gRPC: the right status code, a message that says what to fix, and no state change.

Each row prepares what it needs (a hold, a voided hold, ...), snapshots every key under the server's prefix,
makes the bad call, and snapshots again: the two must be identical.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest

from spendgate._gen.spendgate.v1 import spend_pb2
from spendgate.money import MONEY_MICROS_MAX

from .support import CALL_TIMEOUT_S, HOLD_TTL_S, USD, WALLET, Gate, authorize_request, rpc_error

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
HELD_MICROS = USD // 2
UNKNOWN_AUTHORIZATION = "acme:" + "0" * 32


async def nothing(gate: Gate) -> str:
    return ""


async def held(gate: Gate) -> str:
    """An open hold of $0.50; returns its authorization id."""
    response = await gate.stub.Authorize(
        authorize_request(amount_micros=HELD_MICROS, idempotency_key="setup-hold"), timeout=CALL_TIMEOUT_S
    )
    assert response.decision == spend_pb2.DECISION_APPROVED
    return str(response.authorization_id)


async def voided(gate: Gate) -> str:
    authorization_id = await held(gate)
    await gate.stub.Void(spend_pb2.VoidRequest(authorization_id=authorization_id), timeout=CALL_TIMEOUT_S)
    return authorization_id


async def captured(gate: Gate) -> str:
    authorization_id = await held(gate)
    await gate.stub.Capture(capture(authorization_id, 300_000, "first-capture"), timeout=CALL_TIMEOUT_S)
    return authorization_id


async def expired(gate: Gate) -> str:
    """A hold whose time ran out, already released by a sweep (so the bad call itself has nothing to release)."""
    authorization_id = await held(gate)
    gate.clock.advance(HOLD_TTL_S * 1000 + 1)
    await gate.server.core.sweep()
    day = (await gate.budget(WALLET)).windows[0]
    assert (day.held_micros, day.spent_micros) == (0, 0), "the sweep should have released the expired hold"
    return authorization_id


async def key_used(gate: Gate) -> str:
    response = await gate.stub.Authorize(
        authorize_request(amount_micros=USD // 4, idempotency_key="reused"), timeout=CALL_TIMEOUT_S
    )
    assert response.decision == spend_pb2.DECISION_APPROVED
    return ""


def capture(authorization_id: str, amount_micros: int = 100_000, key: str = "capture-key") -> spend_pb2.CaptureRequest:
    return spend_pb2.CaptureRequest(authorization_id=authorization_id, amount_micros=amount_micros, idempotency_key=key)


Call = Callable[[Gate, str], Awaitable[Any]]


def authorize(**fields: Any) -> Call:
    return lambda gate, _: gate.stub.Authorize(authorize_request(**fields), timeout=CALL_TIMEOUT_S)


def capturing(amount_micros: int = 100_000, key: str = "capture-key", authorization_id: str | None = None) -> Call:
    return lambda gate, prepared: gate.stub.Capture(
        capture(prepared if authorization_id is None else authorization_id, amount_micros, key),
        timeout=CALL_TIMEOUT_S,
    )


def voiding(authorization_id: str | None = None) -> Call:
    return lambda gate, prepared: gate.stub.Void(
        spend_pb2.VoidRequest(authorization_id=prepared if authorization_id is None else authorization_id),
        timeout=CALL_TIMEOUT_S,
    )


def budget(node_id: str) -> Call:
    return lambda gate, _: gate.stub.GetBudget(spend_pb2.GetBudgetRequest(node_id=node_id), timeout=CALL_TIMEOUT_S)


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    call: Call
    code: grpc.StatusCode
    # Every fragment must appear in the status message: together they say what is wrong and what to do.
    fragments: tuple[str, ...]
    setup: Callable[[Gate], Awaitable[str]] = nothing


CASES = [
    # Authorize: ids.
    Case("empty wallet", authorize(wallet_id=""), INVALID, ("wallet_id is required",)),
    Case("unknown wallet", authorize(wallet_id="ghost-agent"), NOT_FOUND, ("no wallet 'ghost-agent'", "apply a plan")),
    Case(
        "pool as wallet",
        authorize(wallet_id="research-agents"),
        INVALID,
        ("'research-agents' is a pool, not a wallet", "spend from wallets"),
    ),
    Case("account as wallet", authorize(wallet_id="acme"), INVALID, ("'acme' is an account, not a wallet",)),
    Case(
        "oversize wallet id",
        authorize(wallet_id="w" * 65),
        INVALID,
        ("wallet_id is 65 characters long", "the limit is 64"),
    ),
    Case(
        "wallet id with a space",
        authorize(wallet_id="research agent"),
        INVALID,
        ("wallet_id 'research agent' may only hold letters, digits",),
    ),
    # Authorize: amounts.
    Case(
        "zero amount", authorize(amount_micros=0), INVALID, ("amount_micros must be positive (got 0)", "$1 = 1000000")
    ),
    Case("negative amount", authorize(amount_micros=-USD), INVALID, ("amount_micros must be positive (got -1000000)",)),
    Case(
        "amount over the max",
        authorize(amount_micros=MONEY_MICROS_MAX + 1),
        INVALID,
        (f"amount_micros {MONEY_MICROS_MAX + 1} is above the largest amount accepted ({MONEY_MICROS_MAX})",),
    ),
    Case("largest int64 amount", authorize(amount_micros=2**63 - 1), INVALID, ("above the largest amount accepted",)),
    Case("smallest int64 amount", authorize(amount_micros=-(2**63)), INVALID, ("amount_micros must be positive",)),
    # Authorize: currency.
    Case(
        "wrong currency",
        authorize(currency="EUR"),
        INVALID,
        ("currency 'EUR' is not the currency of account 'acme' (USD)",),
    ),
    Case("lower-case currency", authorize(currency="usd"), INVALID, ("currency 'usd' is not an ISO 4217 code",)),
    Case("empty currency", authorize(currency=""), INVALID, ("currency is required", "such as USD")),
    # Authorize: idempotency keys.
    Case("missing idempotency key", authorize(idempotency_key=""), INVALID, ("idempotency_key is required", "UUID")),
    Case(
        "oversize idempotency key",
        authorize(idempotency_key="k" * 129),
        INVALID,
        ("idempotency_key is 129 characters long", "the limit is 128"),
    ),
    Case(
        "idempotency key with a space",
        authorize(idempotency_key="my key"),
        INVALID,
        ("idempotency_key may only hold printable ASCII characters without spaces",),
    ),
    Case(
        "non-ASCII idempotency key",
        authorize(idempotency_key="clé"),
        INVALID,
        ("idempotency_key may only hold printable ASCII characters",),
    ),
    Case(
        "idempotency key reused with another amount",
        authorize(amount_micros=USD // 2, idempotency_key="reused"),
        grpc.StatusCode.ALREADY_EXISTS,
        ("idempotency_key 'reused' was already used for a different request", "use a new key"),
        setup=key_used,
    ),
    Case(
        "idempotency key reused as a one-shot",
        authorize(amount_micros=USD // 4, idempotency_key="reused", capture=True),
        grpc.StatusCode.ALREADY_EXISTS,
        ("was already used for a different request",),
        setup=key_used,
    ),
    # Authorize: metadata and service.
    Case(
        "too many metadata entries",
        authorize(metadata={f"k{i}": "v" for i in range(17)}),
        INVALID,
        ("metadata has 17 entries", "the limit is 16"),
    ),
    Case(
        "oversize metadata value",
        authorize(metadata={"task": "v" * 257}),
        INVALID,
        ("metadata value of 'task' is 257 characters long", "the limit is 256"),
    ),
    Case(
        "oversize metadata key",
        authorize(metadata={"k" * 65: "v"}),
        INVALID,
        ("metadata keys must be 1 to 64 characters long",),
    ),
    Case("empty metadata key", authorize(metadata={"": "v"}), INVALID, ("metadata keys must be 1 to 64 characters",)),
    Case(
        "oversize service",
        authorize(service="s" * 129),
        INVALID,
        ("service is 129 characters long", "the limit is 128"),
    ),
    # Capture.
    Case(
        "capture above the hold",
        capturing(HELD_MICROS + 1),
        INVALID,
        (f"cannot capture {HELD_MICROS + 1} micros", f"only {HELD_MICROS} micros are held"),
        setup=held,
    ),
    Case("capture of zero", capturing(0), INVALID, ("amount_micros must be positive (got 0)",), setup=held),
    Case("capture without a key", capturing(key=""), INVALID, ("idempotency_key is required",), setup=held),
    Case("capture after void", capturing(), PRECONDITION, ("it was voided",), setup=voided),
    Case(
        "capture after expiry",
        capturing(),
        PRECONDITION,
        ("its hold expired and the money was released", "authorize again"),
        setup=expired,
    ),
    Case(
        "second capture with another key",
        capturing(300_000, "second-capture"),
        PRECONDITION,
        ("already captured (300000 micros) by another request", "captured or voided once"),
        setup=captured,
    ),
    Case(
        "second capture with the same key and another amount",
        capturing(200_000, "first-capture"),
        PRECONDITION,
        ("already captured",),
        setup=captured,
    ),
    Case(
        "capture of a malformed id",
        capturing(authorization_id="not-an-id"),
        INVALID,
        ("authorization_id 'not-an-id' is malformed", "pass the id Authorize returned"),
    ),
    Case(
        "capture of an empty id",
        capturing(authorization_id=""),
        INVALID,
        ("authorization_id is required", "pass the id Authorize returned"),
    ),
    Case(
        "capture of an oversize id",
        capturing(authorization_id="a" * 200 + ":" + "0" * 32),
        INVALID,
        ("is malformed",),
    ),
    Case(
        "capture of an unknown id",
        capturing(authorization_id=UNKNOWN_AUTHORIZATION),
        NOT_FOUND,
        (f"no authorization {UNKNOWN_AUTHORIZATION!r}",),
    ),
    Case(
        "capture of an id in an unknown account",
        capturing(authorization_id="nobody:" + "f" * 32),
        NOT_FOUND,
        ("no authorization",),
    ),
    # Void.
    Case("void after capture", voiding(), PRECONDITION, ("cannot void", "already captured"), setup=captured),
    Case("void after expiry", voiding(), PRECONDITION, ("its hold expired",), setup=expired),
    Case("void of a malformed id", voiding("acme:xyz"), INVALID, ("is malformed",)),
    Case("void of an unknown id", voiding(UNKNOWN_AUTHORIZATION), NOT_FOUND, ("no authorization",)),
    # GetBudget.
    Case("budget of an empty id", budget(""), INVALID, ("node_id is required",)),
    Case("budget of an unknown node", budget("ghost"), NOT_FOUND, ("no node 'ghost'",)),
]


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
async def test_bad_input_is_refused_with_what_to_fix_and_changes_nothing(gate: Gate, case: Case) -> None:
    prepared = await case.setup(gate)
    before = await gate.snapshot()

    error = await rpc_error(case.call(gate, prepared))

    after = await gate.snapshot()
    assert error.code() == case.code, error.details()
    for fragment in case.fragments:
        assert fragment in (error.details() or ""), f"{fragment!r} not in {error.details()!r}"
    assert before, "the snapshot should hold the fleet's keys"
    assert after == before


async def test_capture_after_expiry_releases_the_hold_as_the_sweeper_would(gate: Gate) -> None:
    # Without a sweep first, the late capture itself finds the hold expired: it is refused, and the money goes
    # back to every level (the only change a refused call makes).
    authorization_id = await held(gate)
    gate.clock.advance(HOLD_TTL_S * 1000 + 1)

    error = await rpc_error(gate.stub.Capture(capture(authorization_id), timeout=CALL_TIMEOUT_S))

    assert error.code() == PRECONDITION
    assert "expired" in (error.details() or "")
    for node in (WALLET, "research-agents", "acme"):
        assert [(w.spent_micros, w.held_micros) for w in (await gate.budget(node)).windows] == [(0, 0)] * 4


async def test_the_snapshot_sees_what_a_successful_call_changes(gate: Gate) -> None:
    # The control for the table above: an accepted request must show up in the snapshot.
    before = await gate.snapshot()

    await gate.stub.Authorize(authorize_request(), timeout=CALL_TIMEOUT_S)

    assert await gate.snapshot() != before
