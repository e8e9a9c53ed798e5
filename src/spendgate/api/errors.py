"""The one place that maps exceptions to gRPC status codes."""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from spendgate.domain import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    SpendgateError,
    UnauthenticatedError,
    UnavailableError,
)

log = logging.getLogger("spendgate.api")

STATUS_OF: dict[type[SpendgateError], grpc.StatusCode] = {
    InvalidArgumentError: grpc.StatusCode.INVALID_ARGUMENT,
    NotFoundError: grpc.StatusCode.NOT_FOUND,
    AlreadyExistsError: grpc.StatusCode.ALREADY_EXISTS,
    FailedPreconditionError: grpc.StatusCode.FAILED_PRECONDITION,
    UnavailableError: grpc.StatusCode.UNAVAILABLE,
    ResourceExhaustedError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    UnauthenticatedError: grpc.StatusCode.UNAUTHENTICATED,
    PermissionDeniedError: grpc.StatusCode.PERMISSION_DENIED,
}

Response = TypeVar("Response")


def status_of(error: BaseException) -> grpc.StatusCode:
    """Return the status code for an error; anything unplanned is INTERNAL."""
    for kind in type(error).__mro__:
        if kind in STATUS_OF:
            return STATUS_OF[kind]
    return grpc.StatusCode.INTERNAL


def grpc_errors(
    handler: Callable[[Any, Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Response]],
) -> Callable[[Any, Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Response]]:
    """Wrap a servicer method so domain errors become statuses with their message, and bugs become INTERNAL."""

    @functools.wraps(handler)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Response:
        try:
            return await handler(self, request, context)
        except SpendgateError as error:
            await context.abort(status_of(error), str(error))
        except Exception:
            # A bug: log it whole, tell the client nothing internal.
            log.exception("unhandled error in %s", handler.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, "internal error; it has been logged")
        raise AssertionError("context.abort returns by raising")  # pragma: no cover

    return wrapper
