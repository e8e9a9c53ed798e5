"""The load-test harness: a short run against an embedded server, and the request encoding it relies on.

No performance assertions: figures on a shared two-core machine say nothing about correctness. The smoke run
checks that every figure is there and that the end-of-run check (no limit exceeded, money accounted for)
ran and passed.
"""

from __future__ import annotations

import json
import pathlib
import statistics
import subprocess
import sys

import pytest
import redis
from click.testing import CliRunner
from rich.console import Console

from helpers import in_ci
from spendgate._gen.spendgate.v1 import spend_pb2
from spendgate.bench import command
from spendgate.bench.check import CheckResult, violations_of
from spendgate.bench.fleet import generate_fleet
from spendgate.bench.report import redis_transport, rounds_table
from spendgate.bench.runner import BenchOptions
from spendgate.bench.servers import RedisServer, find_redis_server
from spendgate.bench.wire import authorize_prefix, authorize_request, stream_request
from spendgate.cli import cli
from spendgate.domain import NodeBudget, NodeKind, Window, WindowBudget

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
    assert "--redis-socket [tcp|unix]" in result.output


@pytest.mark.parametrize(("flag", "unix_socket"), [([], False), (["--redis-socket", "unix"], True)])
def test_the_redis_socket_flag_reaches_the_run(
    flag: list[str], unix_socket: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[BenchOptions] = []

    def run_bench(options: BenchOptions, _progress: Console) -> None:
        seen.append(options)
        raise RuntimeError("stopped by the test")

    monkeypatch.setattr(command, "run_bench", run_bench)
    result = CliRunner().invoke(cli, ["bench", "--quick", *flag])
    assert "stopped by the test" in result.output
    assert [options.redis_unix_socket for options in seen] == [unix_socket]


def test_the_report_names_the_redis_transport_of_a_server_it_started() -> None:
    unix = {"redis_server": {"url": "unix:///tmp/spendgate-redis-x/redis.sock?db=0"}}
    tcp = {"redis_server": {"url": "redis://127.0.0.1:6400/0"}}
    assert redis_transport(unix) == ", Redis over a Unix socket"
    assert redis_transport(tcp) == ", Redis over TCP (loopback)"
    # A --target server keeps its own Redis; the benchmark's serves only its redis phases.
    assert redis_transport({**unix, "target": "127.0.0.1:50051"}) == ""
    assert redis_transport({}) == ""


@pytest.mark.redis
@pytest.mark.parametrize("unix_socket", [True, False], ids=["unix-socket", "tcp"])
def test_the_benchmark_redis_is_reached_by_its_url_and_leaves_no_socket_behind(unix_socket: bool) -> None:
    binary = find_redis_server()
    if not binary:
        assert not in_ci(), "redis-server is missing: the benchmark's Redis cannot be tested in CI"
        pytest.skip("REDIS-SERVER IS MISSING: the benchmark's own Redis was not tested")
    server = RedisServer(binary, unix_socket=unix_socket)
    try:
        assert server.url.startswith("unix://" if unix_socket else "redis://127.0.0.1:")
        client = redis.Redis.from_url(server.url, socket_timeout=5.0)
        try:
            client.set("bench:test", "1")
            assert client.get("bench:test") == b"1"
        finally:
            client.close()
        socket_path = pathlib.Path(server.url.removeprefix("unix://").partition("?")[0])
        if unix_socket:
            assert socket_path.is_socket()
            assert socket_path.stat().st_mode & 0o777 == 0o700, "only the benchmark's user may use the socket"
    finally:
        server.stop()
    if unix_socket:
        assert not socket_path.parent.exists(), "the socket's directory is removed with the server"


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
    if find_redis_server():
        assert figures["system"]["redis_server"]["url"].startswith("redis://127.0.0.1:"), "TCP is the default"
        assert "Redis over TCP (loopback)" in completed.stdout

    # The redis phase needs a redis-server binary; CI has one, so there its absence is a failure, not a skip.
    assert find_redis_server() or not in_ci(), "redis-server is missing: the redis phase cannot run in CI"
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
    if redis_phases:
        # The redis phase's generator sends one script per round trip: Redis's reply writes count them.
        redis_phase = figures["phases"]["redis"]["redis"]
        assert redis_phase["round_trips"] >= redis_phase["scripts"] * 0.9, redis_phase
        assert "Redis round trips per call: " in completed.stdout
        # The embedded server's store uses the benchmark's Redis when there is one: a decision's script takes at
        # most one round trip (a few more are the server's background reads).
        assert 0 < figures["phases"]["unary"]["redis"]["round_trips_per_call"] <= 1.1
    assert figures["phases"]["exhaust"]["decisions"].get("denied: window_limit", 0) > 0
    assert figures["ratios"]["unary_vs_empty_unary_pct"] is not None
    # The open loop reports how late its calls started (counted by start, where calls are counted by answer,
    # so the two counts differ by the calls in flight at the window's edges); a closed loop has no schedule.
    assert figures["phases"]["unary-half"]["start_lateness"]["count"] > 0
    assert "start_lateness" not in figures["phases"]["unary"]

    check = figures["check"]
    assert check["no_limit_exceeded"] is True
    assert check["nodes_checked"] == 8
    assert check["windows_checked"] > 0
    assert check["money"]["ok"] is True
    assert check["money"]["approved_micros"] == check["money"]["wallets_spent_plus_held_delta_micros"]
    assert figures["passed"] is True


def _budget(spent: int, held: int, limit: int | None, *, velocity_used: int = 0) -> NodeBudget:
    day = WindowBudget(Window.DAY, "2026-11-30", limit, spent, held, 0)
    return NodeBudget(
        node_id="w1",
        kind=NodeKind.WALLET,
        parent_id="p1",
        account_id="acme",
        currency="USD",
        time_zone="UTC",
        frozen_reason="",
        per_transaction_micros=None,
        velocity_per_minute=3,
        velocity_used=velocity_used,
        allowed_services=(),
        windows=(day,),
    )


def test_the_end_of_run_check_fails_on_a_limit_exceeded_or_money_unaccounted_for() -> None:
    assert violations_of(_budget(60, 40, 100)) == []
    assert violations_of(_budget(60, 41, 100)) == ["w1 day 2026-11-30: spent 60 + held 41 > limit 100 micros"]
    assert violations_of(_budget(10**9, 0, None)) == []
    assert violations_of(_budget(0, 0, 100, velocity_used=4)) == ["w1 velocity: 4 > 3 this minute"]
    assert CheckResult(approved_micros=5, spent_held_delta_micros=5).passed
    assert CheckResult(approved_micros=5, spent_held_delta_micros=4).money_ok is False
    assert not CheckResult(approved_micros=5, spent_held_delta_micros=4).passed
    assert CheckResult(approved_micros=5, spent_held_delta_micros=7, unknown_micros_max=2).money_ok is True
    assert not CheckResult(violations=["w1 day: over"]).passed


@pytest.mark.slow
def test_rounds_repeat_the_run_and_end_with_the_medians(tmp_path: pathlib.Path) -> None:
    output = tmp_path / "rounds.json"
    command = [sys.executable, "-m", "spendgate.bench", "--embedded", "--quick", "--phases", "empty-unary,unary"]
    command += ["--rounds", "2", "--processes", "1", "--concurrency", "4", "--json", str(output)]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=110, cwd=REPOSITORY, check=False)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "round 2 of 2" in completed.stdout
    assert "Targets over 2 rounds" in completed.stdout
    figures = json.loads(output.read_text())
    assert figures["kind"] == "rounds"
    assert len(figures["rounds"]) == 2
    assert all(set(report["phases"]) == {"empty-unary", "unary"} for report in figures["rounds"])
    unary = figures["targets"]["unary_vs_empty_unary_pct"]
    assert unary["rounds"] == [report["ratios"]["unary_vs_empty_unary_pct"] for report in figures["rounds"]]
    assert unary["median"] == pytest.approx(statistics.median(unary["rounds"]), abs=1e-3)
    # Phases that did not run leave their targets empty rather than made up.
    assert figures["targets"]["stream_vs_unary_x"] == {
        "rounds": [None, None],
        "median": None,
        "target": 3.0,
        "higher_is_better": True,
    }


