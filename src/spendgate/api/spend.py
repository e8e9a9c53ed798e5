"""SpendService: decode the request, call the core, encode the answer. Proto types never leave this module."""

from __future__ import annotations

from typing import Any

import grpc

from spendgate._gen.spendgate.v1 import spend_pb2, spend_pb2_grpc
from spendgate.api.auth import Authenticator
from spendgate.api.codec import encode_authorize, encode_budget
from spendgate.api.errors import grpc_errors
from spendgate.core import SpendCore
from spendgate.domain import AuthorizeCommand, check_id
from spendgate.metrics import Metrics

Context = grpc.aio.ServicerContext[Any, Any]


class SpendServicer(spend_pb2_grpc.SpendServiceServicer):
    """The gRPC face of :class:`~spendgate.core.SpendCore`."""

    def __init__(self, core: SpendCore, auth: Authenticator, metrics: Metrics | None = None) -> None:
        self._core = core
        self._auth = auth
        self._metrics = metrics or Metrics()

    @grpc_errors
    async def Authorize(self, request: spend_pb2.AuthorizeRequest, context: Context) -> spend_pb2.AuthorizeResponse:
        """Decide one spend."""
        token_mode = self._auth.token_mode(context)
        command = AuthorizeCommand(
            wallet_id=request.wallet_id,
            amount_micros=request.amount_micros,
            currency=request.currency,
            idempotency_key=request.idempotency_key,
            service=request.service,
            capture=request.capture,
            metadata=dict(request.metadata),
        )
        result = await self._core.authorize(command, token_mode=token_mode)
        self._metrics.record_decision(result)
        return encode_authorize(result)

    @grpc_errors
    async def Capture(self, request: spend_pb2.CaptureRequest, context: Context) -> spend_pb2.CaptureResponse:
        """Settle a hold."""
        result = await self._core.capture(
            request.authorization_id,
            request.amount_micros,
            request.idempotency_key,
            token_mode=self._auth.token_mode(context),
        )
        return spend_pb2.CaptureResponse(
            authorization_id=result.authorization_id,
            captured_micros=result.captured_micros,
            released_micros=result.released_micros,
            hold_state=int(result.hold_state),  # type: ignore[arg-type]
        )

    @grpc_errors
    async def Void(self, request: spend_pb2.VoidRequest, context: Context) -> spend_pb2.VoidResponse:
        """Release a hold."""
        result = await self._core.void(request.authorization_id, token_mode=self._auth.token_mode(context))
        return spend_pb2.VoidResponse(
            authorization_id=result.authorization_id,
            released_micros=result.released_micros,
            hold_state=int(result.hold_state),  # type: ignore[arg-type]
        )

    @grpc_errors
    async def GetBudget(self, request: spend_pb2.GetBudgetRequest, context: Context) -> spend_pb2.GetBudgetResponse:
        """Report a node's budget."""
        if self._auth.enabled:
            check_id(request.node_id, "node_id")
            account_id = await self._core.store.account_of(request.node_id)
            await self._auth.require(context, account_id=account_id, write=False, node_id=request.node_id)
        return encode_budget(await self._core.get_budget(request.node_id))
