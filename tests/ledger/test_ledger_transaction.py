"""The ledger's values: transactions read from outbox entries, cursors, and window sums."""

from __future__ import annotations

import fakeredis
import pytest
from hypothesis import given
from hypothesis import strategies as st

from spendgate.clock import ManualClock
from spendgate.core import SpendCore
from spendgate.domain import AuthorizeCommand, InvalidArgumentError, Window
from spendgate.ledger import open_ledger
from spendgate.ledger.postgres import PostgresLedger
from spendgate.ledger.sink import Cursor, LedgerTransaction, MalformedEntryError, WindowKey, window_deltas
from spendgate.ledger.sqlite import SqliteLedger
from spendgate.plan import parse_plan
from spendgate.store.keys import Keys
from spendgate.store.redis_store import RedisStore

FIELDS = {
    "txn_id": "acme:0123456789abcdef0123456789abcdef",
    "account_id": "acme",
    "wallet_id": "w1",
    "chain": "w1,pool,acme",
    "amount_micros": "1500000",
    "authorized_micros": "2000000",
    "currency": "USD",
    "service": "api.example.com",
    "metadata": '{"run":"7","team":"x"}',
    "authorized_at_ms": "1795900000000",
    "captured_at_ms": "1795900001000",
    "day": "2026-11-28",
    "week": "2026-W48",
    "month": "2026-11",
    "idempotency_key": "k-1",
    "capture_idempotency_key": "c-1",
}


def test_reads_every_field_of_an_outbox_entry() -> None:
    txn = LedgerTransaction.from_stream_fields(FIELDS)
    assert txn.chain == ("w1", "pool", "acme")
    assert txn.pool_id == "pool"
    assert txn.amount_micros == 1_500_000
    assert isinstance(txn.amount_micros, int)
    assert txn.metadata == {"run": "7", "team": "x"}
    assert txn.window_id(Window.DAY) == "2026-11-28"
    assert txn.window_id(Window.TOTAL) == "all"
    assert txn.to_stream_fields() == FIELDS


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"txn_id": None}, "no 'txn_id'"),
        ({"txn_id": ""}, "empty 'txn_id'"),
        ({"amount_micros": "1.5"}, "not an integer"),
        ({"amount_micros": "-1"}, "outside"),
        ({"amount_micros": str(10**15 + 1)}, "outside"),
        ({"captured_at_ms": "x"}, "not an integer"),
        ({"chain": "w2,pool,acme"}, "does not run from wallet"),
        ({"chain": "w1,pool,other"}, "does not run from wallet"),
        ({"chain": "w1"}, "does not run from wallet"),
        ({"chain": "w1,,acme"}, "does not run from wallet"),
        ({"metadata": "{"}, "not JSON"),
        ({"metadata": '{"a":1}'}, "object of strings"),
        ({"metadata": "[]"}, "object of strings"),
        ({"currency": None}, "no 'currency'"),
    ],
)
def test_refuses_malformed_entries(change: dict[str, str | None], message: str) -> None:
    fields = {**FIELDS, **change}
    fields = {k: v for k, v in fields.items() if v is not None}
    with pytest.raises(MalformedEntryError, match=message):
        LedgerTransaction.from_stream_fields(fields)  # type: ignore[arg-type]


def test_optional_fields_default_to_empty() -> None:
    fields = {k: v for k, v in FIELDS.items() if k not in ("service", "metadata", "capture_idempotency_key")}
    txn = LedgerTransaction.from_stream_fields(fields)
    assert (txn.service, dict(txn.metadata), txn.capture_idempotency_key) == ("", {}, "")


_ids = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-._", min_size=1, max_size=20)


