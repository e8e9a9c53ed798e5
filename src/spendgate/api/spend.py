"""SpendService: decode the request, call the core, encode the answer. Proto types never leave this module."""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc

from spendgate._gen.spendgate.v1 import spend_pb2, spend_pb2_grpc
from spendgate.api.auth import Authenticator
from spendgate.api.codec import encode_authorize, encode_budget
from spendgate.api.errors import grpc_errors, status_of
from spendgate.api.guard import MALFORMED, TOO_LARGE
from spendgate.core import SpendCore
from spendgate.domain import AuthorizeCommand, NotFoundError, SpendgateError, check_id
from spendgate.metrics import Metrics

Context = grpc.aio.ServicerContext[Any, Any]
log = logging.getLogger("spendgate.api")
REQUEST_ID_LENGTH_MAX = 128


def _refused_item(item: Any) -> spend_pb2.AuthorizeStreamResponse | None:
    """The answer to a stream item refused before any decision (undecodable, too large, bad request_id)."""
    # Any: a stream item is an AuthorizeStreamRequest, or MALFORMED / TOO_LARGE when its bytes were refused.
    if item is TOO_LARGE:
        # The same answer a unary call over the size bound gets.
        return spend_pb2.AuthorizeStreamResponse(
            error_code=grpc.StatusCode.RESOURCE_EXHAUSTED.value[0],
            error_message="a stream item is over the request size bound",
        )
    if item is MALFORMED:
        return spend_pb2.AuthorizeStreamResponse(
            error_code=grpc.StatusCode.INVALID_ARGUMENT.value[0],
            error_message="a stream item is not a valid AuthorizeStreamRequest message",
        )
    if not 1 <= len(item.request_id) <= REQUEST_ID_LENGTH_MAX:
        return spend_pb2.AuthorizeStreamResponse(
            request_id=item.request_id[:REQUEST_ID_LENGTH_MAX],
            error_code=grpc.StatusCode.INVALID_ARGUMENT.value[0],
            error_message=f"request_id must be 1 to {REQUEST_ID_LENGTH_MAX} characters",
        )
    return None


class SpendServicer(spend_pb2_grpc.SpendServiceServicer):
    """The gRPC face of :class:`~spendgate.core.SpendCore`."""

    def __init__(
        self, core: SpendCore, auth: Authenticator, metrics: Metrics | None = None, stream_in_flight_max: int = 256
    ) -> None:
        self._core = core
        self._stream_in_flight_max = stream_in_flight_max
        self._auth = auth
        self._metrics = metrics or Metrics()

    @grpc_errors
    async def Authorize(self, request: spend_pb2.AuthorizeRequest, context: Context) -> spend_pb2.AuthorizeResponse:
        """Decide one spend."""
        return await self._authorize(request, self._auth.token_mode(context))

    async def _authorize(self, request: spend_pb2.AuthorizeRequest, token_mode: str) -> spend_pb2.AuthorizeResponse:
        command = AuthorizeCommand(
            wallet_id=request.wallet_id,
            amount_micros=request.amount_micros,
            currency=request.currency,
            idempotency_key=request.idempotency_key,
            service=request.service,
            capture=request.capture,
            metadata=dict(request.metadata) if request.metadata else {},
        )
        try:
            result = await self._core.authorize(command, token_mode=token_mode)
        except NotFoundError:
            # Only a caller who may spend from the wallet learns that it does not exist.
            await self._auth.refuse_before_miss(token_mode, command.wallet_id)
            raise
        self._metrics.record_decision(result)
        return encode_authorize(result)

    async def AuthorizeStream(
        self, request_iterator: AsyncIterator[spend_pb2.AuthorizeStreamRequest], context: Context
    ) -> AsyncIterator[spend_pb2.AuthorizeStreamResponse]:
        """Decide a stream of authorizations concurrently (at most ``stream_in_flight_max`` at a time).

        A reader task starts one decision task per item; each finished decision lands in ``ready``, which this
        generator yields from. Two bare futures stand in for a queue and a semaphore (they cost a fraction):
        ``wake`` wakes the writer when an answer lands, ``space`` wakes the reader when it waits for a slot.
        """
        try:
            token_mode = self._auth.token_mode(context)
        except SpendgateError as error:
            await context.abort(status_of(error), str(error))
        loop = asyncio.get_running_loop()
        ready: collections.deque[spend_pb2.AuthorizeStreamResponse] = collections.deque()
        tasks: set[asyncio.Task[spend_pb2.AuthorizeStreamResponse]] = set()
        wake: asyncio.Future[None] | None = None
        space: asyncio.Future[None] | None = None
        reading = True

        def land(answer: spend_pb2.AuthorizeStreamResponse) -> None:
            nonlocal wake
            ready.append(answer)
            if wake is not None and not wake.done():
                wake.set_result(None)

        def decided(task: asyncio.Task[spend_pb2.AuthorizeStreamResponse]) -> None:
            nonlocal space
            tasks.discard(task)
            if not task.cancelled():
                land(task.result())
            if space is not None and not space.done():
                space.set_result(None)

        async def read() -> None:
            nonlocal space, reading, wake
            try:
                async for item in request_iterator:
                    answer = _refused_item(item)
                    if answer is not None:
                        land(answer)
                        continue
                    while len(tasks) >= self._stream_in_flight_max:
                        space = loop.create_future()
                        await space
                    task = loop.create_task(self._decide(item, token_mode))
                    tasks.add(task)
                    task.add_done_callback(decided)
            finally:
                reading = False
                if wake is not None and not wake.done():
                    wake.set_result(None)

        reader = loop.create_task(read())
        try:
            while True:
                while ready:
                    yield ready.popleft()
                if not reading and not tasks:
                    break
                wake = loop.create_future()
                await wake
                wake = None
        finally:
            reader.cancel()
            for task in list(tasks):
                task.cancel()

    async def _decide(self, item: Any, token_mode: str) -> spend_pb2.AuthorizeStreamResponse:
        """The answer to one valid stream item: its decision, or the error a unary call would get."""
        try:
            response = await self._authorize(item.request, token_mode)
            return spend_pb2.AuthorizeStreamResponse(request_id=item.request_id, response=response)
        except SpendgateError as error:
            return spend_pb2.AuthorizeStreamResponse(
                request_id=item.request_id, error_code=status_of(error).value[0], error_message=str(error)
            )
        except Exception:
            log.exception("unhandled error in AuthorizeStream")
            return spend_pb2.AuthorizeStreamResponse(
                request_id=item.request_id,
                error_code=grpc.StatusCode.INTERNAL.value[0],
                error_message="internal error; it has been logged",
            )

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
            await self._auth.require_node(context, request.node_id, write=False)
        return encode_budget(await self._core.get_budget(request.node_id))
