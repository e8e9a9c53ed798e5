"""Bearer tokens through gRPC: who may call what, checked before any state is touched.

Each table row is (caller, RPC, request, expected status). A row that must be refused is checked against a
snapshot of every key under the server's prefix taken just before it: a refusal changes nothing. Rows that
must be let in run after the refusals (a capture's ledger entry is consumed by the writer in the background,
which would make later snapshots move on their own).
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import fakeredis
import grpc
import pytest

from helpers import USD, new_prefix
from spendgate._gen.spendgate.v1 import admin_pb2, billing_pb2, spend_pb2

from .conftest import StartSecured
from .support import (
    FLEET,
    OTHER_PLAN_YAML,
    RPCS,
    Outcome,
    Secured,
    authorize,
    bearer,
    call,
)

OK = grpc.StatusCode.OK
DENIED = grpc.StatusCode.PERMISSION_DENIED
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
INVALID = grpc.StatusCode.INVALID_ARGUMENT

# The fleet with one limit changed, so that applying it would change state.
CHANGED_FLEET = FLEET.read_text().replace("month: 10000", "month: 9000")
assert FLEET.read_text() != CHANGED_FLEET
CHANGED_OTHER = OTHER_PLAN_YAML.replace("month: 5000", "month: 4000")
# Replicas of one deployment share its root token (a throwaway one of this test's servers).
SHARED_ROOT = "sg_shared-root-token"
UNKNOWN_TOKEN_ID = "0123456789abcdef"  # noqa: S105 -- a public id that no token has, not a secret
NEW_ACCOUNT = "account: {id: initech}\nwallets:\n  - {id: initech-w1}\n"


def requests(s: Secured, holds: dict[str, str]) -> dict[str, Any]:
    """A valid request for every RPC, on account acme: with the root token each would succeed."""
    return valid_requests(holds["research-agent-01"], s.tokens["agent_a2"].token_id)


def valid_requests(hold: str, token_id: str) -> dict[str, Any]:
    """A valid request for every RPC, on account acme, given a hold of research-agent-01 and a token id."""
    return {
        "Authorize": authorize("research-agent-01", "valid-1"),
        "Capture": spend_pb2.CaptureRequest(authorization_id=hold, amount_micros=USD // 20, idempotency_key="cap-1"),
        "Void": spend_pb2.VoidRequest(authorization_id=hold),
        "GetBudget": spend_pb2.GetBudgetRequest(node_id="research-agent-01"),
        "AuthorizeStream": spend_pb2.AuthorizeStreamRequest(
            request_id="r1", request=authorize("research-agent-01", "stream-1")
        ),
        "ApplyPlan": admin_pb2.ApplyPlanRequest(plan_yaml=CHANGED_FLEET),
        "GetTree": admin_pb2.GetTreeRequest(node_id="acme"),
        "SetLimits": admin_pb2.SetLimitsRequest(
            node_id="research-agent-01", limits=admin_pb2.NodeLimits(day_micros=7 * USD)
        ),
        "CreateNode": admin_pb2.CreateNodeRequest(
            node_id="research-agent-09", parent_id="research-agents", kind=spend_pb2.NODE_KIND_WALLET
        ),
        "MoveNode": admin_pb2.MoveNodeRequest(node_id="research-agent-02", new_parent_id="sales-agents"),
        "DeleteNode": admin_pb2.DeleteNodeRequest(node_id="content-agent-02"),
        "FreezeNode": admin_pb2.FreezeNodeRequest(node_id="research-agent-01", reason="test"),
        "UnfreezeNode": admin_pb2.UnfreezeNodeRequest(node_id="research-agent-03"),
        "WatchEvents": admin_pb2.WatchEventsRequest(node_id="acme"),
        "RecommendLimits": admin_pb2.RecommendLimitsRequest(account_id="acme", stage=admin_pb2.RAMP_UP_STAGE_WEEK1),
        "CreateToken": admin_pb2.CreateTokenRequest(
            role=admin_pb2.TOKEN_ROLE_AGENT, scope_node_id="research-agent-01", name="another"
        ),
        "ListTokens": admin_pb2.ListTokensRequest(account_id="acme"),
        "RevokeToken": admin_pb2.RevokeTokenRequest(token_id=token_id),
        "ListTransactions": billing_pb2.ListTransactionsRequest(node_id="acme"),
        "SpendReport": billing_pb2.SpendReportRequest(node_id="acme"),
        "GetLedgerStatus": billing_pb2.GetLedgerStatusRequest(),
        "ListAuditLog": billing_pb2.ListAuditLogRequest(),
    }


async def outcome_and_change(s: Secured, rpc: str, request: Any, metadata: Any) -> tuple[Outcome, bool]:
    """Call, and say whether anything under the server's prefix changed."""
    before = await s.snapshot()
    outcome = await call(s.channel, rpc, request, metadata)
    after = await s.snapshot()
    assert before, "the snapshot should hold the fleet's keys"
    return outcome, after != before


