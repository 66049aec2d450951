"""Currency conversion for authorisations: integers in, integers out, no floats anywhere.

Rates are Decimals: units of the account currency per one unit of the transaction currency.
A markup in basis points is added on top (what the programme charges for FX). Rounding is half
up to the account currency's minor unit.
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import ROUND_HALF_UP, Decimal, localcontext

from processor.currency import exponent


def convert(
    amount: int,
    source: str,
    target: str,
    rates: Mapping[tuple[str, str], Decimal],
    markup_bps: int = 0,
) -> int | None:
    """`amount` minor units of `source` in minor units of `target`, or None without a rate."""
    if source == target:
        return amount
    rate = rates.get((source, target))
    if rate is None:
        return None
    with localcontext() as context:
        context.prec = 34
        major = Decimal(amount).scaleb(-exponent(source))
        converted = major * rate * (Decimal(10_000 + markup_bps) / Decimal(10_000))
        minor = converted.scaleb(exponent(target)).quantize(Decimal(1), rounding=ROUND_HALF_UP)
    return int(minor)


def scale(amount: int, numerator: int, denominator: int) -> int:
    """amount * numerator / denominator, rounded half up (a partial of a converted amount)."""
    if denominator <= 0:
        return amount
    quotient, remainder = divmod(amount * numerator, denominator)
    return quotient + (1 if remainder * 2 >= denominator else 0)
