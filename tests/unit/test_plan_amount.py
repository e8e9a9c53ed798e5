"""Amounts written into plan documents (config history, recommendations) read back to the same micro-units."""

from __future__ import annotations

import pytest

from spendgate.money import parse_amount, plan_amount


@pytest.mark.parametrize(
    ("micros", "written"),
    [(0, 0), (1, "0.000001"), (250_000, "0.25"), (50_000_000, 50), (1_000_001, "1.000001")],
)
def test_plan_amounts_round_trip(micros: int, written: int | str) -> None:
    assert plan_amount(micros) == written
    assert parse_amount(plan_amount(micros)) == micros
