"""Helpers of the security tests: servers with auth on, callers of every RPC with any token, and a test PKI.

Every RPC of SpendService, AdminService and BillingService is called through one generic path (``call``), by
name, with a request message and a bearer token (or a raw header, or none). It answers the status code, so a
test can lay out a table of (who, what, expected code). The list of RPCs comes from the proto descriptors,
so a new RPC that a table forgets fails the test that checks the table covers every RPC.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any, TypeVar

import grpc
import pytest
from google.protobuf import message_factory

from helpers import FLEET_YAML, USD, in_ci, snapshot
from spendgate._gen.spendgate.v1 import admin_pb2, billing_pb2, spend_pb2
from spendgate.app import SpendgateServer

T = TypeVar("T")

FLEET = FLEET_YAML
SPENDGATE = pathlib.Path(sys.executable).parent / "spendgate"
# A deadline on raw calls: far above what a healthy call needs, so it only stops a hang.
CALL_TIMEOUT_S = 10.0
# How long a WatchEvents call that was let in stays open before the test calls it a success.
WATCH_OPEN_S = 0.3

# A second account, so that scoping across accounts can be tested: B's tokens must open nothing of A's.
OTHER_PLAN_YAML = """\
account:
  id: globex
  currency: USD
  time_zone: UTC
  limits: {month: 5000}
pools:
  - id: globex-pool
    limits: {month: 1000}
    wallets:
      - {id: globex-w1, limits: {day: 50, per_transaction: 1}}
      - {id: globex-w2, limits: {day: 50, per_transaction: 1}}
"""

# Who gets a token in a secured fixture: name -> (role, scope).
TOKENS: dict[str, tuple[int, str]] = {
    "agent_a": (admin_pb2.TOKEN_ROLE_AGENT, "research-agent-01"),
    "agent_a2": (admin_pb2.TOKEN_ROLE_AGENT, "sales-agent-01"),
    "reader_a": (admin_pb2.TOKEN_ROLE_READER, "acme"),
    "admin_a": (admin_pb2.TOKEN_ROLE_ADMIN, "acme"),
    "agent_b": (admin_pb2.TOKEN_ROLE_AGENT, "globex-w1"),
    "reader_b": (admin_pb2.TOKEN_ROLE_READER, "globex"),
    "admin_b": (admin_pb2.TOKEN_ROLE_ADMIN, "globex"),
}

SERVICES = {
    "SpendService": spend_pb2.DESCRIPTOR.services_by_name["SpendService"],
    "AdminService": admin_pb2.DESCRIPTOR.services_by_name["AdminService"],
    "BillingService": billing_pb2.DESCRIPTOR.services_by_name["BillingService"],
}


@dataclasses.dataclass(frozen=True)
class Rpc:
    """One RPC: its service, name, request and response classes, and whether each side streams."""

    service: str
    name: str
    request: Any
    response: Any
    client_streaming: bool
    server_streaming: bool

    @property
    def path(self) -> str:
        """The HTTP/2 path gRPC calls it by."""
        return f"/spendgate.v1.{self.service}/{self.name}"


RPCS: dict[str, Rpc] = {
    method.name: Rpc(
        service=service,
        name=method.name,
        request=message_factory.GetMessageClass(method.input_type),
        response=message_factory.GetMessageClass(method.output_type),
        client_streaming=method.client_streaming,
        server_streaming=method.server_streaming,
    )
    for service, descriptor in SERVICES.items()
    for method in descriptor.methods
}
# Statuses that mean a bug in the server, never an answer to a request.
BUG_CODES = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)


def clean_env() -> dict[str, str]:
    """The environment of a spendgate subprocess: ours without any SPENDGATE_* setting, and a wide terminal."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("SPENDGATE_")}
    return env | {"COLUMNS": "200", "NO_COLOR": "1"}


def missing(what: str) -> None:
    """Fail in CI, skip loudly elsewhere."""
    if in_ci():
        pytest.fail(f"{what} (CI=true: a missing tool or service fails the run)")
    pytest.skip(f"SKIPPED, NOT TESTED: {what}")


def bearer(secret: str) -> tuple[tuple[str, str], ...]:
    """The metadata that carries a bearer token."""
    return (("authorization", f"Bearer {secret}"),)


