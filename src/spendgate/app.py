"""The composition root: builds the store, the core and the gRPC server from settings, and runs them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from collections.abc import AsyncIterator

import grpc
import redis.asyncio as aioredis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from redis.backoff import NoBackoff
from redis.retry import Retry

from spendgate._gen.spendgate.v1 import admin_pb2, admin_pb2_grpc, spend_pb2, spend_pb2_grpc
from spendgate.admin import AdminCore
from spendgate.api.admin import AdminServicer
from spendgate.api.auth import Authenticator, issue_token, new_secret
from spendgate.api.guard import add_guarded
from spendgate.api.spend import SpendServicer
from spendgate.clock import Clock, SystemClock, pause
from spendgate.core import SpendCore
from spendgate.domain import InvalidArgumentError, NodeKind, SpendgateError
from spendgate.metrics import Metrics, MetricsInterceptor, collect_forever
from spendgate.plan import load_plan
from spendgate.settings import Settings
from spendgate.store.keys import Keys
from spendgate.store.redis_store import RedisStore
from spendgate.webhooks import WebhookDeliverer, WebhookSettings

log = logging.getLogger("spendgate")

SPEND_SERVICE = spend_pb2.DESCRIPTOR.services_by_name["SpendService"].full_name
ADMIN_SERVICE = admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name
HEALTH_PROBE_INTERVAL_S = 1.0
EMBEDDED_TIMEOUT_S = 10.0


def redis_client(settings: Settings) -> aioredis.Redis:
    """Return the Redis client the settings ask for: a real one, or the embedded in-process fakeredis."""
    if settings.embedded:
        import fakeredis  # Only the embedded mode needs it; a production server never imports it.

        # In-process "connections" cost nothing; the bound only stops a runaway.
        client: aioredis.Redis = fakeredis.FakeAsyncRedis(decode_responses=True, max_connections=100_000)
        return client
    # A blocking pool makes a burst of calls wait (within the store's deadline) for a free connection instead
    # of failing; batching keeps the number in use small anyway.
    pool = aioredis.BlockingConnectionPool.from_url(
        settings.redis_url,
        max_connections=settings.redis_connections_max,
        timeout=settings.redis_timeout_s,
        decode_responses=True,
        socket_timeout=settings.redis_timeout_s,
        socket_connect_timeout=settings.redis_timeout_s,
        # One quick reconnect covers a pooled connection that died with a Redis restart; the store's own
        # deadline bounds the whole call either way.
        retry=Retry(NoBackoff(), 1),
        health_check_interval=30,
    )
    # from_pool hands the pool to the client, so closing the client (on server stop) disconnects it; a plain
    # Redis(connection_pool=pool) would leave every connection open.
    return aioredis.Redis.from_pool(pool)


def build_store(settings: Settings, client: aioredis.Redis | None = None, metrics: Metrics | None = None) -> RedisStore:
    """Return the store for the settings."""
    client = client if client is not None else redis_client(settings)
    in_process = type(client).__module__.startswith("fakeredis")
    return RedisStore(
        client,
        keys=Keys(settings.key_prefix),
        # The in-process store cannot be "down"; its deadline only has to cover a burst queued in-process.
        timeout_s=max(settings.redis_timeout_s, EMBEDDED_TIMEOUT_S) if in_process else settings.redis_timeout_s,
        hold_ttl_ms=int(settings.hold_ttl_s * 1000),
        idempotency_ttl_ms=int(settings.idempotency_ttl_s * 1000),
        retention_ms=int(settings.hold_retention_s * 1000),
        on_outage=metrics.redis_errors.inc if metrics is not None else None,
        alert_percents=settings.alert_percent_list,
        holds_per_wallet_max=settings.holds_per_wallet_max,
    )


class SpendgateServer:
    """A running spendgate: the gRPC server, its health service and its background tasks."""

    def __init__(
        self,
        settings: Settings,
        core: SpendCore,
        admin: AdminCore,
        store: RedisStore,
        metrics: Metrics,
        server: grpc.aio.Server,
        health: HealthServicer,
        port: int,
    ) -> None:
        self.settings = settings
        self.core = core
        self.admin = admin
        self.store = store
        # The root token in force (generated at start when the settings gave none); empty with auth off.
        self.root_token = ""
        self.metrics = metrics
        self.port = port
        self._server = server
        self._health = health
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def address(self) -> str:
        """The TCP address clients dial."""
        host = "127.0.0.1" if self.settings.host in ("0.0.0.0", "::", "[::]") else self.settings.host
        return f"{host}:{self.port}"

    async def start(self) -> None:
        """Start serving and the background tasks."""
        await self._server.start()
        self._tasks = [
            asyncio.create_task(self._sweep_forever(), name="sweeper"),
            asyncio.create_task(self._probe_forever(), name="health-probe"),
            asyncio.create_task(
                collect_forever(self.metrics, self.store, self.core.get_budget, self.settings.metrics_interval_s),
                name="metrics",
            ),
        ]
        if self.settings.webhook_url:
            webhook_settings = WebhookSettings(
                url=self.settings.webhook_url,
                secret=self.settings.webhook_secret,
                kinds=frozenset(kind.strip() for kind in self.settings.webhook_kinds.split(",") if kind.strip()),
            )
            deliverer = WebhookDeliverer(self.store, webhook_settings, f"{socket.gethostname()}-{os.getpid()}")
            self._tasks.append(asyncio.create_task(deliverer.run_forever(), name="webhooks"))
        if self.settings.metrics_port:
            self.metrics.serve_http(self.settings.metrics_host, self.settings.metrics_port)

    async def stop(self, grace_s: float | None = None) -> None:
        """Stop taking calls, let in-flight calls finish within the grace period, then stop the tasks."""
        await self._health.enter_graceful_shutdown()
        await self._server.stop(self.settings.shutdown_grace_s if grace_s is None else grace_s)
        await cancel_all(self._tasks)
        # The endpoint's thread would otherwise serve (and hold the port) for as long as the process lives.
        await asyncio.to_thread(self.metrics.stop_http)
        await self.core.store.close()

    async def wait(self) -> None:
        """Wait until the server stops."""
        await self._server.wait_for_termination()

    async def _sweep_forever(self) -> None:
        while True:
            try:
                released = await self.core.sweep()
                if released:
                    log.info("released %d expired holds", released)
            except SpendgateError as error:
                log.warning("hold sweep failed: %s", error)
            await pause(self.settings.sweep_interval_s)

    async def _probe_forever(self) -> None:
        serving = health_pb2.HealthCheckResponse.SERVING
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        while True:
            try:
                await self.core.store.ping()
                status = serving
            except SpendgateError:
                status = not_serving
            for service in ("", SPEND_SERVICE):
                await self._health.set(service, status)
            await pause(HEALTH_PROBE_INTERVAL_S)


async def cancel_all(tasks: list[asyncio.Task[None]]) -> None:
    """Cancel tasks and wait until every one has ended.

    A cancellation is repeated until it takes: on Python 3.11 one can be lost inside a library (redis-py sends
    with ``asyncio.wait_for``, which swallows a cancellation that arrives as its inner call finishes), and a
    task that lost it would run, and keep a shutdown waiting, forever.
    """
    pending = [task for task in tasks if not task.done()]
    while pending:
        for task in pending:
            task.cancel()
        await asyncio.wait(pending, timeout=0.1)
        pending = [task for task in pending if not task.done()]
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as error:
        raise InvalidArgumentError(f"cannot read {what} {path}: {error.strerror}") from error


def server_credentials(settings: Settings) -> grpc.ServerCredentials:
    """TLS (and, with a client CA, mutual TLS) credentials from the files the settings name."""
    key = _read(settings.tls_key_file, "tls_key_file")
    certificate = _read(settings.tls_cert_file, "tls_cert_file")
    client_ca = _read(settings.tls_client_ca_file, "tls_client_ca_file") if settings.tls_client_ca_file else None
    return grpc.ssl_server_credentials(
        [(key, certificate)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


async def create_server(
    settings: Settings, *, clock: Clock | None = None, client: aioredis.Redis | None = None
) -> SpendgateServer:
    """Build (not start) a server from settings; loads the settings' plan, if any."""
    metrics = Metrics(nodes_max=settings.metrics_nodes_max)
    store = build_store(settings, client, metrics)
    clock = clock or SystemClock()
    core = SpendCore(store, clock)
    admin = AdminCore(store, core, clock)
    root_token = settings.admin_token or (new_secret() if settings.auth else "")
    auth = Authenticator(store, enabled=settings.auth, root_token=root_token)
    if settings.plan:
        plan = load_plan(settings.plan)
        changes = await admin.apply_plan(plan, actor="spendgate serve --plan")
        log.info(
            "applied plan %s: account %s, %d nodes, %d changes",
            settings.plan,
            plan.account_id,
            len(plan.nodes),
            len(changes),
        )
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", settings.message_size_max_bytes),
            ("grpc.max_metadata_size", settings.metadata_size_max_bytes),
            ("grpc.max_concurrent_streams", settings.streams_per_connection_max),
            ("grpc.so_reuseport", 0),
        ],
        maximum_concurrent_rpcs=settings.concurrent_rpcs_max,
        interceptors=[MetricsInterceptor(metrics)],
    )
    add_guarded(server, spend_pb2_grpc.add_SpendServiceServicer_to_server, SpendServicer(core, auth, metrics))
    add_guarded(server, admin_pb2_grpc.add_AdminServiceServicer_to_server, AdminServicer(admin, store, auth, clock))
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (
            SPEND_SERVICE,
            ADMIN_SERVICE,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    address = f"{settings.host}:{settings.port}"
    if settings.tls_cert_file:
        credentials = server_credentials(settings)
        port = server.add_secure_port(address, credentials)
    else:
        port = server.add_insecure_port(address)
    if settings.unix_socket:
        # A unix socket is reachable only through the file system's permissions; it stays plaintext.
        server.add_insecure_port(f"unix:{settings.unix_socket}")
    spendgate_server = SpendgateServer(settings, core, admin, store, metrics, server, health, port)
    spendgate_server.root_token = root_token
    return spendgate_server


@contextlib.asynccontextmanager
async def running_server(
    settings: Settings, *, clock: Clock | None = None, client: aioredis.Redis | None = None
) -> AsyncIterator[SpendgateServer]:
    """Run a server for the duration of a ``with`` block (for tests and embedding)."""
    server = await create_server(settings, clock=clock, client=client)
    await server.start()
    try:
        yield server
    finally:
        await server.stop(grace_s=1.0)


async def demo_tokens(server: SpendgateServer) -> list[tuple[str, str, str]]:
    """Issue an operator token per account and an agent token per wallet: (role, scope, secret).

    The embedded default keeps auth on; these let a newcomer use it at once. Its store lives in memory, so
    the tokens die with the process.
    """
    issued: list[tuple[str, str, str]] = []
    now_ms = server.core.clock.now_ms()
    for account_id in await server.store.account_ids():
        plan = await server.store.read_plan(account_id)
        for node in plan.nodes if plan else ():
            role = "admin" if node.kind is NodeKind.ACCOUNT else "agent" if node.kind is NodeKind.WALLET else ""
            if role:
                secret, _ = await issue_token(
                    server.store,
                    role=role,
                    scope_node_id=node.node_id,
                    account_id=account_id,
                    name=f"demo {role}",
                    now_ms=now_ms,
                )
                issued.append((role, node.node_id, secret))
    return issued


def print_tokens(server: SpendgateServer, issued: list[tuple[str, str, str]], settings: Settings) -> None:
    """Show the tokens a person needs to start (to stdout; they are not logged)."""
    lines = ["", "spendgate: auth is on; send 'authorization: Bearer <token>' (the CLI reads SPENDGATE_TOKEN)."]
    if not settings.admin_token:
        lines.append(f"  root token (generated at start): {server.root_token}")
    for role, scope, secret in issued:
        lines.append(f"  {role:<6} {scope:<20} {secret}")
    lines.append("")
    # Printed, not logged: the secrets are shown once to the person who started the server.
    print("\n".join(lines), flush=True)


async def serve(settings: Settings) -> None:
    """Run a server until SIGTERM or SIGINT, then shut down gracefully."""
    server = await create_server(settings)
    await server.start()
    if settings.auth:
        print_tokens(server, await demo_tokens(server) if settings.embedded else [], settings)
    mode = "embedded (in-process fakeredis)" if settings.embedded else f"redis {settings.redis_url}"
    log.info("spendgate listening on %s:%d (%s)", settings.host, server.port, mode)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    log.info("shutting down: finishing in-flight calls (up to %.0f s)", settings.shutdown_grace_s)
    await server.stop()
    log.info("stopped")
