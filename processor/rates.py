"""The FX rates file named by `programme.rates_file`: decoded and checked at start.

```toml
# units of the account currency (`to`) per one unit of the transaction currency (`from`)
[[rates]]
from = "USD"
to = "EUR"
rate = "0.9200"     # a string: parsed as a Decimal, never a float
```
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from pathlib import Path

import msgspec

from processor.config import ConfigError
from processor.currency import UnknownCurrency, exponent


class RateEntry(
    msgspec.Struct,
    frozen=True,
    forbid_unknown_fields=True,
    rename={"source": "from", "target": "to"},
):
    source: str
    target: str
    rate: str


class RatesFile(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    rates: tuple[RateEntry, ...] = ()


def load_rates(path: str | Path) -> dict[tuple[str, str], Decimal]:
    try:
        data = msgspec.toml.decode(Path(path).read_bytes(), type=RatesFile)
    except OSError as error:
        raise ConfigError(f"{path}: cannot read rates file: {error.strerror}") from None
    except (msgspec.ValidationError, msgspec.DecodeError) as error:
        raise ConfigError(f"{path}: {error}") from None
    rates: dict[tuple[str, str], Decimal] = {}
    for index, entry in enumerate(data.rates):
        where = f"{path}: $.rates[{index}]"
        for name, code in (("from", entry.source), ("to", entry.target)):
            try:
                exponent(code)
            except UnknownCurrency as error:
                raise ConfigError(f"{where}.{name}: {error}") from None
        try:
            rate = Decimal(entry.rate)
        except InvalidOperation:
            raise ConfigError(f"{where}.rate: {entry.rate!r} is not a decimal number") from None
        if not rate.is_finite() or rate <= 0:
            raise ConfigError(f"{where}.rate: {entry.rate!r} must be a positive number")
        if (entry.source, entry.target) in rates:
            raise ConfigError(f"{where}: a second rate for {entry.source} -> {entry.target}")
        rates[(entry.source, entry.target)] = rate
    return rates
