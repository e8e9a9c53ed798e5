"""The server as stock gRPC tools and operators see it: health, reflection, graceful shutdown, SIGTERM."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import pathlib
import signal
import time
from typing import Any

import fakeredis
import grpc
import pytest
import redis.asyncio as aioredis
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from helpers import delete_prefix, eventually, free_port
from spendgate import AsyncClient
from spendgate._gen.spendgate.v1 import admin_pb2, admin_pb2_grpc, spend_pb2, spend_pb2_grpc
from spendgate.app import create_server, running_server
from spendgate.clock import ManualClock
from spendgate.settings import Settings

from .support import (
    CALL_TIMEOUT_S,
    FLEET,
    HOLD_TTL_S,
    SPENDGATE,
    USD,
    WALLET,
    Gate,
    authorize_request,
    clean_env,
    rpc_error,
)

SPEND_SERVICE = "spendgate.v1.SpendService"
SERVING = health_pb2.HealthCheckResponse.SERVING


async def health_status(channel: grpc.aio.Channel, service: str) -> Any:
    stub = health_pb2_grpc.HealthStub(channel)
    try:
        response = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=CALL_TIMEOUT_S)
    except grpc.aio.AioRpcError as error:
        return error.code()
    return response.status


async def test_health_check_says_serving(gate: Gate) -> None:
    assert await health_status(gate.channel, "") == SERVING

    async def spend_service_serving() -> bool:
        return bool(await health_status(gate.channel, SPEND_SERVICE) == SERVING)

    # The service's own status is set by the server's first probe of its store.
    await eventually(spend_service_serving, what="spendgate.v1.SpendService to be SERVING")


async def test_a_server_started_on_a_fleet_already_in_redis_decides_first_calls_without_lookups(
    backend_kind: str,
    clock: ManualClock,
    key_prefix: str,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The fleet is put in Redis by one server; another starts without a plan, as a replica or after a restart.
    # It learnt every node's account when it started; the decision walks the wallet's chain itself.
    redis_url = str(request.getfixturevalue("redis_url")) if backend_kind == "redis" else ""
    client = fakeredis.FakeAsyncRedis(decode_responses=True) if not redis_url else None
    settings = Settings(port=0, key_prefix=key_prefix, hold_ttl_s=HOLD_TTL_S, redis_url=redis_url)
    looked_up: list[tuple[str, str]] = []
    try:
        async with running_server(dataclasses.replace(settings, plan=str(FLEET)), clock=clock, client=client):
            pass
        async with (
            running_server(settings, clock=clock, client=client) as server,
            grpc.aio.insecure_channel(server.address) as channel,
        ):
            store = server.core.store
            for name in ("account_of", "account_info", "resolve_wallet"):
                original = getattr(store, name)

                async def recorded(node_id: str, name: str = name, original: Any = original) -> Any:
                    task = asyncio.current_task()
                    # The metrics collector reads every node's budget in a task of its own.
                    if task is None or task.get_name() != "metrics":
                        looked_up.append((name, node_id))
                    return await original(node_id)

                monkeypatch.setattr(store, name, recorded)
            stub = spend_pb2_grpc.SpendServiceStub(channel)
            for wallet in ("research-agent-01", "research-agent-02", "sales-agent-01"):
                response = await stub.Authorize(authorize_request(wallet), timeout=CALL_TIMEOUT_S)
                assert response.decision == spend_pb2.DECISION_APPROVED, response.message
    finally:
        if redis_url:
            async with aioredis.Redis.from_url(redis_url, decode_responses=True) as cleaner:
                await delete_prefix(cleaner, key_prefix)

    assert looked_up == []


@pytest.mark.parametrize("backend_kind", ["fakeredis"])
async def test_reflection_describes_the_spend_service(gate: Gate) -> None:
    def describe() -> tuple[list[str], list[str], str]:
        with grpc.insecure_channel(gate.address) as channel:
            database = ProtoReflectionDescriptorDatabase(channel)
            services = list(database.get_services())
            service = DescriptorPool(database).FindServiceByName(SPEND_SERVICE)
            authorize = service.methods_by_name["Authorize"]
            return services, sorted(service.methods_by_name), authorize.input_type.full_name

    services, methods, authorize_input = await asyncio.to_thread(describe)

    assert SPEND_SERVICE in services
    assert "grpc.health.v1.Health" in services
    # Served through generic handlers only, and still listed.
    assert "spendgate.v1.AdminService" in services
    assert "grpc.reflection.v1alpha.ServerReflection" in services
    assert {"Authorize", "Capture", "Void", "GetBudget"} <= set(methods)
    assert authorize_input == "spendgate.v1.AuthorizeRequest"


async def test_only_the_spend_service_and_health_are_registered_methods(
    monkeypatch: pytest.MonkeyPatch, clock: ManualClock, key_prefix: str, tmp_path: pathlib.Path
) -> None:
    # grpc.aio waits on a pending request per registered method for every call it accepts: the rarely called
    # services (admin, billing, reflection) are served through generic handlers only.
    registered: list[str] = []
    original = grpc.aio._server.Server.add_registered_method_handlers

    def record(self: Any, service: str, handlers: dict[str, Any]) -> None:
        registered.append(service)
        original(self, service, handlers)

    monkeypatch.setattr(grpc.aio._server.Server, "add_registered_method_handlers", record)
    settings = Settings(port=0, plan=str(FLEET), key_prefix=key_prefix, ledger=True, data_dir=str(tmp_path))
    server = await create_server(settings, clock=clock, client=fakeredis.FakeAsyncRedis(decode_responses=True))
    await server.start()
    try:
        assert server.ledger is not None  # So BillingService is served too.
        assert sorted(registered) == ["grpc.health.v1.Health", SPEND_SERVICE]
        async with grpc.aio.insecure_channel(server.address) as channel:
            # A generic-only service still answers.
            tree = await admin_pb2_grpc.AdminServiceStub(channel).GetTree(
                admin_pb2.GetTreeRequest(), timeout=CALL_TIMEOUT_S
            )
            assert any(node.budget.node_id == "acme" for node in tree.nodes)
    finally:
        await server.stop(grace_s=0)


async def test_an_in_flight_call_completes_during_graceful_shutdown(clock: ManualClock, key_prefix: str) -> None:
    settings = Settings(port=0, plan=str(FLEET), key_prefix=key_prefix, hold_ttl_s=HOLD_TTL_S)
    server = await create_server(settings, clock=clock, client=fakeredis.FakeAsyncRedis(decode_responses=True))
    await server.start()
    # Hold the call inside the server until the shutdown has begun.
    entered, release = asyncio.Event(), asyncio.Event()
    authorize = server.core.authorize

    async def slow_authorize(*args: Any, **kwargs: Any) -> Any:
        entered.set()
        await release.wait()
        return await authorize(*args, **kwargs)

    server.core.authorize = slow_authorize  # type: ignore[method-assign]
    stopping: asyncio.Task[None] | None = None
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = spend_pb2_grpc.SpendServiceStub(channel)
            call = asyncio.ensure_future(stub.Authorize(authorize_request(), timeout=CALL_TIMEOUT_S))
            await asyncio.wait_for(entered.wait(), CALL_TIMEOUT_S)

            stopping = asyncio.create_task(server.stop(grace_s=CALL_TIMEOUT_S))
            await asyncio.sleep(0.2)
            assert not stopping.done(), "the shutdown should wait for the call in flight"
            # A call that arrives during the shutdown is turned away.
            late = await rpc_error(stub.Authorize(authorize_request(idempotency_key="late"), timeout=CALL_TIMEOUT_S))
            assert late.code() == grpc.StatusCode.UNAVAILABLE
            release.set()

            response = await call
            await asyncio.wait_for(stopping, CALL_TIMEOUT_S)
    finally:
        release.set()
        if stopping is None:
            await server.stop(grace_s=0)

    assert response.decision == spend_pb2.DECISION_APPROVED
    assert response.hold_state == spend_pb2.HOLD_STATE_HELD


def _helper_threads_batch(pid: int) -> bool:
    """Whether the process's main thread runs under the default policy and grpc's threads under SCHED_BATCH."""
    policies = {}
    for task in pathlib.Path(f"/proc/{pid}/task").iterdir():
        try:
            policies[int(task.name)] = ((task / "comm").read_text().strip(), os.sched_getscheduler(int(task.name)))
        except (FileNotFoundError, ProcessLookupError):  # The thread ended after the listing.
            continue
    engines = [policy for name, policy in policies.values() if name == "event_engine"]
    return policies[pid][1] == os.SCHED_OTHER and bool(engines) and all(p == os.SCHED_BATCH for p in engines)


async def test_spendgate_serve_answers_then_exits_cleanly_on_sigterm(tmp_path: pathlib.Path) -> None:
    port = free_port()
    root_token = "sg_test-root-token-for-this-test-only"  # noqa: S105 - a throwaway token of this test's server
    env = clean_env() | {"SPENDGATE_ADMIN_TOKEN": root_token, "SPENDGATE_DATA_DIR": str(tmp_path / "data")}
    process = await asyncio.create_subprocess_exec(
        str(SPENDGATE),
        "serve",
        "--port",
        str(port),
        "--plan",
        str(FLEET),
        "--log-format",
        "text",
        cwd=tmp_path,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    address = f"127.0.0.1:{port}"
    try:
        async with grpc.aio.insecure_channel(address) as channel:

            async def serving() -> bool:
                if process.returncode is not None:
                    pytest.fail(f"spendgate serve exited early with {process.returncode}")
                return bool(await health_status(channel, SPEND_SERVICE) == SERVING)

            await eventually(serving, timeout_s=30, what="spendgate serve to answer health checks")
            async with AsyncClient(address, token=root_token, timeout_s=CALL_TIMEOUT_S) as client:
                result = await client.authorize(WALLET, USD // 4)
                assert result.approved
                assert (await client.get_budget(WALLET)).windows[0].held_micros == USD // 4
            if hasattr(os, "SCHED_BATCH"):
                # grpc's threads yield to the event loop's (spendgate/threads.py); the loop's own does not.
                await eventually(
                    lambda: asyncio.to_thread(_helper_threads_batch, process.pid),
                    timeout_s=10,
                    what="grpc's threads under SCHED_BATCH",
                )

        process.send_signal(signal.SIGTERM)
        started = time.monotonic()
        stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=15)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()

    # Generous: the point is that it exits by itself, not how fast.
    assert time.monotonic() - started < 10
    assert process.returncode == 0, stderr.decode()
    log = stderr.decode()
    assert "shutting down" in log
    assert "stopped" in log
    assert "auth is on" in stdout.decode()
