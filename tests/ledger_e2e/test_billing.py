"""BillingService and the billing CLI against what was really settled: filters, pages, reports and exports.

A server on a ManualClock settles five weeks of spend through the gRPC API (from late October to early
December 2026, with holds captured across midnight at month ends, and captures exactly on filter boundaries);
its writer moves it into the ledger. Each test runs on the embedded default (in-process store, SQLite ledger)
and on a real Redis with PostgreSQL.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import io
import json
from collections.abc import Callable, Iterable
from typing import Any

import grpc
import pytest

from helpers import USD, RedisServer
from spendgate._gen.spendgate.v1 import billing_pb2, billing_pb2_grpc
from spendgate.client import BillingClient
from spendgate.clock import ManualClock

from .conftest import Gate, StartGate
from .support import (
    ACCOUNT,
    CALL_TIMEOUT_S,
    Expected,
    Spender,
    check_transaction,
    drained,
    page_order,
    run_cli,
    utc_ms,
)

FIRST_MS = utc_ms("2026-10-27T08:00")
# Filter boundaries with a capture exactly on each (since is inclusive, until exclusive).
SINCE_MS = utc_ms("2026-11-03T00:00")
UNTIL_MS = utc_ms("2026-11-17T00:00")
NOVEMBER = (utc_ms("2026-11-01T00:00"), utc_ms("2026-12-01T00:00"))
PAGE_SIZE = 7


@dataclasses.dataclass
class Billed:
    """A server with five weeks of settled spend in its ledger, and what was settled."""

    gate: Gate
    spender: Spender
    stub: Any

    @property
    def settled(self) -> list[Expected]:
        """Everything settled, in the ledger's page order."""
        return page_order(self.spender.settled.values())


async def settle_weeks(spender: Spender, clock: ManualClock) -> None:
    """Five weeks of spend: random spends every few hours, plus holds settled across month ends."""

    async def until(end_ms: int) -> None:
        while clock.now_ms() < end_ms - 10 * 3_600_000:
            await spender.random_spend(1, amount_max_micros=USD, step_ms_max=9 * 3_600_000)
        clock.set(end_ms)

    await until(utc_ms("2026-10-31T23:58"))
    # Authorized on October 31, captured on November 1: it counts in October's windows, settles in November.
    await spender.hold_and_capture("research-agent-02", USD, 600_000, service="api.openai.example", wait_ms=180_000)
    await until(SINCE_MS)
    await spender.one_shot("research-agent-03", 410_000, service="search.example")
    await until(UNTIL_MS)
    await spender.one_shot("research-agent-01", 170_000, service="search.example")
    await until(utc_ms("2026-11-30T23:59"))
    await spender.hold_and_capture("sales-agent-02", USD, 250_000, service="api.openai.example", wait_ms=120_000)
    await until(utc_ms("2026-12-02T20:00"))


@pytest.fixture(params=["embedded", pytest.param("postgres", marks=[pytest.mark.redis, pytest.mark.postgres])])
def backend(request: pytest.FixtureRequest) -> dict[str, Any]:
    """The settings of each backend: the embedded default, or our own Redis and PostgreSQL database."""
    if request.param == "embedded":
        return {}
    redis_server: RedisServer = request.getfixturevalue("redis_server")
    return {"redis_url": redis_server.url, "database_url": request.getfixturevalue("database_url")}


@pytest.fixture
async def billed(backend: dict[str, Any], start_gate: StartGate) -> Billed:
    """Five weeks of spend settled through the API into the ledger, on each backend.

    ``backend`` comes first, so the server stops before its Redis and database go away.
    """
    clock = ManualClock(FIRST_MS)
    gate: Gate = await start_gate(clock=clock, **backend)
    spender = Spender(gate.client, clock, seed=31)
    await settle_weeks(spender, clock)
    assert len(spender.settled) > 100
    await drained(gate.channel, len(spender.settled))
    return Billed(gate, spender, billing_pb2_grpc.BillingServiceStub(gate.channel))  # type: ignore[no-untyped-call]


async def walk(
    stub: Any, page_size: int = PAGE_SIZE, between_pages: Callable[[], Any] | None = None, **filters: Any
) -> list[Any]:
    """Every page of ListTransactions; checks each page's size and that the last one has no token."""
    listed: list[Any] = []
    token = ""
    while True:
        response = await stub.ListTransactions(
            billing_pb2.ListTransactionsRequest(page_size=page_size, page_token=token, **filters),
            timeout=CALL_TIMEOUT_S,
        )
        listed += response.transactions
        token = response.next_page_token
        if not token:
            assert len(response.transactions) <= page_size
            return listed
        assert len(response.transactions) == page_size, "only the last page may be short"
        if between_pages is not None:
            await between_pages()
            between_pages = None


def selected(
    settled: Iterable[Expected],
    *,
    node: str,
    since_ms: int = 0,
    until_ms: int = 0,
    service: str = "",
) -> list[Expected]:
    """What a filter must return, computed from the captures (not from the ledger)."""
    return page_order(
        item
        for item in settled
        if node in item.chain
        and (not since_ms or item.captured_ms >= since_ms)
        and (not until_ms or item.captured_ms < until_ms)
        and (not service or item.service == service)
    )


