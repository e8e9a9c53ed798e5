"""The ceiling: a SpendService whose handlers do nothing, on the same server stack as spendgate.

Same grpc.aio server options and bounds as :func:`spendgate.app.create_server` (from the default settings),
uvloop, a health service; ``Authorize`` returns an empty ``AuthorizeResponse`` and ``AuthorizeStream``
answers each request with its ``request_id`` at once. Whatever this serves per second is the most any
handler on this stack can serve on this machine. ``--metrics-interceptor`` adds spendgate's metrics
interceptor, to price it.

Run it as ``python -m spendgate.bench.empty_server --port N``; it serves until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import AsyncIterator
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from spendgate._gen.spendgate.v1 import spend_pb2, spend_pb2_grpc
from spendgate.settings import Settings

_EMPTY = spend_pb2.AuthorizeResponse()


class EmptySpendServicer(spend_pb2_grpc.SpendServiceServicer):
    """Answers at once, deciding nothing."""

    async def Authorize(
        self, request: spend_pb2.AuthorizeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> spend_pb2.AuthorizeResponse:
        """Return an empty response."""
        return _EMPTY

    async def AuthorizeStream(
        self,
        request_iterator: AsyncIterator[spend_pb2.AuthorizeStreamRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[spend_pb2.AuthorizeStreamResponse]:
        """Echo each request's id with an empty response."""
        async for item in request_iterator:
            yield spend_pb2.AuthorizeStreamResponse(request_id=item.request_id, response=_EMPTY)


def server_options(settings: Settings) -> list[tuple[str, Any]]:
    """The channel options :func:`spendgate.app.create_server` gives its server."""
    return [
        ("grpc.max_receive_message_length", settings.message_size_max_bytes),
        ("grpc.max_metadata_size", settings.metadata_size_max_bytes),
        ("grpc.max_concurrent_streams", settings.streams_per_connection_max),
        ("grpc.so_reuseport", 0),
    ]


async def serve(port: int, *, metrics_interceptor: bool = False) -> None:
    """Serve the empty service on 127.0.0.1:``port`` until SIGTERM or SIGINT."""
    settings = Settings()
    server = grpc.aio.server(options=server_options(settings), maximum_concurrent_rpcs=settings.concurrent_rpcs_max)
    if metrics_interceptor:
        # The server's own guard and RPC timing around the empty handler: what they cost per call.
        from spendgate.api.guard import add_guarded
        from spendgate.metrics import Metrics

        add_guarded(
            server,
            spend_pb2_grpc.add_SpendServiceServicer_to_server,
            EmptySpendServicer(),
            size_max_bytes=settings.message_size_max_bytes,
            observe=Metrics().observe_rpc,
        )
    else:
        # The generated gRPC module has no type hints (protoc's grpc plugin writes none).
        spend_pb2_grpc.add_SpendServiceServicer_to_server(EmptySpendServicer(), server)  # type: ignore[no-untyped-call]
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await server.stop(1.0)


def main() -> None:
    """Parse the flags and serve."""
    parser = argparse.ArgumentParser(prog="python -m spendgate.bench.empty_server", description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--metrics-interceptor", action="store_true", help="add spendgate's metrics interceptor")
    arguments = parser.parse_args()
    main_coroutine = serve(arguments.port, metrics_interceptor=arguments.metrics_interceptor)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on every platform we support
        asyncio.run(main_coroutine)
        return
    uvloop.run(main_coroutine)


if __name__ == "__main__":
    main()