@given(
    chain=st.lists(_ids, min_size=2, max_size=6, unique=True),
    amount=st.integers(0, 10**15),
    authorized=st.integers(0, 10**15),
    at=st.integers(0, 4_102_444_800_000),
    service=st.text(max_size=30),
    metadata=st.dictionaries(st.text(min_size=1, max_size=8), st.text(max_size=12), max_size=4),
)
def test_stream_fields_round_trip(
    chain: list[str], amount: int, authorized: int, at: int, service: str, metadata: dict[str, str]
) -> None:
    txn = LedgerTransaction(
        txn_id=f"{chain[-1]}:abc",
        account_id=chain[-1],
        wallet_id=chain[0],
        chain=tuple(chain),
        amount_micros=amount,
        authorized_micros=authorized,
        currency="EUR",
        service=service,
        metadata=dict(sorted(metadata.items())),
        authorized_at_ms=at,
        captured_at_ms=at,
        day="2026-01-01",
        week="2026-W01",
        month="2026-01",
        idempotency_key="k",
        capture_idempotency_key="",
    )
    assert LedgerTransaction.from_stream_fields(txn.to_stream_fields()) == txn


async def test_reads_what_the_capture_script_appends() -> None:
    """The contract between capture.lua's outbox_append and the ledger, through the real scripts."""
    client = fakeredis.FakeAsyncRedis(decode_responses=True)
    keys = Keys("unit")
    clock = ManualClock(1_795_900_000_000)
    core = SpendCore(RedisStore(client, keys=keys), clock)
    plan = parse_plan({"account": {"id": "acme"}, "pools": [{"id": "p", "wallets": [{"id": "w"}]}]})
    await core.apply_plan(plan)
    one_shot = await core.authorize(
        AuthorizeCommand("w", 250_000, "USD", "k-1", service="api.x", capture=True, metadata={"team": "a"})
    )
    held = await core.authorize(AuthorizeCommand("w", 900_000, "USD", "k-2"))
    clock.advance(5_000)
    await core.capture(held.authorization_id, 400_000, "c-2")
    entries = await client.xrange(keys.outbox("acme"))
    first, second = (LedgerTransaction.from_stream_fields(fields) for _, fields in entries)
    assert first.txn_id == one_shot.authorization_id
    assert (first.amount_micros, first.authorized_micros, first.service) == (250_000, 250_000, "api.x")
    assert first.metadata == {"team": "a"}
    assert first.chain == ("w", "p", "acme")
    assert (first.day, first.week, first.month) == ("2026-11-28", "2026-W48", "2026-11")
    assert second.txn_id == held.authorization_id
    assert (second.amount_micros, second.authorized_micros) == (400_000, 900_000)
    assert second.captured_at_ms - second.authorized_at_ms == 5_000
    assert (second.idempotency_key, second.capture_idempotency_key) == ("k-2", "c-2")
    await client.aclose()


def test_cursor_round_trips_and_refuses_garbage() -> None:
    cursor = Cursor(1_795_900_000_000, "acme:ff")
    assert Cursor.decode(cursor.encode()) == cursor
    for token in ("", "%%%", "bm90IGpzb24", Cursor(1, "x").encode()[:-3] + "A", "WzEsMl0"):
        with pytest.raises(InvalidArgumentError, match="page token"):
            Cursor.decode(token)


def test_window_deltas_count_every_node_in_every_window() -> None:
    txn = LedgerTransaction.from_stream_fields(FIELDS)
    totals = window_deltas([txn, txn])
    assert len(totals) == 3 * 4
    assert totals[WindowKey("pool", Window.MONTH, "2026-11")].spent_micros == 3_000_000
    assert totals[WindowKey("acme", Window.TOTAL, "all")].transaction_count == 2


def test_open_ledger_picks_the_backend(tmp_path: object) -> None:
    assert isinstance(open_ledger("", data_dir=str(tmp_path)), SqliteLedger)
    assert isinstance(open_ledger("sqlite:///x.db"), SqliteLedger)
    assert isinstance(open_ledger("postgresql://u@h/db"), PostgresLedger)
    with pytest.raises(InvalidArgumentError, match="neither"):
        open_ledger("mysql://x")
