"""Fuzzing with hypothesis: random and adversarial requests to every RPC never fail internally, and invalid
requests mixed into a run of valid ones leave Redis and the ledger exactly as the valid ones alone do.

Requests are drawn from the proto descriptors (every field of every request type: huge and negative int64s,
NaN and infinite doubles, unknown enum values, unicode and control characters, empty and oversize strings,
the ids of real nodes, holds and tokens), sent with any token (none, garbage, agents, readers, admins of
either account, root). Raw bytes go through a generic channel with identity serializers: random bytes,
truncated requests, and requests of another RPC's type.

A failure prints the hypothesis blob to reproduce it; examples are kept modest so the suite stays fast.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from typing import Any

import grpc
import pytest
import yaml
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st

from helpers import START_MS
from spendgate._gen.spendgate.v1 import admin_pb2, billing_pb2, spend_pb2
from spendgate.api.auth import issue_token
from spendgate.clock import ManualClock
from spendgate.ledger import LedgerWriter
from spendgate.money import MONEY_MICROS_MAX
from spendgate.plan import parse_plan

from .conftest import StartSecured
from .support import BUG_CODES, RPCS, USD, Issued, Outcome, Secured, authorize, bearer, call

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
# Shrinking a failure of these tests can take hypothesis's whole five-minute budget (each example replays
# dozens of calls on servers whose state moves on). A failure is reported unshrunk, with the blob to reproduce
# it; set SPENDGATE_HYPOTHESIS_SHRINK=1 to get a minimal example while debugging.
PHASES = (
    tuple(Phase)
    if os.environ.get("SPENDGATE_HYPOTHESIS_SHRINK")
    else (Phase.explicit, Phase.reuse, Phase.generate, Phase.target)
)
FUZZ_SETTINGS = settings(
    max_examples=20,
    deadline=None,
    phases=PHASES,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
# A watch that is let in stays open; the fuzz only needs to see that it was not refused with a bug status.
WATCH_OPEN_S = 0.05

# ---------------------------------------------------------------------------------------------------------
# Values.

INT64 = st.one_of(
    st.integers(INT64_MIN, INT64_MAX),
    st.integers(-3, 3 * USD),
    st.sampled_from([INT64_MIN, INT64_MAX, MONEY_MICROS_MAX, MONEY_MICROS_MAX + 1, 2**53, 2**53 + 1, -(2**53)]),
)
INT32 = st.one_of(st.integers(INT32_MIN, INT32_MAX), st.integers(-3, 1001), st.sampled_from([INT32_MIN, INT32_MAX]))
DOUBLE = st.floats(allow_nan=True, allow_infinity=True)
UNICODE = st.text(max_size=40)
CONTROL = st.text(st.characters(codec="utf-8", categories=["Cc", "Cf", "Zs", "Zl", "Zp"]), min_size=1, max_size=8)
NASTY = st.sampled_from(
    [
        "",
        " ",
        "\x00",
        "acme\n",
        "acme\x00",
        "ACME",
        "../acme",
        "acme:",
        ":",
        "{acme}",
        "*",
        "%",
        "research-agent-01 ",
        "rëséarch",
        "𝕒𝕔𝕞𝕖",
        "\u202eacme",
        "a" * 64,
        "a" * 65,
        "k" * 128,
        "k" * 129,
        "s" * 257,
        "x" * 5000,
    ]
)


def text_of(known: list[str]) -> st.SearchStrategy[str]:
    """Strings a field may get: real ids, their near misses, and anything."""
    base = st.sampled_from(known)
    near = st.tuples(base, CONTROL | NASTY).map(lambda pair: pair[0] + pair[1])
    # Real ids come up most, so requests get past validation to the checks behind it.
    return st.one_of(base, base, base, near, NASTY, UNICODE, CONTROL)


def plan_documents(known: list[str]) -> st.SearchStrategy[str]:
    """YAML text for ApplyPlan: plan-shaped documents with wrong types and values, and plain garbage."""
    scalar = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(INT64_MIN, INT64_MAX),
        st.floats(allow_nan=True, allow_infinity=True),
        text_of(known),
        st.sampled_from(["50", "0.25", "$3,000", "-1", "1e30", "USD", "UTC", "Mars/Olympus", "nan"]),
    )
    keys = st.sampled_from(
        [
            "account",
            "pools",
            "wallets",
            "id",
            "limits",
            "currency",
            "time_zone",
            "day",
            "week",
            "month",
            "total",
            "per_transaction",
            "velocity_per_minute",
            "allowed_services",
            "frozen",
            "shadow",
            "breaker",
            "multiplier",
            "recent_minutes",
            "trailing_minutes",
            "min_spend",
            "bogus",
        ]
    )
    tree = st.recursive(
        scalar,
        lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(keys, children, max_size=5)),
        max_leaves=25,
    )
    document = st.dictionaries(st.sampled_from(["account", "pools", "wallets", "bogus"]), tree, max_size=3)
    dumped = st.one_of(document, tree).map(lambda value: yaml.safe_dump(value, allow_unicode=True))
    return st.one_of(dumped, UNICODE, st.sampled_from(["[", "{a: [", "!!python/object:os.system {}", "&a [*a]"]))


def message_of(descriptor: Descriptor, known: dict[str, list[str]], depth: int = 0) -> st.SearchStrategy[Any]:
    """Any message of this type: every field set, to a plausible value of its type most of the time and to
    an adversarial one otherwise (so that some requests get past validation to the checks behind it)."""
    cls = message_factory.GetMessageClass(descriptor)
    text = text_of(known["all"])
    fields: dict[str, st.SearchStrategy[Any]] = {}
    for field in descriptor.fields:
        value: st.SearchStrategy[Any]
        if field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type.GetOptions().map_entry:
            small = st.text(st.characters(codec="ascii", categories=["L", "N"]), min_size=1, max_size=8)
            fields[field.name] = st.one_of(
                st.dictionaries(small, small, max_size=3), st.dictionaries(text, text, max_size=20)
            )
            continue
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            if depth >= 2:
                continue
            value = message_of(field.message_type, known, depth + 1)
        elif field.type == FieldDescriptor.TYPE_STRING:
            if field.name == "plan_yaml":
                value = plan_documents(known["all"])
            elif field.name == "currency":
                value = st.one_of(st.just("USD"), st.just("USD"), text)
            elif field.name in PLAUSIBLE:
                value = st.one_of(st.sampled_from(known[PLAUSIBLE[field.name]]), text)
            else:
                value = text
        elif field.type == FieldDescriptor.TYPE_INT64:
            value = st.one_of(st.integers(1, USD), st.integers(1, USD), INT64)
        elif field.type == FieldDescriptor.TYPE_INT32:
            value = st.one_of(st.integers(0, 100), INT32)
        elif field.type == FieldDescriptor.TYPE_ENUM:
            defined = [number.number for number in field.enum_type.values]
            value = st.one_of(st.sampled_from(defined), st.sampled_from(defined), INT32)
        elif field.type == FieldDescriptor.TYPE_BOOL:
            value = st.booleans()
        elif field.type == FieldDescriptor.TYPE_DOUBLE:
            value = st.one_of(st.floats(0.5, 5.0), DOUBLE)
        else:
            raise AssertionError(f"no strategy for {descriptor.name}.{field.name} (type {field.type})")
        is_repeated = getattr(field, "is_repeated", None)
        repeated = is_repeated if isinstance(is_repeated, bool) else field.label == FieldDescriptor.LABEL_REPEATED
        if repeated:
            value = st.lists(value, max_size=70 if field.name == "allowed_services" else 4)
        fields[field.name] = value
    # A few fields are left unset now and then (an unset optional limit means no limit).
    required = {name: strategy for name, strategy in fields.items() if not name.endswith("_micros")}
    optional = {name: strategy for name, strategy in fields.items() if name.endswith("_micros")}
    if descriptor.name not in ("NodeLimits",):
        required, optional = fields, {}
    return st.fixed_dictionaries(required, optional=optional).map(lambda values: cls(**values))


def callers(s: Secured) -> st.SearchStrategy[tuple[tuple[str, str], ...]]:
    """Who calls: nobody, garbage, or any real token."""
    garbage = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=300)
    # Real tokens come up most (root half the time), so most requests get past authentication to the checks
    # behind it.
    return st.one_of(
        st.just(s.metadata("root")),
        st.just(s.metadata("root")),
        st.sampled_from(sorted(s.tokens)).map(s.metadata),
        st.just(()),
        st.one_of(garbage.map(lambda value: (("authorization", value),)), garbage.map(bearer)),
    )


async def known_values(s: Secured) -> dict[str, list[str]]:
    """Real values of this server by kind: nodes, holds (of both accounts), tokens, and others."""
    holds = [
        await s.hold("agent_a", "research-agent-01"),
        await s.hold("agent_a2", "sales-agent-01"),
        await s.hold("agent_b", "globex-w1"),
    ]
    nodes = ["acme", "research-agents", "research-agent-01", "sales-agent-01", "globex", "globex-pool", "globex-w1"]
    tokens = [issued.token_id for issued in s.tokens.values()]
    other = ["USD", "EUR", "acme:" + "0" * 32, "api.example.com", "key-1"]
    return {"node": nodes, "hold": holds, "token": tokens, "other": other, "all": nodes + holds + tokens + other}


# Which kind of real value a string field plausibly holds, by its name.
PLAUSIBLE = {
    "wallet_id": "node",
    "node_id": "node",
    "parent_id": "node",
    "new_parent_id": "node",
    "scope_node_id": "node",
    "account_id": "node",
    "authorization_id": "hold",
    "token_id": "token",
}


def check_outcome(label: str, outcome: Outcome) -> None:
    assert outcome.code not in BUG_CODES, f"{label}: {outcome}"
    assert outcome.code != grpc.StatusCode.DEADLINE_EXCEEDED, f"{label} hung: {outcome}"


def no_errors_logged(caplog: pytest.LogCaptureFixture, since: int) -> int:
    """Fail if the server logged an error (an unhandled exception) since record ``since``; return the count."""
    errors = [r for r in caplog.records[since:] if r.levelno >= logging.ERROR and r.name.startswith("spendgate")]
    assert not errors, "the server logged errors:\n" + "\n".join(r.getMessage() for r in errors)
    return len(caplog.records)


# ---------------------------------------------------------------------------------------------------------
# Every RPC, random requests.


class Lazy(dict[str, Any]):
    """A dict that hypothesis prints briefly in a failing example (it holds servers and strategies)."""

    def __repr__(self) -> str:
        return "<the test's server>"


@pytest.fixture
def lazy() -> dict[str, Any]:
    """What a hypothesis test makes on its first example and keeps for the others (its server, its values).

    Hypothesis runs every example inside one call of the test, so function-scoped fixtures are made once
    per test, not per example; the server is started on the test's own event loop by the first example.
    """
    return Lazy()


async def fuzz_server(lazy: dict[str, Any], start_secured: StartSecured) -> tuple[Secured, dict[str, list[str]]]:
    if "server" not in lazy:
        lazy["server"] = await start_secured(ledger=True, ledger_writers=0)
        lazy["known"] = await known_values(lazy["server"])
        lazy["logged"] = 0
    return lazy["server"], lazy["known"]


@pytest.mark.parametrize("rpc_name", sorted(RPCS))
@settings(FUZZ_SETTINGS, max_examples=40)
@given(data=st.data())
async def test_random_requests_to_every_rpc_never_fail_internally(
    start_secured: StartSecured, lazy: dict[str, Any], caplog: pytest.LogCaptureFixture, rpc_name: str, data: Any
) -> None:
    caplog.set_level(logging.WARNING)
    s, known = await fuzz_server(lazy, start_secured)
    if rpc_name not in lazy:
        lazy[rpc_name] = (message_of(RPCS[rpc_name].request.DESCRIPTOR, known), callers(s))
    requests, metadata = lazy[rpc_name]
    request = data.draw(requests, label="request")
    outcome = await call(s.channel, rpc_name, request, data.draw(metadata, label="metadata"), watch_open_s=WATCH_OPEN_S)
    check_outcome(f"{rpc_name}({request!r:.300})", outcome)
    event(outcome.code.name)
    lazy["logged"] = no_errors_logged(caplog, lazy["logged"])
    # The server still serves after that. (The account, not a wallet: a generated DeleteNode may be a valid one,
    # with the root token and force, and remove a wallet for real; an account cannot be deleted node by node.)
    assert (await s.call("GetBudget", spend_pb2.GetBudgetRequest(node_id="globex"))).code == grpc.StatusCode.OK


def raw_requests(known: dict[str, list[str]]) -> st.SearchStrategy[bytes]:
    """Bytes a request may be: random, a request of any RPC's type, or one cut short."""
    any_request = (
        st.sampled_from(sorted(RPCS))
        .flatmap(lambda name: message_of(RPCS[name].request.DESCRIPTOR, known, depth=1))
        .map(lambda message: message.SerializeToString())
    )
    cut = st.tuples(any_request, st.integers(0, 200)).map(lambda pair: pair[0][: pair[1]])
    return st.one_of(st.binary(max_size=300), any_request, cut)


