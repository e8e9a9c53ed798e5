"""Bounds on everything a client controls: message and metadata size, id and key lengths, holds per wallet,
streams per connection, concurrent calls and watchers. Past a bound a call is refused (INVALID_ARGUMENT or
RESOURCE_EXHAUSTED) and nothing changes; the server keeps answering.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc

from helpers import START_MS, eventually
from spendgate._gen.spendgate.v1 import admin_pb2, billing_pb2, spend_pb2
from spendgate.api.admin import WATCHERS_MAX
from spendgate.clock import ManualClock
from spendgate.domain import ID_LENGTH_MAX, IDEMPOTENCY_KEY_LENGTH_MAX

from .conftest import StartSecured
from .support import BUG_CODES, RPCS, USD, Secured, authorize, call, own_connection

OK = grpc.StatusCode.OK
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
INVALID = grpc.StatusCode.INVALID_ARGUMENT
BUDGET = spend_pb2.GetBudgetRequest(node_id="research-agent-01")
MESSAGE_MAX = 64 * 1024


def padded(message: Any, size: int) -> bytes:
    """``message`` serialized, then padded to exactly ``size`` bytes with an unknown length-delimited field.

    An unknown field decodes fine, so only the size can make the server refuse it.
    """
    body = message.SerializeToString()
    tag = bytes([0x82, 0x7D])  # field 2000, wire type 2 (length-delimited)
    for length_bytes in range(1, 6):
        payload = size - len(body) - len(tag) - length_bytes
        varint = _varint(payload)
        if len(varint) == length_bytes and payload >= 0:
            data = body + tag + varint + b"x" * payload
            assert len(data) == size
            return data
    raise AssertionError(f"cannot pad to {size}")


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


async def still_answers(s: Secured) -> None:
    outcome = await s.call("GetBudget", BUDGET)
    assert outcome.code == OK, f"the server stopped answering: {outcome}"
    async with own_connection(s.address) as fresh:
        outcome = await call(fresh, "GetBudget", BUDGET, s.metadata("root"))
        assert outcome.code == OK, f"a new connection is not answered: {outcome}"


async def test_a_request_over_the_message_bound_is_resource_exhausted_on_every_rpc(
    start_secured: StartSecured,
) -> None:
    s = await start_secured(ledger=True, plan_size_max_bytes=1024 * 1024)
    assert s.server.settings.message_size_max_bytes == MESSAGE_MAX
    before = await s.snapshot()
    wrong = []
    for name, rpc in RPCS.items():
        bound = 1024 * 1024 if name == "ApplyPlan" else MESSAGE_MAX
        sample = rpc.request()
        if name == "AuthorizeStream":
            sample = spend_pb2.AuthorizeStreamRequest(request_id="big", request=authorize("research-agent-01", "big"))
        over = await s.call(name, padded(sample, bound + 1), raw=True)
        if over.code != EXHAUSTED:
            wrong.append(f"{name} at {bound + 1} bytes: {over}")
        # At the bound exactly, the size is not the problem (the request may still be refused for what it says).
        at = await s.call(name, padded(sample, bound), raw=True)
        if at.code == EXHAUSTED or at.code in BUG_CODES:
            wrong.append(f"{name} at {bound} bytes: {at}")
    # Far over the largest bound, the transport refuses it before any handler sees it.
    huge = await s.call("Authorize", padded(authorize("research-agent-01", "huge"), 3 * 1024 * 1024), raw=True)
    if huge.code != EXHAUSTED:
        wrong.append(f"Authorize at 3 MiB: {huge}")
    assert not wrong, "\n".join(wrong)
    await still_answers(s)
    # The in-bound requests at exactly the bound may have acted (an authorization, a freeze...); the oversize
    # ones must not have: replay the oversize ones alone and compare.
    assert before, "the snapshot should hold the fleet's keys"
    settled = await s.snapshot()
    for name, rpc in RPCS.items():
        bound = 1024 * 1024 if name == "ApplyPlan" else MESSAGE_MAX
        await s.call(name, padded(rpc.request(), bound + 1), raw=True)
    assert await s.snapshot() == settled


async def test_oversize_metadata_fails_cleanly_and_the_server_keeps_answering(start_secured: StartSecured) -> None:
    s = await start_secured()
    assert s.server.settings.metadata_size_max_bytes == 8 * 1024
    before = await s.snapshot()
    oversize = {
        "one 16 KiB header": (("x-pad", "a" * 16 * 1024),),
        "one 100 KiB header": (("x-pad", "a" * 100 * 1024),),
        "300 small headers": tuple((f"x-pad-{i}", "a" * 100) for i in range(300)),
        "a 20 KiB bearer token": (("authorization", "Bearer " + "a" * 20 * 1024),),
    }
    for label, extra in oversize.items():
        for name, request in (("GetBudget", BUDGET), ("Authorize", authorize("research-agent-01", f"md-{label}"))):
            outcome = await call(s.channel, name, request, (*s.metadata("root"), *extra))
            assert outcome.code != OK, f"{label} {name} was let in"
            await still_answers(s)
    assert await s.snapshot() == before
    # Under the bound, a long bearer token is simply unknown.
    outcome = await call(s.channel, "GetBudget", BUDGET, (("authorization", "Bearer " + "a" * 4000),))
    assert outcome.code == grpc.StatusCode.UNAUTHENTICATED, outcome


async def test_holds_per_wallet_are_bounded_and_a_refusal_changes_nothing(start_secured: StartSecured) -> None:
    clock = ManualClock(START_MS)
    s = await start_secured(holds_per_wallet_max=3, hold_ttl_s=60, clock=clock)
    held = [await s.hold("agent_a", "research-agent-01", key=f"h-{i}") for i in range(3)]
    before = await s.snapshot()
    over = await s.call("Authorize", authorize("research-agent-01", "h-over"), "agent_a")
    assert over.code == EXHAUSTED, over
    assert "3 open holds" in over.details, over.details
    stream_item = spend_pb2.AuthorizeStreamRequest(request_id="s", request=authorize("research-agent-01", "h-s"))
    over = await s.call("AuthorizeStream", stream_item, "agent_a")
    assert over.code == EXHAUSTED, over
    assert await s.snapshot() == before
    # A retry of a hold made before the bound was reached still gets its first answer.
    again = await s.call("Authorize", authorize("research-agent-01", "h-0"), "agent_a")
    assert again.code == OK, again
    assert again.responses[0].authorization_id == held[0]
    # The bound is per wallet: the next wallet is not affected.
    await s.hold("agent_a2", "sales-agent-01", key="other-wallet")
    # A one-shot opens no hold, so it is not bounded by open holds.
    one_shot = await s.call("Authorize", authorize("research-agent-01", "one-shot", capture=True), "agent_a")
    assert one_shot.code == OK, one_shot
    assert one_shot.responses[0].decision == spend_pb2.DECISION_APPROVED
    # Settling or voiding a hold frees its place; so does expiry (released in the same step as the decision).
    await s.ok("Void", spend_pb2.VoidRequest(authorization_id=held[0]), "agent_a")
    await s.hold("agent_a", "research-agent-01", key="h-3")
    await s.ok(
        "Capture",
        spend_pb2.CaptureRequest(authorization_id=held[1], amount_micros=USD // 20, idempotency_key="c"),
        "agent_a",
    )
    await s.hold("agent_a", "research-agent-01", key="h-4")
    assert (await s.call("Authorize", authorize("research-agent-01", "h-5"), "agent_a")).code == EXHAUSTED
    clock.advance(61_000)
    await s.hold("agent_a", "research-agent-01", key="h-6")
    budget = await s.ok("GetBudget", BUDGET, "agent_a")
    assert budget.windows[0].held_micros == USD // 10


async def test_long_or_malformed_ids_and_keys_are_invalid_argument_everywhere(start_secured: StartSecured) -> None:
    s = await start_secured(ledger=True)
    long_id = "w" * (ID_LENGTH_MAX + 1)
    long_key = "k" * (IDEMPOTENCY_KEY_LENGTH_MAX + 1)
    weird = ["", long_id, "bad id", "wallet\x00", "wallet\n", "välléte", "../acme", "a:b", "{acme}", "-lead"]
    cases: list[tuple[str, Any]] = []
    for node in weird:
        cases += [
            ("Authorize", authorize(node, "k-1")),
            ("GetBudget", spend_pb2.GetBudgetRequest(node_id=node)),
            ("SetLimits", admin_pb2.SetLimitsRequest(node_id=node, limits=admin_pb2.NodeLimits(day_micros=USD))),
            ("FreezeNode", admin_pb2.FreezeNodeRequest(node_id=node, reason="x")),
            ("UnfreezeNode", admin_pb2.UnfreezeNodeRequest(node_id=node)),
            ("DeleteNode", admin_pb2.DeleteNodeRequest(node_id=node)),
            ("MoveNode", admin_pb2.MoveNodeRequest(node_id=node, new_parent_id="acme")),
            (
                "CreateNode",
                admin_pb2.CreateNodeRequest(node_id=node, parent_id="research-agents", kind=spend_pb2.NODE_KIND_WALLET),
            ),
            (
                "CreateNode",
                admin_pb2.CreateNodeRequest(node_id="fresh-1", parent_id=node, kind=spend_pb2.NODE_KIND_WALLET),
            ),
            (
                "CreateToken",
                admin_pb2.CreateTokenRequest(role=admin_pb2.TOKEN_ROLE_AGENT, scope_node_id=node, name="n"),
            ),
            ("RecommendLimits", admin_pb2.RecommendLimitsRequest(account_id=node)),
            ("ListTransactions", billing_pb2.ListTransactionsRequest(node_id=node)),
            ("SpendReport", billing_pb2.SpendReportRequest(node_id=node)),
        ]
        if node:
            cases.append(("ListTokens", admin_pb2.ListTokensRequest(account_id=node)))
            cases.append(("GetTree", admin_pb2.GetTreeRequest(node_id=node)))
    cases += [
        ("Authorize", authorize("research-agent-01", long_key)),
        ("Authorize", authorize("research-agent-01", "has space")),
        ("Authorize", authorize("research-agent-01", "ключ")),
        ("Authorize", authorize("research-agent-01", "k-2", service="s" * 129)),
        ("Authorize", authorize("research-agent-01", "k-3", service="tab\there")),
        ("Authorize", authorize("research-agent-01", "k-4", metadata={"m" * 65: "v"})),
        ("Authorize", authorize("research-agent-01", "k-5", metadata={"k": "v" * 257})),
        ("Authorize", authorize("research-agent-01", "k-6", metadata={f"k{i}": "v" for i in range(17)})),
        ("Authorize", authorize("research-agent-01", "k-7", currency="usd")),
        # A trailing newline is not part of a valid id, key or code (a regex's $ would let it through).
        ("Authorize", authorize("research-agent-01", "key\n")),
        ("Authorize", authorize("research-agent-01", "k-10", currency="USD\n")),
        ("Void", spend_pb2.VoidRequest(authorization_id="acme:" + "0" * 32 + "\n")),
        (
            "Capture",
            spend_pb2.CaptureRequest(authorization_id="acme:" + "0" * 32, amount_micros=1, idempotency_key=long_key),
        ),
        ("Capture", spend_pb2.CaptureRequest(authorization_id="a" * 200, amount_micros=1, idempotency_key="k")),
        ("Void", spend_pb2.VoidRequest(authorization_id="acme:" + "0" * 31 + "\x00")),
        ("Void", spend_pb2.VoidRequest(authorization_id=long_id + ":" + "0" * 32)),
        (
            "AuthorizeStream",
            spend_pb2.AuthorizeStreamRequest(request_id="r" * 129, request=authorize("research-agent-01", "k-8")),
        ),
        ("AuthorizeStream", spend_pb2.AuthorizeStreamRequest(request_id="r", request=authorize(long_id, "k-9"))),
        (
            "CreateToken",
            admin_pb2.CreateTokenRequest(
                role=admin_pb2.TOKEN_ROLE_AGENT, scope_node_id="research-agent-01", name="n" * 65
            ),
        ),
        (
            "CreateToken",
            admin_pb2.CreateTokenRequest(
                role=admin_pb2.TOKEN_ROLE_AGENT, scope_node_id="research-agent-01", name="bell\a"
            ),
        ),
        (
            "SetLimits",
            admin_pb2.SetLimitsRequest(
                node_id="research-agent-01", limits=admin_pb2.NodeLimits(allowed_services=["x" * 129])
            ),
        ),
        (
            "SetLimits",
            admin_pb2.SetLimitsRequest(
                node_id="research-agent-01", limits=admin_pb2.NodeLimits(allowed_services=[f"s{i}" for i in range(65)])
            ),
        ),
    ]
    before = await s.snapshot()
    wrong = []
    for name, request in cases:
        outcome = await s.call(name, request)
        if outcome.code != INVALID:
            wrong.append(f"{name} {request!r:.100}: {outcome}")
    assert not wrong, "\n".join(wrong)
    assert await s.snapshot() == before


async def test_many_streams_on_one_connection_are_bounded_and_the_server_keeps_answering(
    start_secured: StartSecured,
) -> None:
    s = await start_secured(streams_per_connection_max=8)
    release = asyncio.Event()

    async def items(index: int) -> AsyncIterator[spend_pb2.AuthorizeStreamRequest]:
        yield spend_pb2.AuthorizeStreamRequest(
            request_id=f"r{index}", request=authorize("research-agent-01", f"stream-{index}", amount_micros=1)
        )
        await release.wait()

    async with own_connection(s.address) as crowded:
        method = crowded.stream_stream(
            RPCS["AuthorizeStream"].path,
            request_serializer=spend_pb2.AuthorizeStreamRequest.SerializeToString,
            response_deserializer=spend_pb2.AuthorizeStreamResponse.FromString,
        )
        streams = [method(items(i), metadata=s.metadata("agent_a"), timeout=60) for i in range(300)]
        reads = [asyncio.ensure_future(stream.read()) for stream in streams]
        try:
            # Eight streams are served at once; the others wait or are refused, never served past the bound.
            async def answered() -> int:
                return sum(1 for read in reads if read.done() and not read.exception()) >= 8

            await eventually(answered, what="eight streams to be answered")
            await asyncio.sleep(0.3)
            served = [read for read in reads if read.done() and not read.exception()]
            assert len(served) == 8, f"{len(served)} streams were served at once; the bound is 8"
            assert all(read.result().response.decision == spend_pb2.DECISION_APPROVED for read in served)
            # Another connection is answered while this one is full.
            async with own_connection(s.address) as other:
                for _ in range(5):
                    outcome = await call(other, "GetBudget", BUDGET, s.metadata("root"), timeout_s=5)
                    assert outcome.code == OK, outcome
        finally:
            release.set()
        # Once the open streams end, each of the others was either served in turn or refused by HTTP/2
        # (REFUSED_STREAM: UNAVAILABLE, a status clients retry; the grpc client may report a refused stream
        # whose request it was still sending as its own "Internal error from Core").
        await asyncio.wait_for(asyncio.gather(*reads, return_exceptions=True), timeout=60)
        codes = [await stream.code() for stream in streams]
        details = {await stream.details() for stream in streams if await stream.code() == grpc.StatusCode.INTERNAL}
        assert set(codes) <= {OK, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL}, set(codes)
        assert details <= {"Internal error from Core"}, details
        served_total = codes.count(OK)
        assert served_total >= 8
        # The same connection serves new streams afterwards.
        again = await call(
            crowded,
            "AuthorizeStream",
            spend_pb2.AuthorizeStreamRequest(
                request_id="again", request=authorize("research-agent-01", "again", amount_micros=1)
            ),
            s.metadata("agent_a"),
        )
        assert again.code == OK, again
    # Every stream that was answered held its micro-unit, and no refused one did.
    budget = await s.ok("GetBudget", BUDGET)
    assert budget.windows[0].held_micros == served_total + 1
    await still_answers(s)


def hold_open(channel: grpc.aio.Channel, s: Secured, release: asyncio.Event, index: int) -> Any:
    """An AuthorizeStream that authorizes one item, then stays open until ``release`` is set."""

    async def items() -> AsyncIterator[spend_pb2.AuthorizeStreamRequest]:
        yield spend_pb2.AuthorizeStreamRequest(
            request_id=f"r{index}", request=authorize("research-agent-01", f"open-{index}", amount_micros=1)
        )
        await release.wait()

    method = channel.stream_stream(
        RPCS["AuthorizeStream"].path,
        request_serializer=spend_pb2.AuthorizeStreamRequest.SerializeToString,
        response_deserializer=spend_pb2.AuthorizeStreamResponse.FromString,
    )
    return method(items(), metadata=s.metadata("agent_a"), timeout=60)


async def test_calls_past_the_concurrent_call_bound_are_resource_exhausted_until_some_end(
    start_secured: StartSecured,
) -> None:
    bound = 16
    s = await start_secured(concurrent_rpcs_max=bound)
    release = asyncio.Event()
    async with own_connection(s.address) as first, own_connection(s.address) as second:
        streams = [hold_open(first if i % 2 else second, s, release, i) for i in range(bound)]
        try:
            answers = await asyncio.wait_for(asyncio.gather(*(stream.read() for stream in streams)), timeout=10)
            assert all(answer.response.decision == spend_pb2.DECISION_APPROVED for answer in answers)
            async with own_connection(s.address) as other:
                for name, request in (("GetBudget", BUDGET), ("Authorize", authorize("research-agent-01", "x"))):
                    outcome = await call(other, name, request, s.metadata("root"), timeout_s=5)
                    assert outcome.code == EXHAUSTED, f"{name} past the bound: {outcome}"
        finally:
            release.set()
        for stream in streams:
            assert await stream.code() == OK
    await still_answers(s)
    budget = await s.ok("GetBudget", BUDGET)
    assert budget.windows[0].held_micros == bound, "the refused Authorize held nothing"


async def test_watchers_are_bounded_and_a_place_frees_when_one_ends(start_secured: StartSecured) -> None:
    s = await start_secured()
    watch = admin_pb2.WatchEventsRequest()
    async with own_connection(s.address) as watching, own_connection(s.address) as probing:
        method = watching.unary_stream(
            RPCS["WatchEvents"].path,
            request_serializer=admin_pb2.WatchEventsRequest.SerializeToString,
            response_deserializer=admin_pb2.WatchEventsResponse.FromString,
        )
        extra = 4
        watches = [method(watch, metadata=s.metadata("root"), timeout=60) for _ in range(WATCHERS_MAX + extra)]

        async def refused() -> bool:
            return sum(1 for stream in watches if stream.done()) >= extra

        # Exactly the watches past the bound are refused; the others stay open.
        await eventually(refused, what="the watches past the bound to be refused")
        await asyncio.sleep(0.2)
        ended = [stream for stream in watches if stream.done()]
        assert len(ended) == extra, f"{len(ended)} watches ended; {extra} are past the bound"
        assert {await stream.code() for stream in ended} == {EXHAUSTED}
        watches = [stream for stream in watches if not stream.done()]

        async def probe() -> grpc.StatusCode:
            return (await call(probing, "WatchEvents", watch, s.metadata("root"))).code

        over = await call(probing, "WatchEvents", watch, s.metadata("root"))
        assert over.code == EXHAUSTED, over
        assert f"at most {WATCHERS_MAX} watchers" in over.details
        # Other calls are still served while the watchers are full.
        await still_answers(s)
        watches[0].cancel()

        async def free() -> bool:
            return await probe() == OK

        await eventually(free, what="a watcher's place to be free again")
        for stream in watches[1:]:
            stream.cancel()
    await still_answers(s)