async def check_rows(s: Secured, rows: list[tuple[str, str, Any, set[grpc.StatusCode]]]) -> None:
    """Run every row; refusals must change nothing. Report every wrong row at once."""
    wrong = []
    for who, rpc, request, expected in rows:
        outcome, changed = await outcome_and_change(s, rpc, request, s.metadata(who))
        if outcome.code not in expected:
            wrong.append(f"{who} {rpc} {request!r:.90}: {outcome} (expected {sorted(c.name for c in expected)})")
        elif outcome.code != OK and changed:
            wrong.append(f"{who} {rpc}: refused with {outcome.code.name} but state changed")
    assert not wrong, "\n".join(wrong)


# ---------------------------------------------------------------------------------------------------------
# Unauthenticated.


def test_the_valid_request_table_covers_every_rpc() -> None:
    table = valid_requests("acme:" + "0" * 32, UNKNOWN_TOKEN_ID)
    assert set(table) == set(RPCS), "an RPC has no row: add it to valid_requests()"
    for name, request in table.items():
        assert isinstance(request, RPCS[name].request), name


async def test_every_valid_request_succeeds_with_the_root_token(start_secured: StartSecured) -> None:
    # The control for the tables below: their refusals are about the caller, never the request.
    s = await start_secured(ledger=True, ledger_writers=0)
    table = requests(s, {"research-agent-01": await s.hold("agent_a", "research-agent-01")})
    table["Void"] = spend_pb2.VoidRequest(authorization_id=await s.hold("agent_a", "research-agent-01"))
    wrong = [
        f"{rpc}: {outcome}" for rpc, request in table.items() if (outcome := await s.call(rpc, request)).code != OK
    ]
    assert not wrong, "\n".join(wrong)


async def test_missing_unknown_or_malformed_tokens_are_unauthenticated_on_every_rpc(
    start_secured: StartSecured, backend_kind: str
) -> None:
    s = await start_secured(backend_kind, ledger=True)
    holds = {"research-agent-01": await s.hold("agent_a", "research-agent-01")}
    table = requests(s, holds)
    admin_secret = s.tokens["admin_a"].secret
    headers: dict[str, tuple[tuple[str, str], ...]] = {
        "no metadata": (),
        "an empty bearer": (("authorization", "Bearer"),),
        "a bearer of a space": (("authorization", "Bearer "),),
        "another scheme": (("authorization", f"Basic {s.root}"),),
        "no scheme": (("authorization", s.root),),
        "an unknown token": bearer("sg_" + "x" * 40),
        "an oversize token": bearer("sg_" + "a" * 5000),
        "the root token with a suffix": bearer(s.root + "x"),
        "the root token cut short": bearer(s.root[:-1]),
        "an admin token with a suffix": bearer(admin_secret + "x"),
        # Neither the public id nor the stored hash is a credential: a leak of Redis opens nothing.
        "a token's public id": bearer(s.tokens["admin_a"].token_id),
        "a token's stored hash": bearer(hashlib.sha256(admin_secret.encode()).hexdigest()),
        "the token in another header": (("x-token", admin_secret),),
    }
    wrong = []
    for label, metadata in headers.items():
        before = await s.snapshot()
        for rpc, request in table.items():
            outcome = await call(s.channel, rpc, request, metadata)
            if outcome.code != UNAUTHENTICATED:
                wrong.append(f"{label} -> {rpc}: {outcome}")
        if await s.snapshot() != before:
            wrong.append(f"{label}: the calls changed state")
    assert not wrong, "\n".join(wrong)

    # The same requests go through with a real token (the lowercase scheme is accepted), so the refusals
    # above were about the token, not the requests.
    lowercase = (("authorization", f"bearer {s.root}"),)
    for rpc in ("GetBudget", "GetTree", "ListTokens", "GetLedgerStatus", "Authorize", "FreezeNode"):
        outcome = await call(s.channel, rpc, table[rpc], lowercase)
        assert outcome.code == OK, f"{rpc} with the root token: {outcome}"


