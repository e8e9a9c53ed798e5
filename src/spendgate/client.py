"""Typed Python clients: :class:`Client` (blocking) and :class:`AsyncClient` (asyncio).

Both set an idempotency key on every mutating call when the caller does not, and retry a bounded number of
times on ``UNAVAILABLE`` and on deadlines with the *same* key, so a retry never charges twice. Errors come
back as the same exceptions the core raises (:class:`~spendgate.domain.InvalidArgumentError`, ...).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from typing import Any, Self, TypeVar

import grpc

from spendgate._gen.spendgate.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    billing_pb2,
    billing_pb2_grpc,
    spend_pb2,
    spend_pb2_grpc,
)
from spendgate.api.codec import decode_authorize, decode_budget, decode_capture, decode_void
from spendgate.api.errors import STATUS_OF
from spendgate.domain import (
    AuthorizeResult,
    CaptureResult,
    InvalidArgumentError,
    Limits,
    NodeBudget,
    NodeKind,
    SpendgateError,
    UnavailableError,
    VoidResult,
)

T = TypeVar("T")
_RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
_ERROR_OF = {code: kind for kind, code in STATUS_OF.items()}
_CODES = {code.value[0]: code for code in grpc.StatusCode}


class RpcError(SpendgateError):
    """A call that failed with a status the core does not raise on purpose (for example INTERNAL)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code


@dataclasses.dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How a client retries calls that may not have reached the server (bounded, exponential back-off)."""

    attempts_max: int = 4
    backoff_initial_s: float = 0.05
    backoff_max_s: float = 1.0

    def delay_s(self, attempt: int) -> float:
        """The pause before retry number ``attempt`` (1-based)."""
        return float(min(self.backoff_max_s, self.backoff_initial_s * 2 ** (attempt - 1)))


def _error(error: grpc.RpcError) -> SpendgateError:
    code: grpc.StatusCode = error.code()
    details = error.details() or ""
    kind = _ERROR_OF.get(code)
    if kind is not None:
        return kind(details)
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return UnavailableError(f"deadline exceeded: {details}")
    return RpcError(code, details)


def _metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


@dataclasses.dataclass(frozen=True, slots=True)
class Tls:
    """TLS for a client: the CA that signed the server's certificate, and for mutual TLS the client's own."""

    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""

    def credentials(self) -> grpc.ChannelCredentials:
        """The channel credentials these files make."""

        def read(path: str) -> bytes | None:
            if not path:
                return None
            with open(path, "rb") as handle:
                return handle.read()

        return grpc.ssl_channel_credentials(
            root_certificates=read(self.ca_file),
            private_key=read(self.key_file),
            certificate_chain=read(self.cert_file),
        )


def _sync_channel(target: str, tls: Tls | None) -> grpc.Channel:
    return grpc.secure_channel(target, tls.credentials()) if tls else grpc.insecure_channel(target)


def _aio_channel(target: str, tls: Tls | None) -> grpc.aio.Channel:
    return grpc.aio.secure_channel(target, tls.credentials()) if tls else grpc.aio.insecure_channel(target)


def new_idempotency_key() -> str:
    """Return a fresh idempotency key."""
    return uuid.uuid4().hex


def _authorize_request(
    wallet_id: str,
    amount_micros: int,
    currency: str,
    service: str,
    capture: bool,
    metadata: Mapping[str, str] | None,
    idempotency_key: str | None,
) -> spend_pb2.AuthorizeRequest:
    _check_int64(amount_micros)
    return spend_pb2.AuthorizeRequest(
        wallet_id=wallet_id,
        amount_micros=amount_micros,
        currency=currency,
        service=service,
        capture=capture,
        metadata=dict(metadata or {}),
        idempotency_key=idempotency_key or new_idempotency_key(),
    )


def _check_int64(amount_micros: int) -> None:
    """An amount outside int64 cannot even be encoded; say what to fix instead of protobuf's ValueError."""
    if not -(2**63) <= amount_micros < 2**63:
        raise InvalidArgumentError(f"amount_micros {amount_micros} is outside int64; amounts are micro-units")


def _capture_request(
    authorization_id: str, amount_micros: int, idempotency_key: str | None
) -> spend_pb2.CaptureRequest:
    _check_int64(amount_micros)
    return spend_pb2.CaptureRequest(
        authorization_id=authorization_id,
        amount_micros=amount_micros,
        idempotency_key=idempotency_key or new_idempotency_key(),
    )


