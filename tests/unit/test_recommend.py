"""The recommendation rules, checked against the operators' formula on a known ledger."""

from __future__ import annotations

import decimal

import pytest

from spendgate.domain import InvalidArgumentError
from spendgate.recommend import Spend, Stage, recommend, round_up_to_cent

# Wallet a: 6 calls over 3 days (2/day), $0.25 average, priciest $0.40, busiest day $0.65.
LEDGER = [
    Spend("a", "2026-11-01", 100_000),
    Spend("a", "2026-11-01", 250_000),
    Spend("a", "2026-11-02", 400_000),
    Spend("a", "2026-11-02", 250_000),
    Spend("a", "2026-11-03", 250_000),
    Spend("a", "2026-11-03", 250_000),
    Spend("b", "2026-11-02", 1_000),
]


@pytest.mark.parametrize(
    ("stage", "multiplier", "day_limit"),
    [
        # 2 calls/day x $0.25 x 2 = $1.00
        (Stage.WEEK1, None, 1_000_000),
        # 2 calls/day x $0.25 x 4 = $2.00
        (Stage.WEEK3, None, 2_000_000),
        # busiest day $0.65 x 1.2 = $0.78
        (Stage.MONTH2, None, 780_000),
        # 2 x $0.25 x 3.5 = $1.75
        (None, decimal.Decimal("3.5"), 1_750_000),
    ],
)
def test_day_limit_follows_the_formula(stage: Stage | None, multiplier: decimal.Decimal | None, day_limit: int) -> None:
    result = {r.wallet_id: r for r in recommend(LEDGER, days=3, stage=stage, multiplier=multiplier)}
    a = result["a"]
    assert a.calls == 6
    assert a.calls_per_day == 2
    assert a.average_cost_micros == 250_000
    assert a.day_limit_micros == day_limit
    # About 2x the priciest call ($0.40).
    assert a.per_transaction_micros == 800_000


def test_amounts_round_up_to_whole_cents() -> None:
    # Wallet b: 1 call of $0.001 in 3 days; 1/3 x $0.001 x 2 = $0.000667 -> one cent, never below the formula.
    b = {r.wallet_id: r for r in recommend(LEDGER, days=3, stage=Stage.WEEK1)}["b"]
    assert b.day_limit_micros == 10_000
    assert b.per_transaction_micros == 10_000
    assert round_up_to_cent(decimal.Decimal(10_000)) == 10_000
    assert round_up_to_cent(decimal.Decimal(10_001)) == 20_000


def test_wallets_without_spend_get_no_recommendation() -> None:
    assert recommend([], days=7, stage=Stage.WEEK1) == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"days": 0, "stage": Stage.WEEK1}, "at least one day"),
        ({"days": 7}, "either a ramp-up stage or a safety multiplier"),
        ({"days": 7, "stage": Stage.WEEK1, "multiplier": decimal.Decimal(2)}, "either"),
        ({"days": 7, "multiplier": decimal.Decimal("0.5")}, "from 1 to 100"),
    ],
)
def test_bad_requests_are_refused(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        recommend(LEDGER, **kwargs)  # type: ignore[arg-type]