@settings(FUZZ_SETTINGS, max_examples=300)
@given(rpc_name=st.sampled_from(sorted(RPCS)), data=st.data(), who=st.sampled_from(["root", "admin_a", None]))
async def test_random_bytes_to_every_rpc_never_fail_internally(
    start_secured: StartSecured,
    lazy: dict[str, Any],
    caplog: pytest.LogCaptureFixture,
    rpc_name: str,
    data: Any,
    who: str | None,
) -> None:
    caplog.set_level(logging.WARNING)
    s, known = await fuzz_server(lazy, start_secured)
    if "raw" not in lazy:
        lazy["raw"] = raw_requests(known)
    raw = data.draw(lazy["raw"], label="bytes")
    outcome = await call(s.channel, rpc_name, raw, s.metadata(who), raw=True, watch_open_s=WATCH_OPEN_S)
    check_outcome(f"{rpc_name}({raw!r:.300})", outcome)
    lazy["logged"] = no_errors_logged(caplog, lazy["logged"])


# ---------------------------------------------------------------------------------------------------------
# Valid operations with invalid ones in between: the same end state as the valid ones alone.

WALLETS = ("w1", "w2")


def fuzz_plan(account: str) -> Any:
    """An account of two wallets in a pool, with limits that bind within a run."""
    return parse_plan(
        {
            "account": {"id": account, "limits": {"month": 40}},
            "pools": [
                {
                    "id": f"{account}-pool",
                    "limits": {"day": 12},
                    "wallets": [
                        {"id": f"{account}-w1", "limits": {"day": 8, "per_transaction": 3}},
                        {"id": f"{account}-w2", "limits": {"day": 8, "velocity_per_minute": 6}},
                    ],
                }
            ],
        }
    )


