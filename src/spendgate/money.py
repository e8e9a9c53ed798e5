"""Money as integer micro-units: parsing what people type and showing it back.

1 unit of a currency is 1,000,000 micro-units. Money is never a float anywhere in spendgate; amounts people
type (``0.25``, ``$50``, ``3,000``) are parsed exactly with :mod:`decimal`.
"""

from __future__ import annotations

import decimal
import re

MICROS_PER_UNIT = 1_000_000

# The largest amount or limit spendgate accepts: $1,000,000,000. Lua numbers in Redis are doubles, which are
# exact only up to 2**53 (about 9.007e15); with every amount and limit at most 1e15, a window's spent + held
# + the new amount stays exact in the scripts' comparisons.
MONEY_MICROS_MAX = 1_000_000_000 * MICROS_PER_UNIT

# Commas only as thousands separators ("3,000", "1,234,567.5"): "1,5" or "0,250" is a decimal comma, which read
# as "15" or "250" would set a limit ten or a thousand times too high, so it is refused rather than guessed.
_AMOUNT = re.compile(
    r"^\$?\s*(?P<number>([1-9][0-9]{0,2}(,[0-9]{3})+|[0-9][0-9_]*)(\.[0-9]*)?|\.[0-9]+)\s*(?P<currency>[A-Za-z]{3})?$"
)


class MoneyError(ValueError):
    """An amount that cannot be read as money."""


def parse_amount(text: str | int | float | decimal.Decimal) -> int:
    """Return micro-units for an amount in currency units: ``"0.25"``, ``"$50"``, ``"3,000"``, ``1.5``.

    Raises :class:`MoneyError` for negative, malformed, over-precise (beyond 6 decimals) or too large amounts.
    """
    if isinstance(text, bool):
        raise MoneyError(f"{text!r} is not an amount")
    if isinstance(text, int):
        value = decimal.Decimal(text)
    elif isinstance(text, float):
        # YAML and JSON give floats for "0.1"; their shortest repr is what the person wrote.
        value = decimal.Decimal(repr(text))
    elif isinstance(text, decimal.Decimal):
        value = text
    else:
        match = _AMOUNT.match(text.strip())
        if match is None:
            raise MoneyError(f"{text!r} is not an amount: write it like 0.25, $50 or 3,000")
        value = decimal.Decimal(match.group("number").replace(",", "").replace("_", ""))
    if not value.is_finite() or value < 0:
        raise MoneyError(f"{text!r} is not a non-negative amount")
    micros = value * MICROS_PER_UNIT
    if micros != micros.to_integral_value():
        raise MoneyError(f"{text!r} has more than 6 decimal places (the smallest unit is one micro-unit)")
    result = int(micros)
    if result > MONEY_MICROS_MAX:
        raise MoneyError(f"{text!r} is above the largest amount spendgate accepts ({format_amount(MONEY_MICROS_MAX)})")
    return result


def plan_amount(micros: int) -> int | str:
    """Micro-units as a plan file writes them, which :func:`parse_amount` reads back: ``50`` or ``"0.25"``."""
    units, rest = divmod(micros, MICROS_PER_UNIT)
    return units if rest == 0 else f"{units}.{rest:06d}".rstrip("0")


def format_amount(micros: int, currency: str = "USD") -> str:
    """Show micro-units as a person reads them: ``$1,234.50`` for USD, ``12.000001 EUR`` otherwise."""
    sign = "-" if micros < 0 else ""
    units, rest = divmod(abs(micros), MICROS_PER_UNIT)
    fraction = f"{rest:06d}".rstrip("0")
    fraction = fraction.ljust(2, "0")
    body = f"{units:,}.{fraction}"
    if currency == "USD":
        return f"{sign}${body}"
    return f"{sign}{body} {currency}"
