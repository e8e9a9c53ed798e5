"""AdminService: decode, call the control plane's core, encode. Proto types never leave this module."""

from __future__ import annotations

import asyncio
import contextlib
import decimal
import math
from collections.abc import AsyncIterator
from typing import Any

import grpc
import yaml

from spendgate._gen.spendgate.v1 import admin_pb2, admin_pb2_grpc, spend_pb2
from spendgate.admin import AdminCore, PlanChange, describe_node, plan_to_document, subtree
from spendgate.api.auth import Authenticator, Principal, issue_token
from spendgate.api.codec import encode_budget
from spendgate.api.errors import grpc_errors, status_of
from spendgate.clock import Clock
from spendgate.domain import (
    ALLOWED_SERVICES_MAX,
    InvalidArgumentError,
    Limits,
    NodeKind,
    NotFoundError,
    PermissionDeniedError,
    SpendgateError,
    check_id,
    check_service,
    with_article,
)
from spendgate.money import MONEY_MICROS_MAX
from spendgate.plan import VELOCITY_MAX, parse_plan_text
from spendgate.recommend import Stage
from spendgate.store.protocol import TokenRecord
from spendgate.store.redis_store import RedisStore

Context = grpc.aio.ServicerContext[Any, Any]

WATCHERS_MAX = 64
WATCH_POLL_S = 0.1
WATCH_BATCH_MAX = 500
# How often a watcher re-reads the subtree and the account list, so new nodes and accounts show up.
WATCH_REFRESH_S = 5.0
_LIMIT_FIELDS = ("per_transaction_micros", "day_micros", "week_micros", "month_micros", "total_micros")


def decode_limits(limits: admin_pb2.NodeLimits) -> Limits:
    """Validate and decode limits (an unset field is no limit)."""
    values: dict[str, Any] = {}
    for name in _LIMIT_FIELDS:
        if limits.HasField(name):
            value = getattr(limits, name)
            if not 0 <= value <= MONEY_MICROS_MAX:
                raise InvalidArgumentError(f"limits.{name} must be from 0 to {MONEY_MICROS_MAX} (got {value})")
            values[name] = value
    if limits.HasField("velocity_per_minute"):
        if not 1 <= limits.velocity_per_minute <= VELOCITY_MAX:
            raise InvalidArgumentError(f"limits.velocity_per_minute must be from 1 to {VELOCITY_MAX}")
        values["velocity_per_minute"] = limits.velocity_per_minute
    if len(limits.allowed_services) > ALLOWED_SERVICES_MAX:
        raise InvalidArgumentError(f"limits.allowed_services: at most {ALLOWED_SERVICES_MAX} services")
    for service in limits.allowed_services:
        if not service:
            raise InvalidArgumentError("limits.allowed_services may not hold an empty name")
        check_service(service)
    return Limits(allowed_services=tuple(limits.allowed_services), **values)


def encode_change(change: PlanChange, currency: str) -> admin_pb2.PlanChange:
    """Encode one change of a plan diff."""
    return admin_pb2.PlanChange(
        node_id=change.node_id,
        kind=int(change.kind),  # type: ignore[arg-type]
        before=describe_node(change.before, currency) if change.before else "",
        after=describe_node(change.after, currency) if change.after else "",
        unsafe_reason=change.unsafe_reason,
    )


def encode_token(record: TokenRecord) -> admin_pb2.Token:
    """Encode a token's description (never its secret)."""
    return admin_pb2.Token(
        token_id=record.token_id,
        role=f"TOKEN_ROLE_{record.role.upper()}",
        scope_node_id=record.scope_node_id,
        account_id=record.account_id,
        name=record.name,
        created_at_ms=record.created_at_ms,
    )


