"""AuthorizeStream: every item answered once by its id, limits held across concurrent items, a bounded number
of decisions in flight, and bad items answered one by one while the stream goes on."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc

from helpers import USD
from spendgate._gen.spendgate.v1 import spend_pb2
from spendgate.api.auth import Authenticator
from spendgate.api.spend import SpendServicer
from spendgate.domain import AuthorizeCommand, AuthorizeResult, Decision

from .support import CALL_TIMEOUT_S, WALLET, Gate, authorize_request


async def exchange(gate: Gate, items: list[spend_pb2.AuthorizeStreamRequest]) -> list[Any]:
    """Write every item, then read every answer until the server ends the stream."""

    async def requests() -> AsyncIterator[spend_pb2.AuthorizeStreamRequest]:
        for item in items:
            yield item

    call = gate.stub.AuthorizeStream(requests(), timeout=CALL_TIMEOUT_S)
    return [answer async for answer in call]


async def test_a_stream_decides_every_item_once_and_never_past_a_limit(gate: Gate) -> None:
    # research-agent-01 may spend $50 a day: 250 one-shot items of $0.25 are 200 approvals and 50 denials.
    items = [
        spend_pb2.AuthorizeStreamRequest(
            request_id=f"r-{n}",
            request=authorize_request(amount_micros=USD // 4, idempotency_key=f"stream-{n}", capture=True),
        )
        for n in range(250)
    ]
    answers = await exchange(gate, items)

    assert sorted(answer.request_id for answer in answers) == sorted(item.request_id for item in items)
    assert all(answer.error_code == 0 for answer in answers)
    decisions = [answer.response.decision for answer in answers]
    assert decisions.count(spend_pb2.DECISION_APPROVED) == 200
    denied = [answer.response for answer in answers if answer.response.decision == spend_pb2.DECISION_DENIED]
    assert len(denied) == 50
    assert {(response.denied_by.node_id, response.denied_by.window) for response in denied} == {
        (WALLET, spend_pb2.WINDOW_DAY)
    }
    day = next(w for w in (await gate.budget(WALLET)).windows if w.window == spend_pb2.WINDOW_DAY)
    assert (day.spent_micros, day.held_micros) == (50 * USD, 0)


async def test_bad_items_are_answered_one_by_one_and_the_stream_goes_on(gate: Gate) -> None:
    items = [
        spend_pb2.AuthorizeStreamRequest(request_id="", request=authorize_request(idempotency_key="s-1")),
        spend_pb2.AuthorizeStreamRequest(request_id="r" * 129, request=authorize_request(idempotency_key="s-2")),
        spend_pb2.AuthorizeStreamRequest(
            request_id="negative", request=authorize_request(amount_micros=-5, idempotency_key="s-3")
        ),
        spend_pb2.AuthorizeStreamRequest(request_id="good", request=authorize_request(idempotency_key="s-4")),
        spend_pb2.AuthorizeStreamRequest(
            request_id="no-such-wallet", request=authorize_request("nobody", idempotency_key="s-5")
        ),
    ]
    answers = {answer.request_id: answer for answer in await exchange(gate, items)}

    invalid = grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert answers[""].error_code == invalid
    assert "request_id must be 1 to 128 characters" in answers[""].error_message
    assert answers["r" * 128].error_code == invalid
    assert answers["negative"].error_code == invalid
    assert answers["no-such-wallet"].error_code == grpc.StatusCode.NOT_FOUND.value[0]
    assert answers["good"].error_code == 0
    assert answers["good"].response.decision == spend_pb2.DECISION_APPROVED
    assert len(answers) == 5


class _GatedCore:
    """A core whose decisions wait for a gate, counting how many are in progress at once."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.running = 0
        self.most_running = 0

    async def authorize(self, command: AuthorizeCommand, *, token_mode: str = "") -> AuthorizeResult:
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        await self.gate.wait()
        self.running -= 1
        return AuthorizeResult(decision=Decision.APPROVED, authorization_id=f"acme:{command.idempotency_key}")


class _Context:
    def invocation_metadata(self) -> tuple[()]:
        return ()


async def test_at_most_the_bound_of_decisions_are_in_flight_and_all_are_answered() -> None:
    core = _GatedCore()
    auth = Authenticator(store=None, enabled=False, root_token="")  # type: ignore[arg-type]
    servicer = SpendServicer(core, auth, stream_in_flight_max=3)  # type: ignore[arg-type]
    items = [
        spend_pb2.AuthorizeStreamRequest(request_id=f"r-{n}", request=authorize_request(idempotency_key=f"k-{n}"))
        for n in range(20)
    ]

    async def requests() -> AsyncIterator[spend_pb2.AuthorizeStreamRequest]:
        for item in items:
            yield item

    answers: list[spend_pb2.AuthorizeStreamResponse] = []

    async def consume() -> None:
        async for answer in servicer.AuthorizeStream(requests(), _Context()):  # type: ignore[arg-type]
            answers.append(answer)

    consumer = asyncio.create_task(consume())
    for _ in range(50):
        await asyncio.sleep(0)
    assert core.running == 3
    assert answers == []
    core.gate.set()
    await asyncio.wait_for(consumer, CALL_TIMEOUT_S)

    assert core.most_running == 3
    assert sorted(answer.request_id for answer in answers) == sorted(item.request_id for item in items)
    assert {answer.response.authorization_id for answer in answers} == {f"acme:k-{n}" for n in range(20)}
