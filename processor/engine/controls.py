"""Spend controls: evaluation and usage bookkeeping, pure functions of their inputs.

Three levels (programme, account, card) all apply; each kind of check runs across all levels
before the next kind, in the order of specs/decision_precedence.toml: channel, MCC, country
(57), amount limits (61), count limits (65). Within a kind the first failing level answers,
programme first, so the reason names the broadest rule that refused.

Which usage a limit counts: a card-level or programme-level limit counts the card's own usage
(programme limits are the default for every card), an account-level limit counts the usage of
all the account's cards together.
"""

from __future__ import annotations

import struct
import sys
from bisect import bisect_right
from collections.abc import Sequence
from datetime import UTC, date, datetime, tzinfo
from typing import Final

import msgspec

from processor.ledger.controls import (
    COUNTER_ROW_LENGTH,
    INTERVAL_COLUMN,
    TRAILING_COUNT_MAX,
    TRAILING_WINDOW_SECONDS_MAX,
    Controls,
    Usage,
)
from processor.ledger.controls import EMPTY_CATALOG as EMPTY_CATALOG  # re-exported
from processor.ledger.controls import Catalog as Catalog
from processor.ledger.controls import control_errors as control_errors


class Periods(msgspec.Struct, frozen=True, gc=False):
    """The calendar periods an instant falls in, in the programme's time zone.

    Periods are plain numbers so stored usage can tell "this day" from "another day" by
    equality: daily = the local date's ordinal, weekly = the ordinal of its Monday, monthly =
    year * 12 + month, yearly = the year; all_time is always 0.
    """

    at_ms: int
    daily: int
    weekly: int
    monthly: int
    yearly: int
    all_time: int = 0

    @property
    def numbers(self) -> list[int]:
        """As stored in Usage.periods."""
        return [self.daily, self.weekly, self.monthly, self.yearly]


def periods_at(at_ms: int, zone: tzinfo = UTC) -> Periods:
    local = datetime.fromtimestamp(at_ms / 1000, zone).date()
    day = local.toordinal()
    return Periods(at_ms, day, day - local.weekday(), local.year * 12 + local.month, local.year)