async def test_an_unknown_token_learns_nothing_about_which_nodes_or_holds_exist(
    start_secured: StartSecured,
) -> None:
    s = await start_secured(ledger=True, ledger_writers=0)
    unknown = bearer("sg_" + "y" * 40)
    probes = {
        "Authorize": authorize("no-such-wallet", "probe-1"),
        "GetBudget": spend_pb2.GetBudgetRequest(node_id="no-such-node"),
        "Capture": spend_pb2.CaptureRequest(
            authorization_id="acme:" + "0" * 32, amount_micros=1, idempotency_key="probe-2"
        ),
        "Void": spend_pb2.VoidRequest(authorization_id="nobody:" + "0" * 32),
        "GetTree": admin_pb2.GetTreeRequest(node_id="no-such-node"),
        "FreezeNode": admin_pb2.FreezeNodeRequest(node_id="no-such-node", reason="probe"),
        "RevokeToken": admin_pb2.RevokeTokenRequest(token_id=UNKNOWN_TOKEN_ID),
        "ApplyPlan": admin_pb2.ApplyPlanRequest(plan_yaml=NEW_ACCOUNT),
        "RecommendLimits": admin_pb2.RecommendLimitsRequest(account_id="no-such-account"),
        "ListTransactions": billing_pb2.ListTransactionsRequest(node_id="no-such-node"),
        "SpendReport": billing_pb2.SpendReportRequest(node_id="no-such-node"),
        "CreateToken": admin_pb2.CreateTokenRequest(
            role=admin_pb2.TOKEN_ROLE_AGENT, scope_node_id="no-such-wallet", name="probe"
        ),
    }
    # A plan that does not parse is not parsed for a caller without a valid token.
    bad_plan = admin_pb2.ApplyPlanRequest(plan_yaml="account: [unclosed\n" * 1000)
    wrong = []
    for rpc, request in [*probes.items(), ("ApplyPlan", bad_plan)]:
        outcome = await call(s.channel, rpc, request, unknown)
        if outcome.code != UNAUTHENTICATED:
            wrong.append(f"{rpc}: {outcome}")
    # An agent learns nothing about nodes beyond its wallet either: another wallet is refused, existing or not.
    for wallet in ("research-agent-02", "no-such-wallet"):
        for rpc, request in (
            ("Authorize", authorize(wallet, "probe-3")),
            ("GetBudget", spend_pb2.GetBudgetRequest(node_id=wallet)),
        ):
            outcome = await s.call(rpc, request, "agent_a")
            if outcome.code != DENIED:
                wrong.append(f"agent {rpc} {wallet}: {outcome}")
    assert not wrong, "an unauthenticated caller was told more than UNAUTHENTICATED:\n" + "\n".join(wrong)


# ---------------------------------------------------------------------------------------------------------
# Scopes.


async def holds_of_every_kind(s: Secured) -> dict[str, str]:
    return {
        "research-agent-01": await s.hold("agent_a", "research-agent-01"),
        "sales-agent-01": await s.hold("agent_a2", "sales-agent-01"),
        "globex-w1": await s.hold("agent_b", "globex-w1"),
    }