# A valid operation: ("authorize", wallet, amount, capture) | ("capture", hold, fraction) | ("void", hold).
VALID_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("authorize"), st.sampled_from(WALLETS), st.integers(1, 4 * USD), st.booleans()),
        st.tuples(st.just("capture"), st.integers(0, 20), st.floats(0.01, 1.0)),
        st.tuples(st.just("void"), st.integers(0, 20)),
    ),
    min_size=4,
    max_size=16,
)
INVALID_KINDS = [
    "amount",
    "unknown_wallet",
    "cross_wallet",
    "reader_spends",
    "other_account_admin",
    "garbage_token",
    "key_conflict",
    "exact_replay",
    "bad_fields",
    "capture_too_much",
    "capture_bad_amount",
    "capture_cross_wallet",
    "void_cross_wallet",
    "resolved_again",
    "unknown_hold",
    "admin_denied",
    "admin_invalid",
    "raw_bytes",
    "stream",
    "reads",
]


class Run:
    """One server's side of a run: its account, holds and answers, in the order the operations came."""

    def __init__(self, s: Secured, account: str) -> None:
        self.s = s
        self.account = account
        self.holds: list[str] = []  # authorization ids of approved holds, by order of approval
        self.hold_wallets: dict[str, str] = {}
        self.keys: dict[str, spend_pb2.AuthorizeRequest] = {}
        self.captures: dict[str, spend_pb2.CaptureRequest] = {}

    def wallet(self, name: str) -> str:
        return f"{self.account}-{name}"