class AsyncClient:
    """An asyncio client of SpendService."""

    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        *,
        token: str | None = None,
        timeout_s: float = 2.0,
        retry: RetryPolicy | None = None,
        channel: grpc.aio.Channel | None = None,
        tls: Tls | None = None,
    ) -> None:
        self._channel = channel or _aio_channel(target, tls)
        # The generated gRPC module has no type hints (protoc's grpc plugin writes none).
        self._stub = spend_pb2_grpc.SpendServiceStub(self._channel)  # type: ignore[no-untyped-call]
        self._metadata = _metadata(token)
        self._timeout_s = timeout_s
        self._retry = retry or RetryPolicy()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel."""
        await self._channel.close(grace=None)

    async def _call(self, method: Callable[..., Awaitable[Any]], request: Any, decode: Callable[[Any], T]) -> T:
        for attempt in range(1, self._retry.attempts_max + 1):
            try:
                response = await method(request, timeout=self._timeout_s, metadata=self._metadata)
                return decode(response)
            except grpc.RpcError as error:
                if error.code() not in _RETRYABLE or attempt == self._retry.attempts_max:
                    raise _error(error) from None
            await asyncio.sleep(self._retry.delay_s(attempt))
        raise AssertionError("unreachable: the last attempt returns or raises")  # pragma: no cover

    async def authorize(
        self,
        wallet_id: str,
        amount_micros: int,
        *,
        currency: str = "USD",
        service: str = "",
        capture: bool = False,
        metadata: Mapping[str, str] | None = None,
        idempotency_key: str | None = None,
    ) -> AuthorizeResult:
        """Ask to spend ``amount_micros`` from a wallet; a denial is a result, not an error."""
        request = _authorize_request(wallet_id, amount_micros, currency, service, capture, metadata, idempotency_key)
        return await self._call(self._stub.Authorize, request, decode_authorize)

    async def capture(
        self, authorization_id: str, amount_micros: int, *, idempotency_key: str | None = None
    ) -> CaptureResult:
        """Settle a hold fully or partially."""
        request = _capture_request(authorization_id, amount_micros, idempotency_key)
        return await self._call(self._stub.Capture, request, decode_capture)

    async def void(self, authorization_id: str) -> VoidResult:
        """Release a hold."""
        return await self._call(self._stub.Void, spend_pb2.VoidRequest(authorization_id=authorization_id), decode_void)

    def stream(self) -> AuthorizeStream:
        """Open a bidirectional authorization stream (for high throughput)."""
        return AuthorizeStream(self._stub, self._metadata)

    async def get_budget(self, node_id: str) -> NodeBudget:
        """Report a node's budget."""
        return await self._call(self._stub.GetBudget, spend_pb2.GetBudgetRequest(node_id=node_id), decode_budget)


class AuthorizeStream:
    """Many authorizations over one bidirectional stream (``AsyncClient.stream()``); answers match by id.

    Use it as ``async with client.stream() as stream: result = await stream.authorize(...)`` from as many
    tasks as you like: requests share the stream and are decided concurrently by the server.
    """

    def __init__(self, stub: Any, metadata: tuple[tuple[str, str], ...]) -> None:
        self._outgoing: asyncio.Queue[spend_pb2.AuthorizeStreamRequest | None] = asyncio.Queue()
        self._pending: dict[str, asyncio.Future[AuthorizeResult]] = {}
        self._call = stub.AuthorizeStream(self._requests(), metadata=metadata)
        self._reader = asyncio.create_task(self._read())

    async def __aenter__(self) -> AuthorizeStream:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def _requests(self) -> AsyncIterator[spend_pb2.AuthorizeStreamRequest]:
        while (item := await self._outgoing.get()) is not None:
            yield item

    async def _read(self) -> None:
        failure: SpendgateError = UnavailableError("the stream ended")
        try:
            async for answer in self._call:
                future = self._pending.pop(answer.request_id, None)
                if future is None or future.done():
                    continue
                if answer.error_code:
                    code = _CODES.get(answer.error_code, grpc.StatusCode.UNKNOWN)
                    kind = _ERROR_OF.get(code)
                    future.set_exception(kind(answer.error_message) if kind else RpcError(code, answer.error_message))
                else:
                    future.set_result(decode_authorize(answer.response))
        except grpc.RpcError as error:
            failure = _error(error)
        finally:
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(failure)
            self._pending.clear()

    async def authorize(
        self,
        wallet_id: str,
        amount_micros: int,
        *,
        currency: str = "USD",
        service: str = "",
        capture: bool = False,
        metadata: Mapping[str, str] | None = None,
        idempotency_key: str | None = None,
    ) -> AuthorizeResult:
        """Ask to spend over the stream; the same arguments and answer as :meth:`AsyncClient.authorize`."""
        if self._reader.done():
            raise UnavailableError("the stream is closed")
        request_id = uuid.uuid4().hex
        future: asyncio.Future[AuthorizeResult] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        request = _authorize_request(wallet_id, amount_micros, currency, service, capture, metadata, idempotency_key)
        self._outgoing.put_nowait(spend_pb2.AuthorizeStreamRequest(request_id=request_id, request=request))
        return await future

    async def close(self) -> None:
        """Finish the stream after the answers still due have arrived."""
        self._outgoing.put_nowait(None)
        await self._reader