async def test_an_agent_token_acts_only_on_its_own_wallet(secured: Secured) -> None:
    s = secured
    holds = await holds_of_every_kind(s)
    valid = requests(s, holds)
    other_stream = spend_pb2.AuthorizeStreamRequest(request_id="x", request=authorize("research-agent-02", "s-2"))
    refused: list[tuple[str, Any]] = [
        ("Authorize", authorize("research-agent-02", "a-1")),
        ("Authorize", authorize("globex-w1", "a-2")),
        ("AuthorizeStream", other_stream),
        (
            "Capture",
            spend_pb2.CaptureRequest(authorization_id=holds["sales-agent-01"], amount_micros=1, idempotency_key="c"),
        ),
        ("Void", spend_pb2.VoidRequest(authorization_id=holds["sales-agent-01"])),
        (
            "Capture",
            spend_pb2.CaptureRequest(authorization_id=holds["globex-w1"], amount_micros=1, idempotency_key="c"),
        ),
        ("Void", spend_pb2.VoidRequest(authorization_id=holds["globex-w1"])),
        *(
            ("GetBudget", spend_pb2.GetBudgetRequest(node_id=node))
            for node in ("research-agent-02", "research-agents", "acme", "globex-w1")
        ),
        # Every admin RPC, even on the agent's own wallet.
        ("ApplyPlan", valid["ApplyPlan"]),
        ("ApplyPlan", admin_pb2.ApplyPlanRequest(plan_yaml=NEW_ACCOUNT)),
        ("GetTree", admin_pb2.GetTreeRequest()),
        ("GetTree", admin_pb2.GetTreeRequest(node_id="acme")),
        ("SetLimits", valid["SetLimits"]),
        ("CreateNode", valid["CreateNode"]),
        ("MoveNode", admin_pb2.MoveNodeRequest(node_id="research-agent-01", new_parent_id="sales-agents")),
        ("DeleteNode", admin_pb2.DeleteNodeRequest(node_id="research-agent-01")),
        ("FreezeNode", valid["FreezeNode"]),
        ("UnfreezeNode", admin_pb2.UnfreezeNodeRequest(node_id="research-agent-01")),
        ("WatchEvents", admin_pb2.WatchEventsRequest()),
        ("WatchEvents", admin_pb2.WatchEventsRequest(node_id="acme")),
        ("RecommendLimits", valid["RecommendLimits"]),
        ("CreateToken", valid["CreateToken"]),
        ("ListTokens", admin_pb2.ListTokensRequest()),
        ("ListTokens", valid["ListTokens"]),
        ("RevokeToken", admin_pb2.RevokeTokenRequest(token_id=s.tokens["agent_a"].token_id)),
        ("RevokeToken", valid["RevokeToken"]),
    ]
    rows = [("agent_a", rpc, request, {DENIED}) for rpc, request in refused]
    allowed = [
        ("Authorize", authorize("research-agent-01", "own-1")),
        ("AuthorizeStream", valid["AuthorizeStream"]),
        ("GetBudget", valid["GetBudget"]),
        (
            "Capture",
            spend_pb2.CaptureRequest(authorization_id=holds["research-agent-01"], amount_micros=1, idempotency_key="c"),
        ),
    ]
    rows += [("agent_a", rpc, request, {OK}) for rpc, request in allowed]
    await check_rows(s, rows)
    own = await s.hold("agent_a", "research-agent-01")
    await s.ok("Void", spend_pb2.VoidRequest(authorization_id=own), "agent_a")


