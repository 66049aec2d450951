"""Spend controls and their usage counters, as stored in the ledger and spoken by the API.

Controls are set at three levels: the programme (one set, in the ledger's meta database), an
account and a card (inside their records). All levels apply; a request must pass every one, so
the strictest wins. `Controls` is encoded as a map, not an array: it is what the API reads and
writes, and a map lets fields be added without breaking stored records.

`Usage` is what a card or an account has spent and how often, per calendar interval and over the
recent past, written in the same transaction as the hold it counts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated, Final, Literal

import msgspec
from msgspec import Meta

from processor.currency import UnknownCurrency, exponent

AmountInterval = Literal["per_authorization", "daily", "weekly", "monthly", "yearly", "all_time"]
CalendarInterval = Literal["daily", "weekly", "monthly", "yearly", "all_time"]
CALENDAR_INTERVALS: Final[tuple[CalendarInterval, ...]] = (
    "daily",
    "weekly",
    "monthly",
    "yearly",
    "all_time",
)
Channel = Literal["ecommerce", "chip", "contactless", "magstripe", "manual", "atm_cash"]
CHANNELS: Final[tuple[Channel, ...]] = (
    "ecommerce",
    "chip",
    "contactless",
    "magstripe",
    "manual",
    "atm_cash",
)

# Trailing windows are counted from the timestamps of recent approvals, kept per card and
# account for at most this long and at most this many per category (see Usage.recent).
TRAILING_WINDOW_SECONDS_MAX: Final = 86_400
TRAILING_COUNT_MAX: Final = 1_000
CONTROL_ENTRIES_MAX: Final = 64  # items per list: bounds the work of one decision

# Strings carry no `pattern` here on purpose: these Structs are decoded from the ledger on every
# authorisation, and msgspec's regex checks made a card with controls 15x slower to decode
# (3.8 us vs 0.25 us). Their format is checked where controls come in, by
# engine.controls.control_errors (API and load file), against the catalog as well.
MinorUnits = Annotated[int, Meta(ge=0, le=10**15)]
CategoryName = Annotated[str, Meta(min_length=1, max_length=40)]  # a category of the catalog
Mcc = Annotated[str, Meta(min_length=4, max_length=4)]  # four digits
# ISO 3166-1 alpha-2, or the lower-case name of a country group in specs/country_groups.toml.
CountryOrGroup = Annotated[str, Meta(min_length=2, max_length=40)]
CurrencyCode = Annotated[str, Meta(min_length=3, max_length=3)]  # ISO 4217 alphabetic
Categories = Annotated[tuple[CategoryName, ...], Meta(max_length=CONTROL_ENTRIES_MAX)]
Mccs = Annotated[tuple[Mcc, ...], Meta(max_length=CONTROL_ENTRIES_MAX)]
Countries = Annotated[tuple[CountryOrGroup, ...], Meta(max_length=CONTROL_ENTRIES_MAX)]


class AmountLimit(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """At most `amount` (minor units of `currency`) per authorisation or per interval."""

    interval: AmountInterval
    amount: MinorUnits
    # The limit applies to accounts in this currency only: a programme may run several.
    currency: CurrencyCode
    # Restricted to these MCC categories (specs/mcc_categories.toml); empty = all spend.
    categories: Categories = ()


class CountLimit(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """At most `count` approved authorisations per calendar interval or trailing window."""

    count: Annotated[int, Meta(ge=0, le=10**9)]
    interval: CalendarInterval | None = None
    window_seconds: Annotated[int, Meta(ge=1, le=TRAILING_WINDOW_SECONDS_MAX)] | None = None
    categories: Categories = ()

    def __post_init__(self) -> None:
        if (self.interval is None) == (self.window_seconds is None):
            raise ValueError("a count limit needs exactly one of `interval` and `window_seconds`")
        if self.window_seconds is not None and self.count > TRAILING_COUNT_MAX:
            raise ValueError(
                f"a trailing-window count limit may be at most {TRAILING_COUNT_MAX}, "
                f"got {self.count}"
            )


class Channels(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Channel switches: False turns the channel off at this level."""

    ecommerce: bool = True
    chip: bool = True
    contactless: bool = True
    magstripe: bool = True
    manual: bool = True  # manual key entry, mail and telephone orders
    atm_cash: bool = True  # cash withdrawals (processing code 01)


ALL_CHANNELS_ON: Final = Channels()


