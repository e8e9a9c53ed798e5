"""The composition root: builds the store, the core and the gRPC server from settings, and runs them."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
from collections.abc import AsyncIterator

import grpc
import redis.asyncio as aioredis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

# The servicer enable_server_reflection uses on grpc.aio (reflection.aio names it too, without exporting it).
from grpc_reflection.v1alpha._async import ReflectionServicer
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from spendgate._gen.spendgate.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    billing_pb2,
    billing_pb2_grpc,
    spend_pb2,
    spend_pb2_grpc,
)
from spendgate.admin import AdminCore
from spendgate.api.admin import AdminServicer
from spendgate.api.auth import Authenticator, issue_token, new_secret
from spendgate.api.billing import BillingServicer
from spendgate.api.guard import add_generic_only, add_guarded
from spendgate.api.spend import SpendServicer
from spendgate.clock import Clock, SystemClock, pause
from spendgate.core import SpendCore
from spendgate.domain import InvalidArgumentError, NodeKind, SpendgateError, UnavailableError
from spendgate.ledger import LedgerSink, LedgerWriter, open_ledger, read_outbox
from spendgate.ledger.reconcile import (
    ReconcileReport,
    missing_account_report,
    rebuild_account,
    reconcile_account,
)
from spendgate.metrics import Metrics, collect_forever
from spendgate.plan import load_plan
from spendgate.settings import Settings
from spendgate.store.keys import Keys
from spendgate.store.pipe import PipeUnsupportedError, RedisPipe
from spendgate.store.redis_store import REDIS_OUTAGES, RedisStore
from spendgate.threads import keep_other_threads_batch
from spendgate.webhooks import WebhookDeliverer, WebhookSettings

log = logging.getLogger("spendgate")

SPEND_SERVICE = spend_pb2.DESCRIPTOR.services_by_name["SpendService"].full_name
ADMIN_SERVICE = admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name
BILLING_SERVICE = billing_pb2.DESCRIPTOR.services_by_name["BillingService"].full_name
HEALTH_PROBE_INTERVAL_S = 1.0
EMBEDDED_TIMEOUT_S = 10.0
# A standalone ledger writer whose database is down at start retries after this long, doubling up to the cap.
LEDGER_START_RETRY_INITIAL_S = 0.5
LEDGER_START_RETRY_MAX_S = 30.0
# What may stop the writers draining the outbox at shutdown: Redis or the database down, or the deadline.
_DRAIN_FAILURES: tuple[type[BaseException], ...] = (SpendgateError, *REDIS_OUTAGES)


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


def redis_pipe(settings: Settings) -> RedisPipe | None:
    """The hot path's pipelined connection to the settings' Redis, where it can serve the URL (not TLS)."""
    if not settings.redis_pipe or not settings.redis_url:
        return None
    try:
        return RedisPipe.from_url(
            settings.redis_url, timeout_s=settings.redis_timeout_s, linger_s=settings.redis_linger_us / 1_000_000
        )
    except PipeUnsupportedError:
        return None


def build_store(settings: Settings, client: aioredis.Redis | None = None, metrics: Metrics | None = None) -> RedisStore:
    """Return the store for the settings."""
    client = client if client is not None else redis_client(settings)
    in_process = type(client).__module__.startswith("fakeredis")
    store = RedisStore(
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
        pipe=None if in_process else redis_pipe(settings),
    )
    store.in_process = in_process
    return store


class SpendgateServer:
    """A running spendgate: the gRPC server, its health service and its background tasks."""

    def __init__(
        self,
        settings: Settings,
        core: SpendCore,
        admin: AdminCore,
        ledger: LedgerSink | None,
        store: RedisStore,
        metrics: Metrics,
        server: grpc.aio.Server,
        health: HealthServicer,
        port: int,
    ) -> None:
        self.settings = settings
        self.core = core
        self.admin = admin
        self.ledger = ledger
        self._writers: list[LedgerWriter] = []
        self._writer_clients: list[aioredis.Redis] = []
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
        try:
            # So that a wallet's first call is one round trip (see SpendCore.load_account_hints).
            nodes = await self.core.load_account_hints()
            log.info("knows the accounts of %d nodes", nodes)
        except UnavailableError as error:
            log.warning("could not load the nodes' accounts (a wallet's first call looks its account up): %s", error)
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
        if self.ledger is not None:
            consumer = self.settings.ledger_consumer or f"{socket.gethostname()}-{os.getpid()}"
            for index in range(self.settings.ledger_writers):
                writer = LedgerWriter(
                    self._writer_client(),
                    self.ledger,
                    keys=self.store.keys,
                    consumer=f"{consumer}-{index}",
                    clock=self.core.clock,
                    batch_size_max=self.settings.ledger_batch_size_max,
                    linger_ms=self.settings.ledger_linger_ms,
                )
                self._writers.append(writer)
                self._tasks.append(asyncio.create_task(writer.run(), name=f"ledger-writer-{index}"))

    def _writer_client(self) -> aioredis.Redis:
        """The writers block on the outbox for up to a second: they need a client with a longer timeout."""
        if self.settings.embedded or self.store.in_process:
            return self.store.client
        client = aioredis.Redis.from_url(
            self.settings.redis_url,
            decode_responses=True,
            socket_timeout=10.0,
            socket_connect_timeout=self.settings.redis_timeout_s,
        )
        # Closed on stop, with the store's: a client left open leaks its connections.
        self._writer_clients.append(client)
        return client

    async def stop(self, grace_s: float | None = None) -> None:
        """Stop taking calls, let in-flight calls finish within the grace period, then stop the tasks."""
        await self._health.enter_graceful_shutdown()
        grace = self.settings.shutdown_grace_s if grace_s is None else grace_s
        await self._server.stop(grace)
        for writer in self._writers:
            writer.stop()
        if self._writers:
            # What was settled before the stop reaches the ledger now; an embedded store would lose it.
            try:
                await self._writers[0].drain(timeout_s=max(grace, 1.0))
            except _DRAIN_FAILURES as error:
                # The rest of the shutdown must still happen (Redis or the database may be down, or the drain
                # may time out); what is left stays in a real Redis's outbox.
                log.warning("the ledger writers did not drain the outbox before stopping: %r", error)
        await cancel_all(self._tasks)
        for client in self._writer_clients:
            await client.aclose()
        if self.ledger is not None:
            await self.ledger.close()
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


async def _prepare_ledger(ledger: LedgerSink, store: RedisStore, clock: Clock, *, restore: bool) -> None:
    """Migrate the ledger; for an in-process store, restore every account's tree and counters from it."""
    try:
        version = await ledger.migrate()
    except UnavailableError as error:
        # The hot path does not need the ledger: settled money waits in the outbox until it is back.
        log.warning("ledger unavailable at start (%s); the outbox will hold settled money until it is back", error)
        return
    log.info("ledger schema at version %d", version)
    if restore:
        for plan in await ledger.latest_plans():
            restored = await rebuild_account(store, ledger, plan, now_ms=clock.now_ms())
            log.info("restored account %s from the ledger (%d window counters)", plan.account_id, len(restored))