def test_the_rounds_table_judges_each_median_against_its_target() -> None:
    figures: list[dict[str, float | None]] = [
        {"unary_vs_empty_unary_pct": 80.0, "stream_vs_unary_x": 2.0, "half_load_p99_ms": 4.0},
        {"unary_vs_empty_unary_pct": 70.0, "stream_vs_unary_x": 3.5, "half_load_p99_ms": 2.0},
        {"unary_vs_empty_unary_pct": 76.0, "stream_vs_unary_x": 2.5, "half_load_p99_ms": 2.5},
    ]
    for round_figures, round_trips in zip(figures, (0.9, 1.2, 0.95), strict=True):
        round_figures["ledger_writer_vs_server_x"] = None
        round_figures["unary_round_trips_per_call"] = round_trips
    console = Console(record=True, width=200)
    console.print(rounds_table(figures))
    rows = {line.split("│")[1].strip(): line for line in console.export_text().splitlines() if line.count("│") > 3}
    assert "76.0" in rows["unary Authorize, % of the empty-handler ceiling"]
    assert "≥ 75%: met" in rows["unary Authorize, % of the empty-handler ceiling"]
    assert "≥ 3x: not met" in rows["AuthorizeStream, times unary"]
    assert "≤ 3ms: met" in rows["p99 at half load, ms"]
    assert not any("ledger" in label for label in rows)
    assert "0.95" in rows["Redis round trips per unary decision"]
    assert "≤ 1: met" in rows["Redis round trips per unary decision"]
