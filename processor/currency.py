"""ISO 4217 currency lookups, from the `iso4217` package (the ISO maintenance agency's table)."""

from __future__ import annotations

from iso4217 import Currency

_BY_ALPHA: dict[str, Currency] = {c.code: c for c in Currency}
_BY_NUMERIC: dict[str, Currency] = {f"{c.number:03d}": c for c in Currency if c.number}


class UnknownCurrency(ValueError):
    pass


def numeric_code(alpha: str) -> str:
    """'EUR' -> '978'."""
    currency = _BY_ALPHA.get(alpha)
    if currency is None or not currency.number:
        raise UnknownCurrency(f"currency {alpha!r} is not an ISO 4217 alphabetic code")
    return f"{currency.number:03d}"


def alpha_code(numeric: str) -> str | None:
    currency = _BY_NUMERIC.get(numeric)
    return None if currency is None else currency.code


def exponent(alpha: str) -> int:
    """Minor-unit digits: EUR 2, JPY 0, BHD 3. Codes without one (no-currency, gold, SDR) raise."""
    currency = _BY_ALPHA.get(alpha)
    if currency is None:
        raise UnknownCurrency(f"currency {alpha!r} is not an ISO 4217 alphabetic code")
    if currency.exponent is None:
        raise UnknownCurrency(
            f"currency {alpha!r} has no minor unit in ISO 4217 (N.A.); accounts need one"
        )
    return int(currency.exponent)