@dataclasses.dataclass(frozen=True)
class Outcome:
    """How a call ended: its status code, its details, and the responses it gave."""

    code: grpc.StatusCode
    details: str
    responses: tuple[Any, ...] = ()

    def __str__(self) -> str:
        return f"{self.code.name}: {self.details}"


async def call(
    channel: grpc.aio.Channel,
    rpc_name: str,
    request: Any,
    metadata: Sequence[tuple[str, str]] = (),
    *,
    raw: bool = False,
    timeout_s: float = CALL_TIMEOUT_S,
    watch_open_s: float = WATCH_OPEN_S,
) -> Outcome:
    """Call any RPC by name and say how it ended.

    With ``raw`` the request is bytes sent as they are (identity serializer). A stream of requests is one
    item long; a stream of answers is read to its end, except WatchEvents, which never ends by itself: a
    watch still open after ``watch_open_s`` counts as let in (OK). An AuthorizeStream item refused inside
    the stream is reported with its item's code, as if the call had failed with it.
    """
    rpc = RPCS[rpc_name]
    serializer = None if raw else rpc.request.SerializeToString
    # Answers come from the server, so they are always decoded (an AuthorizeStream item's code is inside).
    deserializer = rpc.response.FromString
    watch = rpc_name == "WatchEvents"
    timeout = watch_open_s if watch else timeout_s
    try:
        if rpc.client_streaming:
            method = channel.stream_stream(rpc.path, request_serializer=serializer, response_deserializer=deserializer)
            stream = method(iter([request]), metadata=tuple(metadata), timeout=timeout)
            responses = tuple([response async for response in stream])
            for response in responses:
                if response.error_code:
                    code = next(c for c in grpc.StatusCode if c.value[0] == response.error_code)
                    return Outcome(code, response.error_message, responses)
            return Outcome(grpc.StatusCode.OK, "", responses)
        if rpc.server_streaming:
            method = channel.unary_stream(rpc.path, request_serializer=serializer, response_deserializer=deserializer)
            stream = method(request, metadata=tuple(metadata), timeout=timeout)
            responses = tuple([response async for response in stream])
            return Outcome(grpc.StatusCode.OK, "", responses)
        method = channel.unary_unary(rpc.path, request_serializer=serializer, response_deserializer=deserializer)
        response = await method(request, metadata=tuple(metadata), timeout=timeout)
        return Outcome(grpc.StatusCode.OK, "", (response,))
    except grpc.aio.AioRpcError as error:
        if watch and error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            return Outcome(grpc.StatusCode.OK, "the watch stayed open")
        return Outcome(error.code(), error.details() or "")


@dataclasses.dataclass(frozen=True)
class Issued:
    """A token as CreateToken answered it: the secret (shown once) and its public id."""

    secret: str
    token_id: str


@dataclasses.dataclass
class Secured:
    """A running spendgate with auth on, the example fleet and a second account, and tokens for both."""

    server: SpendgateServer
    channel: grpc.aio.Channel
    prefix: str
    tokens: dict[str, Issued]
    data_dir: pathlib.Path

    @property
    def address(self) -> str:
        """The address clients dial."""
        return self.server.address

    @property
    def root(self) -> str:
        """The deployment's root token."""
        return self.server.root_token

    def metadata(self, who: str | None) -> tuple[tuple[str, str], ...]:
        """The metadata of a caller: ``None`` (no token), ``"root"``, or a name of :data:`TOKENS`."""
        if who is None:
            return ()
        return bearer(self.root if who == "root" else self.tokens[who].secret)

    async def call(self, rpc_name: str, request: Any, who: str | None = "root", **options: Any) -> Outcome:
        """Call an RPC as ``who``."""
        return await call(self.channel, rpc_name, request, self.metadata(who), **options)

    async def ok(self, rpc_name: str, request: Any, who: str | None = "root") -> Any:
        """Call an RPC that must succeed; return its (last) response."""
        outcome = await self.call(rpc_name, request, who)
        assert outcome.code == grpc.StatusCode.OK, f"{rpc_name} as {who}: {outcome}"
        return outcome.responses[-1] if outcome.responses else None

    async def hold(self, who: str, wallet_id: str, amount_micros: int = USD // 10, key: str = "") -> str:
        """Authorize (hold) as ``who``; return the authorization id."""
        response = await self.ok(
            "Authorize",
            spend_pb2.AuthorizeRequest(
                wallet_id=wallet_id,
                amount_micros=amount_micros,
                currency="USD",
                idempotency_key=key or f"hold-{time.monotonic_ns()}",
            ),
            who,
        )
        assert response.decision == spend_pb2.DECISION_APPROVED, response
        return str(response.authorization_id)

    async def snapshot(self) -> dict[str, Any]:
        """Every key of this server (its prefix) with its value."""
        return await snapshot(self.server.store.client, self.prefix)


def authorize(
    wallet_id: str, key: str, amount_micros: int = USD // 10, currency: str = "USD", **fields: Any
) -> spend_pb2.AuthorizeRequest:
    """A valid AuthorizeRequest unless a test changes a field."""
    return spend_pb2.AuthorizeRequest(
        wallet_id=wallet_id, amount_micros=amount_micros, currency=currency, idempotency_key=key, **fields
    )


def own_connection(address: str) -> grpc.aio.Channel:
    """A channel with a connection of its own (channels to one address otherwise share one in a process)."""
    return grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])