class StrongAuthentication(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """PSD2 strong customer authentication for e-commerce (specs/sca.md): an e-commerce
    authorisation the network says was not authenticated (3-D Secure) is soft-declined, so
    the merchant retries with it, unless out of scope (merchant-initiated, recurring) or
    exempt as low value.
    """

    # The amounts' currency: the rule applies to accounts in it (as amount limits do).
    currency: CurrencyCode
    above: MinorUnits = 0  # required for amounts above this; 0: for any amount
    # The low-value exemption (PSD2 RTS, article 16: 30 EUR each, and since the last
    # authentication at most 100 EUR in all, or five payments; a programme sets one or both).
    # low_value_max 0 turns the exemption off; a total or count of 0 is no limit of that kind.
    low_value_max: MinorUnits = 0
    low_value_total_max: MinorUnits = 0
    low_value_count_max: Annotated[int, Meta(ge=0, le=1000)] = 0


class Controls(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    amount_limits: Annotated[tuple[AmountLimit, ...], Meta(max_length=CONTROL_ENTRIES_MAX)] = ()
    count_limits: Annotated[tuple[CountLimit, ...], Meta(max_length=CONTROL_ENTRIES_MAX)] = ()
    # Allow-lists: when either is non-empty, only MCCs in an allowed category or listed pass.
    allowed_categories: Categories = ()
    allowed_mccs: Mccs = ()
    blocked_categories: Categories = ()
    blocked_mccs: Mccs = ()
    # Merchant country (field 43 positions 39-40). Allow-list empty = every country.
    allowed_countries: Countries = ()
    blocked_countries: Countries = ()
    channels: Channels = ALL_CHANNELS_ON
    require_sca: StrongAuthentication | None = None

    @property
    def empty(self) -> bool:
        return self == NO_CONTROLS


NO_CONTROLS: Final = Controls()


def stored_controls(controls: Controls | None) -> Controls | None:
    """How controls are kept: none at all as None, whether a file or a request said `{}`."""
    return None if controls is None or controls.empty else controls


# Column of each calendar interval in a Usage counter row: [amount, count] per interval.
INTERVAL_COLUMN: Final = {"daily": 0, "weekly": 2, "monthly": 4, "yearly": 6, "all_time": 8}
COUNTER_ROW_LENGTH: Final = 10


class Usage(msgspec.Struct, array_like=True, kw_only=True, gc=False):
    """What one card or account has used, in its account's currency.

    Flat on purpose: it is updated on every approval, and one list per category updated in
    place measured several times cheaper than a Struct per interval.
    """

    # The daily, weekly, monthly and yearly period numbers the counters belong to
    # (engine.controls.Periods); a counter of another period is stale and reads as zero.
    periods: list[int] = msgspec.field(default_factory=lambda: [0, 0, 0, 0])
    # Category ("" = all spend) -> [amount, count] for daily, weekly, monthly, yearly, all_time.
    counters: dict[str, list[int]] = msgspec.field(default_factory=dict)
    # Category ("" = all) -> approval times in ms, packed little-endian u64, oldest first: packed
    # so a busy card decodes its history as one bytes object, not a thousand integers.
    # A bytearray so an approval appends in place instead of copying the whole history.
    recent: dict[str, bytearray] = msgspec.field(default_factory=dict)
    # Category -> the newest time dropped from `recent` to keep it bounded (see recent_count).
    trimmed: dict[str, int] = msgspec.field(default_factory=dict)


def card_scope(card_id: str) -> str:
    """Key of a card's Usage in the ledger's `usage` database."""
    return "c:" + card_id


def account_scope(account_id: str) -> str:
    """Key of an account's Usage (all its cards together)."""
    return "a:" + account_id


# --- the catalog the controls name ---------------------------------------------------------


class Catalog(msgspec.Struct, frozen=True):
    """The named groups controls refer to: MCC categories and country groups."""

    category_of_mcc: Mapping[str, str]  # MCC -> its one category
    categories: frozenset[str]
    country_groups: Mapping[str, frozenset[str]]

    def category(self, mcc: str) -> str | None:
        return self.category_of_mcc.get(mcc)

    def names_country(self, names: Sequence[str], country: str) -> bool:
        """Whether `country` is one of `names` or in one of the groups they name."""
        for name in names:
            if name == country:
                return True
            group = self.country_groups.get(name)
            if group is not None and country in group:
                return True
        return False

    def countries(self, names: Sequence[str]) -> frozenset[str]:
        """Alpha-2 codes named directly or through a group."""
        found: set[str] = set()
        for name in names:
            group = self.country_groups.get(name)
            if group is None:
                found.add(name)
            else:
                found |= group
        return frozenset(found)


EMPTY_CATALOG: Final = Catalog({}, frozenset(), {})


# --- validation ----------------------------------------------------------------------------------


def control_errors(
    controls: Controls, catalog: Catalog, account_currency: str | None, where: str
) -> list[str]:
    """What in `controls` cannot be enforced, each naming its path under `where`.

    The Struct's own types check shapes; this checks names against the catalog and, at account
    and card level (`account_currency` given), that amount limits are in the account's currency.
    """
    errors: list[str] = []
    for field in ("allowed_categories", "blocked_categories"):
        for index, name in enumerate(getattr(controls, field)):
            if name not in catalog.categories:
                errors.append(
                    f"{where}.{field}[{index}]: unknown MCC category {name!r} "
                    f"(known: {', '.join(sorted(catalog.categories))})"
                )
    for field in ("allowed_mccs", "blocked_mccs"):
        for index, mcc in enumerate(getattr(controls, field)):
            if not (len(mcc) == 4 and mcc.isascii() and mcc.isdigit()):
                errors.append(f"{where}.{field}[{index}]: MCC {mcc!r} is not four digits")
    for field in ("allowed_countries", "blocked_countries"):
        for index, name in enumerate(getattr(controls, field)):
            if len(name) == 2 and name.isascii() and name.isalpha() and name.isupper():
                continue  # ISO 3166-1 alpha-2
            if name not in catalog.country_groups:
                errors.append(
                    f"{where}.{field}[{index}]: {name!r} is neither an ISO 3166-1 alpha-2 code "
                    f"nor a country group (known: {', '.join(sorted(catalog.country_groups))})"
                )
    restricted: list[tuple[str, Sequence[str]]] = []
    for index, amount_limit in enumerate(controls.amount_limits):
        restricted.append((f"amount_limits[{index}]", amount_limit.categories))
    for index, count_limit in enumerate(controls.count_limits):
        restricted.append((f"count_limits[{index}]", count_limit.categories))
    for field, categories in restricted:
        for position, name in enumerate(categories):
            if name not in catalog.categories:
                errors.append(
                    f"{where}.{field}.categories[{position}]: unknown MCC category {name!r}"
                )
            elif name in categories[:position]:
                # Counted once per listing, it was counted twice: the limit met at half.
                errors.append(
                    f"{where}.{field}.categories[{position}]: MCC category {name!r} listed twice"
                )
    for index, amount_limit in enumerate(controls.amount_limits):
        where_currency = f"{where}.amount_limits[{index}].currency"
        errors += _currency_errors(amount_limit.currency, account_currency, where_currency)
    if controls.require_sca is not None:
        sca = controls.require_sca
        errors += _currency_errors(sca.currency, account_currency, f"{where}.require_sca.currency")
        if sca.low_value_max and not (sca.low_value_total_max or sca.low_value_count_max):
            # RTS article 16: the exemption stops at a cumulative amount or count since the
            # last authentication; without either, every low-value payment went unchecked.
            errors.append(
                f"{where}.require_sca.low_value_max: a low-value exemption needs "
                "low_value_total_max or low_value_count_max (PSD2 RTS article 16)"
            )
    return errors


def _currency_errors(currency: str, account_currency: str | None, where: str) -> list[str]:
    """A control's amounts are in `currency`: a known one, and at account and card level the
    account's."""
    errors = []
    try:
        exponent(currency)
    except UnknownCurrency as error:
        errors.append(f"{where}: {error}")
    if account_currency is not None and currency != account_currency:
        errors.append(f"{where}: {currency!r} is not the account's currency {account_currency!r}")
    return errors


def with_shorthands(
    controls: Controls | None,
    per_transaction_limit: int | None,
    blocked_mccs: Sequence[str],
    currency: str,
) -> Controls | None:
    """`controls` with a card's two older shorthands folded in: a per-authorisation amount
    limit in `currency` (the account's) and blocked MCCs. A load file may still use them,
    and card records written before card controls existed still carry them (the engine
    reads those through this too: no migration rewrote them)."""
    if per_transaction_limit is None and not blocked_mccs:
        return controls
    folded = controls or Controls()
    amount_limits = folded.amount_limits
    if per_transaction_limit is not None:
        amount_limits += (
            AmountLimit(
                interval="per_authorization", amount=per_transaction_limit, currency=currency
            ),
        )
    blocked = folded.blocked_mccs + tuple(
        mcc for mcc in blocked_mccs if mcc not in folded.blocked_mccs
    )
    return msgspec.structs.replace(folded, amount_limits=amount_limits, blocked_mccs=blocked)


def without_amounts(usage: Usage | None) -> Usage | None:
    """`usage` with its amounts at zero and its counts and approval times kept: what stays
    true when the currency its amounts were counted in changes."""
    if usage is None:
        return None
    counters = {
        category: [0 if index % 2 == 0 else value for index, value in enumerate(row)]
        for category, row in usage.counters.items()
    }
    return msgspec.structs.replace(usage, counters=counters)