class Client:
    """A blocking client of SpendService; the same methods as :class:`AsyncClient`."""

    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        *,
        token: str | None = None,
        timeout_s: float = 2.0,
        retry: RetryPolicy | None = None,
        channel: grpc.Channel | None = None,
        tls: Tls | None = None,
    ) -> None:
        self._channel = channel or _sync_channel(target, tls)
        # The generated gRPC module has no type hints (protoc's grpc plugin writes none).
        self._stub = spend_pb2_grpc.SpendServiceStub(self._channel)  # type: ignore[no-untyped-call]
        self._metadata = _metadata(token)
        self._timeout_s = timeout_s
        self._retry = retry or RetryPolicy()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()

    def _call(self, method: Callable[..., Any], request: Any, decode: Callable[[Any], T]) -> T:
        for attempt in range(1, self._retry.attempts_max + 1):
            try:
                return decode(method(request, timeout=self._timeout_s, metadata=self._metadata))
            except grpc.RpcError as error:
                if error.code() not in _RETRYABLE or attempt == self._retry.attempts_max:
                    raise _error(error) from None
            time.sleep(self._retry.delay_s(attempt))
        raise AssertionError("unreachable: the last attempt returns or raises")  # pragma: no cover

    def authorize(
        self,
        wallet_id: str,
        amount_micros: int,
        *,
        currency: str = "USD",
        service: str = "",
        capture: bool = False,
        metadata: Mapping[str, str] | None = None,
        idempotency_key: str | None = None,
    ) -> AuthorizeResult:
        """Ask to spend ``amount_micros`` from a wallet; a denial is a result, not an error."""
        request = _authorize_request(wallet_id, amount_micros, currency, service, capture, metadata, idempotency_key)
        return self._call(self._stub.Authorize, request, decode_authorize)

    def capture(
        self, authorization_id: str, amount_micros: int, *, idempotency_key: str | None = None
    ) -> CaptureResult:
        """Settle a hold fully or partially."""
        return self._call(
            self._stub.Capture,
            _capture_request(authorization_id, amount_micros, idempotency_key),
            decode_capture,
        )

    def void(self, authorization_id: str) -> VoidResult:
        """Release a hold."""
        return self._call(self._stub.Void, spend_pb2.VoidRequest(authorization_id=authorization_id), decode_void)

    def get_budget(self, node_id: str) -> NodeBudget:
        """Report a node's budget."""
        return self._call(self._stub.GetBudget, spend_pb2.GetBudgetRequest(node_id=node_id), decode_budget)


@dataclasses.dataclass(frozen=True, slots=True)
class Event:
    """One event of the live feed."""

    kind: str
    at_ms: int
    account_id: str
    node_id: str
    chain: tuple[str, ...]
    amount_micros: int
    decision: str
    deny_reason: str
    window: str
    threshold_percent: int
    message: str
    authorization_id: str


@dataclasses.dataclass(frozen=True, slots=True)
class PlanChangeView:
    """One change of a plan diff as the server described it."""

    node_id: str
    kind: str
    before: str
    after: str
    unsafe_reason: str


@dataclasses.dataclass(frozen=True, slots=True)
class ApplyProgress:
    """Progress of a plan being applied; the last one has ``done`` set and carries the changes."""

    nodes_done: int
    nodes_total: int
    done: bool = False
    applied: bool = False
    changes: tuple[PlanChangeView, ...] = ()