class Model:
    """What the valid-only run says about holds: which are open, and how much each holds."""

    def __init__(self) -> None:
        self.held: list[int] = []
        self.state: list[str] = []

    def open_hold(self, index: int) -> int | None:
        if not self.held:
            return None
        index %= len(self.held)
        return index if self.state[index] == "held" else None


async def valid_step(run: Run, op: tuple[Any, ...], model: Model, index: int, ref: Any = None) -> Any:
    """Apply one valid operation; return its answer (as bytes, to compare the two runs)."""
    s = run.s
    if op[0] == "authorize":
        _, wallet, amount, capture = op
        key = f"op-{index}"
        request = authorize(run.wallet(wallet), key, amount, capture=capture, service="api.example.com")
        run.keys[key] = request
        response = await s.ok("Authorize", request)
        if response.decision == spend_pb2.DECISION_APPROVED and not capture:
            run.holds.append(response.authorization_id)
            run.hold_wallets[response.authorization_id] = wallet
        answer = spend_pb2.AuthorizeResponse()
        answer.CopyFrom(response)
        answer.authorization_id = ""
        return answer.SerializeToString(deterministic=True)
    hold = ref
    if op[0] == "capture":
        amount = max(1, math.floor(model.held[hold] * op[2]))
        request = spend_pb2.CaptureRequest(
            authorization_id=run.holds[hold], amount_micros=amount, idempotency_key=f"c-{index}"
        )
        run.captures[run.holds[hold]] = request
        response = await s.ok("Capture", request)
    else:
        response = await s.ok("Void", spend_pb2.VoidRequest(authorization_id=run.holds[hold]))
    response.authorization_id = ""
    return response.SerializeToString(deterministic=True)


