"""Prometheus metrics for one server.

RPC latency, decisions by reason, spend and utilization per node, holds, outbox lag and Redis errors. Each
server has its own registry, so several servers can live in one process (tests).

Per-node series are bounded: at most ``nodes_max`` nodes are exported (the busiest by utilization first), so a
fleet of 100,000 wallets does not become 100,000 x 4 series.
"""

from __future__ import annotations

import bisect
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
from spendgate.domain import AuthorizeResult, NotFoundError, SpendgateError
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
        """The counters, as they are now."""
        yield CounterMetricFamily(
            "spendgate_redis_pipe_commands", "Commands sent over the Redis pipe.", value=self._stats.commands
        )
        yield CounterMetricFamily(
            "spendgate_redis_pipe_writes",
            "Writes (round trips) that carried them; commands / writes is the batch size.",
            value=self._stats.writes,
        )
        yield CounterMetricFamily(
            "spendgate_redis_pipe_lingered_writes",
            "Writes that waited for more commands to share them, because the event loop was busy.",
            value=self._stats.lingered,
        )


class Metrics:
    """The server's metrics and the registry they live in."""

    def __init__(self, nodes_max: int = 1000, nodes_scan_max: int = 10_000) -> None:
        self.registry = CollectorRegistry()
        self.nodes_max = nodes_max
        # Reading budgets costs one script call per node per refresh; past this many nodes the scan stops. It
        # is at least twice nodes_max: the exported nodes are read again at every refresh, in half the budget.
        self.nodes_scan_max = max(nodes_scan_max, 2 * nodes_max)
        # Where the round over every account's nodes goes on at the next refresh (the account, and the node's
        # place among its sorted ids), and the nodes exported last time, the busiest first.
        self.scan_cursor = ("", 0)
        self.exported_nodes: list[str] = []
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


_WindowRow = tuple[str, int, int, int | None, float]


def _window_rows(budget: Any) -> list[_WindowRow]:
    """A node budget's windows as (name, spent, held, limit, utilization) rows."""
    rows: list[_WindowRow] = []
    for window in budget.windows:
        used = window.spent_micros + window.held_micros
        ratio = used / window.limit_micros if window.limit_micros else 0.0
        rows.append(
            (_WINDOW_NAMES[int(window.window)], window.spent_micros, window.held_micros, window.limit_micros, ratio)
        )
    return rows


async def collect_once(metrics: Metrics, store: AdminStore, budgets: Callable[[str], Awaitable[Any]]) -> None:
    """One refresh of the Redis-backed gauges.

    Up to ``nodes_scan_max`` node budgets are read per refresh: first the nodes exported last time (the
    busiest; at most ``nodes_max``, which is at most half the budget), so their series stay current; then the
    rest of the budget continues a round over every account's nodes where the last refresh stopped, so on a
    fleet larger than the budget every node is looked at within a few refreshes. The ``nodes_max`` busiest of
    the nodes read (by their highest utilization of any window) get per-node series, with all four windows
    each. A node deleted between two reads is skipped.
    """
    rows: dict[str, list[_WindowRow]] = {}
    left = metrics.nodes_scan_max

    async def read(node_id: str) -> None:
        nonlocal left
        left -= 1
        with contextlib.suppress(NotFoundError):
            rows[node_id] = _window_rows(await budgets(node_id))

    account_ids = sorted(await store.account_ids())
    for account_id in account_ids:
        counts = await store.backlog(account_id)
        metrics.holds.labels(account_id).set(counts.holds)
        metrics.outbox_entries.labels(account_id).set(counts.outbox_entries)
        metrics.outbox_age.labels(account_id).set(counts.outbox_oldest_age_ms / 1000)
    for node_id in metrics.exported_nodes[: metrics.nodes_scan_max // 2]:
        await read(node_id)
    # The round goes on in the account it stopped in, or (that account gone) in the next one by id.
    cursor_account, node_at = metrics.scan_cursor
    account_at = bisect.bisect_left(account_ids, cursor_account)
    if account_at >= len(account_ids) or account_ids[account_at] != cursor_account:
        node_at = 0
        if account_at >= len(account_ids):
            account_at = 0
    # Every account once, and the one the round starts in once more when it starts past its first node.
    visits_left = len(account_ids) + (1 if node_at else 0)
    while left > 0 and visits_left > 0:
        # The ids alone, sorted: reading the whole plan would read every node's hash.
        nodes = sorted(await store.node_ids(account_ids[account_at]))
        while node_at < len(nodes) and left > 0:
            node_id = nodes[node_at]
            node_at += 1
            if node_id not in rows:
                await read(node_id)
        if node_at >= len(nodes):
            account_at, node_at = (account_at + 1) % len(account_ids), 0
            visits_left -= 1
    if account_ids:
        metrics.scan_cursor = (account_ids[account_at], node_at)
    ranked = [(max((row[4] for row in windows), default=0.0), node_id, windows) for node_id, windows in rows.items()]
    ranked.sort(key=lambda row: (-row[0], row[1]))
    exported = ranked[: metrics.nodes_max]
    metrics.exported_nodes = [node_id for _, node_id, _ in exported]
    kept = [
        (ratio, node_id, window_name, spent, held, limit)
        for _, node_id, windows in exported
        for window_name, spent, held, limit, ratio in windows
    ]
    for gauge in (metrics.spent, metrics.held, metrics.utilization):
        gauge.clear()
    for ratio, node_id, window_name, spent, held, limit in kept:
        metrics.spent.labels(node_id, window_name).set(spent)
        metrics.held.labels(node_id, window_name).set(held)
        if limit:
            metrics.utilization.labels(node_id, window_name).set(ratio)