# ---------------------------------------------------------------------------------------------------------
# A test PKI made with the openssl command line (the cryptography package is not a dependency).


@dataclasses.dataclass(frozen=True)
class Pki:
    """A CA, a server certificate for 127.0.0.1 signed by it, a client certificate signed by it, and a
    client certificate signed by another CA (which mutual TLS must refuse)."""

    ca: pathlib.Path
    server_cert: pathlib.Path
    server_key: pathlib.Path
    client_cert: pathlib.Path
    client_key: pathlib.Path
    rogue_ca: pathlib.Path
    rogue_client_cert: pathlib.Path
    rogue_client_key: pathlib.Path


def _openssl(directory: pathlib.Path, *args: str) -> None:
    result = subprocess.run(["openssl", *args], cwd=directory, capture_output=True, text=True, timeout=60, check=False)
    if result.returncode != 0:
        raise AssertionError(f"openssl {' '.join(args)} failed: {result.stderr}")


def _ca(directory: pathlib.Path, name: str) -> None:
    _openssl(
        directory,
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        f"{name}.key",
        "-out",
        f"{name}.pem",
        "-days",
        "2",
        "-subj",
        f"/CN={name}",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    )


def _leaf(directory: pathlib.Path, name: str, ca: str, extensions: str) -> None:
    (directory / f"{name}.ext").write_text(extensions)
    _openssl(
        directory,
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        f"{name}.key",
        "-out",
        f"{name}.csr",
        "-subj",
        f"/CN={name}",
    )
    _openssl(
        directory,
        "x509",
        "-req",
        "-in",
        f"{name}.csr",
        "-CA",
        f"{ca}.pem",
        "-CAkey",
        f"{ca}.key",
        "-CAcreateserial",
        "-out",
        f"{name}.pem",
        "-days",
        "2",
        "-extfile",
        f"{name}.ext",
    )


def make_pki(directory: pathlib.Path) -> Pki:
    """Generate the test PKI under ``directory`` (skips loudly, or fails in CI, without openssl)."""
    if shutil.which("openssl") is None:
        missing("the openssl command is missing, so no test certificates can be made for the TLS tests")
    leaf = "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
    _ca(directory, "ca")
    _ca(directory, "rogue-ca")
    _leaf(
        directory,
        "server",
        "ca",
        leaf + "extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )
    _leaf(directory, "client", "ca", leaf + "extendedKeyUsage=clientAuth\n")
    _leaf(directory, "rogue-client", "rogue-ca", leaf + "extendedKeyUsage=clientAuth\n")
    return Pki(
        ca=directory / "ca.pem",
        server_cert=directory / "server.pem",
        server_key=directory / "server.key",
        client_cert=directory / "client.pem",
        client_key=directory / "client.key",
        rogue_ca=directory / "rogue-ca.pem",
        rogue_client_cert=directory / "rogue-client.pem",
        rogue_client_key=directory / "rogue-client.key",
    )
