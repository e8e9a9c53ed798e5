"""The operator commands against a ``spendgate serve`` subprocess (embedded store, auth on, a free port).

The server is shared by the tests of this module; each test works on nodes (or an account) of its own.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import time
from collections.abc import Iterator

import pytest

from spendgate.client import AdminClient, Client
from spendgate.domain import NotFoundError, Window

from .support import FLEET, SPENDGATE, ServeProcess, write_plan

ROOT_TOKEN = "root-token-for-the-cli-tests-0123456789"  # noqa: S105 - a test server's token, not a credential


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    directory = tmp_path_factory.mktemp("cli-serve")
    server = ServeProcess(
        directory,
        "--plan",
        str(FLEET),
        env={"SPENDGATE_ADMIN_TOKEN": ROOT_TOKEN, "SPENDGATE_AUTH": "on", "SPENDGATE_REDIS_URL": ""},
    )
    try:
        server.wait_ready("acme", token=ROOT_TOKEN)
        yield server
    finally:
        server.stop()


def spendgate(
    serve: ServeProcess, *args: str, token: str | None = ROOT_TOKEN, timeout_s: float = 30
) -> subprocess.CompletedProcess[str]:
    """Run one CLI command against the server and return what it did."""
    env = {**os.environ, "SPENDGATE_TARGET": serve.target, "COLUMNS": "200", "NO_COLOR": "1"}
    env.pop("SPENDGATE_TOKEN", None)
    if token is not None:
        env["SPENDGATE_TOKEN"] = token
    return subprocess.run(
        [str(SPENDGATE), *args], env=env, capture_output=True, text=True, timeout=timeout_s, check=False
    )


def lines_with(output: str, text: str) -> list[str]:
    return [line for line in output.splitlines() if text in line]


PLAN = """
account:
  id: cli-co
  limits: {month: 100}
pools:
  - id: cli-pool
    limits: {month: 50}
    wallets:
      - {id: cli-bot-1, limits: {day: 5, per_transaction: 1}}
      - {id: cli-bot-2, limits: {day: 5, per_transaction: 1}}