async def test_a_reader_token_reads_its_account_but_never_writes(start_secured: StartSecured) -> None:
    s = await start_secured(ledger=True)
    holds = await holds_of_every_kind(s)
    valid = requests(s, holds)
    refused = [
        "Authorize",
        "AuthorizeStream",
        "Capture",
        "Void",
        "ApplyPlan",
        "SetLimits",
        "CreateNode",
        "MoveNode",
        "DeleteNode",
        "FreezeNode",
        "UnfreezeNode",
        "CreateToken",
        "ListTokens",
        "RevokeToken",
        "GetLedgerStatus",
    ]
    rows = [("reader_a", rpc, valid[rpc], {DENIED}) for rpc in refused]
    # The ledger's status is deployment-wide: for the root token only, not an account's admin.
    rows.append(("admin_a", "GetLedgerStatus", valid["GetLedgerStatus"], {DENIED}))
    # Another account's nodes are not readable.
    rows += [
        ("reader_a", "GetBudget", spend_pb2.GetBudgetRequest(node_id="globex-w1"), {DENIED}),
        ("reader_a", "GetTree", admin_pb2.GetTreeRequest(node_id="globex"), {DENIED}),
        ("reader_a", "ListTransactions", billing_pb2.ListTransactionsRequest(node_id="globex"), {DENIED}),
        ("reader_a", "SpendReport", billing_pb2.SpendReportRequest(node_id="globex-pool"), {DENIED}),
        ("reader_a", "WatchEvents", admin_pb2.WatchEventsRequest(node_id="globex"), {DENIED}),
    ]
    # Its own account is.
    reads: list[tuple[str, Any]] = [
        ("GetBudget", spend_pb2.GetBudgetRequest(node_id="acme")),
        ("GetBudget", spend_pb2.GetBudgetRequest(node_id="research-agent-02")),
        ("GetTree", admin_pb2.GetTreeRequest()),
        ("GetTree", admin_pb2.GetTreeRequest(node_id="acme")),
        ("WatchEvents", admin_pb2.WatchEventsRequest()),
        ("RecommendLimits", valid["RecommendLimits"]),
        ("ListTransactions", valid["ListTransactions"]),
        ("SpendReport", valid["SpendReport"]),
    ]
    rows += [("reader_a", rpc, request, {OK}) for rpc, request in reads]
    # Agents do not read the audit log at all.
    rows.append(("agent_a", "ListAuditLog", valid["ListAuditLog"], {DENIED}))
    await check_rows(s, rows)
    # A reader's audit log is its own account's; the root's has the other account's too.
    own = await s.ok("ListAuditLog", valid["ListAuditLog"], "reader_a")
    everything = await s.ok("ListAuditLog", valid["ListAuditLog"], "root")
    assert own.records, "the token creations are in the audit log"
    assert not [record for record in own.records if record.node_id.startswith("globex")]
    assert [record for record in everything.records if record.node_id.startswith("globex")]
    # The default scope of a reader's tree is its own account, not the deployment.
    tree = await s.ok("GetTree", admin_pb2.GetTreeRequest(), "reader_a")
    assert {node.budget.account_id for node in tree.nodes} == {"acme"}