FILTERS: list[dict[str, Any]] = [
    {"node_id": "research-agent-01"},
    {"node_id": "research-agents"},
    {"node_id": ACCOUNT},
    {"node_id": ACCOUNT, "since_ms": SINCE_MS, "until_ms": UNTIL_MS},
    {"node_id": "sales-agents", "service": "api.openai.example"},
    {"node_id": "research-agents", "since_ms": NOVEMBER[0], "service": "search.example"},
]


async def test_list_transactions_filters_and_pages(billed: Billed) -> None:
    """A wallet, a pool's subtree, the account, a time range, a service, and combinations, over several pages."""
    for filters in FILTERS:
        expected = selected(
            billed.spender.settled.values(),
            node=filters["node_id"],
            since_ms=filters.get("since_ms", 0),
            until_ms=filters.get("until_ms", 0),
            service=filters.get("service", ""),
        )
        assert len(expected) > 2 * PAGE_SIZE, f"{filters} should need several pages"
        listed = await walk(billed.stub, **filters)
        assert [txn.txn_id for txn in listed] == [item.txn_id for item in expected], filters
        for txn, item in zip(listed, expected, strict=True):
            check_transaction(txn, item)


async def test_boundaries_and_the_cross_month_capture(billed: Billed) -> None:
    in_range = await walk(billed.stub, node_id=ACCOUNT, since_ms=SINCE_MS, until_ms=UNTIL_MS)
    assert in_range[0].captured_at_ms == SINCE_MS, "since is inclusive"
    assert all(txn.captured_at_ms < UNTIL_MS for txn in in_range), "until is exclusive"
    november = await walk(billed.stub, node_id="research-agent-02", since_ms=NOVEMBER[0], until_ms=NOVEMBER[1])
    # The hold authorized on October 31 and captured on November 1 settled in November, in October's windows.
    crossing = november[0]
    assert crossing.captured_at_ms == utc_ms("2026-11-01T00:01")
    assert (crossing.day, crossing.month, crossing.amount_micros) == ("2026-10-31", "2026-10", 600_000)


async def test_pages_are_stable_while_the_ledger_grows(billed: Billed) -> None:
    """Transactions settled during a walk come after it (later capture times); none is seen twice or skipped."""
    before = [item.txn_id for item in billed.settled]

    async def settle_more() -> None:
        billed.spender.advance(3_600_000)
        for _ in range(12):
            await billed.spender.one_shot("content-agent-01", 10_000, service="search.example")
        await drained(billed.gate.channel, len(billed.spender.settled))

    listed = await walk(billed.stub, page_size=10, between_pages=settle_more, node_id=ACCOUNT)
    ids = [txn.txn_id for txn in listed]
    assert ids[: len(before)] == before
    assert ids == [item.txn_id for item in billed.settled]
    assert len(ids) == len(before) + 12