"""


def test_apply_dry_run_apply_and_apply_again(serve: ServeProcess, tmp_path: pathlib.Path) -> None:
    plan = write_plan(tmp_path, PLAN)

    dry = spendgate(serve, "apply", "--dry-run", str(plan))
    assert dry.returncode == 0, dry.stderr
    for node in ("cli-co", "cli-pool", "cli-bot-1", "cli-bot-2"):
        assert lines_with(dry.stdout, f"added {node}"), dry.stdout
    assert "would change 4 node(s)" in dry.stdout
    with Client(serve.target, token=ROOT_TOKEN) as client, pytest.raises(NotFoundError):
        client.get_budget("cli-co")

    applied = spendgate(serve, "apply", str(plan))
    assert applied.returncode == 0, applied.stderr
    assert "changed 4 node(s)" in applied.stdout
    again = spendgate(serve, "apply", str(plan))
    assert (again.returncode, again.stdout.strip()) == (0, "no changes: the tree already matches the plan")

    edited = write_plan(tmp_path, PLAN.replace("{day: 5, per_transaction: 1}}\n", "{day: 7, per_transaction: 1}}\n", 1))
    diff = spendgate(serve, "apply", "--dry-run", str(edited))
    assert diff.returncode == 0, diff.stderr
    assert lines_with(diff.stdout, "changed cli-bot-1")
    assert "wallet in cli-pool, per transaction $1.00, day $5.00" in diff.stdout
    assert "-> wallet in cli-pool, per transaction $1.00, day $7.00" in diff.stdout
    assert "would change 1 node(s)" in diff.stdout


def test_apply_refuses_an_unsafe_removal_unless_forced(serve: ServeProcess, tmp_path: pathlib.Path) -> None:
    plan = write_plan(tmp_path, PLAN.replace("cli-", "unsafe-"))
    assert spendgate(serve, "apply", str(plan)).returncode == 0
    spent = spendgate(serve, "authorize", "unsafe-bot-2", "0.40", "--capture")
    assert spent.returncode == 0, spent.stdout + spent.stderr
    assert "APPROVED $0.40" in spent.stdout
    without = write_plan(
        tmp_path,
        PLAN.replace("cli-", "unsafe-").replace(
            "      - {id: unsafe-bot-2, limits: {day: 5, per_transaction: 1}}\n", ""
        ),
        "without.yaml",
    )

    preview = spendgate(serve, "apply", "--dry-run", str(without))
    assert preview.returncode == 0
    assert lines_with(preview.stdout, "removed unsafe-bot-2")
    assert "unsafe: unsafe-bot-2 holds $0.00 and spent $0.40 in open windows" in preview.stdout

    refused = spendgate(serve, "apply", str(without))
    assert refused.returncode == 2
    assert "FailedPrecondition" in refused.stderr
    assert "pass force" in refused.stderr
    assert spendgate(serve, "budget", "unsafe-bot-2").returncode == 0

    forced = spendgate(serve, "apply", "--force", str(without))
    assert forced.returncode == 0, forced.stderr
    assert "changed 1 node(s)" in forced.stdout
    gone = spendgate(serve, "budget", "unsafe-bot-2")
    assert (gone.returncode, "NotFound" in gone.stderr) == (2, True)


def test_tree_shows_spent_held_limit_and_utilization(serve: ServeProcess) -> None:
    assert spendgate(serve, "authorize", "content-agent-01", "0.50", "--capture").returncode == 0
    assert spendgate(serve, "authorize", "content-agent-01", "0.25").returncode == 0

    shown = spendgate(serve, "tree", "content-agents")
    assert shown.returncode == 0, shown.stderr
    header = shown.stdout.splitlines()[0].split()
    assert header == ["node", "window", "spent", "held", "limit", "utilization"]
    [wallet] = lines_with(shown.stdout, "content-agent-01")
    assert wallet.startswith("  content-agent-01")  # indented under its pool
    # $0.75 of $20 is under 5 %: an empty bar.
    assert wallet.split() == ["content-agent-01", "day", "$0.50", "$0.25", "$20.00", "░" * 10, "4%"]
    [pool] = lines_with(shown.stdout, "content-agents")
    assert pool.split()[:5] == ["content-agents", "month", "$0.50", "$0.25", "$1,000.00"]

    as_json = spendgate(serve, "tree", "--json")
    assert as_json.returncode == 0
    entries = {entry["budget"]["node_id"]: entry for entry in json.loads(as_json.stdout)}
    assert entries["acme"]["depth"] == 0
    assert entries["content-agent-01"]["depth"] == 2
    day = next(w for w in entries["content-agent-01"]["budget"]["windows"] if w["window"] == "day")
    assert (day["spent_micros"], day["held_micros"], day["limit_micros"]) == (500_000, 250_000, 20_000_000)


def test_freeze_with_void_holds_then_unfreeze(serve: ServeProcess) -> None:
    held = spendgate(serve, "authorize", "sales-agent-02", "0.25")
    assert held.returncode == 0
    assert "APPROVED $0.25" in held.stdout

    frozen = spendgate(serve, "freeze", "sales-agent-02", "--reason", "runaway loop", "--void-holds")
    assert frozen.returncode == 0, frozen.stderr
    assert frozen.stdout.strip() == "FROZEN sales-agent-02: runaway loop; voided 1 hold(s), released $0.25"
    denied = spendgate(serve, "authorize", "sales-agent-02", "0.10")
    assert denied.returncode == 1
    assert "DENIED frozen by sales-agent-02" in denied.stdout
    budget = spendgate(serve, "budget", "sales-agent-02", "--json")
    assert json.loads(budget.stdout)["frozen_reason"] == "runaway loop"
    assert [w["held_micros"] for w in json.loads(budget.stdout)["windows"]] == [0, 0, 0, 0]
    assert "(frozen)" in lines_with(spendgate(serve, "tree", "sales-agents").stdout, "sales-agent-02")[0]

    unfrozen = spendgate(serve, "unfreeze", "sales-agent-02")
    assert (unfrozen.returncode, unfrozen.stdout.strip()) == (0, "UNFROZEN sales-agent-02")
    again = spendgate(serve, "unfreeze", "sales-agent-02")
    assert (again.returncode, again.stdout.strip()) == (0, "sales-agent-02 was not frozen")
    assert spendgate(serve, "authorize", "sales-agent-02", "0.10").returncode == 0


def test_watch_prints_events_and_stops_after_count(serve: ServeProcess) -> None:
    env = {**os.environ, "SPENDGATE_TARGET": serve.target, "SPENDGATE_TOKEN": ROOT_TOKEN, "COLUMNS": "200"}
    as_json = subprocess.Popen(
        [str(SPENDGATE), "watch", "research-agents", "--kind", "freeze", "--count", "1", "--json"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    as_text = subprocess.Popen(
        [str(SPENDGATE), "watch", "research-agent-02", "--count", "2"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # A watch starts at the end of the feed when the server takes it: repeat the events until both have
        # seen their count and exited.
        with AdminClient(serve.target, token=ROOT_TOKEN) as admin:
            deadline = time.monotonic() + 30
            while as_json.poll() is None or as_text.poll() is None:
                assert time.monotonic() < deadline, "the watch commands did not exit"
                admin.freeze("research-agent-02", "seen by watch")
                admin.unfreeze("research-agent-02")
                time.sleep(0.1)
        json_out, json_err = as_json.communicate(timeout=10)
        text_out, text_err = as_text.communicate(timeout=10)
    finally:
        for process in (as_json, as_text):
            if process.poll() is None:
                process.kill()
                process.wait()
    assert as_json.returncode == 0, json_err
    [line] = json_out.splitlines()
    event = json.loads(line)
    assert (event["kind"], event["node_id"], event["message"]) == ("freeze", "research-agent-02", "seen by watch")
    assert event["account_id"] == "acme"

    assert as_text.returncode == 0, text_err
    # Freezes and unfreezes alternate, so any two events in a row are one of each, in either order.
    lines = sorted(line.split(" UTC ", 1)[1] for line in text_out.splitlines())
    assert lines == ["freeze research-agent-02: seen by watch", "unfreeze research-agent-02 $0.00"]


@pytest.mark.parametrize(
    ("args", "token", "code", "message"),
    [
        (("freeze", "no-such-wallet", "--reason", "typo"), ROOT_TOKEN, 2, "NotFound"),
        (("freeze", "sales-agent-01"), ROOT_TOKEN, 2, "Missing option '--reason'"),
        (("set-limits", "no-such-wallet", "--day", "5"), ROOT_TOKEN, 2, "NotFound"),
        (("set-limits", "sales-agent-01", "--day", "five"), ROOT_TOKEN, 2, "five"),
        (("move", "sales-agent-01", "sales-agent-02"), ROOT_TOKEN, 2, "InvalidArgument"),
        (("delete", "acme"), ROOT_TOKEN, 2, "InvalidArgument"),
        (("tree",), None, 2, "Unauthenticated"),
        (("tree",), "not-a-token", 2, "Unauthenticated"),
        (("watch", "no-such-node", "--count", "1"), ROOT_TOKEN, 2, "NotFound"),
    ],
    ids=[
        "freeze-unknown",
        "freeze-no-reason",
        "limits-unknown",
        "limits-amount",
        "move",
        "delete",
        "no-token",
        "bad-token",
        "watch",
    ],
)
def test_errors_exit_2_with_a_message(
    serve: ServeProcess, args: tuple[str, ...], token: str | None, code: int, message: str
) -> None:
    result = spendgate(serve, *args, token=token)
    assert result.returncode == code
    assert message in result.stderr
    with Client(serve.target, token=ROOT_TOKEN) as client:
        assert not client.get_budget("sales-agent-01").frozen


def test_apply_an_invalid_plan_exits_2(serve: ServeProcess, tmp_path: pathlib.Path) -> None:
    plan = write_plan(tmp_path, PLAN.replace("per_transaction: 1}}", "per_txn: 1}}", 1))
    result = spendgate(serve, "apply", str(plan))
    assert result.returncode == 2
    assert "InvalidArgument" in result.stderr
    assert "pools[0].wallets[0].limits: unknown key(s) per_txn" in result.stderr


def test_create_set_limits_move_and_delete(serve: ServeProcess) -> None:
    created = spendgate(serve, "create", "cli-pool-2", "--parent", "acme", "--pool", "--month", "30")
    assert created.returncode == 0, created.stderr
    assert "cli-pool-2 (pool in acme)" in created.stdout
    wallet = spendgate(serve, "create", "cli-wallet", "--parent", "cli-pool-2", "--day", "2", "--per-transaction", "1")
    assert wallet.returncode == 0, wallet.stderr
    limited = spendgate(
        serve, "set-limits", "cli-wallet", "--day", "3", "--velocity", "10", "--service", "api.example.com"
    )
    assert limited.returncode == 0, limited.stderr
    moved = spendgate(serve, "move", "cli-wallet", "research-agents")
    assert (moved.returncode, moved.stdout.strip()) == (0, "moved cli-wallet under research-agents")
    with Client(serve.target, token=ROOT_TOKEN) as client:
        budget = client.get_budget("cli-wallet")
        assert budget.parent_id == "research-agents"
        assert budget.window(Window.DAY).limit_micros == 3_000_000
        assert budget.per_transaction_micros is None  # set-limits replaces every limit
        assert (budget.velocity_per_minute, budget.allowed_services) == (10, ("api.example.com",))
    deleted = spendgate(serve, "delete", "cli-pool-2")
    assert (deleted.returncode, deleted.stdout.strip()) == (0, "deleted cli-pool-2")
