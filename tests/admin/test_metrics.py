"""The Prometheus endpoint: decisions by reason, RPC latency by method and code, per-node spend."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Callable

import pytest
from prometheus_client.parser import text_string_to_metric_families

from spendgate.domain import NotFoundError

from .support import USD, StartFleet, free_port, wait_for

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def sample(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def test_the_metrics_endpoint_counts_decisions_and_times_rpcs(start_fleet: StartFleet) -> None:
    port = free_port()
    fleet = start_fleet(metrics_port=port, metrics_interval_s=0.05)

    assert fleet.spend.authorize("research-agent-01", 400_000).approved
    assert fleet.spend.authorize("research-agent-01", 300_000, capture=True).approved
    assert not fleet.spend.authorize("research-agent-01", 2 * USD).approved
    with pytest.raises(NotFoundError):
        fleet.spend.get_budget("no-such-node")

    samples = scrape(port)
    assert sample(samples, "spendgate_decisions_total", decision="approved", reason="none") == 2
    assert sample(samples, "spendgate_decisions_total", decision="denied", reason="per_transaction_limit") == 1
    assert sample(samples, "spendgate_rpc_duration_seconds_count", method="Authorize", code="OK") == 3
    # A failed call is timed after its status went out, so the client may see the error first.
    wait_for(
        lambda: sample(scrape(port), "spendgate_rpc_duration_seconds_count", method="GetBudget", code="NOT_FOUND") == 1,
        what="the failed GetBudget to be timed",
    )
    assert sample(samples, "spendgate_rpc_duration_seconds_bucket", method="Authorize", code="OK", le="+Inf") == 3
    assert sample(samples, "spendgate_redis_errors_total") == 0

    # The per-node gauges are collected in the background, node by node: wait for a collection that saw it all.
    def collected() -> Samples | None:
        now = scrape(port)
        spent = [
            sample(now, "spendgate_node_spent_micros", node="research-agent-01", window="day"),
            sample(now, "spendgate_node_spent_micros", node="acme", window="month"),
        ]
        return now if spent == [300_000, 300_000] else None

    samples = wait_for(collected, what="the per-node gauges to show the spend")
    assert sample(samples, "spendgate_node_held_micros", node="research-agent-01", window="day") == 400_000
    assert sample(samples, "spendgate_node_utilization_ratio", node="research-agent-01", window="day") == 0.014
    assert sample(samples, "spendgate_holds_outstanding", account="acme") == 1


def per_node_series(port: int, fleet_spends: Callable[[], object]) -> Samples:
    fleet_spends()

    def collected() -> Samples | None:
        now = scrape(port)
        return now if any(name == "spendgate_node_spent_micros" and value for (name, _), value in now.items()) else None

    return wait_for(collected, what="the per-node gauges")


def test_per_node_series_are_bounded(start_fleet: StartFleet) -> None:
    port = free_port()
    fleet = start_fleet(metrics_port=port, metrics_interval_s=0.05, metrics_nodes_max=2)
    samples = per_node_series(port, lambda: fleet.spend.authorize("research-agent-01", 900_000, capture=True))
    # At most nodes_max x 4 windows of series of each per-node gauge.
    for gauge in ("spendgate_node_spent_micros", "spendgate_node_held_micros"):
        assert len([name for name, _ in samples if name == gauge]) == 2 * 4


def test_the_busiest_nodes_get_the_per_node_series(start_fleet: StartFleet) -> None:
    port = free_port()
    fleet = start_fleet(metrics_port=port, metrics_interval_s=0.05, metrics_nodes_max=2)
    samples = per_node_series(port, lambda: fleet.spend.authorize("content-agent-02", 900_000, capture=True))
    nodes = {dict(labels)["node"] for name, labels in samples if name == "spendgate_node_utilization_ratio"}
    assert "content-agent-02" in nodes


def test_the_endpoint_stops_with_the_server(start_fleet: StartFleet) -> None:
    port = free_port()
    fleet = start_fleet(metrics_port=port)
    assert scrape(port)
    fleet.harness.stop()
    with pytest.raises(urllib.error.URLError):
        scrape(port)