async def test_an_admin_token_acts_only_in_its_own_account(secured: Secured) -> None:
    s = secured
    holds = await holds_of_every_kind(s)
    on_b: list[tuple[str, Any]] = [
        ("Authorize", authorize("globex-w1", "b-1")),
        ("AuthorizeStream", spend_pb2.AuthorizeStreamRequest(request_id="x", request=authorize("globex-w1", "b-2"))),
        (
            "Capture",
            spend_pb2.CaptureRequest(authorization_id=holds["globex-w1"], amount_micros=1, idempotency_key="c"),
        ),
        ("Void", spend_pb2.VoidRequest(authorization_id=holds["globex-w1"])),
        ("GetBudget", spend_pb2.GetBudgetRequest(node_id="globex-w1")),
        ("GetTree", admin_pb2.GetTreeRequest(node_id="globex")),
        ("SetLimits", admin_pb2.SetLimitsRequest(node_id="globex-w1", limits=admin_pb2.NodeLimits(day_micros=USD))),
        (
            "CreateNode",
            admin_pb2.CreateNodeRequest(node_id="globex-w9", parent_id="globex-pool", kind=spend_pb2.NODE_KIND_WALLET),
        ),
        ("MoveNode", admin_pb2.MoveNodeRequest(node_id="globex-w2", new_parent_id="globex")),
        ("DeleteNode", admin_pb2.DeleteNodeRequest(node_id="globex-w2")),
        ("FreezeNode", admin_pb2.FreezeNodeRequest(node_id="globex", reason="hostile")),
        ("UnfreezeNode", admin_pb2.UnfreezeNodeRequest(node_id="globex")),
        ("WatchEvents", admin_pb2.WatchEventsRequest(node_id="globex")),
        ("RecommendLimits", admin_pb2.RecommendLimitsRequest(account_id="globex")),
        ("ApplyPlan", admin_pb2.ApplyPlanRequest(plan_yaml=CHANGED_OTHER)),
        ("ApplyPlan", admin_pb2.ApplyPlanRequest(plan_yaml=NEW_ACCOUNT)),
        (
            "CreateToken",
            admin_pb2.CreateTokenRequest(role=admin_pb2.TOKEN_ROLE_AGENT, scope_node_id="globex-w1", name="x"),
        ),
        (
            "CreateToken",
            admin_pb2.CreateTokenRequest(role=admin_pb2.TOKEN_ROLE_ADMIN, scope_node_id="globex", name="x"),
        ),
        ("ListTokens", admin_pb2.ListTokensRequest(account_id="globex")),
        ("RevokeToken", admin_pb2.RevokeTokenRequest(token_id=s.tokens["agent_b"].token_id)),
    ]
    rows = [("admin_a", rpc, request, {DENIED}) for rpc, request in on_b]
    # Moving or creating across the border of its account, from its own side, is refused too.
    rows += [
        (
            "admin_a",
            "MoveNode",
            admin_pb2.MoveNodeRequest(node_id="research-agent-03", new_parent_id="globex-pool"),
            {DENIED, INVALID, grpc.StatusCode.NOT_FOUND},
        ),
        (
            "admin_a",
            "CreateNode",
            admin_pb2.CreateNodeRequest(
                node_id="globex-w1", parent_id="research-agents", kind=spend_pb2.NODE_KIND_WALLET
            ),
            {INVALID, grpc.StatusCode.ALREADY_EXISTS},
        ),
        (
            "admin_a",
            "ApplyPlan",
            admin_pb2.ApplyPlanRequest(plan_yaml=FLEET.read_text().replace("id: content-agent-02", "id: globex-w2")),
            {INVALID, DENIED, grpc.StatusCode.ALREADY_EXISTS},
        ),
    ]
    # Its own account is open to it.
    rows += [
        ("admin_a", "GetTree", admin_pb2.GetTreeRequest(), {OK}),
        ("admin_a", "ListTokens", admin_pb2.ListTokensRequest(), {OK}),
        ("admin_a", "FreezeNode", admin_pb2.FreezeNodeRequest(node_id="research-agent-03", reason="ok"), {OK}),
        ("admin_a", "Authorize", authorize("research-agent-02", "admin-1"), {OK}),
    ]
    await check_rows(s, rows)
    listed = await s.ok("ListTokens", admin_pb2.ListTokensRequest(), "admin_a")
    assert {token.account_id for token in listed.tokens} == {"acme"}, "an admin sees only its account's tokens"
    # The other account's nodes are as they were.
    budget = await s.ok("GetBudget", spend_pb2.GetBudgetRequest(node_id="globex"), "admin_b")
    assert not budget.frozen


async def test_the_stream_refuses_a_foreign_wallet_item_by_item_and_keeps_serving_its_own(secured: Secured) -> None:
    s = secured
    items = [
        spend_pb2.AuthorizeStreamRequest(request_id="mine-1", request=authorize("research-agent-01", "m-1")),
        spend_pb2.AuthorizeStreamRequest(request_id="theirs", request=authorize("research-agent-02", "t-1")),
        spend_pb2.AuthorizeStreamRequest(request_id="other-acct", request=authorize("globex-w2", "t-2")),
        spend_pb2.AuthorizeStreamRequest(request_id="mine-2", request=authorize("research-agent-01", "m-2")),
    ]
    method = s.channel.stream_stream(
        RPCS["AuthorizeStream"].path,
        request_serializer=spend_pb2.AuthorizeStreamRequest.SerializeToString,
        response_deserializer=spend_pb2.AuthorizeStreamResponse.FromString,
    )
    answers = {
        answer.request_id: answer async for answer in method(iter(items), metadata=s.metadata("agent_a"), timeout=10)
    }
    assert answers["mine-1"].response.decision == spend_pb2.DECISION_APPROVED
    assert answers["mine-2"].response.decision == spend_pb2.DECISION_APPROVED
    for refused in ("theirs", "other-acct"):
        assert answers[refused].error_code == DENIED.value[0], answers[refused]
    budget = await s.ok("GetBudget", spend_pb2.GetBudgetRequest(node_id="research-agent-02"), "root")
    assert budget.windows[0].held_micros == 0


