"""The load-test harness: a short run against an embedded server, and the request encoding it relies on.

No performance assertions: figures on a shared two-core machine say nothing about correctness. The smoke run
checks that every figure is there and that the end-of-run check (no limit exceeded, money accounted for)
ran and passed.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest
from click.testing import CliRunner

from spendgate._gen.spendgate.v1 import spend_pb2
from spendgate.bench.fleet import generate_fleet
from spendgate.bench.servers import find_redis_server
from spendgate.bench.wire import authorize_prefix, authorize_request, stream_request
from spendgate.cli import cli

REPOSITORY = pathlib.Path(__file__).resolve().parents[2]
SMOKE_PHASES = "empty-unary,unary,unary-half,stream,redis,exhaust"
LATENCY_KEYS = {"count", "p50_ms", "p90_ms", "p99_ms", "p99.9_ms", "max_ms", "mean_ms"}


def test_encoded_requests_decode_to_what_was_meant() -> None:
    prefix = authorize_prefix("research-agent-01", 250, "USD", "api.example.com", True)
    request = spend_pb2.AuthorizeRequest.FromString(authorize_request(prefix, b"key-1"))
    assert request == spend_pb2.AuthorizeRequest(
        wallet_id="research-agent-01",
        amount_micros=250,
        currency="USD",
        service="api.example.com",
        capture=True,
        idempotency_key="key-1",
    )
    long_key = b"k" * 200  # a length that needs a two-byte varint
    item = spend_pb2.AuthorizeStreamRequest.FromString(stream_request(b"7f", authorize_request(prefix, long_key)))
    assert item.request_id == "7f"
    assert item.request.idempotency_key == long_key.decode()
    assert item.request.wallet_id == "research-agent-01"


def test_generated_fleet_has_the_asked_shape(tmp_path: pathlib.Path) -> None:
    fleet = generate_fleet(tmp_path, accounts=2, pools=3, wallets=4)
    assert fleet.counts() == {"accounts": 2, "pools": 6, "wallets": 24, "nodes": 32}
    assert len(set(fleet.wallet_ids)) == 24
    assert len(fleet.plan_paths) == 2


def test_cli_has_the_bench_command() -> None:
    result = CliRunner().invoke(cli, ["bench", "--help"])
    assert result.exit_code == 0, result.output
    assert "--concurrency" in result.output
    assert "--embedded" in result.output
    assert "--client [h2|grpc]" in result.output


@pytest.mark.slow
def test_a_short_run_reports_every_figure_and_passes_its_check(tmp_path: pathlib.Path) -> None:
    output = tmp_path / "bench.json"
    command = [sys.executable, "-m", "spendgate.bench", "--embedded", "--quick", "--phases", SMOKE_PHASES]
    # Two generated accounts (the second applied through the admin core), each with two $10/day wallets: the
    # exhaust phase, at $1 a call, runs every wallet into its day limit after ten approvals.
    command += ["--accounts", "2", "--pools", "1", "--wallets", "2", "--exhaust-amount", "1"]
    command += ["--processes", "1", "--concurrency", "8", "--json", str(output), "--work-dir", str(tmp_path)]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=110, cwd=REPOSITORY, check=False)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    figures = json.loads(output.read_text())
    assert figures["options"]["client"] == "h2", "the benchmark's own HTTP/2 client is the default"

    redis_phases = {"redis"} if find_redis_server() else set()
    ran = {"empty-unary", "unary", "unary-half", "stream", "exhaust"} | redis_phases
    assert set(figures["phases"]) == ran
    for name in ran:
        phase = figures["phases"][name]
        assert phase["calls"] > 0, name
        assert phase["throughput_per_s"] > 0, name
        assert set(phase["latency"]) == LATENCY_KEYS, name
        assert phase["errors"] == {}, name
        assert phase["generator"]["cpu_s"] is not None, name
        assert phase["failures"] == [], name
    assert figures["phases"]["unary"]["decisions"] == {"approved": figures["phases"]["unary"]["calls"]}
    assert figures["phases"]["exhaust"]["decisions"].get("denied: window_limit", 0) > 0
    assert figures["ratios"]["unary_vs_empty_unary_pct"] is not None

    check = figures["check"]
    assert check["no_limit_exceeded"] is True
    assert check["nodes_checked"] == 8
    assert check["windows_checked"] > 0
    assert check["money"]["ok"] is True
    assert check["money"]["approved_micros"] == check["money"]["wallets_spent_plus_held_delta_micros"]
    assert figures["passed"] is True
