"""Which methods a server registers: the hot ones only; the rest are served through generic handlers."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from spendgate._gen.spendgate.v1 import admin_pb2_grpc, spend_pb2_grpc
from spendgate.api.guard import add_generic_only, add_guarded


class RecordingServer:
    """Records what ``add_*_to_server`` functions hand a server."""

    def __init__(self) -> None:
        self.generic: list[Any] = []
        self.registered: dict[str, dict[str, Any]] = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        self.generic.extend(handlers)

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        self.registered[service] = handlers


def _served(server: RecordingServer, method: str) -> Any:
    class Details(grpc.HandlerCallDetails):
        def __init__(self) -> None:
            self.method = method
            self.invocation_metadata = ()

    for handler in server.generic:
        found = handler.service(Details())
        if found is not None:
            return found
    return None


@pytest.mark.parametrize("registered", [True, False])
def test_add_guarded_registers_methods_only_when_asked(registered: bool) -> None:
    server = RecordingServer()
    add_guarded(
        server,  # type: ignore[arg-type]
        spend_pb2_grpc.add_SpendServiceServicer_to_server,
        spend_pb2_grpc.SpendServiceServicer(),
        size_max_bytes=1024,
        registered=registered,
    )
    assert _served(server, "/spendgate.v1.SpendService/Authorize") is not None
    assert bool(server.registered) is registered
    if registered:
        assert "Authorize" in server.registered["spendgate.v1.SpendService"]


def test_add_generic_only_serves_every_method_without_registering_any() -> None:
    server = RecordingServer()
    add_generic_only(
        server,  # type: ignore[arg-type]
        admin_pb2_grpc.add_AdminServiceServicer_to_server,
        admin_pb2_grpc.AdminServiceServicer(),
    )
    assert server.registered == {}
    assert _served(server, "/spendgate.v1.AdminService/ApplyPlan") is not None
    assert _served(server, "/spendgate.v1.AdminService/NoSuchMethod") is None
