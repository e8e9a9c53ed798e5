"""Prometheus metrics for one server.

RPC latency, decisions by reason, spend and utilization per node, holds, outbox lag and Redis errors. Each
server has its own registry, so several servers can live in one process (tests).

Per-node series are bounded: at most ``nodes_max`` nodes are exported (the busiest by utilization first), so a
fleet of 100,000 wallets does not become 100,000 x 4 series.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Awaitable, Callable, Iterator
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from spendgate.clock import pause
from spendgate.domain import AuthorizeResult, SpendgateError
from spendgate.store.pipe import PipeStats
from spendgate.store.protocol import AdminStore

log = logging.getLogger("spendgate.metrics")

# Latency buckets from 100 µs to 1 s: the hot path lives in the first few.
_LATENCY_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
_WINDOW_NAMES = {1: "day", 2: "week", 3: "month", 4: "total"}


class _PipeCollector(Collector):
    """The Redis pipe's commands and writes: commands per write is how many decisions share a round trip."""

    def __init__(self, stats: PipeStats) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        """The two counters, as they are now."""
        yield CounterMetricFamily(
            "spendgate_redis_pipe_commands", "Commands sent over the Redis pipe.", value=self._stats.commands
        )
        yield CounterMetricFamily(
            "spendgate_redis_pipe_writes",
            "Writes (round trips) that carried them; commands / writes is the batch size.",
            value=self._stats.writes,
        )


class Metrics:
    """The server's metrics and the registry they live in."""

    def __init__(self, nodes_max: int = 1000, nodes_scan_max: int = 10_000) -> None:
        self.registry = CollectorRegistry()
        self.nodes_max = nodes_max
        # Reading budgets costs one script call per node per refresh; past this many nodes the scan stops.
        self.nodes_scan_max = nodes_scan_max
        # The /metrics HTTP server and its thread, while it runs.
        self._http: tuple[WSGIServer, threading.Thread] | None = None
        self.rpc_seconds = Histogram(
            "spendgate_rpc_duration_seconds",
            "Server-side RPC latency.",
            ["method", "code"],
            buckets=_LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        # Label lookups cost more than the observation itself; the hot path reuses the children.
        self._rpc_children: dict[tuple[str, str], Any] = {}
        self._decision_children: dict[tuple[Any, Any], Any] = {}
        self.decisions = Counter(
            "spendgate_decisions_total",
            "Authorization decisions by outcome and reason.",
            ["decision", "reason"],
            registry=self.registry,
        )
        self.redis_errors = Counter(
            "spendgate_redis_errors_total", "Calls that found Redis unavailable.", registry=self.registry
        )
        self.holds = Gauge(
            "spendgate_holds_outstanding", "Open holds per account.", ["account"], registry=self.registry
        )
        self.outbox_entries = Gauge(
            "spendgate_outbox_lag_entries",
            "Settled transactions not yet committed to the ledger, per account.",
            ["account"],
            registry=self.registry,
        )
        self.outbox_age = Gauge(
            "spendgate_outbox_lag_oldest_seconds",
            "Age of the oldest settled transaction not yet in the ledger, per account.",
            ["account"],
            registry=self.registry,
        )
        self.spent = Gauge(
            "spendgate_node_spent_micros",
            "Money spent in the open window, per node.",
            ["node", "window"],
            registry=self.registry,
        )
        self.held = Gauge(
            "spendgate_node_held_micros",
            "Money held in the open window, per node.",
            ["node", "window"],
            registry=self.registry,
        )
        self.utilization = Gauge(
            "spendgate_node_utilization_ratio",
            "(spent + held) / limit of the open window, per limited node window.",
            ["node", "window"],
            registry=self.registry,
        )

    def watch_pipe(self, stats: PipeStats) -> None:
        """Export what the Redis pipe sent, read from its counters at scrape time (nothing per call)."""
        self.registry.register(_PipeCollector(stats))

    def observe_rpc(self, method: str, code: str, seconds: float) -> None:
        """Time one RPC (the API's guard calls this for every unary call)."""
        child = self._rpc_children.get((method, code))
        if child is None:
            child = self._rpc_children[method, code] = self.rpc_seconds.labels(method, code)
        child.observe(seconds)

    def record_decision(self, result: AuthorizeResult) -> None:
        """Count one decision."""
        key = (result.decision, result.deny_reason)
        child = self._decision_children.get(key)
        if child is None:
            child = self._decision_children[key] = self.decisions.labels(
                result.decision.name.lower(), result.deny_reason.name.lower()
            )
        child.inc()

    def serve_http(self, host: str, port: int) -> None:
        """Expose /metrics on an HTTP port (in a thread of its own) until :meth:`stop_http`."""
        self._http = start_http_server(port, addr=host, registry=self.registry)

    def stop_http(self) -> None:
        """Stop the /metrics endpoint, if it runs, and free its port."""
        if self._http is not None:
            server, thread = self._http
            self._http = None
            server.shutdown()
            server.server_close()
            thread.join()


async def collect_forever(
    metrics: Metrics, store: AdminStore, budgets: Callable[[str], Awaitable[Any]], interval_s: float
) -> None:
    """Refresh the gauges that come from Redis: holds, outbox, and per-node spend (bounded)."""
    while True:
        with contextlib.suppress(SpendgateError):
            await collect_once(metrics, store, budgets)
        await pause(interval_s)


async def collect_once(metrics: Metrics, store: AdminStore, budgets: Callable[[str], Awaitable[Any]]) -> None:
    """One refresh of the Redis-backed gauges.

    Up to ``nodes_scan_max`` nodes are read; the ``nodes_max`` busiest of them (by their highest utilization
    of any window) get per-node series, with all four windows each.
    """
    ranked: list[tuple[float, str, list[tuple[str, int, int, int | None, float]]]] = []
    scanned = 0
    for account_id in await store.account_ids():
        counts = await store.backlog(account_id)
        metrics.holds.labels(account_id).set(counts.holds)
        metrics.outbox_entries.labels(account_id).set(counts.outbox_entries)
        metrics.outbox_age.labels(account_id).set(counts.outbox_oldest_age_ms / 1000)
        if scanned >= metrics.nodes_scan_max:
            continue  # The scan's budget is spent: reading this account's whole plan would be wasted work.
        plan = await store.read_plan(account_id)
        for node in plan.nodes if plan else ():
            if scanned >= metrics.nodes_scan_max:
                break
            scanned += 1
            budget = await budgets(node.node_id)
            windows = []
            for window in budget.windows:
                used = window.spent_micros + window.held_micros
                ratio = used / window.limit_micros if window.limit_micros else 0.0
                windows.append(
                    (
                        _WINDOW_NAMES[int(window.window)],
                        window.spent_micros,
                        window.held_micros,
                        window.limit_micros,
                        ratio,
                    )
                )
            ranked.append((max((w[4] for w in windows), default=0.0), node.node_id, windows))
    ranked.sort(key=lambda row: (-row[0], row[1]))
    kept = [
        (ratio, node_id, window_name, spent, held, limit)
        for _, node_id, windows in ranked[: metrics.nodes_max]
        for window_name, spent, held, limit, ratio in windows
    ]
    for gauge in (metrics.spent, metrics.held, metrics.utilization):
        gauge.clear()
    for ratio, node_id, window_name, spent, held, limit in kept:
        metrics.spent.labels(node_id, window_name).set(spent)
        metrics.held.labels(node_id, window_name).set(held)
        if limit:
            metrics.utilization.labels(node_id, window_name).set(ratio)