def _limits_message(limits: Limits) -> admin_pb2.NodeLimits:
    message = admin_pb2.NodeLimits(allowed_services=list(limits.allowed_services))
    for name in (
        "per_transaction_micros",
        "day_micros",
        "week_micros",
        "month_micros",
        "total_micros",
        "velocity_per_minute",
    ):
        value = getattr(limits, name)
        if value is not None:
            setattr(message, name, value)
    return message


class _OperatorClient:
    """What the blocking operator clients share: a channel, a stub, the token, and calls without retries."""

    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        *,
        token: str | None = None,
        timeout_s: float = 30.0,
        channel: grpc.Channel | None = None,
        tls: Tls | None = None,
    ) -> None:
        self._channel = channel or _sync_channel(target, tls)
        self._stub = self._make_stub(self._channel)
        self._metadata = _metadata(token)
        self._timeout_s = timeout_s

    @staticmethod
    def _make_stub(channel: grpc.Channel) -> Any:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()

    def _unary(self, method: Callable[..., Any], request: Any) -> Any:
        try:
            return method(request, timeout=self._timeout_s, metadata=self._metadata)
        except grpc.RpcError as error:
            raise _error(error) from None


class AdminClient(_OperatorClient):
    """A blocking client of AdminService (operators' tools and the CLI). Admin calls are not retried."""

    @staticmethod
    def _make_stub(channel: grpc.Channel) -> Any:
        # The generated gRPC module has no type hints (protoc's grpc plugin writes none).
        return admin_pb2_grpc.AdminServiceStub(channel)  # type: ignore[no-untyped-call]

    def apply_plan(self, plan_yaml: str, *, dry_run: bool = False, force: bool = False) -> Iterator[ApplyProgress]:
        """Apply a plan (YAML text), yielding progress; the last item carries the changes."""
        request = admin_pb2.ApplyPlanRequest(plan_yaml=plan_yaml, dry_run=dry_run, force=force)
        try:
            for message in self._stub.ApplyPlan(request, timeout=max(self._timeout_s, 600.0), metadata=self._metadata):
                yield ApplyProgress(
                    nodes_done=message.nodes_done,
                    nodes_total=message.nodes_total,
                    done=message.done,
                    applied=message.applied,
                    changes=tuple(
                        PlanChangeView(
                            c.node_id,
                            admin_pb2.ChangeKind.Name(c.kind).removeprefix("CHANGE_KIND_").lower(),
                            c.before,
                            c.after,
                            c.unsafe_reason,
                        )
                        for c in message.changes
                    ),
                )
        except grpc.RpcError as error:
            raise _error(error) from None

    def tree(self, node_id: str = "") -> list[tuple[int, NodeBudget, bool]]:
        """The subtree of a node (every account when empty): (depth, budget, shadow), parents first."""
        response = self._unary(self._stub.GetTree, admin_pb2.GetTreeRequest(node_id=node_id))
        return [(node.depth, decode_budget(node.budget), node.shadow) for node in response.nodes]

    def freeze(self, node_id: str, reason: str, *, void_holds: bool = False) -> tuple[int, int]:
        """Freeze a node; return (holds voided, money released in micro-units)."""
        response = self._unary(
            self._stub.FreezeNode, admin_pb2.FreezeNodeRequest(node_id=node_id, reason=reason, void_holds=void_holds)
        )
        return int(response.voided_holds), int(response.released_micros)

    def unfreeze(self, node_id: str) -> bool:
        """Unfreeze a node; return whether it was frozen."""
        return bool(self._unary(self._stub.UnfreezeNode, admin_pb2.UnfreezeNodeRequest(node_id=node_id)).was_frozen)

    def set_limits(self, node_id: str, limits: Limits, *, shadow: bool = False) -> NodeBudget:
        """Replace a node's limits (a limit left out is removed)."""
        request = admin_pb2.SetLimitsRequest(node_id=node_id, limits=_limits_message(limits), shadow=shadow)
        return decode_budget(self._unary(self._stub.SetLimits, request).budget)

    def create_node(self, node_id: str, parent_id: str, kind: NodeKind, limits: Limits) -> NodeBudget:
        """Add a pool or a wallet."""
        request = admin_pb2.CreateNodeRequest(
            node_id=node_id,
            parent_id=parent_id,
            kind=int(kind),  # type: ignore[arg-type]
            limits=_limits_message(limits),
        )
        return decode_budget(self._unary(self._stub.CreateNode, request).budget)

    def move_node(self, node_id: str, new_parent_id: str, *, force: bool = False) -> NodeBudget:
        """Give a node another parent."""
        request = admin_pb2.MoveNodeRequest(node_id=node_id, new_parent_id=new_parent_id, force=force)
        return decode_budget(self._unary(self._stub.MoveNode, request).budget)

    def delete_node(self, node_id: str, *, force: bool = False) -> list[str]:
        """Remove a node and its subtree; return the ids removed."""
        request = admin_pb2.DeleteNodeRequest(node_id=node_id, force=force)
        return list(self._unary(self._stub.DeleteNode, request).removed_node_ids)

    def recommend(
        self, account_id: str, *, stage: str = "", multiplier: float = 0.0, days: int = 7
    ) -> tuple[list[dict[str, Any]], str, tuple[PlanChangeView, ...]]:
        """Limits from actuals: (per-wallet figures, the plan as YAML, what applying it would change)."""
        request = admin_pb2.RecommendLimitsRequest(
            account_id=account_id,
            stage=f"RAMP_UP_STAGE_{stage.upper()}" if stage else "RAMP_UP_STAGE_UNSPECIFIED",
            safety_multiplier=multiplier,
            days=days,
        )
        response = self._unary(self._stub.RecommendLimits, request)
        wallets = [
            {field.name: getattr(w, field.name) for field in admin_pb2.WalletRecommendation.DESCRIPTOR.fields}
            for w in response.wallets
        ]
        changes = tuple(
            PlanChangeView(
                c.node_id,
                admin_pb2.ChangeKind.Name(c.kind).removeprefix("CHANGE_KIND_").lower(),
                c.before,
                c.after,
                c.unsafe_reason,
            )
            for c in response.changes
        )
        return wallets, str(response.plan_yaml), changes

    def watch(self, node_id: str = "", kinds: Sequence[str] = ()) -> Iterator[Event]:
        """Stream events under a node (everything when empty) until the caller stops iterating."""
        codes = [f"EVENT_KIND_{kind.upper()}" for kind in kinds]
        stream = self._stub.WatchEvents(
            admin_pb2.WatchEventsRequest(node_id=node_id, kinds=codes), metadata=self._metadata
        )
        try:
            for message in stream:
                yield Event(
                    kind=admin_pb2.EventKind.Name(message.kind).removeprefix("EVENT_KIND_").lower(),
                    at_ms=message.at_ms,
                    account_id=message.account_id,
                    node_id=message.node_id,
                    chain=tuple(message.chain),
                    amount_micros=message.amount_micros,
                    decision=spend_pb2.Decision.Name(message.decision).removeprefix("DECISION_").lower(),
                    deny_reason=spend_pb2.DenyReason.Name(message.deny_reason).removeprefix("DENY_REASON_").lower(),
                    window=spend_pb2.Window.Name(message.window).removeprefix("WINDOW_").lower(),
                    threshold_percent=message.threshold_percent,
                    message=message.message,
                    authorization_id=message.authorization_id,
                )
        except grpc.RpcError as error:
            if error.code() is not grpc.StatusCode.CANCELLED:
                raise _error(error) from None
        finally:
            stream.cancel()