class AdminServicer(admin_pb2_grpc.AdminServiceServicer):
    """The gRPC face of :class:`~spendgate.admin.AdminCore`."""

    def __init__(self, admin: AdminCore, store: RedisStore, auth: Authenticator, clock: Clock) -> None:
        self._admin = admin
        self._store = store
        self._auth = auth
        self._clock = clock
        self._watchers = 0

    async def _require_node(self, context: Context, node_id: str, *, write: bool) -> Principal:
        """The caller, if they may read (or change) ``node_id``'s account."""
        check_id(node_id, "node_id")
        if not self._auth.enabled:
            return await self._auth.principal(context)
        return await self._auth.require_node(context, node_id, write=write)

    async def _default_scope(self, context: Context, node_id: str) -> str:
        """The node a read covers: the one asked for, else everything (root) or the caller's account."""
        if node_id:
            await self._require_node(context, node_id, write=False)
            return node_id
        caller = await self._auth.principal(context)
        if caller.root:
            return ""
        if caller.role == "agent":
            raise PermissionDeniedError("agent tokens may only read their own wallet's budget")
        return caller.account_id

    async def ApplyPlan(
        self, request: admin_pb2.ApplyPlanRequest, context: Context
    ) -> AsyncIterator[admin_pb2.ApplyPlanResponse]:
        """Diff and (unless a dry run) apply a plan, streaming progress."""
        try:
            # Authenticated before the plan is parsed: an unknown caller cannot make the server parse megabytes.
            await self._auth.principal(context)
            # Parsing a large plan takes seconds: off the event loop, so authorizations keep flowing meanwhile.
            plan = await asyncio.to_thread(parse_plan_text, request.plan_yaml)
            try:
                await self._store.account_info(plan.account_id)
                exists = True
            except NotFoundError:
                exists = False
            caller = await self._auth.require(context, account_id=plan.account_id if exists else None, write=True)
            progress: asyncio.Queue[tuple[int, int]] = asyncio.Queue(maxsize=1024)

            def report(done: int, total: int) -> None:
                # Progress is advisory: when the client reads slowly, updates are dropped, never queued forever.
                with contextlib.suppress(asyncio.QueueFull):
                    progress.put_nowait((done, total))

            work = asyncio.create_task(
                self._admin.apply_plan(
                    plan, dry_run=request.dry_run, force=request.force, actor=caller.actor, progress=report
                )
            )
            try:
                while not work.done():
                    getter = asyncio.ensure_future(progress.get())
                    await asyncio.wait({work, getter}, return_when=asyncio.FIRST_COMPLETED)
                    if getter.done():
                        done, total = getter.result()
                        yield admin_pb2.ApplyPlanResponse(nodes_done=done, nodes_total=total)
                    else:
                        getter.cancel()
                changes = work.result()
            finally:
                work.cancel()
            total = sum(1 for _ in changes)
            yield admin_pb2.ApplyPlanResponse(
                changes=[encode_change(change, plan.currency) for change in changes],
                applied=not request.dry_run and bool(changes),
                nodes_done=0 if request.dry_run else total,
                nodes_total=total,
                done=True,
            )
        except SpendgateError as error:
            await context.abort(status_of(error), str(error))

    @grpc_errors
    async def GetTree(self, request: admin_pb2.GetTreeRequest, context: Context) -> admin_pb2.GetTreeResponse:
        """Report a subtree with budgets."""
        entries = await self._admin.tree(await self._default_scope(context, request.node_id))
        return admin_pb2.GetTreeResponse(
            nodes=[
                admin_pb2.TreeNode(depth=entry.depth, budget=encode_budget(entry.budget), shadow=entry.shadow)
                for entry in entries
            ]
        )

    @grpc_errors
    async def SetLimits(self, request: admin_pb2.SetLimitsRequest, context: Context) -> admin_pb2.SetLimitsResponse:
        """Replace a node's limits."""
        caller = await self._require_node(context, request.node_id, write=True)
        budget = await self._admin.set_limits(
            request.node_id, decode_limits(request.limits), shadow=request.shadow, actor=caller.actor
        )
        return admin_pb2.SetLimitsResponse(budget=encode_budget(budget))

    @grpc_errors
    async def CreateNode(self, request: admin_pb2.CreateNodeRequest, context: Context) -> admin_pb2.CreateNodeResponse:
        """Add a pool or a wallet."""
        kinds = {spend_pb2.NODE_KIND_POOL: NodeKind.POOL, spend_pb2.NODE_KIND_WALLET: NodeKind.WALLET}
        if request.kind not in kinds:
            raise InvalidArgumentError("kind must be NODE_KIND_POOL or NODE_KIND_WALLET")
        caller = await self._require_node(context, request.parent_id, write=True)
        budget = await self._admin.create_node(
            request.node_id,
            request.parent_id,
            kinds[request.kind],
            decode_limits(request.limits),
            actor=caller.actor,
        )
        return admin_pb2.CreateNodeResponse(budget=encode_budget(budget))

    @grpc_errors
    async def MoveNode(self, request: admin_pb2.MoveNodeRequest, context: Context) -> admin_pb2.MoveNodeResponse:
        """Give a node another parent."""
        caller = await self._require_node(context, request.node_id, write=True)
        budget = await self._admin.move_node(
            request.node_id, request.new_parent_id, force=request.force, actor=caller.actor
        )
        return admin_pb2.MoveNodeResponse(budget=encode_budget(budget))

    @grpc_errors
    async def DeleteNode(self, request: admin_pb2.DeleteNodeRequest, context: Context) -> admin_pb2.DeleteNodeResponse:
        """Remove a node and its subtree."""
        caller = await self._require_node(context, request.node_id, write=True)
        removed = await self._admin.delete_node(request.node_id, force=request.force, actor=caller.actor)
        return admin_pb2.DeleteNodeResponse(removed_node_ids=removed)

    @grpc_errors
    async def FreezeNode(self, request: admin_pb2.FreezeNodeRequest, context: Context) -> admin_pb2.FreezeNodeResponse:
        """Freeze a node."""
        caller = await self._require_node(context, request.node_id, write=True)
        voided, released = await self._admin.freeze(
            request.node_id, request.reason, void_holds=request.void_holds, actor=caller.actor
        )
        return admin_pb2.FreezeNodeResponse(voided_holds=voided, released_micros=released)

    @grpc_errors
    async def UnfreezeNode(
        self, request: admin_pb2.UnfreezeNodeRequest, context: Context
    ) -> admin_pb2.UnfreezeNodeResponse:
        """Unfreeze a node."""
        caller = await self._require_node(context, request.node_id, write=True)
        return admin_pb2.UnfreezeNodeResponse(
            was_frozen=await self._admin.unfreeze(request.node_id, actor=caller.actor)
        )

    async def WatchEvents(
        self, request: admin_pb2.WatchEventsRequest, context: Context
    ) -> AsyncIterator[admin_pb2.WatchEventsResponse]:
        """Stream events under a node until the client goes away."""
        if self._watchers >= WATCHERS_MAX:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"at most {WATCHERS_MAX} watchers at once")
        self._watchers += 1
        try:
            scope = await self._default_scope(context, request.node_id)
            async for event in self._watch(scope, request):
                yield event
        except SpendgateError as error:
            await context.abort(status_of(error), str(error))
        finally:
            self._watchers -= 1

    async def _scope(self, node_id: str) -> tuple[list[str], set[str] | None]:
        """The accounts to read and the node ids to keep (``None``: every node)."""
        if not node_id:
            return await self._store.account_ids(), None
        check_id(node_id, "node_id")
        account_id = await self._store.account_of(node_id)
        plan = await self._store.read_plan(account_id)
        ids = {n.node_id for n in subtree(plan, node_id)} if plan else {node_id}
        return [account_id], ids

    async def _watch(
        self, scope: str, request: admin_pb2.WatchEventsRequest
    ) -> AsyncIterator[admin_pb2.WatchEventsResponse]:
        kinds = {int(kind) for kind in request.kinds if kind}
        accounts, ids = await self._scope(scope)
        last = {account: await self._store.last_event_id(account) for account in accounts}
        loop = asyncio.get_running_loop()
        refreshed = loop.time()
        while True:
            if loop.time() - refreshed > WATCH_REFRESH_S:
                accounts, ids = await self._scope(scope)
                for account in accounts:
                    if account not in last:
                        last[account] = await self._store.last_event_id(account)
                refreshed = loop.time()
            events = await self._store.read_events(last, WATCH_BATCH_MAX)
            for account, event_id, fields in events:
                last[account] = event_id
                kind = int(fields.get("k", "0"))
                chain = [part for part in fields.get("chain", "").split(",") if part]
                if kinds and kind not in kinds:
                    continue
                if ids is not None and not (ids & {fields.get("node", ""), *chain}):
                    continue
                yield admin_pb2.WatchEventsResponse(
                    kind=kind,  # type: ignore[arg-type]
                    at_ms=int(fields.get("at", "0")),
                    account_id=account,
                    node_id=fields.get("node", ""),
                    chain=chain,
                    amount_micros=int(fields.get("amt", "0") or 0),
                    decision=int(fields.get("dec", "0") or 0),  # type: ignore[arg-type]
                    deny_reason=int(fields.get("rsn", "0") or 0),  # type: ignore[arg-type]
                    window=int(fields.get("win", "0") or 0),  # type: ignore[arg-type]
                    threshold_percent=int(fields.get("pct", "0") or 0),
                    message=fields.get("msg", ""),
                    authorization_id=fields.get("auth", ""),
                )
            if not events:
                await asyncio.sleep(WATCH_POLL_S)

    # ------------------------------------------------------------------------------------------------
    # Tokens.

    @grpc_errors
    async def CreateToken(
        self, request: admin_pb2.CreateTokenRequest, context: Context
    ) -> admin_pb2.CreateTokenResponse:
        """Issue a token; the secret is in the answer and nowhere else."""
        roles = {
            admin_pb2.TOKEN_ROLE_AGENT: "agent",
            admin_pb2.TOKEN_ROLE_READER: "reader",
            admin_pb2.TOKEN_ROLE_ADMIN: "admin",
        }
        role = roles.get(request.role)
        if role is None:
            raise InvalidArgumentError("role must be TOKEN_ROLE_AGENT, TOKEN_ROLE_READER or TOKEN_ROLE_ADMIN")
        if not 1 <= len(request.name) <= 64 or not request.name.isprintable():
            raise InvalidArgumentError("name must be 1 to 64 printable characters")
        caller = await self._require_node(context, request.scope_node_id, write=True)
        account_id = await self._store.account_of(request.scope_node_id)
        kind = await self._spend_budget_kind(request.scope_node_id)
        if role == "agent" and kind is not NodeKind.WALLET:
            raise InvalidArgumentError(
                f"an agent token is scoped to a wallet; {request.scope_node_id} is {with_article(kind.name.lower())}"
            )
        if role != "agent" and request.scope_node_id != account_id:
            raise InvalidArgumentError(f"{role} tokens are scoped to an account: use {account_id!r}")
        secret, record = await issue_token(
            self._store,
            role=role,
            scope_node_id=request.scope_node_id,
            account_id=account_id,
            name=request.name,
            now_ms=self._clock.now_ms(),
        )
        await self._admin.audit_token(caller.actor, "token.create", record)
        return admin_pb2.CreateTokenResponse(secret=secret, token=encode_token(record))

    @grpc_errors
    async def ListTokens(self, request: admin_pb2.ListTokensRequest, context: Context) -> admin_pb2.ListTokensResponse:
        """List tokens without secrets: every token for the root, one account's for its admins."""
        caller = await self._auth.principal(context)
        account_id = request.account_id or ("" if caller.root else caller.account_id)
        if account_id:
            check_id(account_id, "account_id")
        await self._auth.require(context, account_id=account_id or None, write=True)
        records = [r for r in await self._store.list_tokens() if not account_id or r.account_id == account_id]
        records.sort(key=lambda r: (r.account_id, r.token_id))
        return admin_pb2.ListTokensResponse(tokens=[encode_token(r) for r in records])

    @grpc_errors
    async def RevokeToken(
        self, request: admin_pb2.RevokeTokenRequest, context: Context
    ) -> admin_pb2.RevokeTokenResponse:
        """Revoke a token by its public id."""
        # Authenticated first: only a caller with a valid token learns whether a token id exists.
        await self._auth.principal(context)
        matches = [r for r in await self._store.list_tokens() if r.token_id == request.token_id]
        if not request.token_id or not matches:
            raise NotFoundError(f"no token {request.token_id!r}: see spendgate token list")
        record = matches[0]
        caller = await self._auth.require(context, account_id=record.account_id, write=True)
        await self._store.revoke_token(record)
        await self._admin.audit_token(caller.actor, "token.revoke", record)
        return admin_pb2.RevokeTokenResponse(token=encode_token(record))

    async def _spend_budget_kind(self, node_id: str) -> NodeKind:
        plan = await self._store.read_plan(await self._store.account_of(node_id))
        for node in plan.nodes if plan else ():
            if node.node_id == node_id:
                return node.kind
        raise NotFoundError(f"no node {node_id!r}")

    @grpc_errors
    async def RecommendLimits(
        self, request: admin_pb2.RecommendLimitsRequest, context: Context
    ) -> admin_pb2.RecommendLimitsResponse:
        """Propose wallet limits from actuals, as a plan."""
        check_id(request.account_id, "account_id")
        await self._auth.require_node(context, request.account_id, write=False)
        stages = {
            admin_pb2.RAMP_UP_STAGE_WEEK1: Stage.WEEK1,
            admin_pb2.RAMP_UP_STAGE_WEEK3: Stage.WEEK3,
            admin_pb2.RAMP_UP_STAGE_MONTH2: Stage.MONTH2,
        }
        stage = stages.get(request.stage)
        multiplier = None
        if stage is None:
            if not math.isfinite(request.safety_multiplier):
                raise InvalidArgumentError("safety_multiplier must be a finite number")
            multiplier = decimal.Decimal(repr(request.safety_multiplier)) if request.safety_multiplier else None
        recommendations, plan, changes = await self._admin.recommend_plan(
            request.account_id, stage=stage, multiplier=multiplier, days=request.days or 7
        )
        return admin_pb2.RecommendLimitsResponse(
            wallets=[
                admin_pb2.WalletRecommendation(
                    wallet_id=r.wallet_id,
                    calls=r.calls,
                    calls_per_day=float(r.calls_per_day),
                    average_cost_micros=int(r.average_cost_micros),
                    priciest_micros=r.priciest_micros,
                    busiest_day_micros=r.busiest_day_micros,
                    multiplier=float(r.multiplier or 0),
                    day_limit_micros=r.day_limit_micros,
                    per_transaction_micros=r.per_transaction_micros,
                )
                for r in recommendations
            ],
            plan_yaml=yaml.safe_dump(plan_to_document(plan), sort_keys=False),
            changes=[encode_change(change, plan.currency) for change in changes],
        )