async def invalid_step(run: Run, kind: str, draw: Callable[[Any], Any]) -> None:
    """Apply one invalid operation on the mixed run; it must be refused (or, for replays and reads, change
    nothing) and never with a bug status."""
    s = run.s
    event(f"invalid: {kind}")
    w1, w2 = run.wallet("w1"), run.wallet("w2")
    agent1 = bearer(run.s.tokens[f"{run.account}-agent-w1"].secret)
    hold = draw(st.sampled_from(run.holds)) if run.holds else f"{run.account}:" + "0" * 32
    expect_refusal = True
    if kind == "amount":
        amount = draw(st.one_of(st.integers(INT64_MIN, 0), st.integers(MONEY_MICROS_MAX + 1, INT64_MAX)))
        outcome = await s.call("Authorize", authorize(w1, draw(st.text("abc", min_size=1)), amount), "root")
    elif kind == "unknown_wallet":
        wallet = draw(text_of([w1, w2]).filter(lambda w: w not in (w1, w2)))
        outcome = await s.call("Authorize", authorize(wallet, "unknown-1"), "root")
    elif kind == "cross_wallet":
        outcome = await call(s.channel, "Authorize", authorize(w2, draw(st.sampled_from(["x-1", "op-0"]))), agent1)
    elif kind == "reader_spends":
        outcome = await call(
            s.channel, "Authorize", authorize(w1, "r-1"), bearer(s.tokens[f"{run.account}-reader"].secret)
        )
    elif kind == "other_account_admin":
        rpc, request = draw(
            st.sampled_from(
                [
                    ("Authorize", authorize(w1, "o-1")),
                    ("FreezeNode", admin_pb2.FreezeNodeRequest(node_id=run.account, reason="x")),
                    ("Void", spend_pb2.VoidRequest(authorization_id=hold)),
                    ("SetLimits", admin_pb2.SetLimitsRequest(node_id=w1, limits=admin_pb2.NodeLimits(day_micros=1))),
                ]
            )
        )
        outcome = await s.call(rpc, request, "admin_b")
    elif kind == "garbage_token":
        secret = draw(st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=60))
        outcome = await call(s.channel, "Authorize", authorize(w1, "g-1"), bearer(secret))
    elif kind == "key_conflict" and run.keys:
        key = draw(st.sampled_from(sorted(run.keys)))
        original = run.keys[key]
        changed = spend_pb2.AuthorizeRequest()
        changed.CopyFrom(original)
        changed.amount_micros = original.amount_micros % (3 * USD) + 1
        outcome = await s.call("Authorize", changed, "root")
        assert outcome.code == grpc.StatusCode.ALREADY_EXISTS, outcome
    elif kind == "exact_replay" and run.keys:
        key = draw(st.sampled_from(sorted(run.keys)))
        outcome = await s.call("Authorize", run.keys[key], "root")
        expect_refusal = False
        assert outcome.code == grpc.StatusCode.OK, outcome
    elif kind == "bad_fields":
        field = draw(st.sampled_from(["currency", "key", "service", "metadata"]))
        fields: dict[str, Any] = {}
        key = "b-1"
        if field == "currency":
            fields["currency"] = draw(
                st.one_of(st.sampled_from(["EUR", "usd", "US", "USDX", ""]), UNICODE).filter(lambda c: c != "USD")
            )
        elif field == "key":
            key = draw(st.one_of(st.just(""), st.text(min_size=129, max_size=140), CONTROL, st.just("with space")))
        elif field == "service":
            fields["service"] = draw(st.one_of(st.text(min_size=129, max_size=140), CONTROL.map(lambda c: "svc" + c)))
        else:
            fields["metadata"] = draw(
                st.one_of(
                    st.dictionaries(st.text(min_size=1, max_size=5), st.text(max_size=3), min_size=17, max_size=20),
                    st.just({"": "v"}),
                    st.just({"k" * 65: "v"}),
                    st.just({"k": "v" * 257}),
                )
            )
        outcome = await s.call("Authorize", authorize(w1, key, **fields), "root")
    elif kind == "capture_too_much" and run.holds:
        outcome = await s.call(
            "Capture",
            spend_pb2.CaptureRequest(authorization_id=hold, amount_micros=4 * USD + 1, idempotency_key="big"),
            "root",
        )
    elif kind == "capture_bad_amount":
        amount = draw(st.one_of(st.integers(INT64_MIN, 0), st.integers(MONEY_MICROS_MAX + 1, INT64_MAX)))
        outcome = await s.call(
            "Capture",
            spend_pb2.CaptureRequest(authorization_id=hold, amount_micros=amount, idempotency_key="ba"),
            "root",
        )
    elif kind == "capture_cross_wallet" and run.holds:
        # Another wallet's agent (of this account or the other one) captures a hold that is not its wallet's.
        target = draw(st.sampled_from(run.holds))
        owner = run.hold_wallets[target]
        thief = draw(st.sampled_from([f"{run.account}-agent-{'w2' if owner == 'w1' else 'w1'}", "agent_b"]))
        outcome = await call(
            s.channel,
            "Capture",
            spend_pb2.CaptureRequest(authorization_id=target, amount_micros=1, idempotency_key="x"),
            bearer(s.tokens[thief].secret),
        )
    elif kind == "void_cross_wallet" and run.holds:
        outcome = await call(
            s.channel, "Void", spend_pb2.VoidRequest(authorization_id=hold), bearer(s.tokens["agent_b"].secret)
        )
    elif kind == "resolved_again" and run.captures:
        held = draw(st.sampled_from(sorted(run.captures)))
        first = run.captures[held]
        again = draw(st.sampled_from(["same", "other_key", "void"]))
        if again == "same":
            outcome = await s.call("Capture", first, "root")
            expect_refusal = outcome.code != grpc.StatusCode.OK
        elif again == "other_key":
            outcome = await s.call(
                "Capture",
                spend_pb2.CaptureRequest(authorization_id=held, amount_micros=first.amount_micros, idempotency_key="z"),
                "root",
            )
        else:
            outcome = await s.call("Void", spend_pb2.VoidRequest(authorization_id=held), "root")
    elif kind == "unknown_hold":
        near = [hold + "0", hold[:-1], f"{run.account}:" + "f" * 32, "globex:" + "0" * 32, f"{run.account}:"]
        hold_id = draw(text_of(near).filter(lambda candidate: candidate not in run.holds))
        rpc = draw(st.sampled_from(["Capture", "Void"]))
        request = (
            spend_pb2.CaptureRequest(authorization_id=hold_id, amount_micros=1, idempotency_key="u")
            if rpc == "Capture"
            else spend_pb2.VoidRequest(authorization_id=hold_id)
        )
        outcome = await s.call(rpc, request, "root")
    elif kind == "admin_denied":
        who = draw(st.sampled_from([f"{run.account}-reader", f"{run.account}-agent-w1"]))
        rpc, request = draw(
            st.sampled_from(
                [
                    ("FreezeNode", admin_pb2.FreezeNodeRequest(node_id=w1, reason="x")),
                    ("SetLimits", admin_pb2.SetLimitsRequest(node_id=w1, limits=admin_pb2.NodeLimits(day_micros=1))),
                    ("DeleteNode", admin_pb2.DeleteNodeRequest(node_id=w2, force=True)),
                    ("MoveNode", admin_pb2.MoveNodeRequest(node_id=w1, new_parent_id=run.account)),
                    (
                        "ApplyPlan",
                        admin_pb2.ApplyPlanRequest(plan_yaml=f"account: {{id: {run.account}}}\n", force=True),
                    ),
                ]
            )
        )
        outcome = await call(s.channel, rpc, request, bearer(s.tokens[who].secret))
    elif kind == "admin_invalid":
        rpc, request = draw(
            st.sampled_from(
                [
                    ("SetLimits", admin_pb2.SetLimitsRequest(node_id=w1, limits=admin_pb2.NodeLimits(day_micros=-1))),
                    (
                        "SetLimits",
                        admin_pb2.SetLimitsRequest(node_id=w1, limits=admin_pb2.NodeLimits(velocity_per_minute=0)),
                    ),
                    (
                        "SetLimits",
                        admin_pb2.SetLimitsRequest(node_id=w1, limits=admin_pb2.NodeLimits(total_micros=INT64_MAX)),
                    ),
                    ("FreezeNode", admin_pb2.FreezeNodeRequest(node_id=w1 + "\n", reason="x")),
                    ("MoveNode", admin_pb2.MoveNodeRequest(node_id=run.account, new_parent_id=w1)),
                    ("MoveNode", admin_pb2.MoveNodeRequest(node_id=w1, new_parent_id=w2)),
                    (
                        "CreateNode",
                        admin_pb2.CreateNodeRequest(node_id=w2, parent_id=run.account, kind=spend_pb2.NODE_KIND_WALLET),
                    ),
                    (
                        "CreateNode",
                        admin_pb2.CreateNodeRequest(node_id="n-1", parent_id=w1, kind=spend_pb2.NODE_KIND_WALLET),
                    ),
                    ("CreateNode", admin_pb2.CreateNodeRequest(node_id="n-2", parent_id=run.account, kind=99)),
                    ("DeleteNode", admin_pb2.DeleteNodeRequest(node_id=run.account)),
                    (
                        "ApplyPlan",
                        admin_pb2.ApplyPlanRequest(plan_yaml=f"account: {{id: {run.account}, limits: {{day: -1}}}}"),
                    ),
                    (
                        "CreateToken",
                        admin_pb2.CreateTokenRequest(
                            role=admin_pb2.TOKEN_ROLE_AGENT, scope_node_id=run.account, name="x"
                        ),
                    ),
                    ("RevokeToken", admin_pb2.RevokeTokenRequest(token_id="0" * 16)),
                ]
            )
        )
        outcome = await s.call(rpc, request, "root")
    elif kind == "raw_bytes":
        rpc = draw(st.sampled_from(["Authorize", "Capture", "Void"]))
        data = draw(
            st.one_of(st.binary(min_size=1, max_size=120), st.sampled_from([b"\xff", b"\x0a\x05", b"\x08" * 11]))
        )
        outcome = await s.call(rpc, data, "root", raw=True)
    elif kind == "stream":
        items = [
            spend_pb2.AuthorizeStreamRequest(request_id="", request=authorize(w1, "s-1")),
            spend_pb2.AuthorizeStreamRequest(request_id="r" * 129, request=authorize(w1, "s-2")),
            spend_pb2.AuthorizeStreamRequest(request_id="s-3", request=authorize(w1, "s-3", -5)),
            spend_pb2.AuthorizeStreamRequest(request_id="s-4", request=authorize(w2, "s-4", currency="XXX")),
        ]
        item = draw(st.sampled_from(items))
        outcome = await call(s.channel, "AuthorizeStream", item, agent1)
    else:
        # Reads change nothing.
        rpc, request = draw(
            st.sampled_from(
                [
                    ("GetBudget", spend_pb2.GetBudgetRequest(node_id=w1)),
                    ("GetTree", admin_pb2.GetTreeRequest(node_id=run.account)),
                    ("ListTransactions", billing_pb2.ListTransactionsRequest(node_id=run.account)),
                    ("SpendReport", billing_pb2.SpendReportRequest(node_id=run.account)),
                    ("ListTokens", admin_pb2.ListTokensRequest(account_id=run.account)),
                ]
            )
        )
        outcome = await s.call(rpc, request, "root")
        expect_refusal = False
    check_outcome(f"{kind}", outcome)
    if expect_refusal:
        assert outcome.code != grpc.StatusCode.OK, f"the invalid operation {kind} went through: {outcome}"