@dataclasses.dataclass(frozen=True, slots=True)
class TokenInfo:
    """An issued token's description (never its secret)."""

    token_id: str
    role: str
    scope_node_id: str
    account_id: str
    name: str
    created_at_ms: int


def _token_info(message: admin_pb2.Token) -> TokenInfo:
    return TokenInfo(
        token_id=message.token_id,
        role=admin_pb2.TokenRole.Name(message.role).removeprefix("TOKEN_ROLE_").lower(),
        scope_node_id=message.scope_node_id,
        account_id=message.account_id,
        name=message.name,
        created_at_ms=message.created_at_ms,
    )


class TokenClient(AdminClient):
    """Token management on AdminService (create, list, revoke)."""

    def create_token(self, role: str, scope_node_id: str, name: str) -> tuple[str, TokenInfo]:
        """Issue a token; return its secret (shown this once) and its description."""
        request = admin_pb2.CreateTokenRequest(
            role=f"TOKEN_ROLE_{role.upper()}",
            scope_node_id=scope_node_id,
            name=name,
        )
        response = self._unary(self._stub.CreateToken, request)
        return str(response.secret), _token_info(response.token)

    def list_tokens(self, account_id: str = "") -> list[TokenInfo]:
        """The tokens the caller may see."""
        response = self._unary(self._stub.ListTokens, admin_pb2.ListTokensRequest(account_id=account_id))
        return [_token_info(token) for token in response.tokens]

    def revoke_token(self, token_id: str) -> TokenInfo:
        """Revoke a token by id."""
        return _token_info(self._unary(self._stub.RevokeToken, admin_pb2.RevokeTokenRequest(token_id=token_id)).token)


