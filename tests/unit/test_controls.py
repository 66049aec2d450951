"""Table-driven tests of the spend controls (processor/engine/controls.py) and decide() with them.

What a request looks like to the controls (channels from fields 3/22/25, country from field 43),
each kind of control at one level, every amount and count interval, the calendar boundaries in
UTC and in a programme zone with daylight saving, the trailing window's edge, usage bookkeeping
(record and release), the precedence of levels, and the currency rules. Every expectation is an
exact machine reason. The reference is specs/controls.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, date, datetime, timedelta, tzinfo
from decimal import Decimal
from typing import Any, NamedTuple
from zoneinfo import ZoneInfo

import msgspec
import pytest

from processor.catalog import default_catalog
from processor.engine import Decision, ProgrammeRules, Spend, decide
from processor.engine.controls import (
    Periods,
    Refusal,
    channels_of,
    check_controls,
    control_errors,
    country_of,
    periods_at,
    record_usage,
    release_usage,
    used,
)
from processor.ledger.controls import (
    CALENDAR_INTERVALS,
    CHANNELS,
    TRAILING_COUNT_MAX,
    AmountLimit,
    Channels,
    Controls,
    CountLimit,
    StrongAuthentication,
    Usage,
)
from processor.ledger.records import Account, Card
from processor.wire.messages import AuthorizationRequest

CATALOG = default_catalog()
RULES = ProgrammeRules(catalog=CATALOG)
BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")
NOW_YYMM = 2611


def ms(text: str, zone: tzinfo = UTC) -> int:
    """Milliseconds since the epoch of an ISO local time in `zone` ("2026-11-24T12:00:00.000")."""
    return int(datetime.fromisoformat(text).replace(tzinfo=zone).timestamp() * 1000)


NOW_MS = ms("2026-11-24T12:00:00")  # a Tuesday
NOW = periods_at(NOW_MS)


def field43(country: str) -> str:
    """Field 43 in the 40-character layout: name 25, city 13, country 2."""
    return f"{'ACME':<25}{'CITY':<13}{country}"


def refusal(
    levels: Sequence[tuple[Controls, Usage]],
    *,
    mcc: str = "5411",
    country: str | None = "DE",
    channels: Sequence[str] = ("chip",),
    amount: int = 1_000,
    currency: str = "EUR",
    periods: Periods = NOW,
) -> str | None:
    """The reason check_controls refuses with (None: passes); the code must match the reason."""
    found = check_controls(
        levels,
        mcc=mcc,
        country=country,
        channels=channels,
        amount=amount,
        currency=currency,
        periods=periods,
        catalog=CATALOG,
    )
    if found is None:
        return None
    assert isinstance(found, Refusal)
    kind = found.reason.split(":")[0]
    expected_code = (
        "61" if kind.endswith("_amount_limit") else "65" if kind.endswith("_count_limit") else "57"
    )
    assert found.response_code == expected_code, found
    return found.reason


def card_level(controls: Controls, usage: Usage | None = None) -> list[tuple[Controls, Usage]]:
    return [(controls, usage if usage is not None else Usage())]


def usage_of(*approvals: tuple[int, str, int]) -> Usage:
    """Usage after approvals of (amount, MCC, at_ms), in the given order, in UTC."""
    usage = Usage()
    for amount, mcc, at_ms in approvals:
        record_usage(usage, amount, CATALOG.category(mcc), periods_at(at_ms))
    return usage


def amount_limit(interval: str, amount: int, *categories: str, currency: str = "EUR") -> Controls:
    limit = AmountLimit(interval=interval, amount=amount, currency=currency, categories=categories)  # type: ignore[arg-type]
    return Controls(amount_limits=(limit,))


def count_limit(count: int, interval: str | None = None, window: int | None = None) -> Controls:
    return Controls(
        count_limits=(CountLimit(count=count, interval=interval, window_seconds=window),)  # type: ignore[arg-type]
    )


# --- channels_of ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("processing_code", "field22", "field25", "expected"),
    [
        ("000000", "051", "00", ("chip",)),
        ("000000", "951", "00", ("chip",)),
        ("000000", "071", "00", ("contactless",)),
        ("000000", "911", "00", ("contactless",)),
        ("000000", "021", "00", ("magstripe",)),
        ("000000", "801", "00", ("magstripe",)),  # chip read as magstripe (fallback)
        ("000000", "901", "00", ("magstripe",)),
        ("000000", "011", "00", ("manual",)),
        ("000000", "091", "00", ("ecommerce",)),
        ("000000", "101", "00", ("ecommerce",)),  # credential on file
        ("000000", "811", "00", ("ecommerce",)),
        ("000000", "051", None, ("chip",)),
        # Field 25 = 59 (e-commerce) or 08 (mail/telephone order) wins over field 22.
        ("000000", "051", "59", ("ecommerce",)),
        ("000000", "011", "59", ("ecommerce",)),  # a PAN keyed into a web page
        ("000000", "071", "08", ("manual",)),
        ("000000", None, "59", ("ecommerce",)),
        ("000000", None, "08", ("manual",)),
        # Unknown or absent entry mode: no channel at all.
        ("000000", "991", "00", ()),
        ("000000", None, None, ()),
        ("000000", "", "00", ()),
        # Processing code 01 (cash) adds atm_cash to the entry channel.
        ("010000", "051", "00", ("atm_cash", "chip")),
        ("010000", "021", "00", ("atm_cash", "magstripe")),
        ("010000", "071", "00", ("atm_cash", "contactless")),
        ("010000", "051", "59", ("atm_cash", "ecommerce")),
        ("010000", "051", "08", ("atm_cash", "manual")),
        ("010000", "991", "00", ("atm_cash",)),
        ("010000", None, None, ("atm_cash",)),
        ("011000", "051", "00", ("atm_cash", "chip")),  # from savings: still cash
        # Cashback and balance inquiries are not cash withdrawals.
        ("090000", "051", "00", ("chip",)),
        ("310000", "051", "00", ("chip",)),
    ],
)
def test_channels_of(
    processing_code: str, field22: str | None, field25: str | None, expected: tuple[str, ...]
) -> None:
    assert channels_of(processing_code, field22, field25) == expected
    assert set(expected) <= set(CHANNELS)


# --- country_of ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "expected"),
    [
        (field43("DE"), "DE"),
        (field43("US"), "US"),
        ("DEMO SHOP              BERLIN       DE  ", None),  # 40 characters, country misplaced
        (field43("DE")[:-1], None),  # 39 characters
        (field43("DE") + " ", None),  # 41 characters
        (field43("D"), None),
        ("", None),
        (None, None),
        (field43("de"), None),  # lower case is not ISO 3166-1 alpha-2
        (field43("12"), None),
        (field43("  "), None),
        (field43("D1"), None),
        (field43("ÄÖ"), None),  # alphabetic, not ASCII
    ],
)
def test_country_of(field: str | None, expected: str | None) -> None:
    assert country_of(field) == expected


# --- periods_at ----------------------------------------------------------------------------------


def local_periods(day: date) -> tuple[int, int, int, int]:
    monday = day - timedelta(days=day.weekday())
    return day.toordinal(), monday.toordinal(), day.year * 12 + day.month, day.year


@pytest.mark.parametrize(
    ("instant", "zone", "local_day"),
    [
        (ms("2026-11-24T12:00:00"), UTC, date(2026, 11, 24)),
        (ms("2026-11-24T23:59:59.999"), UTC, date(2026, 11, 24)),
        (ms("2026-11-25T00:00:00"), UTC, date(2026, 11, 25)),
        # Berlin is UTC+1 in winter: 23:00 UTC is already the next day there.
        (ms("2026-11-24T22:59:59.999"), BERLIN, date(2026, 11, 24)),
        (ms("2026-11-24T23:00:00"), BERLIN, date(2026, 11, 25)),
        # ... and UTC+2 in summer.
        (ms("2026-07-01T21:59:59.999"), BERLIN, date(2026, 7, 1)),
        (ms("2026-07-01T22:00:00"), BERLIN, date(2026, 7, 2)),
        # New York is behind UTC: 02:00 UTC is still the previous day there.
        (ms("2026-11-25T02:00:00"), NEW_YORK, date(2026, 11, 24)),
        (ms("2026-12-31T23:00:00"), BERLIN, date(2027, 1, 1)),
        (ms("2027-01-01T00:00:00"), UTC, date(2027, 1, 1)),
        (0, UTC, date(1970, 1, 1)),
    ],
)
def test_periods_at_is_the_local_calendar(instant: int, zone: tzinfo, local_day: date) -> None:
    periods = periods_at(instant, zone)
    assert periods.at_ms == instant
    assert (periods.daily, periods.weekly, periods.monthly, periods.yearly) == local_periods(
        local_day
    )
    assert periods.all_time == 0


def test_a_week_runs_monday_to_sunday() -> None:
    monday = date(2026, 11, 23)
    weeks = {periods_at(ms(f"{monday + timedelta(days=n)}T12:00:00")).weekly for n in range(7)}
    assert weeks == {monday.toordinal()}
    assert periods_at(ms("2026-11-30T00:00:00")).weekly == monday.toordinal() + 7
    # A week across a year end is one week: Monday 2026-12-28 to Sunday 2027-01-03.
    assert (
        periods_at(ms("2026-12-28T00:00:00")).weekly == periods_at(ms("2027-01-03T23:59:59")).weekly
    )


# --- interval boundaries -------------------------------------------------------------------------


class Boundary(NamedTuple):
    name: str
    interval: str
    zone: tzinfo
    recorded: int  # when 10 000 were approved (and counted once)
    asked: int  # when the next request comes
    same_period: bool


BOUNDARIES = [
    # UTC
    Boundary(
        "day, last ms", "daily", UTC, ms("2026-11-24T00:00:00"), ms("2026-11-24T23:59:59.999"), True
    ),
    Boundary(
        "day, midnight",
        "daily",
        UTC,
        ms("2026-11-24T23:59:59.999"),
        ms("2026-11-25T00:00:00"),
        False,
    ),
    Boundary(
        "week, Sunday night",
        "weekly",
        UTC,
        ms("2026-11-23T00:00:00"),
        ms("2026-11-29T23:59:59.999"),
        True,
    ),
    Boundary(
        "week, Monday 00:00",
        "weekly",
        UTC,
        ms("2026-11-29T23:59:59.999"),
        ms("2026-11-30T00:00:00"),
        False,
    ),
    Boundary(
        "week across New Year",
        "weekly",
        UTC,
        ms("2026-12-28T00:00:00"),
        ms("2027-01-03T23:59:59.999"),
        True,
    ),
    Boundary(
        "month, last ms",
        "monthly",
        UTC,
        ms("2026-11-01T00:00:00"),
        ms("2026-11-30T23:59:59.999"),
        True,
    ),
    Boundary(
        "month rollover",
        "monthly",
        UTC,
        ms("2026-11-30T23:59:59.999"),
        ms("2026-12-01T00:00:00"),
        False,
    ),
    Boundary(
        "month rollover at year end",
        "monthly",
        UTC,
        ms("2026-12-31T12:00:00"),
        ms("2027-01-01T00:00:00"),
        False,
    ),
    Boundary(
        "same month of another year",
        "monthly",
        UTC,
        ms("2025-11-24T12:00:00"),
        ms("2026-11-24T12:00:00"),
        False,
    ),
    Boundary(
        "year, last ms",
        "yearly",
        UTC,
        ms("2026-01-01T00:00:00"),
        ms("2026-12-31T23:59:59.999"),
        True,
    ),
    Boundary(
        "year rollover",
        "yearly",
        UTC,
        ms("2026-12-31T23:59:59.999"),
        ms("2027-01-01T00:00:00"),
        False,
    ),
    Boundary(
        "all time never rolls",
        "all_time",
        UTC,
        ms("2020-01-01T00:00:00"),
        ms("2030-06-01T00:00:00"),
        True,
    ),
    # Europe/Berlin, winter (UTC+1): local midnight is 23:00 UTC.
    Boundary(
        "Berlin day, 22:59:59.999 UTC",
        "daily",
        BERLIN,
        ms("2026-11-24T12:00:00"),
        ms("2026-11-24T22:59:59.999"),
        True,
    ),
    Boundary(
        "Berlin day, 23:00 UTC",
        "daily",
        BERLIN,
        ms("2026-11-24T12:00:00"),
        ms("2026-11-24T23:00:00"),
        False,
    ),
    Boundary(
        "Berlin: UTC midnight is no boundary",
        "daily",
        BERLIN,
        ms("2026-11-24T23:30:00"),
        ms("2026-11-25T00:30:00"),
        True,
    ),
    Boundary(
        "Berlin week, Monday 00:00 local",
        "weekly",
        BERLIN,
        ms("2026-11-29T22:59:59.999"),
        ms("2026-11-29T23:00:00"),
        False,
    ),
    Boundary(
        "Berlin month rollover",
        "monthly",
        BERLIN,
        ms("2026-11-30T22:59:59.999"),
        ms("2026-11-30T23:00:00"),
        False,
    ),
    Boundary(
        "Berlin year rollover",
        "yearly",
        BERLIN,
        ms("2026-12-31T22:59:59.999"),
        ms("2026-12-31T23:00:00"),
        False,
    ),
    Boundary(
        "Berlin: 23:30 UTC on 31 Dec is next year",
        "yearly",
        BERLIN,
        ms("2026-12-31T23:30:00"),
        ms("2027-01-01T00:30:00"),
        True,
    ),
    # Spring forward, Sunday 2026-03-29: a 23-hour day, 2026-03-28T23:00Z to 2026-03-29T22:00Z.
    Boundary(
        "DST 23h day, first and last ms",
        "daily",
        BERLIN,
        ms("2026-03-28T23:00:00"),
        ms("2026-03-29T21:59:59.999"),
        True,
    ),
    Boundary(
        "DST 23h day, next midnight",
        "daily",
        BERLIN,
        ms("2026-03-29T21:59:59.999"),
        ms("2026-03-29T22:00:00"),
        False,
    ),
    Boundary(
        "DST 23h day, starts at 23:00 UTC",
        "daily",
        BERLIN,
        ms("2026-03-28T22:59:59.999"),
        ms("2026-03-28T23:00:00"),
        False,
    ),
    Boundary(
        "DST Sunday ends the week",
        "weekly",
        BERLIN,
        ms("2026-03-29T21:59:59.999"),
        ms("2026-03-29T22:00:00"),
        False,
    ),
    Boundary(
        "DST across 02:00 local",
        "daily",
        BERLIN,
        ms("2026-03-29T00:59:59.999"),
        ms("2026-03-29T01:00:00"),
        True,
    ),
    # Fall back, Sunday 2026-10-25: a 25-hour day, 2026-10-24T22:00Z to 2026-10-25T23:00Z.
    Boundary(
        "DST 25h day, 22:30 UTC is still Sunday",
        "daily",
        BERLIN,
        ms("2026-10-24T22:00:00"),
        ms("2026-10-25T22:30:00"),
        True,
    ),
    Boundary(
        "DST 25h day, next midnight",
        "daily",
        BERLIN,
        ms("2026-10-25T22:59:59.999"),
        ms("2026-10-25T23:00:00"),
        False,
    ),
    Boundary(
        "DST 25h day, starts at 22:00 UTC",
        "daily",
        BERLIN,
        ms("2026-10-24T21:59:59.999"),
        ms("2026-10-24T22:00:00"),
        False,
    ),
    # New York (behind UTC): local midnight is 05:00 UTC in winter.
    Boundary(
        "New York day, 04:59:59.999 UTC",
        "daily",
        NEW_YORK,
        ms("2026-11-24T12:00:00"),
        ms("2026-11-25T04:59:59.999"),
        True,
    ),
    Boundary(
        "New York day, 05:00 UTC",
        "daily",
        NEW_YORK,
        ms("2026-11-24T12:00:00"),
        ms("2026-11-25T05:00:00"),
        False,
    ),
]


@pytest.mark.parametrize("case", BOUNDARIES, ids=[b.name for b in BOUNDARIES])
def test_interval_boundary(case: Boundary) -> None:
    usage = Usage()
    record_usage(usage, 10_000, None, periods_at(case.recorded, case.zone))
    asked = periods_at(case.asked, case.zone)
    full = f"{case.interval}_amount_limit" if case.same_period else None
    counted = f"{case.interval}_count_limit" if case.same_period else None

    assert used(usage, case.interval, asked) == ((10_000, 1) if case.same_period else (0, 0))
    # The limit is used up in its period and fresh in the next.
    assert (
        refusal(card_level(amount_limit(case.interval, 10_000), usage), amount=1, periods=asked)
        == full
    )
    assert refusal(card_level(count_limit(1, case.interval), usage), periods=asked) == counted
    # The request itself always fits an empty allowance.
    assert (
        refusal(card_level(amount_limit(case.interval, 10_001), usage), amount=1, periods=asked)
        is None
    )


@pytest.mark.parametrize("case", BOUNDARIES, ids=[b.name for b in BOUNDARIES])
def test_recording_in_a_new_period_starts_it_afresh(case: Boundary) -> None:
    usage = Usage()
    record_usage(usage, 10_000, None, periods_at(case.recorded, case.zone))
    asked = periods_at(case.asked, case.zone)
    record_usage(usage, 7, None, asked)
    expected = (10_007, 2) if case.same_period else (7, 1)
    assert used(usage, case.interval, asked) == expected
    assert used(usage, "all_time", asked) == (10_007, 2)


# --- trailing windows ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ago_ms", "counted"),
    [
        (0, True),
        (1, True),
        (59_999, True),
        (60_000, False),  # exactly window_seconds ago: no longer counts
        (60_001, False),
        (86_400_000, False),
    ],
)
def test_trailing_window_edge(ago_ms: int, counted: bool) -> None:
    usage = usage_of((100, "5411", NOW_MS - ago_ms))
    reason = refusal(card_level(count_limit(1, window=60), usage))
    assert reason == ("trailing_count_limit" if counted else None)


def test_trailing_window_counts_only_approvals_inside_it() -> None:
    usage = usage_of(
        *((100, "5411", NOW_MS - seconds * 1000) for seconds in (3_600, 120, 61, 60, 59, 30, 1))
    )
    # 59, 30 and 1 seconds ago are inside a 60-second window: 3 approvals.
    assert refusal(card_level(count_limit(4, window=60), usage)) is None
    assert refusal(card_level(count_limit(3, window=60), usage)) == "trailing_count_limit"
    # 120, 61 and 60 seconds ago join a 121-second window; 3600 seconds ago a 3601-second one.
    assert refusal(card_level(count_limit(7, window=121), usage)) is None
    assert refusal(card_level(count_limit(6, window=121), usage)) == "trailing_count_limit"
    assert refusal(card_level(count_limit(8, window=3_601), usage)) is None
    assert refusal(card_level(count_limit(7, window=3_601), usage)) == "trailing_count_limit"


def test_trailing_window_is_time_zone_free() -> None:
    # Across local midnight in Berlin: the window still counts both.
    before = ms("2026-11-24T22:59:30")
    after = ms("2026-11-24T23:00:10")
    usage = Usage()
    record_usage(usage, 100, None, periods_at(before, BERLIN))
    asked = periods_at(after, BERLIN)
    assert refusal(card_level(count_limit(1, window=60), usage), periods=asked) == (
        "trailing_count_limit"
    )
    assert refusal(card_level(count_limit(1, interval="daily"), usage), periods=asked) is None


def test_trailing_window_after_the_clock_stepped_back() -> None:
    usage = usage_of((100, "5411", NOW_MS), (100, "5411", NOW_MS - 10_000))
    assert refusal(card_level(count_limit(2, window=60), usage)) == "trailing_count_limit"
    # Giving back the earlier approval (recorded second) removes that one, not the later one.
    release_usage(usage, 100, 1, None, periods_at(NOW_MS - 10_000), NOW)
    assert refusal(card_level(count_limit(2, window=60), usage)) is None
    later = periods_at(NOW_MS + 55_000)  # the approval at NOW is still in the window
    assert refusal(card_level(count_limit(1, window=60), usage), periods=later) == (
        "trailing_count_limit"
    )


def test_a_busy_card_keeps_a_bounded_history_and_still_counts_its_window() -> None:
    usage = Usage()
    approvals = TRAILING_COUNT_MAX + 700
    for index in range(approvals):
        record_usage(usage, 1, None, periods_at(NOW_MS - (approvals - index) * 1_000))
    # The largest trailing count limit allowed still sees its window full.
    full = card_level(count_limit(TRAILING_COUNT_MAX, window=86_400), usage)
    assert refusal(full) == "trailing_count_limit"
    assert refusal(card_level(count_limit(TRAILING_COUNT_MAX, window=999), usage)) is None
    assert used(usage, "daily", NOW)[1] == approvals  # calendar counters are never trimmed
    assert len(usage.recent[""]) // 8 <= 2 * TRAILING_COUNT_MAX


def test_approvals_older_than_the_longest_window_are_forgotten() -> None:
    usage = usage_of((1, "5411", NOW_MS - 86_400_000 - 1), (1, "5411", NOW_MS))
    assert len(usage.recent[""]) // 8 == 1


# --- single controls: channels -------------------------------------------------------------------


@pytest.mark.parametrize("channel", CHANNELS)
def test_each_channel_switch(channel: str) -> None:
    off = Controls(channels=Channels(**{channel: False}))
    assert refusal(card_level(off), channels=(channel,)) == f"channel_blocked:{channel}"
    for other in CHANNELS:
        if other != channel:
            assert refusal(card_level(off), channels=(other,)) is None
    assert refusal(card_level(off), channels=()) is None


class Request(NamedTuple):
    name: str
    processing_code: str
    field22: str | None
    field25: str | None
    switched_off: tuple[str, ...]
    reason: str | None


CHANNEL_REQUESTS = [
    Request(
        "ATM cash, chip, cash off", "010000", "051", "00", ("atm_cash",), "channel_blocked:atm_cash"
    ),
    Request("ATM cash, chip, chip off", "010000", "051", "00", ("chip",), "channel_blocked:chip"),
    Request(
        "ATM cash, both off: cash named",
        "010000",
        "051",
        "00",
        ("chip", "atm_cash"),
        "channel_blocked:atm_cash",
    ),
    Request("ATM cash, unknown entry mode", "010000", "991", "00", ("chip", "magstripe"), None),
    Request(
        "ATM cash, unknown entry mode, cash off",
        "010000",
        "991",
        "00",
        ("atm_cash",),
        "channel_blocked:atm_cash",
    ),
    Request("purchase, cash off", "000000", "051", "00", ("atm_cash",), None),
    Request("cashback, cash off", "090000", "051", "00", ("atm_cash",), None),
    Request(
        "e-commerce by field 25, chip field 22",
        "000000",
        "051",
        "59",
        ("ecommerce",),
        "channel_blocked:ecommerce",
    ),
    Request("e-commerce by field 25, chip off", "000000", "051", "59", ("chip",), None),
    Request("keyed on the web, manual off", "000000", "011", "59", ("manual",), None),
    Request(
        "keyed at a terminal, manual off",
        "000000",
        "011",
        "00",
        ("manual",),
        "channel_blocked:manual",
    ),
    Request(
        "MOTO by field 25, manual off", "000000", "071", "08", ("manual",), "channel_blocked:manual"
    ),
    Request("MOTO by field 25, contactless off", "000000", "071", "08", ("contactless",), None),
    Request(
        "magstripe fallback", "000000", "801", "00", ("magstripe",), "channel_blocked:magstripe"
    ),
    Request(
        "contactless magstripe",
        "000000",
        "911",
        "00",
        ("contactless",),
        "channel_blocked:contactless",
    ),
    Request(
        "credential on file", "000000", "101", "00", ("ecommerce",), "channel_blocked:ecommerce"
    ),
    Request(
        "unknown entry mode, all but cash off",
        "000000",
        "991",
        "00",
        tuple(c for c in CHANNELS if c != "atm_cash"),
        None,
    ),
]


@pytest.mark.parametrize("case", CHANNEL_REQUESTS, ids=[c.name for c in CHANNEL_REQUESTS])
def test_channels_of_requests_through_decide(case: Request) -> None:
    controls = Controls(channels=Channels(**dict.fromkeys(case.switched_off, False)))
    request = make_request(
        processing_code=case.processing_code,
        pos_entry_mode=case.field22,
        pos_condition=case.field25,
    )
    decision = decide_with(request, card_controls=controls)
    assert decision == (approved() if case.reason is None else Decision("57", case.reason))


# --- single controls: MCC ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("controls", "mcc", "reason"),
    [
        (Controls(blocked_mccs=("5933",)), "5933", "mcc_blocked"),
        (Controls(blocked_mccs=("5933",)), "5411", None),
        (Controls(blocked_mccs=("7995",)), "7995", "mcc_blocked"),  # single MCC, not its category
        (Controls(blocked_categories=("gambling",)), "7995", "mcc_category_blocked:gambling"),
        (Controls(blocked_categories=("gambling",)), "9406", "mcc_category_blocked:gambling"),
        (Controls(blocked_categories=("gambling",)), "5411", None),
        (Controls(blocked_categories=("gambling",)), "5933", None),  # in no category
        (
            Controls(blocked_categories=("gambling",), blocked_mccs=("7995",)),
            "7995",
            "mcc_blocked",
        ),
        (
            Controls(blocked_categories=("quasi_cash", "digital_goods")),
            "5816",
            "mcc_category_blocked:digital_goods",
        ),
        # Categories given as ranges.
        (Controls(blocked_categories=("airlines",)), "3000", "mcc_category_blocked:airlines"),
        (Controls(blocked_categories=("airlines",)), "3150", "mcc_category_blocked:airlines"),
        (Controls(blocked_categories=("airlines",)), "3302", "mcc_category_blocked:airlines"),
        (Controls(blocked_categories=("airlines",)), "3303", None),
        (Controls(blocked_categories=("airlines",)), "4511", "mcc_category_blocked:airlines"),
        (Controls(blocked_categories=("hotels",)), "3999", "mcc_category_blocked:hotels"),
        # Allow-lists: only what is listed passes.
        (Controls(allowed_categories=("groceries",)), "5411", None),
        (Controls(allowed_categories=("groceries",)), "5812", "mcc_not_allowed"),
        (Controls(allowed_categories=("groceries",)), "5933", "mcc_not_allowed"),  # no category
        (Controls(allowed_mccs=("5912",)), "5912", None),
        (Controls(allowed_mccs=("5912",)), "5411", "mcc_not_allowed"),
        (
            Controls(allowed_categories=("groceries", "transport"), allowed_mccs=("5912",)),
            "5912",
            None,
        ),
        (
            Controls(allowed_categories=("groceries", "transport"), allowed_mccs=("5912",)),
            "4121",
            None,
        ),
        (
            Controls(allowed_categories=("groceries", "transport"), allowed_mccs=("5912",)),
            "5812",
            "mcc_not_allowed",
        ),
        # A block wins over an allow-list at the same level.
        (
            Controls(allowed_categories=("groceries",), blocked_mccs=("5411",)),
            "5411",
            "mcc_blocked",
        ),
        (
            Controls(allowed_mccs=("7995",), blocked_categories=("gambling",)),
            "7995",
            "mcc_category_blocked:gambling",
        ),
    ],
)
def test_mcc_controls(controls: Controls, mcc: str, reason: str | None) -> None:
    assert refusal(card_level(controls), mcc=mcc) == reason


# --- single controls: country --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("controls", "country", "reason"),
    [
        (Controls(blocked_countries=("US",)), "US", "country_blocked:US"),
        (Controls(blocked_countries=("US",)), "DE", None),
        (Controls(blocked_countries=("US",)), None, None),  # no country passes a block-list
        (Controls(blocked_countries=("GB", "US")), "GB", "country_blocked:GB"),
        (Controls(blocked_countries=("eea",)), "NO", "country_blocked:NO"),
        (Controls(blocked_countries=("eu",)), "NO", None),  # Norway: EEA, not EU
        (Controls(blocked_countries=("eea",)), "CH", None),
        (Controls(allowed_countries=("eea",)), "DE", None),
        (Controls(allowed_countries=("eea",)), "NO", None),
        (Controls(allowed_countries=("eea",)), "LI", None),
        (Controls(allowed_countries=("eea",)), "GB", "country_not_allowed:GB"),
        (Controls(allowed_countries=("eea",)), "CH", "country_not_allowed:CH"),
        (Controls(allowed_countries=("eea",)), None, "country_unknown"),
        (Controls(allowed_countries=("eu", "CH")), "CH", None),
        (Controls(allowed_countries=("eu", "CH")), "NO", "country_not_allowed:NO"),
        (Controls(allowed_countries=("US",)), "US", None),
        (Controls(allowed_countries=("US",)), None, "country_unknown"),
        # A block wins over an allow-list at the same level.
        (
            Controls(allowed_countries=("eea",), blocked_countries=("DE",)),
            "DE",
            "country_blocked:DE",
        ),
        (Controls(allowed_countries=("eea",), blocked_countries=("DE",)), "FR", None),
    ],
)
def test_country_controls(controls: Controls, country: str | None, reason: str | None) -> None:
    assert refusal(card_level(controls), country=country) == reason


@pytest.mark.parametrize(
    ("field", "controls", "expected"),
    [
        (field43("US"), Controls(blocked_countries=("US",)), Decision("57", "country_blocked:US")),
        (field43("NO"), Controls(allowed_countries=("eea",)), None),
        (
            field43("GB"),
            Controls(allowed_countries=("eea",)),
            Decision("57", "country_not_allowed:GB"),
        ),
        (None, Controls(allowed_countries=("eea",)), Decision("57", "country_unknown")),
        (
            field43("DE")[:-1],
            Controls(allowed_countries=("eea",)),
            Decision("57", "country_unknown"),
        ),
        ("SHOP BERLIN DE", Controls(allowed_countries=("eea",)), Decision("57", "country_unknown")),
        # Without an allow-list, an unreadable field 43 refuses nothing.
        (None, Controls(blocked_countries=("US",)), None),
        ("SHOP NEW YORK US", Controls(blocked_countries=("US",)), None),
    ],
)
def test_field_43_through_decide(
    field: str | None, controls: Controls, expected: Decision | None
) -> None:
    decision = decide_with(make_request(merchant_name_location=field), card_controls=controls)
    assert decision == (expected or approved())


# --- amount limits -------------------------------------------------------------------------------

PERIOD_INTERVALS = ("daily", "weekly", "monthly", "yearly", "all_time")


@pytest.mark.parametrize("interval", PERIOD_INTERVALS)
def test_each_amount_interval_counts_what_its_period_used(interval: str) -> None:
    usage = usage_of((6_000, "5411", NOW_MS - 1_000))
    levels = card_level(amount_limit(interval, 10_000), usage)
    assert refusal(levels, amount=4_000) is None  # 6 000 + 4 000 = the limit: inclusive
    assert refusal(levels, amount=4_001) == f"{interval}_amount_limit"
    assert refusal(card_level(amount_limit(interval, 10_000)), amount=10_000) is None
    assert refusal(card_level(amount_limit(interval, 10_000)), amount=10_001) == (
        f"{interval}_amount_limit"
    )


def test_per_authorization_limit_ignores_usage() -> None:
    usage = usage_of(*((9_000, "5411", NOW_MS - n) for n in range(1, 4)))
    levels = card_level(amount_limit("per_authorization", 10_000), usage)
    assert refusal(levels, amount=10_000) is None
    assert refusal(levels, amount=10_001) == "per_authorization_amount_limit"
    assert refusal(card_level(amount_limit("per_authorization", 0)), amount=1) == (
        "per_authorization_amount_limit"
    )


def test_all_time_limit_counts_every_period() -> None:
    usage = usage_of(
        (3_000, "5411", ms("2024-02-29T12:00:00")),
        (3_000, "5411", ms("2025-07-01T12:00:00")),
        (3_000, "5411", NOW_MS - 1),
    )
    levels = card_level(amount_limit("all_time", 10_000), usage)
    assert refusal(levels, amount=1_000) is None
    assert refusal(levels, amount=1_001) == "all_time_amount_limit"
    # ... while the yearly limit sees this year's only.
    assert refusal(card_level(amount_limit("yearly", 3_001), usage), amount=1) is None


@pytest.mark.parametrize(
    ("categories", "mcc", "amount", "reason"),
    [
        # Usage: 15 000 groceries, 5 000 cash, 2 000 quasi-cash, 4 000 uncategorised today.
        (("cash",), "6011", 15_000, None),  # 5 000 + 15 000 = 20 000: at the limit
        (("cash",), "6011", 15_001, "daily_amount_limit:cash"),
        (("cash",), "6010", 15_001, "daily_amount_limit:cash"),
        (("cash",), "5411", 50_000, None),  # groceries: the limit does not apply
        (("cash",), "5933", 50_000, None),  # no category: the limit does not apply
        (("cash", "quasi_cash"), "6051", 13_000, None),  # 5 000 + 2 000 + 13 000
        (("cash", "quasi_cash"), "6051", 13_001, "daily_amount_limit:cash+quasi_cash"),
        (("cash", "quasi_cash"), "6011", 13_001, "daily_amount_limit:cash+quasi_cash"),
        (("groceries",), "5411", 5_000, None),
        (("groceries",), "5499", 5_001, "daily_amount_limit:groceries"),
        # Unrestricted (a limit of 40 000): all 26 000 used count, whatever the category.
        ((), "5411", 14_000, None),
        ((), "5933", 14_001, "daily_amount_limit"),
    ],
)
def test_category_restricted_amount_limit(
    categories: tuple[str, ...], mcc: str, amount: int, reason: str | None
) -> None:
    usage = usage_of(
        (15_000, "5411", NOW_MS - 4_000),
        (5_000, "6011", NOW_MS - 3_000),
        (2_000, "6051", NOW_MS - 2_000),
        (4_000, "5933", NOW_MS - 1_000),
    )
    limit = 40_000 if not categories else 20_000
    levels = card_level(amount_limit("daily", limit, *categories), usage)
    assert refusal(levels, mcc=mcc, amount=amount) == reason


def test_several_amount_limits_at_one_level_first_failing_answers() -> None:
    usage = usage_of((9_000, "6011", NOW_MS - 1))
    controls = Controls(
        amount_limits=(
            AmountLimit(interval="per_authorization", amount=5_000, currency="EUR"),
            AmountLimit(interval="daily", amount=10_000, currency="EUR", categories=("cash",)),
            AmountLimit(interval="monthly", amount=12_000, currency="EUR"),
        )
    )
    levels = card_level(controls, usage)
    assert refusal(levels, mcc="6011", amount=5_001) == "per_authorization_amount_limit"
    assert refusal(levels, mcc="6011", amount=1_001) == "daily_amount_limit:cash"
    assert refusal(levels, mcc="5411", amount=3_001) == "monthly_amount_limit"
    assert refusal(levels, mcc="5411", amount=3_000) is None


# --- count limits --------------------------------------------------------------------------------


@pytest.mark.parametrize("interval", PERIOD_INTERVALS)
def test_each_count_interval(interval: str) -> None:
    usage = usage_of((100, "5411", NOW_MS - 2_000), (100, "5411", NOW_MS - 1_000))
    assert refusal(card_level(count_limit(3, interval), usage)) is None
    assert refusal(card_level(count_limit(2, interval), usage)) == f"{interval}_count_limit"
    assert refusal(card_level(count_limit(0, interval))) == f"{interval}_count_limit"


@pytest.mark.parametrize(
    ("limit", "mcc", "reason"),
    [
        # Usage: two restaurant approvals and three grocery approvals, all within the last minute.
        (
            CountLimit(count=2, interval="daily", categories=("restaurants",)),
            "5812",
            "daily_count_limit:restaurants",
        ),
        (CountLimit(count=3, interval="daily", categories=("restaurants",)), "5812", None),
        (CountLimit(count=2, interval="daily", categories=("restaurants",)), "5411", None),
        (
            CountLimit(count=5, interval="weekly", categories=("restaurants", "groceries")),
            "5411",
            "weekly_count_limit:restaurants+groceries",
        ),
        (
            CountLimit(count=6, interval="weekly", categories=("restaurants", "groceries")),
            "5814",
            None,
        ),
        (
            CountLimit(count=2, window_seconds=60, categories=("restaurants",)),
            "5813",
            "trailing_count_limit:restaurants",
        ),
        (CountLimit(count=2, window_seconds=60, categories=("restaurants",)), "5933", None),
        (CountLimit(count=5, window_seconds=60), "5933", "trailing_count_limit"),
        (CountLimit(count=6, window_seconds=60), "5933", None),
    ],
)
def test_category_restricted_count_limit(limit: CountLimit, mcc: str, reason: str | None) -> None:
    usage = usage_of(
        (100, "5812", NOW_MS - 50_000),
        (100, "5813", NOW_MS - 40_000),
        *((100, "5411", NOW_MS - seconds * 1000) for seconds in (30, 20, 10)),
    )
    assert refusal(card_level(Controls(count_limits=(limit,)), usage), mcc=mcc) == reason


def test_a_category_listed_twice_in_stored_controls_counts_once() -> None:
    """Controls stored before duplicates were refused counted a category listed twice
    twice: 60.00 of groceries read as 120.00 against a 100.00 limit."""
    usage = usage_of((6_000, "5411", NOW_MS - 10_000))
    twice = ("groceries", "groceries")
    amounts = Controls(
        amount_limits=(
            AmountLimit(interval="daily", amount=10_000, currency="EUR", categories=twice),
        )
    )
    assert refusal(card_level(amounts, usage), amount=4_000) is None
    counts = Controls(count_limits=(CountLimit(count=2, window_seconds=60, categories=twice),))
    assert refusal(card_level(counts, usage)) is None


def test_amount_limits_come_before_count_limits() -> None:
    controls = Controls(
        amount_limits=(AmountLimit(interval="daily", amount=100, currency="EUR"),),
        count_limits=(CountLimit(count=0, interval="daily"),),
    )
    assert refusal(card_level(controls), amount=101) == "daily_amount_limit"
    assert refusal(card_level(controls), amount=100) == "daily_count_limit"


@pytest.mark.parametrize(
    ("count", "interval", "window"),
    [
        (1, "daily", 60),  # both
        (1, None, None),  # neither
        (TRAILING_COUNT_MAX + 1, None, 60),  # a window counts at most TRAILING_COUNT_MAX
        (1, None, 86_401),  # a window is at most a day
        (1, None, 0),
    ],
)
def test_malformed_count_limits_are_refused(
    count: int, interval: str | None, window: int | None
) -> None:
    raw: dict[str, Any] = {"count": count}
    if interval is not None:
        raw["interval"] = interval
    if window is not None:
        raw["window_seconds"] = window
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert(raw, CountLimit)


# --- usage bookkeeping ---------------------------------------------------------------------------


def test_record_counts_total_and_category() -> None:
    usage = usage_of((1_000, "6011", NOW_MS), (500, "5411", NOW_MS), (200, "5933", NOW_MS))
    for interval in CALENDAR_INTERVALS:
        assert used(usage, interval, NOW) == (1_700, 3)
        assert used(usage, interval, NOW, ("cash",)) == (1_000, 1)
        assert used(usage, interval, NOW, ("groceries",)) == (500, 1)
        assert used(usage, interval, NOW, ("cash", "groceries")) == (1_500, 2)
        assert used(usage, interval, NOW, ("gambling",)) == (0, 0)


def test_full_release_in_the_same_period_gives_everything_back() -> None:
    usage = usage_of((3_000, "6011", NOW_MS - 5_000))
    record_usage(usage, 1_000, "cash", periods_at(NOW_MS - 1_000))
    release_usage(usage, 1_000, 1, "cash", periods_at(NOW_MS - 1_000), NOW)
    for interval in CALENDAR_INTERVALS:
        assert used(usage, interval, NOW, ("cash",)) == (3_000, 1)
        assert used(usage, interval, NOW) == (3_000, 1)
    assert refusal(card_level(count_limit(2, window=60), usage)) is None


def test_partial_release_gives_back_the_amount_not_the_approval() -> None:
    usage = usage_of((3_000, "5411", NOW_MS - 1_000))
    release_usage(usage, 1_200, 0, "groceries", periods_at(NOW_MS - 1_000), NOW)
    assert used(usage, "daily", NOW) == (1_800, 1)
    assert used(usage, "daily", NOW, ("groceries",)) == (1_800, 1)
    assert refusal(card_level(count_limit(1, window=60), usage)) == "trailing_count_limit"


def test_release_never_goes_below_zero() -> None:
    usage = usage_of((1_000, "5411", NOW_MS - 1_000))
    release_usage(usage, 5_000, 3, "groceries", periods_at(NOW_MS - 1_000), NOW)
    for interval in CALENDAR_INTERVALS:
        assert used(usage, interval, NOW) == (0, 0)
        assert used(usage, interval, NOW, ("groceries",)) == (0, 0)
    release_usage(Usage(), 5_000, 1, None, NOW, NOW)  # nothing recorded: nothing to take


def test_release_only_gives_back_to_periods_still_current() -> None:
    tuesday = ms("2026-11-24T10:00:00")
    wednesday = ms("2026-11-25T10:00:00")
    usage = usage_of((6_000, "5411", tuesday), (3_000, "5411", wednesday))
    now = periods_at(wednesday + 60_000)
    # Reversing Tuesday's approval on Wednesday: this week, month, year and all time get it
    # back; Wednesday's allowance does not grow.
    release_usage(usage, 6_000, 1, "groceries", periods_at(tuesday), now)
    assert used(usage, "daily", now) == (3_000, 1)
    assert used(usage, "weekly", now) == (3_000, 1)
    assert used(usage, "monthly", now) == (3_000, 1)
    assert used(usage, "all_time", now) == (3_000, 1)


def test_release_next_week_gives_nothing_back_to_the_new_week() -> None:
    sunday = ms("2026-11-29T23:00:00")
    monday = ms("2026-11-30T01:00:00")
    usage = usage_of((6_000, "5411", sunday), (1_000, "5411", monday))
    now = periods_at(monday + 1)
    release_usage(usage, 6_000, 1, None, periods_at(sunday), now)
    assert used(usage, "weekly", now) == (1_000, 1)
    assert used(usage, "monthly", now) == (1_000, 1)  # November -> November 30: same month
    assert used(usage, "all_time", now) == (1_000, 1)


# --- levels --------------------------------------------------------------------------------------


NONE = Controls()
LEVEL_CASES = [
    # (name, programme, account, card, request changes, reason)
    ("programme alone refuses", Controls(blocked_mccs=("5411",)), NONE, NONE, {}, "mcc_blocked"),
    ("account alone refuses", NONE, Controls(blocked_mccs=("5411",)), NONE, {}, "mcc_blocked"),
    ("card alone refuses", NONE, NONE, Controls(blocked_mccs=("5411",)), {}, "mcc_blocked"),
    (
        "programme single MCC before card category",
        Controls(blocked_mccs=("7995",)),
        NONE,
        Controls(blocked_categories=("gambling",)),
        {"mcc": "7995"},
        "mcc_blocked",
    ),
    (
        "programme category before card single MCC",
        Controls(blocked_categories=("gambling",)),
        NONE,
        Controls(blocked_mccs=("7995",)),
        {"mcc": "7995"},
        "mcc_category_blocked:gambling",
    ),
    (
        "account allow-list before card block",
        NONE,
        Controls(allowed_categories=("groceries",)),
        Controls(blocked_mccs=("5812",)),
        {"mcc": "5812"},
        "mcc_not_allowed",
    ),
    (
        "a card channel block beats a programme MCC block (kinds first)",
        Controls(blocked_mccs=("5411",)),
        NONE,
        Controls(channels=Channels(chip=False)),
        {},
        "channel_blocked:chip",
    ),
    (
        "a card MCC block beats an account country block",
        NONE,
        Controls(blocked_countries=("DE",)),
        Controls(blocked_mccs=("5411",)),
        {},
        "mcc_blocked",
    ),
    (
        "a card country block beats a programme amount limit",
        Controls(
            amount_limits=(AmountLimit(interval="per_authorization", amount=1, currency="EUR"),)
        ),
        NONE,
        Controls(blocked_countries=("eu",)),
        {},
        "country_blocked:DE",
    ),
    (
        "programme country allow-list before the card's block (levels before kinds within a row)",
        Controls(allowed_countries=("US",)),
        NONE,
        Controls(blocked_countries=("DE",)),
        {},
        "country_not_allowed:DE",
    ),
    (
        "programme weekly before card daily",
        Controls(amount_limits=(AmountLimit(interval="weekly", amount=500, currency="EUR"),)),
        NONE,
        Controls(amount_limits=(AmountLimit(interval="daily", amount=500, currency="EUR"),)),
        {},
        "weekly_amount_limit",
    ),
    (
        "only the card's limit is exceeded",
        Controls(amount_limits=(AmountLimit(interval="weekly", amount=5_000, currency="EUR"),)),
        NONE,
        Controls(amount_limits=(AmountLimit(interval="daily", amount=500, currency="EUR"),)),
        {},
        "daily_amount_limit",
    ),
    (
        "account amount limit before card amount limit",
        NONE,
        Controls(amount_limits=(AmountLimit(interval="monthly", amount=500, currency="EUR"),)),
        Controls(amount_limits=(AmountLimit(interval="yearly", amount=500, currency="EUR"),)),
        {},
        "monthly_amount_limit",
    ),
    (
        "a card amount limit beats a programme count limit (kinds first)",
        Controls(count_limits=(CountLimit(count=0, interval="daily"),)),
        NONE,
        Controls(amount_limits=(AmountLimit(interval="daily", amount=500, currency="EUR"),)),
        {},
        "daily_amount_limit",
    ),
    (
        "programme count limit before the account's",
        Controls(count_limits=(CountLimit(count=0, window_seconds=60),)),
        Controls(count_limits=(CountLimit(count=0, interval="monthly"),)),
        NONE,
        {},
        "trailing_count_limit",
    ),
    (
        "no level refuses",
        Controls(blocked_mccs=("7995",)),
        NONE,
        Controls(blocked_countries=("US",)),
        {},
        None,
    ),
]


@pytest.mark.parametrize(
    ("programme", "account", "card", "changes", "reason"),
    [case[1:] for case in LEVEL_CASES],
    ids=[case[0] for case in LEVEL_CASES],
)
def test_level_precedence(
    programme: Controls,
    account: Controls,
    card: Controls,
    changes: dict[str, Any],
    reason: str | None,
) -> None:
    decision = decide_with(
        make_request(**changes), programme=programme, account_controls=account, card_controls=card
    )
    assert decision == (approved(**changes) if reason is None else refused(reason))


class Counting(NamedTuple):
    name: str
    level: str  # which level holds the limit
    card_used: int  # what the card has used today
    account_used: int  # what the account's cards together have used today
    reason: str | None


COUNTING = [
    # A daily limit of 10 000, a request of 2 000.
    Counting("programme limit counts the card's usage: fits", "programme", 8_000, 9_500, None),
    Counting(
        "programme limit counts the card's usage: over",
        "programme",
        8_001,
        8_001,
        "daily_amount_limit",
    ),
    Counting(
        "account limit counts the account's usage: over", "account", 0, 8_001, "daily_amount_limit"
    ),
    Counting("account limit counts the account's usage: fits", "account", 9_000, 8_000, None),
    Counting("card limit counts the card's usage: over", "card", 8_001, 0, "daily_amount_limit"),
    Counting("card limit counts the card's usage: fits", "card", 8_000, 9_500, None),
]


@pytest.mark.parametrize("case", COUNTING, ids=[c.name for c in COUNTING])
def test_whose_usage_each_level_counts(case: Counting) -> None:
    limit = Controls(amount_limits=(AmountLimit(interval="daily", amount=10_000, currency="EUR"),))
    card_usage = usage_of((case.card_used, "5411", NOW_MS - 1_000)) if case.card_used else Usage()
    account_usage = usage_of((case.account_used, "5411", NOW_MS - 1_000))
    decision = decide_with(
        make_request(amount=2_000),
        programme=limit if case.level == "programme" else None,
        account_controls=limit if case.level == "account" else None,
        card_controls=limit if case.level == "card" else None,
        card_usage=card_usage,
        account_usage=account_usage,
    )
    assert decision == (approved(2_000) if case.reason is None else refused(case.reason))


@pytest.mark.parametrize("level", ["programme", "account", "card"])
def test_trailing_limits_count_the_same_usage_as_amount_limits(level: str) -> None:
    limit = count_limit(1, window=600)
    busy = usage_of((100, "5411", NOW_MS - 1_000))
    card_busy = level != "account"
    decision = decide_with(
        make_request(),
        programme=limit if level == "programme" else None,
        account_controls=limit if level == "account" else None,
        card_controls=limit if level == "card" else None,
        card_usage=busy if card_busy else Usage(),
        account_usage=Usage() if card_busy else busy,
    )
    assert decision == refused("trailing_count_limit")
    # The other usage being busy does not matter.
    quiet = decide_with(
        make_request(),
        programme=limit if level == "programme" else None,
        account_controls=limit if level == "account" else None,
        card_controls=limit if level == "card" else None,
        card_usage=Usage() if card_busy else busy,
        account_usage=busy if card_busy else Usage(),
    )
    assert quiet == approved()


# --- currency ------------------------------------------------------------------------------------


FX = ProgrammeRules(rates={("USD", "EUR"): Decimal("0.92")}, fx_markup_bps=100, catalog=CATALOG)


@pytest.mark.parametrize(
    ("limit_currency", "account_currency", "request_currency", "reason"),
    [
        ("EUR", "EUR", "978", "per_authorization_amount_limit"),
        ("USD", "EUR", "978", None),  # another currency than the account's: does not apply
        ("USD", "USD", "840", "per_authorization_amount_limit"),
        ("EUR", "USD", "840", None),
        ("GBP", "USD", "840", None),
    ],
)
def test_a_limit_applies_only_to_accounts_in_its_currency(
    limit_currency: str, account_currency: str, request_currency: str, reason: str | None
) -> None:
    programme = amount_limit("per_authorization", 999, currency=limit_currency)
    decision = decide_with(
        make_request(currency=request_currency),
        programme=programme,
        account_currency=account_currency,
    )
    assert decision == (approved() if reason is None else refused(reason))


@pytest.mark.parametrize(
    ("used_today", "reason"),
    [(10_000 - 929, None), (10_000 - 928, "daily_amount_limit")],
)
def test_limits_are_checked_on_the_amount_in_the_account_currency(
    used_today: int, reason: str | None
) -> None:
    # 10.00 USD at 0.92 plus 1 % markup = 9.29 EUR on a EUR account: 929 is what counts.
    request = make_request(currency="840", amount=1_000)
    usage = usage_of((used_today, "5411", NOW_MS - 1_000))
    decision = decide_with(
        request, card_controls=amount_limit("daily", 10_000), card_usage=usage, rules=FX
    )
    expected = Decision("00", "approved", hold_amount=929, billing_amount=929)
    assert decision == (expected if reason is None else refused(reason))


def test_limits_use_the_networks_billing_amount_when_given() -> None:
    request = make_request(
        currency="840", amount=1_000, billing_amount="000000000950", billing_currency="978"
    )
    within = decide_with(request, card_controls=amount_limit("per_authorization", 950))
    over = decide_with(request, card_controls=amount_limit("per_authorization", 949))
    assert within == Decision("00", "approved", hold_amount=950, billing_amount=950)
    assert over == refused("per_authorization_amount_limit")


# --- where the controls sit among the other checks -----------------------------------------------


def test_controls_come_before_the_balance_and_after_the_card() -> None:
    blocked = Controls(blocked_mccs=("5411",))
    assert decide_with(make_request(amount=10**9), card_controls=blocked) == refused("mcc_blocked")
    frozen = decide_with(make_request(), card_controls=blocked, card_status="frozen")
    assert frozen == Decision("62", "card_frozen")
    # Where the card may be used is checked before the amount is looked at.
    assert decide_with(make_request(amount=None), card_controls=blocked) == refused("mcc_blocked")
    limits = Controls(
        amount_limits=(AmountLimit(interval="per_authorization", amount=0, currency="EUR"),),
        count_limits=(CountLimit(count=0, interval="daily"),),
    )
    assert decide_with(make_request(amount=None), card_controls=limits) == Decision(
        "13", "invalid_amount"
    )


def test_an_account_verification_is_refused_where_the_card_may_not_be_used() -> None:
    """A card verified (a purchase of zero: stored on file, added to a wallet) at a merchant,
    in a country or through a channel its controls block was answered 85, and declined at
    its first purchase there. It spends nothing: no amount or count limit refuses it."""
    verification = make_request(amount=0)
    for controls, reason in (
        (Controls(blocked_mccs=("5411",)), "mcc_blocked"),
        (Controls(allowed_countries=("FR",)), "country_not_allowed:DE"),
        (Controls(channels=Channels(**dict.fromkeys(CHANNELS, False))), None),
    ):
        decision = decide_with(verification, card_controls=controls)
        if reason is None:
            assert decision.response_code == "57", decision
            assert decision.reason.startswith("channel_blocked:"), decision
        else:
            assert decision == refused(reason), controls
    spent_out = Controls(
        amount_limits=(AmountLimit(interval="per_authorization", amount=0, currency="EUR"),),
        count_limits=(CountLimit(count=0, interval="daily"),),
    )
    assert decide_with(verification, card_controls=spent_out) == Decision("85", "account_verified")


def test_balance_inquiry_is_not_subject_to_controls() -> None:
    everything_off = Controls(
        channels=Channels(**dict.fromkeys(CHANNELS, False)),
        allowed_mccs=("0001",),
        allowed_countries=("US",),
        count_limits=(CountLimit(count=0, interval="daily"),),
    )
    request = make_request(processing_code="310000", amount=None)
    decision = decide_with(request, programme=everything_off, card_controls=everything_off)
    assert decision == Decision("00", "balance_inquiry", balance_inquiry=True)


# --- control_errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("controls", "account_currency", "expected"),
    [
        (Controls(), "EUR", []),
        (
            Controls(
                blocked_categories=("gambling",),
                allowed_countries=("eea", "CH"),
                amount_limits=(
                    AmountLimit(interval="daily", amount=1, currency="EUR", categories=("cash",)),
                ),
                count_limits=(CountLimit(count=1, window_seconds=60, categories=("restaurants",)),),
            ),
            "EUR",
            [],
        ),
        (
            Controls(blocked_categories=("casinos",)),
            None,
            ["$.c.blocked_categories[0]: unknown MCC category 'casinos'"],
        ),
        (
            Controls(allowed_categories=("groceries", "spaceflight")),
            None,
            ["$.c.allowed_categories[1]: unknown MCC category 'spaceflight'"],
        ),
        (
            Controls(blocked_mccs=("59",)),
            None,
            ["$.c.blocked_mccs[0]: MCC '59' is not four digits"],
        ),
        (Controls(allowed_mccs=("5411", "54x1")), None, ["$.c.allowed_mccs[1]: MCC '54x1'"]),
        (Controls(allowed_countries=("atlantis",)), None, ["$.c.allowed_countries[0]: 'atlantis'"]),
        (Controls(blocked_countries=("US", "de")), None, ["$.c.blocked_countries[1]: 'de'"]),
        (
            Controls(
                amount_limits=(
                    AmountLimit(interval="daily", amount=1, currency="EUR", categories=("bingo",)),
                )
            ),
            "EUR",
            ["$.c.amount_limits[0].categories[0]: unknown MCC category 'bingo'"],
        ),
        (
            Controls(
                count_limits=(
                    CountLimit(count=1, interval="daily"),
                    CountLimit(count=1, interval="daily", categories=("cash", "bingo")),
                )
            ),
            None,
            ["$.c.count_limits[1].categories[1]: unknown MCC category 'bingo'"],
        ),
        (
            Controls(amount_limits=(AmountLimit(interval="daily", amount=1, currency="ABC"),)),
            None,
            ["$.c.amount_limits[0].currency: currency 'ABC'"],
        ),
        # At account and card level a limit must be in the account's currency ...
        (
            Controls(amount_limits=(AmountLimit(interval="daily", amount=1, currency="USD"),)),
            "EUR",
            ["$.c.amount_limits[0].currency: 'USD' is not the account's currency 'EUR'"],
        ),
        # ... at programme level (no account currency) any known currency will do.
        (
            Controls(amount_limits=(AmountLimit(interval="daily", amount=1, currency="USD"),)),
            None,
            [],
        ),
        # A category listed twice was counted twice: the limit met at half.
        (
            Controls(
                amount_limits=(
                    AmountLimit(
                        interval="daily", amount=1, currency="EUR", categories=("cash", "cash")
                    ),
                )
            ),
            "EUR",
            ["$.c.amount_limits[0].categories[1]: MCC category 'cash' listed twice"],
        ),
        # A low-value exemption with no cumulative cap exempted every low-value payment.
        (
            Controls(require_sca=StrongAuthentication(currency="EUR", low_value_max=3000)),
            "EUR",
            ["$.c.require_sca.low_value_max: a low-value exemption needs"],
        ),
        (
            Controls(
                require_sca=StrongAuthentication(
                    currency="EUR", low_value_max=3000, low_value_count_max=5
                )
            ),
            "EUR",
            [],
        ),
    ],
)
def test_control_errors_name_the_path(
    controls: Controls, account_currency: str | None, expected: list[str]
) -> None:
    errors = control_errors(controls, CATALOG, account_currency, "$.c")
    assert len(errors) == len(expected), errors
    for error, start in zip(errors, expected, strict=True):
        assert error.startswith(start), (error, start)


def test_control_errors_reports_every_problem() -> None:
    controls = Controls(
        blocked_categories=("casinos",),
        blocked_mccs=("1",),
        allowed_countries=("atlantis",),
        amount_limits=(AmountLimit(interval="daily", amount=1, currency="USD"),),
    )
    errors = control_errors(controls, CATALOG, "EUR", "$.cards[3].controls")
    assert len(errors) == 4
    assert all(error.startswith("$.cards[3].controls.") for error in errors)


# --- helpers for decide() ------------------------------------------------------------------------


def make_request(**changes: Any) -> AuthorizationRequest:
    fields: dict[str, Any] = {
        "mti": "0100",
        "pan": "4761739001010010",
        "processing_code": "000000",
        "amount": 1_000,
        "transmission_datetime": "1124120000",
        "stan": "000001",
        "expiry": None,
        "mcc": "5411",
        "pos_entry_mode": "051",
        "pos_condition": "00",
        "acquirer": "123456",
        "forwarding": None,
        "rrn": "000000000001",
        "terminal": "TERM0001",
        "merchant_id": "MERCHANT0000001",
        "merchant_name_location": field43("DE"),
        "additional_data": None,
        "currency": "978",
        "billing_amount": None,
        "billing_currency": None,
        "echo": {},
    }
    fields.update(changes)
    return AuthorizationRequest(**fields)


def decide_with(
    request: AuthorizationRequest,
    *,
    programme: Controls | None = None,
    account_controls: Controls | None = None,
    card_controls: Controls | None = None,
    card_usage: Usage | None = None,
    account_usage: Usage | None = None,
    periods: Periods = NOW,
    rules: ProgrammeRules = RULES,
    account_currency: str = "EUR",
    card_status: str = "active",
) -> Decision:
    card = Card(
        card_id="card_00112233445566778899",
        account_id="acct-1",
        bin="476173",
        last4="0010",
        pan_length=16,
        expiry="3012",
        status=card_status,  # type: ignore[arg-type]
        controls=card_controls,
    )
    account = Account(
        id="acct-1",
        currency=account_currency,
        posted=1_000_000,
        controls=account_controls,
    )
    spend = Spend(programme, card_usage or Usage(), account_usage or Usage(), periods)
    return decide(request, card, account, rules, NOW_YYMM, spend)


def approved(amount: int = 1_000, **_: Any) -> Decision:
    return Decision("00", "approved", hold_amount=amount)


def refused(reason: str) -> Decision:
    kind = reason.split(":")[0]
    code = (
        "61" if kind.endswith("_amount_limit") else "65" if kind.endswith("_count_limit") else "57"
    )
    return Decision(code, reason)


# --- regressions ---------------------------------------------------------------------------------


def test_a_clock_stepping_back_across_midnight_never_frees_the_day() -> None:
    usage = Usage()
    record_usage(usage, 9_000, None, periods_at(NOW_MS))
    record_usage(usage, 1, None, periods_at(NOW_MS - 13 * 3_600_000))  # stepped back a day
    record_usage(usage, 1, None, periods_at(NOW_MS + 1_000))
    assert used(usage, "daily", periods_at(NOW_MS + 2_000)) == (9_002, 3)
    # While the clock is still behind, what was counted "later" still counts.
    assert used(usage, "daily", periods_at(NOW_MS - 13 * 3_600_000))[0] == 9_002


def test_a_trimmed_history_never_lets_a_reversal_undercount_a_window() -> None:
    usage = Usage()
    approvals = TRAILING_COUNT_MAX + 129  # past the trimming threshold: the oldest are dropped
    for index in range(approvals):
        record_usage(usage, 1, None, periods_at(NOW_MS - (approvals - index) * 10))
    assert len(usage.recent[""]) // 8 <= TRAILING_COUNT_MAX + 128
    release_usage(usage, 1, 1, None, periods_at(NOW_MS - 10), periods_at(NOW_MS))
    limit = Controls(count_limits=(CountLimit(count=TRAILING_COUNT_MAX, window_seconds=3600),))
    refusal = check_controls(
        [(limit, usage)],
        mcc="5411",
        country=None,
        channels=(),
        amount=1,
        currency="EUR",
        periods=periods_at(NOW_MS),
        catalog=CATALOG,
    )
    assert refusal == Refusal("65", "trailing_count_limit")