async def state_of(run: Run) -> dict[str, Any]:
    """The account's node hashes (config and every counter), open holds, outbox and event counts."""
    store = run.s.server.store
    client, keys = store.client, store.keys
    nodes = sorted(await client.smembers(keys.nodes(run.account)))

    def unprefixed(fields: dict[str, str]) -> dict[str, str]:
        # A node hash holds its parent's key (pkey), which names the server's key prefix.
        return {name: value.replace(run.s.prefix, "<prefix>") for name, value in fields.items()}

    return {
        "nodes": {node: unprefixed(await client.hgetall(keys.node(run.account, node))) for node in nodes},
        "open holds": await client.zcard(keys.holds(run.account)),
        "outbox": await client.xlen(keys.outbox(run.account)),
        "events": await client.xlen(keys.events(run.account)),
    }


def differences(expected: dict[str, Any], got: dict[str, Any]) -> list[str]:
    """What differs between the valid-only run's state and the mixed run's, field by field."""
    out = [
        f"{name}: {expected[name]} != {got[name]}"
        for name in expected
        if name != "nodes" and expected[name] != got[name]
    ]
    for node in sorted({*expected["nodes"], *got["nodes"]}):
        want, have = expected["nodes"].get(node, {}), got["nodes"].get(node, {})
        out += [
            f"{node}.{field}: {want.get(field)} != {have.get(field)}"
            for field in sorted({*want, *have})
            if want.get(field) != have.get(field)
        ]
    return out


