"""Limit recommendations from real spend, by the operators' rules of thumb. Pure: no I/O.

- daily limit = expected calls per day x average cost per call x safety multiplier;
- per-transaction limit = about 2x the priciest call seen;
- the multiplier is given, or comes from the ramp-up stage: week 1 -> 2x expected, week 3 -> 3-5x (4x here),
  month 2 -> from real data: the busiest day seen plus a 20 % margin replaces the formula.

Amounts are rounded up to whole cents, so a recommended limit is never below what the formula asks for.
"""

from __future__ import annotations

import dataclasses
import decimal
import enum
from collections.abc import Iterable

from spendgate.domain import InvalidArgumentError
from spendgate.money import MICROS_PER_UNIT

CENT_MICROS = MICROS_PER_UNIT // 100
PER_TRANSACTION_FACTOR = 2
MONTH_TWO_MARGIN = decimal.Decimal("1.2")


class Stage(enum.Enum):
    """Where a fleet is in its ramp-up."""

    WEEK1 = "week1"
    WEEK3 = "week3"
    MONTH2 = "month2"


STAGE_MULTIPLIERS = {Stage.WEEK1: decimal.Decimal(2), Stage.WEEK3: decimal.Decimal(4)}


@dataclasses.dataclass(frozen=True, slots=True)
class Spend:
    """One settled transaction, as much as the rules need."""

    wallet_id: str
    day: str
    amount_micros: int


@dataclasses.dataclass(frozen=True, slots=True)
class Recommendation:
    """What the rules make of one wallet's actuals."""

    wallet_id: str
    calls: int
    days: int
    calls_per_day: decimal.Decimal
    average_cost_micros: decimal.Decimal
    priciest_micros: int
    busiest_day_micros: int
    multiplier: decimal.Decimal | None
    day_limit_micros: int
    per_transaction_micros: int


def round_up_to_cent(micros: decimal.Decimal) -> int:
    """Round an amount up to a whole cent (in micro-units)."""
    cents = (micros / CENT_MICROS).to_integral_value(rounding=decimal.ROUND_CEILING)
    return int(cents) * CENT_MICROS


def recommend(
    spend: Iterable[Spend], *, days: int, stage: Stage | None = None, multiplier: decimal.Decimal | None = None
) -> list[Recommendation]:
    """Recommend a day and a per-transaction limit for every wallet that spent, over ``days`` observed days."""
    if days < 1:
        raise InvalidArgumentError("the observed period must be at least one day")
    if (stage is None) == (multiplier is None):
        raise InvalidArgumentError("give either a ramp-up stage or a safety multiplier")
    if multiplier is not None and not decimal.Decimal(1) <= multiplier <= decimal.Decimal(100):
        raise InvalidArgumentError("the safety multiplier must be from 1 to 100")
    factor = multiplier if multiplier is not None else STAGE_MULTIPLIERS.get(stage)  # type: ignore[arg-type]
    totals: dict[str, list[int]] = {}
    daily: dict[tuple[str, str], int] = {}
    for item in spend:
        count_total_max = totals.setdefault(item.wallet_id, [0, 0, 0])
        count_total_max[0] += 1
        count_total_max[1] += item.amount_micros
        count_total_max[2] = max(count_total_max[2], item.amount_micros)
        daily[item.wallet_id, item.day] = daily.get((item.wallet_id, item.day), 0) + item.amount_micros
    out = []
    for wallet_id in sorted(totals):
        calls, total, priciest = totals[wallet_id]
        busiest = max(amount for (wallet, _), amount in daily.items() if wallet == wallet_id)
        calls_per_day = decimal.Decimal(calls) / days
        average = decimal.Decimal(total) / calls
        if factor is None:  # month 2: from real data
            day_limit = round_up_to_cent(decimal.Decimal(busiest) * MONTH_TWO_MARGIN)
        else:
            day_limit = round_up_to_cent(calls_per_day * average * factor)
        out.append(
            Recommendation(
                wallet_id=wallet_id,
                calls=calls,
                days=days,
                calls_per_day=calls_per_day,
                average_cost_micros=average,
                priciest_micros=priciest,
                busiest_day_micros=busiest,
                multiplier=factor,
                day_limit_micros=day_limit,
                per_transaction_micros=round_up_to_cent(decimal.Decimal(priciest) * PER_TRANSACTION_FACTOR),
            )
        )
    return out