async def create_server(
    settings: Settings, *, clock: Clock | None = None, client: aioredis.Redis | None = None
) -> SpendgateServer:
    """Build (not start) a server from settings; loads the settings' plan, if any."""
    metrics = Metrics(nodes_max=settings.metrics_nodes_max)
    store = build_store(settings, client, metrics)
    if store.pipe_stats is not None:
        metrics.watch_pipe(store.pipe_stats)
    clock = clock or SystemClock()
    core = SpendCore(store, clock)
    ledger = open_ledger(settings.database_url, data_dir=settings.data_dir) if settings.ledger else None
    if ledger is not None:
        await _prepare_ledger(ledger, store, clock, restore=store.in_process)
    admin = AdminCore(store, core, clock, audit=ledger, config_log=ledger, transactions=ledger)
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
            # The transport admits the largest request of any method (a plan); each method's own bound is
            # enforced before decoding (see add_guarded).
            ("grpc.max_receive_message_length", max(settings.message_size_max_bytes, settings.plan_size_max_bytes)),
            ("grpc.max_metadata_size", settings.metadata_size_max_bytes),
            ("grpc.max_concurrent_streams", settings.streams_per_connection_max),
            ("grpc.so_reuseport", 0),
        ],
        maximum_concurrent_rpcs=settings.concurrent_rpcs_max,
    )
    size_max = settings.message_size_max_bytes
    add_guarded(
        server,
        spend_pb2_grpc.add_SpendServiceServicer_to_server,
        SpendServicer(core, auth, metrics),
        size_max_bytes=size_max,
        observe=metrics.observe_rpc,
    )
    # Only SpendService (the hot path) and health are registered methods; the rest are served through generic
    # handlers, which cost a call nothing until it is theirs (see add_generic_only).
    add_guarded(
        server,
        admin_pb2_grpc.add_AdminServiceServicer_to_server,
        AdminServicer(admin, store, auth, clock),
        size_max_bytes=size_max,
        size_max_bytes_by_method={"ApplyPlan": settings.plan_size_max_bytes},
        observe=metrics.observe_rpc,
        registered=False,
    )
    services = [SPEND_SERVICE, ADMIN_SERVICE]
    if ledger is not None:
        # Lag is read by a writer object over the store's client; it never blocks, so it needs no client of its own.
        lag_reader = LedgerWriter(store.client, ledger, keys=store.keys, clock=clock)
        add_guarded(
            server,
            billing_pb2_grpc.add_BillingServiceServicer_to_server,
            BillingServicer(ledger, store, auth, lag_reader),
            size_max_bytes=size_max,
            observe=metrics.observe_rpc,
            registered=False,
        )
        services.append(BILLING_SERVICE)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    # reflection.enable_server_reflection, but served through the generic handler only (see add_generic_only).
    add_generic_only(
        server,
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server,
        ReflectionServicer(
            (*services, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
        ),
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
    spendgate_server = SpendgateServer(settings, core, admin, ledger, store, metrics, server, health, port)
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
    # Everything built so far (modules, plans, caches) lives as long as the process: keep it out of the
    # garbage collector's scans, so a full collection looks only at what calls allocate and stays short.
    gc.freeze()
    helpers = (
        [asyncio.create_task(keep_other_threads_batch(), name="batch-threads")] if settings.batch_helper_threads else []
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await cancel_all(helpers)
    log.info("shutting down: finishing in-flight calls (up to %.0f s)", settings.shutdown_grace_s)
    await server.stop()
    log.info("stopped")


# ---------------------------------------------------------------------------------------------------------
# Operator tools that work on a deployment's Redis and database directly (the CLI's ledger commands).


async def _direct(settings: Settings, *, migrate: bool = True) -> tuple[RedisStore, LedgerSink]:
    store = build_store(settings)
    ledger = open_ledger(settings.database_url, data_dir=settings.data_dir)
    if migrate:
        await ledger.migrate()
    return store, ledger


async def _migrate_when_up(ledger: LedgerSink, stop: asyncio.Event) -> bool:
    """Migrate the ledger, retrying with bounded back-off while its database is down; False if stopped first.

    A standalone writer may start before its database (a deploy, a failover): it waits rather than exits, and
    the outbox holds settled money meanwhile.
    """
    delay_s = LEDGER_START_RETRY_INITIAL_S
    while True:
        migrating = asyncio.ensure_future(ledger.migrate())
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait((migrating, stopping), return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if not migrating.done():
            migrating.cancel()
            with contextlib.suppress(asyncio.CancelledError, UnavailableError):
                await migrating
            return False
        try:
            log.info("ledger schema at version %d", migrating.result())
            return True
        except UnavailableError as error:
            log.warning("ledger database unavailable (%s); retrying in %.1f s", error, delay_s)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), delay_s)
        if stop.is_set():
            return False
        delay_s = min(delay_s * 2, LEDGER_START_RETRY_MAX_S)


async def run_ledger_writers(settings: Settings, *, writers: int, consumer: str, once: bool) -> int:
    """Run writer loops until SIGTERM/SIGINT (or, with ``once``, drain the outboxes and return the count).

    Run until stopped, the writers wait for a database that is down at start; ``once`` (an operator's
    one-off command) fails at once instead.
    """
    store, ledger = await _direct(settings, migrate=once)
    name = consumer or f"{socket.gethostname()}-{os.getpid()}"
    clients = [
        aioredis.Redis.from_url(settings.redis_url, decode_responses=True, socket_timeout=10.0)
        for _ in range(max(1, writers))
    ]
    loops = [
        LedgerWriter(
            client,
            ledger,
            keys=store.keys,
            consumer=f"{name}-{index}",
            batch_size_max=settings.ledger_batch_size_max,
            linger_ms=settings.ledger_linger_ms,
        )
        for index, client in enumerate(clients)
    ]
    try:
        if once:
            return await loops[0].drain(timeout_s=settings.shutdown_grace_s * 6)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        if not await _migrate_when_up(ledger, stop):
            return 0
        tasks = [asyncio.create_task(writer.run(), name=f"ledger-writer-{i}") for i, writer in enumerate(loops)]
        log.info("%d ledger writer(s) running as %s", len(loops), name)
        await stop.wait()
        for writer in loops:
            writer.stop()
        await cancel_all(tasks)
        return sum(writer.stats.inserted for writer in loops)
    finally:
        for client in clients:
            await client.aclose()
        await ledger.close()
        await store.close()


async def reconcile_accounts(settings: Settings, account_id: str = "") -> list[ReconcileReport]:
    """Compare every account's (or one account's) counters with the ledger plus its outbox."""
    store, ledger = await _direct(settings)
    try:
        known = {plan.account_id: plan for plan in await ledger.latest_plans()}
        accounts = [account_id] if account_id else sorted({*await store.account_ids(), *known})
        reports = []
        now_ms = SystemClock().now_ms()
        for account in accounts:
            if await store.read_plan(account) is None and account in known:
                # Redis lost the account (or never had it): everything the ledger counts in its windows drifted.
                reports.append(await missing_account_report(ledger, known[account], now_ms=now_ms))
                continue
            outbox = await read_outbox(store.client, store.keys, account)
            reports.append(await reconcile_account(store, ledger, account, now_ms=now_ms, outbox=outbox))
        return reports
    finally:
        await ledger.close()
        await store.close()


async def rebuild_accounts(settings: Settings, account_id: str = "") -> list[tuple[str, int]]:
    """Rebuild every account the ledger knows (or one) in Redis: configuration, then spent counters."""
    store, ledger = await _direct(settings)
    try:
        done = []
        for plan in await ledger.latest_plans():
            if account_id and plan.account_id != account_id:
                continue
            outbox = await read_outbox(store.client, store.keys, plan.account_id)
            restored = await rebuild_account(store, ledger, plan, now_ms=SystemClock().now_ms(), outbox=outbox)
            done.append((plan.account_id, len(restored)))
        return done
    finally:
        await ledger.close()
        await store.close()