def period_start(periods: Periods, interval: str) -> date:
    """The first local day of the period (for documentation and the API's usage view)."""
    if interval == "daily":
        return date.fromordinal(periods.daily)
    if interval == "weekly":
        return date.fromordinal(periods.weekly)
    if interval == "monthly":
        return date((periods.monthly - 1) // 12, (periods.monthly - 1) % 12 + 1, 1)
    if interval == "yearly":
        return date(periods.yearly, 1, 1)
    return date.min


# --- what a request looks like to the controls ---------------------------------------------------

# Field 22 positions 1-2 (PAN entry mode) -> channel.
_ENTRY_MODES: Final = {
    "01": "manual",
    "02": "magstripe",
    "80": "magstripe",  # chip card read as magstripe (fallback)
    "90": "magstripe",
    "05": "chip",
    "95": "chip",
    "07": "contactless",
    "91": "contactless",  # contactless magstripe
    "09": "ecommerce",  # PAN entered by e-commerce with a wallet
    "10": "ecommerce",  # credential on file
    "81": "ecommerce",
}
_CARD_NOT_PRESENT: Final = {"59": "ecommerce", "08": "manual"}  # field 25: e-commerce, MOTO


def channels_of(
    processing_code: str, pos_entry_mode: str | None, pos_condition: str | None
) -> tuple[str, ...]:
    """The channels a request travels (fields 3, 22, 25); unknown entry modes give none.

    A cash withdrawal is `atm_cash` and also its entry channel (chip, magstripe, ...), so both
    switches must be on. Field 25 = 59 (e-commerce) or 08 (mail/telephone order) decides the
    channel whatever field 22 says: a keyed PAN on a web page is e-commerce, not manual entry.
    """
    channel = _CARD_NOT_PRESENT.get(pos_condition or "")
    if channel is None and pos_entry_mode:
        channel = _ENTRY_MODES.get(pos_entry_mode[:2])
    if processing_code[:2] == "01":
        return ("atm_cash", channel) if channel else ("atm_cash",)
    return (channel,) if channel else ()


def country_of(merchant_name_location: str | None) -> str | None:
    """ISO 3166-1 alpha-2 country of field 43 (positions 39-40 of the 40-character layout)."""
    if merchant_name_location is None or len(merchant_name_location) != 40:
        return None
    country = merchant_name_location[38:40]
    return country if country.isascii() and country.isalpha() and country.isupper() else None


# --- evaluation ----------------------------------------------------------------------------------


class Refusal(msgspec.Struct, frozen=True, gc=False):
    response_code: str  # 57, 61 or 65
    reason: str


def _suffix(categories: Sequence[str]) -> str:
    return ":" + "+".join(categories) if categories else ""


def used(
    usage: Usage, interval: str, periods: Periods, categories: Sequence[str] = ()
) -> tuple[int, int]:
    """(amount, count) used in the current period of `interval`, in these categories or all."""
    return _used(usage, INTERVAL_COLUMN[interval], periods.numbers, categories)


def _once(categories: Sequence[str]) -> Sequence[str]:
    """The categories a limit weighs, each once ("" for all spend): controls stored before
    duplicates were refused counted a category listed twice twice."""
    if len(categories) < 2:
        return categories or ("",)
    return tuple(dict.fromkeys(categories))


def _used(
    usage: Usage, column: int, current: list[int], categories: Sequence[str]
) -> tuple[int, int]:
    if column < 8 and usage.periods[column >> 1] < current[column >> 1]:
        # The counters are of an earlier period. (Of a LATER one only when the clock stepped
        # back since: they still count, so a clock step never frees an allowance.)
        return 0, 0
    counters = usage.counters
    amount = count = 0
    for category in _once(categories):
        row = counters.get(category)
        if row is not None:
            amount += row[column]
            count += row[column + 1]
    return amount, count


# Recent approval times are kept packed (little-endian u64 ms, ascending) and searched in
# place: a busy card holds up to TRAILING_COUNT_MAX of them, and unpacking and re-packing them
# all on every approval measured ~95 us; an append and a C bisect over a memoryview cost ~2 us
# (a bisect written in Python, ~2 us alone). Little-endian so the memoryview can be cast to
# native u64 on the platforms LMDB files are written on anyway (they are not portable across
# byte orders either).
assert sys.byteorder == "little", "Usage.recent is stored little-endian"
_U64: Final = struct.Struct("<Q")


def _bisect_packed(packed: bytearray, value: int) -> int:
    """How many of the packed times are <= value (bisect_right)."""
    # The views are released when this returns, so the bytearray may grow again afterwards.
    with memoryview(packed) as view, view.cast("Q") as times:
        return bisect_right(times, value)


def recent_count(usage: Usage, since_ms: int, categories: Sequence[str]) -> int:
    """Approvals after `since_ms`, at least as many as there were (never fewer)."""
    count = 0
    for category in _once(categories):
        packed = usage.recent.get(category)
        if packed:
            count += (len(packed) >> 3) - _bisect_packed(packed, since_ms)
        if usage.trimmed.get(category, 0) > since_ms:
            # The window reaches into times dropped to bound the record: it held more than
            # TRAILING_COUNT_MAX then. Say so, rather than count only what was kept (after
            # reversals that could fall under a limit the window really exceeds).
            count += TRAILING_COUNT_MAX
    return count


def check_controls(
    levels: Sequence[tuple[Controls, Usage]],
    *,
    mcc: str,
    country: str | None,
    channels: Sequence[str],
    amount: int,
    currency: str,
    periods: Periods,
    catalog: Catalog,
) -> Refusal | None:
    """The first control, in precedence order, that refuses this request; None = all pass.

    `levels`: (controls, the usage its limits count) for programme, account and card, in that
    order. `amount` is in `currency`, the account's currency.
    """
    return place_refusal(
        levels, mcc=mcc, country=country, channels=channels, catalog=catalog
    ) or limit_refusal(
        levels, mcc=mcc, amount=amount, currency=currency, periods=periods, catalog=catalog
    )


def place_refusal(
    levels: Sequence[tuple[Controls, Usage]],
    *,
    mcc: str,
    country: str | None,
    channels: Sequence[str],
    catalog: Catalog,
) -> Refusal | None:
    """The first of the controls on where a card may be used (channel, merchant category,
    country) that refuses this request: what an account verification is checked against too
    (a card verified where it may not be used would be declined at its first purchase)."""
    category = catalog.category(mcc)
    for controls, _ in levels:
        switches = controls.channels
        for channel in channels:
            if not getattr(switches, channel):
                return Refusal("57", f"channel_blocked:{channel}")
    for controls, _ in levels:
        if mcc in controls.blocked_mccs:
            return Refusal("57", "mcc_blocked")
        if category is not None and category in controls.blocked_categories:
            return Refusal("57", f"mcc_category_blocked:{category}")
        if (controls.allowed_mccs or controls.allowed_categories) and not (
            mcc in controls.allowed_mccs
            or (category is not None and category in controls.allowed_categories)
        ):
            return Refusal("57", "mcc_not_allowed")
    for controls, _ in levels:
        if (
            controls.blocked_countries
            and country is not None
            and catalog.names_country(controls.blocked_countries, country)
        ):
            return Refusal("57", f"country_blocked:{country}")
        if controls.allowed_countries:
            if country is None:
                return Refusal("57", "country_unknown")
            if not catalog.names_country(controls.allowed_countries, country):
                return Refusal("57", f"country_not_allowed:{country}")
    return None


def limit_refusal(
    levels: Sequence[tuple[Controls, Usage]],
    *,
    mcc: str,
    amount: int,
    currency: str,
    periods: Periods,
    catalog: Catalog,
) -> Refusal | None:
    """The first amount or count limit that refuses `amount` (in `currency`, the account's)."""
    category = catalog.category(mcc)
    current = periods.numbers
    for controls, usage in levels:
        for limit in controls.amount_limits:
            if limit.currency != currency or (
                limit.categories and category not in limit.categories
            ):
                continue
            if limit.interval == "per_authorization":
                spent = 0
            else:
                column = INTERVAL_COLUMN[limit.interval]
                spent = _used(usage, column, current, limit.categories)[0]
            if spent + amount > limit.amount:
                return Refusal("61", f"{limit.interval}_amount_limit{_suffix(limit.categories)}")
    for controls, usage in levels:
        for count_limit in controls.count_limits:
            if count_limit.categories and category not in count_limit.categories:
                continue
            interval = count_limit.interval
            if interval is not None:
                column = INTERVAL_COLUMN[interval]
                approvals = _used(usage, column, current, count_limit.categories)[1]
            else:
                assert count_limit.window_seconds is not None
                since = periods.at_ms - count_limit.window_seconds * 1000
                approvals = recent_count(usage, since, count_limit.categories)
            if approvals >= count_limit.count:
                name = "trailing" if interval is None else interval
                return Refusal("65", f"{name}_count_limit{_suffix(count_limit.categories)}")
    return None


# --- usage bookkeeping ---------------------------------------------------------------------------


# Trimming copies the whole packed history, so it is done in steps of this many entries rather
# than on every approval; counting reads only the newest TRAILING_COUNT_MAX anyway.
_TRIM_SLACK: Final = 128


def _roll(usage: Usage, current: list[int]) -> None:
    """Zero the counters of intervals whose period has ended, and move to the current ones.

    Only forwards: when the clock steps back into an earlier period, the counters stay with
    the later one and keep counting (over-counting a moment is safe, forgetting a day is not).
    """
    stale = [index for index in range(4) if usage.periods[index] < current[index]]
    for row in usage.counters.values():
        for index in stale:
            row[index << 1] = row[(index << 1) + 1] = 0
    usage.periods = [max(kept, now) for kept, now in zip(usage.periods, current, strict=True)]


def record_usage(usage: Usage, amount: int, category: str | None, periods: Periods) -> None:
    """Count one approval of `amount` at `periods.at_ms`, in place."""
    record_usages((usage,), amount, category, periods)


def record_usages(
    usages: Sequence[Usage], amount: int, category: str | None, periods: Periods
) -> None:
    """Count one approval in each of `usages` (a card's and its account's): one call, not two,
    because this runs for every approval and its set-up is a good part of its cost."""
    current = periods.numbers
    at_ms = periods.at_ms
    entry = _U64.pack(at_ms)
    keep_since = at_ms - TRAILING_WINDOW_SECONDS_MAX * 1000
    keys = ("", category) if category else ("",)
    for usage in usages:
        if usage.periods != current:
            _roll(usage, current)
        counters = usage.counters
        recent = usage.recent
        for key in keys:
            row = counters.get(key)
            if row is None:
                row = counters[key] = [0] * COUNTER_ROW_LENGTH
            row[0] += amount
            row[1] += 1
            row[2] += amount
            row[3] += 1
            row[4] += amount
            row[5] += 1
            row[6] += amount
            row[7] += 1
            row[8] += amount
            row[9] += 1
            packed = recent.get(key)
            if packed is None:
                packed = recent[key] = bytearray()
            if not packed or _U64.unpack_from(packed, len(packed) - 8)[0] <= at_ms:
                packed += entry  # the usual case: time moves forward; appends in place
            else:  # the clock stepped back: keep the times sorted
                index = _bisect_packed(packed, at_ms) << 3
                packed[index:index] = entry
            # Drop what no window can reach: older than the longest window, or beyond the
            # largest count a window may have (only the newest TRAILING_COUNT_MAX can decide).
            entries = len(packed) >> 3
            if entries > TRAILING_COUNT_MAX + _TRIM_SLACK:
                cut = (entries - TRAILING_COUNT_MAX) << 3
                usage.trimmed[key] = _U64.unpack_from(packed, cut - 8)[0]
                del packed[:cut]
            if _U64.unpack_from(packed)[0] <= keep_since:
                del packed[: _bisect_packed(packed, keep_since) << 3]


def release_usage(
    usage: Usage,
    amount: int,
    count: int,
    category: str | None,
    approved: Periods,
    now: Periods,
) -> None:
    """Give back `amount` (and `count` approvals) counted at `approved.at_ms`, in place.

    Only periods still current get anything back: a reversal tomorrow of today's approval
    does not raise tomorrow's allowance. Counters never go below zero.
    """
    current = now.numbers
    if usage.periods != current:
        _roll(usage, current)
    then = approved.numbers
    # Columns of the intervals whose period is the same now as at the approval, and whose
    # counters are of that period (all_time always).
    columns = [
        index << 1 for index in range(4) if then[index] == current[index] == usage.periods[index]
    ] + [8]
    for key in ("", category) if category else ("",):
        row = usage.counters.get(key)
        if row is not None:
            for column in columns:
                row[column] = max(0, row[column] - amount)
                if count:
                    row[column + 1] = max(0, row[column + 1] - count)
        packed = usage.recent.get(key)
        if count and packed:
            # The newest time at or before the approval's, not only one equal to it: until
            # 2026-12-07 an answer's time could be moved past a load that committed while its
            # batch waited after its usage was counted at the batch's clock (answer_time),
            # and an exact match never came for those. Times are sorted and dropped oldest
            # first, so when the approval's own time is gone, so is every earlier one:
            # nothing else is taken for it.
            index = _bisect_packed(packed, approved.at_ms) - 1
            if index >= 0:
                del packed[index << 3 : (index + 1) << 3]