# ---------------------------------------------------------------------------------------------------------
# Storage, listing, revocation.


async def test_secrets_are_stored_nowhere_and_never_listed(
    start_secured: StartSecured, backend_kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    s = await start_secured(backend_kind, ledger=True)
    await s.hold("agent_a", "research-agent-01")
    revoked = await s.ok(
        "CreateToken",
        admin_pb2.CreateTokenRequest(role=admin_pb2.TOKEN_ROLE_READER, scope_node_id="acme", name="short-lived"),
        "admin_a",
    )
    await s.ok("RevokeToken", admin_pb2.RevokeTokenRequest(token_id=revoked.token.token_id), "admin_a")
    secrets = {name: issued.secret for name, issued in s.tokens.items()} | {"revoked": revoked.secret}

    # Every key and every value under the prefix, as one text.
    stored = repr(await s.snapshot())
    for name, secret in secrets.items():
        assert secret not in stored, f"the secret of {name} is stored in Redis"
    for name in s.tokens:
        # The hash is there (so the scan above looked at the right place).
        assert hashlib.sha256(s.tokens[name].secret.encode()).hexdigest() in stored, name
    assert s.root not in stored

    listed = await s.ok("ListTokens", admin_pb2.ListTokensRequest(), "root")
    assert {token.token_id for token in listed.tokens} == {issued.token_id for issued in s.tokens.values()}
    wire = listed.SerializeToString()
    for name, secret in secrets.items():
        assert secret.encode() not in wire, f"ListTokens returned the secret of {name}"
        # Nor the full hash: the public id is a short prefix of it and is all a listing needs.
        assert hashlib.sha256(secret.encode()).hexdigest().encode() not in wire, name

    # The ledger's audit log records token changes (by public id), never secrets.
    assert s.server.ledger is not None
    audit = await s.server.ledger.list_audit(limit=1000)
    created = repr([record for record in audit if "token" in repr(record)])
    for issued in s.tokens.values():
        assert issued.token_id in created, "every token's creation is in the audit log"
    database = b"".join(path.read_bytes() for path in s.data_dir.rglob("*") if path.is_file())
    assert s.tokens["agent_a"].token_id.encode() in database, "the ledger's files are where the scan looks"
    for name, secret in secrets.items():
        assert secret not in repr(audit), f"the audit log holds the secret of {name}"
        assert secret.encode() not in database, f"the ledger's files hold the secret of {name}"
    logged = "\n".join(record.getMessage() for record in caplog.records)
    for name, secret in secrets.items():
        assert secret not in logged, f"the secret of {name} was logged"


async def test_revocation_takes_effect_on_the_next_call_on_every_replica(
    start_secured: StartSecured, backend_kind: str
) -> None:
    prefix = new_prefix()
    shared = fakeredis.FakeServer() if backend_kind == "fakeredis" else None
    first = await start_secured(backend_kind, prefix=prefix, fake_server=shared, admin_token=SHARED_ROOT)
    second = await start_secured(backend_kind, prefix=prefix, fake_server=shared, admin_token=SHARED_ROOT, setup=False)
    second.tokens = first.tokens
    # Both replicas know the tokens, and a hold made on one is capturable on the other.
    held = await second.hold("agent_a", "research-agent-01", key="before-revoke")
    await first.ok("GetBudget", spend_pb2.GetBudgetRequest(node_id="research-agent-01"), "agent_a")
    await second.ok("GetBudget", spend_pb2.GetBudgetRequest(node_id="globex"), "admin_b")

    await first.ok("RevokeToken", admin_pb2.RevokeTokenRequest(token_id=first.tokens["agent_a"].token_id), "admin_a")
    await first.ok("RevokeToken", admin_pb2.RevokeTokenRequest(token_id=first.tokens["admin_b"].token_id), "root")

    for replica in (second, first):
        before = await replica.snapshot()
        calls = [
            ("agent_a", "Authorize", authorize("research-agent-01", "after-revoke")),
            (
                "agent_a",
                "Capture",
                spend_pb2.CaptureRequest(authorization_id=held, amount_micros=1, idempotency_key="c"),
            ),
            ("agent_a", "Void", spend_pb2.VoidRequest(authorization_id=held)),
            ("agent_a", "GetBudget", spend_pb2.GetBudgetRequest(node_id="research-agent-01")),
            (
                "agent_a",
                "AuthorizeStream",
                spend_pb2.AuthorizeStreamRequest(request_id="x", request=authorize("research-agent-01", "s")),
            ),
            ("admin_b", "GetBudget", spend_pb2.GetBudgetRequest(node_id="globex")),
            ("admin_b", "FreezeNode", admin_pb2.FreezeNodeRequest(node_id="globex", reason="revoked")),
            ("admin_b", "ListTokens", admin_pb2.ListTokensRequest()),
        ]
        for who, rpc, request in calls:
            outcome = await replica.call(rpc, request, who)
            assert outcome.code == UNAUTHENTICATED, f"{who} {rpc} after revocation: {outcome}"
        assert await replica.snapshot() == before
    # Tokens that were not revoked still work on both.
    for replica in (first, second):
        await replica.ok("GetBudget", spend_pb2.GetBudgetRequest(node_id="sales-agent-01"), "agent_a2")
        await replica.ok("Void", spend_pb2.VoidRequest(authorization_id=held), "admin_a")
    listed = await second.ok("ListTokens", admin_pb2.ListTokensRequest(), "root")
    ids = {token.token_id for token in listed.tokens}
    assert first.tokens["agent_a"].token_id not in ids
    assert first.tokens["admin_b"].token_id not in ids
    assert first.tokens["agent_a2"].token_id in ids


async def test_a_token_is_refused_once_its_wallet_is_gone_and_a_new_wallet_of_the_same_id_is_not_its(
    secured: Secured,
) -> None:
    s = secured
    await s.ok("DeleteNode", admin_pb2.DeleteNodeRequest(node_id="globex-w1", force=True), "admin_b")
    outcome = await s.call("Authorize", authorize("globex-w1", "gone-1"), "agent_b")
    assert outcome.code in (grpc.StatusCode.NOT_FOUND, DENIED, UNAUTHENTICATED), outcome
    # The id is reused in another account: the old agent token (still scoped to the name) must not spend there.
    await s.ok(
        "CreateNode",
        admin_pb2.CreateNodeRequest(node_id="globex-w1", parent_id="research-agents", kind=spend_pb2.NODE_KIND_WALLET),
        "admin_a",
    )
    before = await s.snapshot()
    outcome = await s.call("Authorize", authorize("globex-w1", "gone-2"), "agent_b")
    assert outcome.code in (DENIED, UNAUTHENTICATED), outcome
    assert await s.snapshot() == before
    outcome = await s.call("GetBudget", spend_pb2.GetBudgetRequest(node_id="globex-w1"), "agent_b")
    assert outcome.code in (DENIED, UNAUTHENTICATED), outcome


async def test_deleting_a_wallet_retires_its_agent_tokens(secured: Secured) -> None:
    s = secured
    await s.ok("DeleteNode", admin_pb2.DeleteNodeRequest(node_id="research-agent-01", force=True), "admin_a")
    listed = await s.ok("ListTokens", admin_pb2.ListTokensRequest(), "admin_a")
    assert s.tokens["agent_a"].token_id not in {token.token_id for token in listed.tokens}
    await s.ok(
        "CreateNode",
        admin_pb2.CreateNodeRequest(
            node_id="research-agent-01", parent_id="sales-agents", kind=spend_pb2.NODE_KIND_WALLET
        ),
        "admin_a",
    )
    outcome = await s.call("Authorize", authorize("research-agent-01", "reborn-1"), "agent_a")
    assert outcome.code in (DENIED, UNAUTHENTICATED), outcome
