"""Registration of servicers behind a guard against bytes that are not a valid request.

Such a request is refused with INVALID_ARGUMENT, which says what is wrong, instead of grpc's default UNKNOWN
from a decode error deep in the stack.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

Observer = Callable[[str, str, float], None]


class _Malformed:
    """Stands in for a request that could not be decoded."""


class _TooLarge:
    """Stands in for a request over its method's size bound (it is never decoded)."""


MALFORMED = _Malformed()
TOO_LARGE = _TooLarge()
_MESSAGE = "the request is not a valid {} message: check that the client uses spendgate's protos"
_TOO_LARGE = "the {} request is over its size bound of {} bytes"


def _safe(deserializer: Callable[[bytes], Any], size_max_bytes: int) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        if len(data) > size_max_bytes:
            return TOO_LARGE
        try:
            return deserializer(data)
        except (DecodeError, ValueError):
            return MALFORMED

    return deserialize


async def _refuse(request: Any, context: grpc.aio.ServicerContext[Any, Any], name: str, size_max_bytes: int) -> None:
    if request is MALFORMED:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _MESSAGE.format(name))
    if request is TOO_LARGE:
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, _TOO_LARGE.format(name, size_max_bytes))


def _guard(name: str, handler: Any, size_max_bytes: int, observe: Observer | None) -> Any:
    safe = _safe(handler.request_deserializer, size_max_bytes)
    if handler.unary_unary is not None:
        inner_unary = handler.unary_unary

        async def unary_unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            started = time.perf_counter()
            code = "OK"
            try:
                await _refuse(request, context, name, size_max_bytes)
                return await inner_unary(request, context)
            except BaseException:
                status = context.code()
                code = status.name if isinstance(status, grpc.StatusCode) else "UNKNOWN"
                raise
            finally:
                if observe is not None:
                    observe(name, code, time.perf_counter() - started)

        return handler._replace(request_deserializer=safe, unary_unary=unary_unary)
    if handler.unary_stream is not None:
        inner_stream = handler.unary_stream

        async def unary_stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            await _refuse(request, context, name, size_max_bytes)
            async for item in inner_stream(request, context):
                yield item

        return handler._replace(request_deserializer=safe, unary_stream=unary_stream)
    # Streaming requests are checked item by item by the servicer (an answer per malformed item).
    return handler._replace(request_deserializer=safe)


class _Capture:
    """A stand-in server that captures what generated ``add_*_to_server`` functions register."""

    def __init__(self) -> None:
        self.service = ""
        self.handlers: dict[str, Any] = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        """Ignored: the registered handlers carry the same methods."""

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        """Keep the handlers to guard them."""
        self.service, self.handlers = service, handlers


def add_guarded(
    server: grpc.aio.Server,
    add: Callable[[Any, Any], None],
    servicer: Any,
    *,
    size_max_bytes: int,
    size_max_bytes_by_method: dict[str, int] | None = None,
    observe: Observer | None = None,
    registered: bool = True,
) -> None:
    """Register ``servicer`` with the generated function ``add``, its handlers guarded against bad bytes.

    Each request is bounded by ``size_max_bytes`` unless its method has a bound of its own (plans are large;
    authorizations are not). The transport's own bound must be the largest of them. ``observe(method, code,
    seconds)`` is told how long each unary call took (the RPC latency metric), at the cost of two clock reads.
    ``registered=False`` serves the methods through the generic handler only (see :func:`add_generic_only`).
    """
    capture = _Capture()
    add(servicer, capture)
    bounds = size_max_bytes_by_method or {}
    handlers = {
        method: _guard(method, handler, bounds.get(method, size_max_bytes), observe)
        for method, handler in capture.handlers.items()
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(capture.service, handlers),))
    if registered:
        # grpcio has had this method since 1.63; the type stubs predate it.
        server.add_registered_method_handlers(capture.service, handlers)  # type: ignore[attr-defined]


class _GenericOnly:
    """A server as an ``add_*_to_server`` function sees it, that keeps only the generic handlers."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        """Pass the generic handlers on."""
        self._server.add_generic_rpc_handlers(handlers)

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        """Drop them: the generic handlers serve the same methods."""


def add_generic_only(server: grpc.aio.Server, add: Callable[[Any, Any], None], servicer: Any) -> None:
    """Register ``servicer`` with the generated function ``add`` as generic handlers only, for rarely called services.

    grpc.aio keeps one pending request per registered method and waits on all of them (``asyncio.wait``) for
    every call it accepts, so each registered method costs every call, hot or not, a little CPU. A method
    served only through the generic handler costs nothing until it is called, and then a lookup by name.
    """
    add(servicer, _GenericOnly(server))
