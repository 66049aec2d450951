"""ISO 4217 currency lookups, from the `iso4217` package (the ISO maintenance agency's table).

The table is read once into plain dicts: each lookup on the package's enum goes through
several enum descriptors, and rendering one webhook event made eight of them (a tenth of the
delivery process's Python time at 2,000 events/s)."""

from __future__ import annotations

from iso4217 import Currency

# alpha code -> (numeric code or None, minor-unit digits or None)
_BY_ALPHA: dict[str, tuple[str | None, int | None]] = {
    c.code: (
        f"{c.number:03d}" if c.number else None,
        None if c.exponent is None else int(c.exponent),
    )
    for c in Currency
}
_BY_NUMERIC: dict[str, str] = {f"{c.number:03d}": c.code for c in Currency if c.number}


class UnknownCurrency(ValueError):
    pass


def numeric_code(alpha: str) -> str:
    """'EUR' -> '978'."""
    numeric = _BY_ALPHA.get(alpha, (None, None))[0]
    if numeric is None:
        raise UnknownCurrency(f"currency {alpha!r} is not an ISO 4217 alphabetic code")
    return numeric


def alpha_code(numeric: str) -> str | None:
    return _BY_NUMERIC.get(numeric)


def exponent(alpha: str) -> int:
    """Minor-unit digits: EUR 2, JPY 0, BHD 3. Codes without one (no-currency, gold, SDR) raise."""
    found = _BY_ALPHA.get(alpha)
    if found is None:
        raise UnknownCurrency(f"currency {alpha!r} is not an ISO 4217 alphabetic code")
    if found[1] is None:
        raise UnknownCurrency(
            f"currency {alpha!r} has no minor unit in ISO 4217 (N.A.); accounts need one"
        )
    return found[1]
