"""spendgate: real-time spend authorization for fleets of AI agents.

The public Python API is the two clients and the values they return::

    from spendgate import Client
    with Client("127.0.0.1:50051") as client:
        result = client.authorize("research-agent-01", 250_000, service="api.example.com", capture=True)
"""

from __future__ import annotations

from spendgate.client import AsyncClient, Client, RetryPolicy
from spendgate.domain import (
    AuthorizeResult,
    CaptureResult,
    Decision,
    DenyReason,
    HoldState,
    NodeBudget,
    VoidResult,
    Window,
)

__all__ = [
    "AsyncClient",
    "AuthorizeResult",
    "CaptureResult",
    "Client",
    "Decision",
    "DenyReason",
    "HoldState",
    "NodeBudget",
    "RetryPolicy",
    "VoidResult",
    "Window",
]