async def ledger_of(run: Run) -> Any:
    """Drain the account's outbox into the ledger, then read its totals back over the API."""
    server = run.s.server
    assert server.ledger is not None
    writer = LedgerWriter(
        server.store.client, server.ledger, keys=server.store.keys, consumer="fuzz", clock=server.core.clock, trim=False
    )
    await writer.drain(timeout_s=20)
    report = await run.s.ok("SpendReport", billing_pb2.SpendReportRequest(node_id=run.account))
    listed = await run.s.ok(
        "ListTransactions", billing_pb2.ListTransactionsRequest(node_id=run.account, page_size=1000)
    )
    transactions = sorted(
        (t.wallet_id, t.amount_micros, t.authorized_micros, t.service, tuple(sorted(t.metadata.items())))
        for t in listed.transactions
    )
    return [row.SerializeToString(deterministic=True) for row in report.rows], transactions


@settings(FUZZ_SETTINGS, max_examples=40)
@given(ops=VALID_OPS, data=st.data())
async def test_invalid_requests_between_valid_ones_change_nothing(
    start_secured: StartSecured, lazy: dict[str, Any], ops: list[tuple[Any, ...]], data: Any
) -> None:
    if "valid_only" not in lazy:
        lazy["valid_only"] = await start_secured(ledger=True, ledger_writers=0, clock=ManualClock(START_MS))
        lazy["mixed"] = await start_secured(ledger=True, ledger_writers=0, clock=ManualClock(START_MS))
        lazy["count"] = 0
    valid_only, mixed = lazy["valid_only"], lazy["mixed"]
    lazy["count"] += 1
    account = f"fz{lazy['count']}"
    plan = fuzz_plan(account)
    for s in (valid_only, mixed):
        await s.server.admin.apply_plan(plan, actor="fuzz")
    now = mixed.server.core.clock.now_ms()
    for name, role, scope in (
        ("agent-w1", "agent", f"{account}-w1"),
        ("agent-w2", "agent", f"{account}-w2"),
        ("reader", "reader", account),
    ):
        secret, record = await issue_token(
            mixed.server.store, role=role, scope_node_id=scope, account_id=account, name=name, now_ms=now
        )
        mixed.tokens[f"{account}-{name}"] = Issued(secret, record.token_id)
    runs = (Run(valid_only, account), Run(mixed, account))
    model = Model()
    for index, op in enumerate(ops):
        for kind in data.draw(st.lists(st.sampled_from(INVALID_KINDS), max_size=3), label=f"invalid before {index}"):
            await invalid_step(runs[1], kind, data.draw)
        ref = None
        if op[0] != "authorize":
            ref = model.open_hold(op[1])
            if ref is None:
                continue
        answers = [await valid_step(run, op, model, index, ref) for run in runs]
        assert answers[0] == answers[1], f"operation {index} {op} was answered differently"
        if op[0] == "authorize" and len(runs[0].holds) > len(model.held):
            model.held.append(op[2])
            model.state.append("held")
        elif op[0] != "authorize":
            model.state[ref] = "resolved"
    states = [await state_of(run) for run in runs]
    assert states[0] == states[1], f"the invalid requests changed the account's state: {differences(*states)}"
    ledgers = [await ledger_of(run) for run in runs]
    assert ledgers[0] == ledgers[1], "the invalid requests changed the ledger"
    event(f"ledger transactions: {min(len(ledgers[0][1]), 3)}+")
    event(f"open holds at the end: {min(states[0]['open holds'], 3)}+")
