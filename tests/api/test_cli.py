"""The ``spendgate`` command against a running server: dollars in, dollars out, and honest exit codes.

Exit codes: 0 approved or done, 1 denied, 2 an error (with a message on stderr that says what is wrong).
"""

from __future__ import annotations

import asyncio
import json
import re

import pytest

from helpers import free_port
from spendgate._gen.spendgate.v1 import spend_pb2

from .support import HOLD_EXPIRES_AT_MS, SPENDGATE, TODAY, USD, WALLET, Gate, clean_env, utc_text

pytestmark = pytest.mark.parametrize("backend_kind", ["fakeredis"])

AUTHORIZATION_ID = re.compile(r"authorization (acme:[0-9a-f]{32})")


async def spendgate(target: str, *args: str) -> tuple[int, str, str]:
    """Run the CLI; return its exit code, stdout and stderr."""
    process = await asyncio.create_subprocess_exec(
        str(SPENDGATE),
        "--target",
        target,
        "--timeout",
        "10",
        *args,
        # A wide terminal keeps rich from wrapping tables and messages mid-word.
        env=clean_env() | {"COLUMNS": "200", "NO_COLOR": "1"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


def authorization_id(stdout: str) -> str:
    match = AUTHORIZATION_ID.search(stdout)
    assert match, stdout
    return match.group(1)


async def test_authorize_capture_and_budget_in_dollars(gate: Gate) -> None:
    code, out, err = await spendgate(gate.address, "authorize", WALLET, "0.25", "--service", "api.example.com")
    assert code == 0, err
    assert "APPROVED $0.25" in out
    assert f"held until {utc_text(HOLD_EXPIRES_AT_MS)}" in out
    assert "remaining: $49.75 of $50.00 (research-agent-01 day)" in out
    held = authorization_id(out)

    code, out, err = await spendgate(gate.address, "capture", held, "$0.10")
    assert code == 0, err
    assert f"CAPTURED $0.10, released $0.15  ({held})" in out
    day = (await gate.budget(WALLET)).windows[0]
    assert (day.spent_micros, day.held_micros) == (USD // 10, 0)

    code, out, err = await spendgate(gate.address, "budget", WALLET)
    assert code == 0, err
    assert "research-agent-01 (wallet in research-agents)" in out
    day_row = next(line for line in out.splitlines() if TODAY in line)
    assert re.search(rf"day\s+.*{TODAY}\s+.*\$50\.00\s+.*\$0\.10\s+.*\$0\.00\s+.*\$49\.90", day_row), day_row
    assert "per transaction $1.00" in out


async def test_void_releases_the_hold(gate: Gate) -> None:
    code, out, err = await spendgate(gate.address, "authorize", WALLET, "$1")
    assert code == 0, err
    held = authorization_id(out)

    code, out, err = await spendgate(gate.address, "void", held)

    assert code == 0, err
    assert f"VOIDED released $1.00  ({held})" in out
    assert (await gate.budget(WALLET)).windows[0].held_micros == 0


async def test_a_denial_exits_1_and_says_why(gate: Gate) -> None:
    code, out, err = await spendgate(gate.address, "authorize", WALLET, "1.50")

    assert code == 1, err
    assert "DENIED per_transaction_limit by research-agent-01" in out
    assert "$1.50 is above the per-transaction limit of research-agent-01 ($1.00)" in out
    assert "remaining: $50.00 of $50.00" in out


async def test_json_output(gate: Gate) -> None:
    (code, out, err), (denied_code, denied_out, _) = await asyncio.gather(
        spendgate(gate.address, "authorize", WALLET, "0.25", "--capture", "--json", "--meta", "task=t-1"),
        spendgate(gate.address, "authorize", "content-agent-01", "2", "--json"),
    )

    assert code == 0, err
    result = json.loads(out)
    assert result["decision"] == "approved"
    assert result["hold_state"] == "captured"
    assert result["captured_micros"] == USD // 4
    assert result["authorization_id"].startswith("acme:")
    assert result["remaining"] == {
        "node_id": WALLET,
        "window": "day",
        "limit_micros": 50 * USD,
        "remaining_micros": 50 * USD - USD // 4,
    }
    assert denied_code == 1
    denied = json.loads(denied_out)
    assert (denied["decision"], denied["deny_reason"]) == ("denied", "per_transaction_limit")
    assert denied["denied_by"] == {"node_id": "content-agent-01", "window": "none"}

    code, out, err = await spendgate(gate.address, "budget", "research-agents", "--json")
    assert code == 0, err
    budget = json.loads(out)
    assert (budget["node_id"], budget["kind"], budget["parent_id"]) == ("research-agents", "pool", "acme")
    month = next(w for w in budget["windows"] if w["window"] == "month")
    assert (month["limit_micros"], month["spent_micros"], month["held_micros"]) == (3000 * USD, USD // 4, 0)


async def test_errors_exit_2_with_a_message_that_says_what_to_fix(gate: Gate) -> None:
    voided = await gate.stub.Authorize(
        spend_pb2.AuthorizeRequest(wallet_id=WALLET, amount_micros=USD, currency="USD", idempotency_key="v"),
        timeout=10,
    )
    await gate.stub.Void(spend_pb2.VoidRequest(authorization_id=voided.authorization_id), timeout=10)
    unreachable = f"127.0.0.1:{free_port()}"
    cases = [
        ((gate.address, "authorize", "ghost-agent", "0.25"), "NotFound: no wallet 'ghost-agent'"),
        ((gate.address, "authorize", "research-agents", "0.25"), "is a pool, not a wallet"),
        ((gate.address, "authorize", WALLET, "abc"), "'abc' is not an amount: write it like 0.25, $50 or 3,000"),
        ((gate.address, "authorize", WALLET, "0"), "the amount must be more than zero"),
        ((gate.address, "authorize", WALLET, "0.0000001"), "more than 6 decimal places"),
        ((gate.address, "authorize", WALLET, "0.25", "--currency", "EUR"), "is not the currency of account 'acme'"),
        ((gate.address, "authorize", WALLET, "0.25", "--meta", "oops"), "--meta 'oops' must look like KEY=VALUE"),
        ((gate.address, "capture", voided.authorization_id, "0.10"), "FailedPrecondition: cannot capture"),
        ((gate.address, "capture", "not-an-id", "0.10"), "InvalidArgument: authorization_id 'not-an-id' is malformed"),
        ((gate.address, "void", "acme:" + "0" * 32), "NotFound: no authorization"),
        ((gate.address, "budget", "ghost"), "NotFound: no node 'ghost'"),
        ((unreachable, "budget", WALLET), "Unavailable"),
    ]
    before = await gate.snapshot()

    results = await asyncio.gather(*(spendgate(*args) for args, _ in cases))

    for (args, message), (code, out, err) in zip(cases, results, strict=True):
        assert code == 2, (args, code, out, err)
        assert err.startswith("error: "), (args, err)
        assert message in err, (args, err)
        assert "Traceback" not in err, (args, err)
    assert await gate.snapshot() == before