async def test_bad_listing_requests_are_refused(billed: Billed) -> None:
    for request in (
        billing_pb2.ListTransactionsRequest(node_id=ACCOUNT, page_token="not-a-token"),  # noqa: S106 - not a secret
        billing_pb2.ListTransactionsRequest(node_id=ACCOUNT, page_size=1001),
        billing_pb2.ListTransactionsRequest(node_id=ACCOUNT, since_ms=UNTIL_MS, until_ms=SINCE_MS),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await billed.stub.ListTransactions(request, timeout=CALL_TIMEOUT_S)
        assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT


# ---------------------------------------------------------------------------------------------------------
# Spend reports.

GROUPS: dict[str, Callable[[Any], str]] = {
    "WALLET": lambda txn: txn.wallet_id,
    "POOL": lambda txn: txn.chain[1],
    "ACCOUNT": lambda txn: txn.account_id,
    "SERVICE": lambda txn: txn.service,
}


def aggregate(transactions: Iterable[Any], group: str, period: str) -> list[tuple[str, str, str, int, int]]:
    """(period, group, currency, amount, count) rows summed from transactions, in the report's order."""
    totals: dict[tuple[str, str, str], list[int]] = {}
    for txn in transactions:
        key = (txn.day if period == "DAY" else txn.month, GROUPS[group](txn), txn.currency)
        slot = totals.setdefault(key, [0, 0])
        slot[0] += txn.amount_micros
        slot[1] += 1
    return [(*key, amount, count) for key, (amount, count) in sorted(totals.items())]


async def test_spend_report_agrees_with_the_raw_transactions(billed: Billed) -> None:
    """Every grouping per day and per month, for the account, a pool in November, and a wallet."""
    scopes = ((ACCOUNT, 0, 0), ("research-agents", *NOVEMBER), ("sales-agent-01", 0, 0))
    for node, since_ms, until_ms in scopes:
        raw = await walk(billed.stub, page_size=1000, node_id=node, since_ms=since_ms, until_ms=until_ms)
        assert raw
        for group in GROUPS:
            for period in ("DAY", "MONTH"):
                response = await billed.stub.SpendReport(
                    billing_pb2.SpendReportRequest(
                        node_id=node,
                        group_by=f"REPORT_GROUP_{group}",
                        period=f"REPORT_PERIOD_{period}",
                        since_ms=since_ms,
                        until_ms=until_ms,
                    ),
                    timeout=CALL_TIMEOUT_S,
                )
                rows = [(r.period, r.group, r.currency, r.amount_micros, r.transaction_count) for r in response.rows]
                where = (node, group, period)
                assert rows == aggregate(raw, group, period), where
                assert sum(row[3] for row in rows) == sum(txn.amount_micros for txn in raw), where
                assert sum(row[4] for row in rows) == len(raw), where


# ---------------------------------------------------------------------------------------------------------
# The CLI and the blocking client.


def utc_text(ms: int) -> str:
    """A time as the CLI prints it."""
    return datetime.datetime.fromtimestamp(ms / 1000, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


async def test_cli_exports_the_transactions_under_a_pool_as_csv(billed: Billed) -> None:
    result = await run_cli(
        "--target", billed.gate.address, "transactions", "--under", "research-agents", "--since", "2026-11-01", "--csv"
    )
    assert result.code == 0, result
    rows = list(csv.DictReader(io.StringIO(result.out)))
    expected = selected(billed.spender.settled.values(), node="research-agents", since_ms=NOVEMBER[0])
    assert [row["txn_id"] for row in rows] == [item.txn_id for item in expected]
    for row, item in zip(rows, expected, strict=True):
        authorized = datetime.datetime.fromtimestamp(item.authorized_at_ms[0] / 1000, datetime.UTC)
        assert row == {
            "txn_id": item.txn_id,
            "captured_at": utc_text(item.captured_ms),
            "wallet_id": item.wallet_id,
            "pool_id": item.pool_id,
            "account_id": ACCOUNT,
            "service": item.service,
            "amount": row["amount"],
            "amount_micros": str(item.amount_micros),
            "currency": "USD",
            "day": authorized.strftime("%Y-%m-%d"),
            "month": authorized.strftime("%Y-%m"),
            "metadata": json.dumps(item.metadata, sort_keys=True),
        }
        dollars, _, fraction = row["amount"].removeprefix("$").partition(".")
        assert int(dollars.replace(",", "")) * USD + int(fraction.ljust(6, "0")) == item.amount_micros


async def test_cli_reports_a_month_by_pool_as_json(billed: Billed) -> None:
    result = await run_cli("--target", billed.gate.address, "report", "--by", "pool", "--month", "2026-11", "--json")
    assert result.code == 0, result
    lines = json.loads(result.out)
    november = selected(billed.spender.settled.values(), node=ACCOUNT, since_ms=NOVEMBER[0], until_ms=NOVEMBER[1])
    expected = [
        {"period": period, "group": group, "currency": currency, "amount_micros": amount, "transaction_count": count}
        for period, group, currency, amount, count in aggregate(map(_as_ledger_row, november), "POOL", "MONTH")
    ]
    assert lines == expected
    # The hold authorized in October and settled on November 1 is billed in November, under October's window.
    assert [line["period"] for line in lines if line["period"] != "2026-11"] == ["2026-10"]


async def test_cli_reports_per_day_by_service_as_csv(billed: Billed) -> None:
    result = await run_cli(
        "--target",
        billed.gate.address,
        "report",
        "--by",
        "service",
        "--period",
        "day",
        "--under",
        "sales-agents",
        "--csv",
    )
    assert result.code == 0, result
    rows = list(csv.reader(io.StringIO(result.out)))
    assert rows[0] == ["period", "service", "amount", "amount_micros", "currency", "transactions"]
    expected = selected(billed.spender.settled.values(), node="sales-agents")
    assert [(r[0], r[1], r[4], int(r[3]), int(r[5])) for r in rows[1:]] == aggregate(
        map(_as_ledger_row, expected), "SERVICE", "DAY"
    )


async def test_the_blocking_client_pages_through_everything(billed: Billed) -> None:
    import asyncio

    def fetch() -> list[Any]:
        with BillingClient(billed.gate.address, timeout_s=CALL_TIMEOUT_S) as billing:
            return list(billing.transactions(ACCOUNT, page_size=9))

    listed = await asyncio.to_thread(fetch)
    assert [txn.txn_id for txn in listed] == [item.txn_id for item in billed.settled]
    for txn, item in zip(listed, billed.settled, strict=True):
        check_transaction(txn, item)


@dataclasses.dataclass(frozen=True)
class _Row:
    wallet_id: str
    chain: tuple[str, ...]
    account_id: str
    service: str
    currency: str
    amount_micros: int
    day: str
    month: str


def _as_ledger_row(item: Expected) -> _Row:
    """An expected capture in the shape ``aggregate`` reads (windows from the authorization time, UTC)."""
    authorized = datetime.datetime.fromtimestamp(item.authorized_at_ms[0] / 1000, datetime.UTC)
    return _Row(
        item.wallet_id,
        item.chain,
        ACCOUNT,
        item.service,
        "USD",
        item.amount_micros,
        authorized.strftime("%Y-%m-%d"),
        authorized.strftime("%Y-%m"),
    )