@dataclasses.dataclass(frozen=True, slots=True)
class Transaction:
    """A settled transaction from the ledger."""

    txn_id: str
    account_id: str
    wallet_id: str
    chain: tuple[str, ...]
    amount_micros: int
    authorized_micros: int
    currency: str
    service: str
    metadata: Mapping[str, str]
    authorized_at_ms: int
    captured_at_ms: int
    day: str
    week: str
    month: str


@dataclasses.dataclass(frozen=True, slots=True)
class ReportLine:
    """One group's spend in one period."""

    period: str
    group: str
    amount_micros: int
    transaction_count: int
    currency: str


class BillingClient(_OperatorClient):
    """A blocking client of BillingService (finance and the CLI)."""

    @staticmethod
    def _make_stub(channel: grpc.Channel) -> Any:
        # The generated gRPC module has no type hints (protoc's grpc plugin writes none).
        return billing_pb2_grpc.BillingServiceStub(channel)  # type: ignore[no-untyped-call]

    def transactions(
        self, node_id: str, *, since_ms: int = 0, until_ms: int = 0, service: str = "", page_size: int = 500
    ) -> Iterator[Transaction]:
        """Every settled transaction under a node in a time range, oldest first (pages fetched as needed)."""
        token = ""
        while True:
            request = billing_pb2.ListTransactionsRequest(
                node_id=node_id,
                since_ms=since_ms,
                until_ms=until_ms,
                service=service,
                page_size=page_size,
                page_token=token,
            )
            response = self._unary(self._stub.ListTransactions, request)
            for t in response.transactions:
                yield Transaction(
                    t.txn_id,
                    t.account_id,
                    t.wallet_id,
                    tuple(t.chain),
                    t.amount_micros,
                    t.authorized_micros,
                    t.currency,
                    t.service,
                    dict(t.metadata),
                    t.authorized_at_ms,
                    t.captured_at_ms,
                    t.day,
                    t.week,
                    t.month,
                )
            token = response.next_page_token
            if not token:
                return

    def report(
        self, node_id: str, *, group_by: str = "wallet", period: str = "month", since_ms: int = 0, until_ms: int = 0
    ) -> list[ReportLine]:
        """Spend under a node grouped by wallet, pool, account or service, per day or month."""
        request = billing_pb2.SpendReportRequest(
            node_id=node_id,
            group_by=f"REPORT_GROUP_{group_by.upper()}",
            period=f"REPORT_PERIOD_{period.upper()}",
            since_ms=since_ms,
            until_ms=until_ms,
        )
        response = self._unary(self._stub.SpendReport, request)
        return [ReportLine(r.period, r.group, r.amount_micros, r.transaction_count, r.currency) for r in response.rows]

    def audit(self, *, since_ms: int = 0, limit: int = 100) -> list[dict[str, Any]]:
        """Admin changes, oldest first: audit_id, at_ms, actor, action, node_id, before and after (decoded)."""
        response = self._unary(self._stub.ListAuditLog, billing_pb2.ListAuditLogRequest(since_ms=since_ms, limit=limit))
        return [
            {
                "audit_id": r.audit_id,
                "at_ms": r.at_ms,
                "actor": r.actor,
                "action": r.action,
                "node_id": r.node_id,
                "before": json.loads(r.before_json) if r.before_json else None,
                "after": json.loads(r.after_json) if r.after_json else None,
            }
            for r in response.records
        ]

    def status(self) -> tuple[int, int, int]:
        """The ledger's lag: (entries pending, age of the oldest in ms, transactions in the ledger)."""
        response = self._unary(self._stub.GetLedgerStatus, billing_pb2.GetLedgerStatusRequest())
        return int(response.pending_entries), int(response.oldest_pending_age_ms), int(response.ledger_transactions)
