"""Table-driven tests of the pure decide(): one row per outcome of specs/decision_precedence.toml.

Every row builds a request, a card and an account from a known-good baseline that approves, changes
only what the row is about, and states the exact decision expected. Spend controls are passed the
way the lifecycle passes them: programme controls in `Spend`, card controls on the card record,
with empty usage (tests/unit/test_controls.py covers usage, intervals and levels in depth).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, NamedTuple

import msgspec
import pytest

from processor.catalog import default_catalog
from processor.engine import Decision, ProgrammeRules, Spend, decide, yymm
from processor.engine.controls import periods_at
from processor.ledger.controls import AmountLimit, Controls, CountLimit, Usage
from processor.ledger.records import Account, Card
from processor.wire.messages import AuthorizationRequest

NOW_YYMM = 2611  # November 2026
MISSING = None
NOW_MS = int(datetime(2026, 11, 24, 12, 0, tzinfo=UTC).timestamp() * 1000)
PERIODS = periods_at(NOW_MS)
NO_RULES = ProgrammeRules()
CATALOG_RULES = ProgrammeRules(catalog=default_catalog())
PAWN_SHOPS_BLOCKED = Controls(blocked_mccs=("5933",))
GAMBLING_BLOCKED = Controls(blocked_categories=("gambling",))


def per_authorization(amount: int, currency: str = "EUR") -> Controls:
    return Controls(
        amount_limits=(AmountLimit(interval="per_authorization", amount=amount, currency=currency),)
    )


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
        "merchant_name_location": None,
        "additional_data": None,
        "currency": "978",
        "billing_amount": None,
        "billing_currency": None,
        "echo": {},
    }
    fields.update(changes)
    return AuthorizationRequest(**fields)


def make_card(**changes: Any) -> Card:
    fields: dict[str, Any] = {
        "card_id": "card_00112233445566778899",
        "account_id": "acct-1",
        "bin": "476173",
        "last4": "0010",
        "pan_length": 16,
        "expiry": "3012",
        "status": "active",
        "controls": None,
    }
    fields.update(changes)
    return Card(**fields)


def make_account(**changes: Any) -> Account:
    fields: dict[str, Any] = {
        "id": "acct-1",
        "currency": "EUR",
        "posted": 100_000,
        "held": 0,
        "credit_limit": 0,
        "status": "active",
    }
    fields.update(changes)
    return Account(**fields)


class Case(NamedTuple):
    name: str
    code: str
    reason: str
    request: dict[str, Any] = {}
    card: dict[str, Any] | None = {}  # None: no such card
    account: dict[str, Any] | None = {}  # None: no such account
    rules: ProgrammeRules = NO_RULES
    programme: Controls | None = None  # programme-level spend controls
    now_yymm: int = NOW_YYMM
    hold: int = 0
    balance_inquiry: bool = False
    billing: int | None = None  # fields 6/51 of the answer when the amount was converted


PARTIAL_OK = "R" + "61" + "03" + "100"  # field 48: category, subelement 61, position 1 = 1
FX_RULES = ProgrammeRules(
    rates={("USD", "EUR"): Decimal("0.92"), ("JPY", "EUR"): Decimal("0.0062")}, fx_markup_bps=100
)

CASES = [
    # 14: the card is not in the ledger (with or without an account to go with it).
    Case("unknown card", "14", "card_not_found", card=None, account=None),
    Case("unknown card, account present", "14", "card_not_found", card=None),
    # 96: a card whose account record is missing is a ledger inconsistency.
    Case("card without account", "96", "card_account_missing", account=None),
    # 41 / 43 / 62: card and account status.
    Case("lost card", "41", "card_lost", card={"status": "lost"}),
    Case("stolen card", "43", "card_stolen", card={"status": "stolen"}),
    Case("frozen card", "62", "card_frozen", card={"status": "frozen"}),
    Case("inactive card", "62", "card_inactive", card={"status": "inactive"}),
    Case("closed card", "62", "card_closed", card={"status": "closed"}),
    Case("frozen account", "62", "account_frozen", account={"status": "frozen"}),
    Case("closed account", "62", "account_closed", account={"status": "closed"}),
    # 54: a card is valid THROUGH its expiry month.
    Case(
        "expires this month",
        "00",
        "approved",
        card={"expiry": "2611"},
        now_yymm=2611,
        hold=1_000,
    ),
    Case("expired last month", "54", "card_expired", card={"expiry": "2611"}, now_yymm=2612),
    Case(
        "expires in December, still December",
        "00",
        "approved",
        card={"expiry": "2612"},
        now_yymm=2612,
        hold=1_000,
    ),
    Case(
        "expired at the year boundary", "54", "card_expired", card={"expiry": "2612"}, now_yymm=2701
    ),
    Case("expired long ago", "54", "card_expired", card={"expiry": "2401"}),
    Case(
        "field 14 equals the card expiry",
        "00",
        "approved",
        request={"expiry": "3012"},
        hold=1_000,
    ),
    Case(
        "field 14 differs from the card expiry", "54", "expiry_mismatch", request={"expiry": "3011"}
    ),
    Case(
        "field 14 later than the card expiry", "54", "expiry_mismatch", request={"expiry": "3101"}
    ),
    # 12: transaction type and currency.
    Case(
        "refund not supported",
        "12",
        "unsupported_processing_code",
        request={"processing_code": "200000"},
    ),
    Case(
        "unknown transaction type",
        "12",
        "unsupported_processing_code",
        request={"processing_code": "990000"},
    ),
    Case("unknown numeric currency", "12", "unknown_currency", request={"currency": "000"}),
    # 57: another currency with neither a billing amount in the account currency nor a rate.
    Case(
        "USD on a EUR account, no rate",
        "57",
        "currency_not_supported",
        request={"currency": "840"},
    ),
    Case(
        "EUR on a USD account, no rate",
        "57",
        "currency_not_supported",
        account={"currency": "USD"},
    ),
    Case(
        "USD on a EUR account, billing amount in EUR from the network",
        "00",
        "approved",
        request={"currency": "840", "billing_amount": "000000000920", "billing_currency": "978"},
        hold=920,
        billing=920,
    ),
    # 10.00 USD at 0.92 plus 1 % markup = 9.292 EUR, rounded half up to 9.29.
    Case(
        "USD on a EUR account at the programme's rate",
        "00",
        "approved",
        request={"currency": "840", "amount": 1_000},
        rules=FX_RULES,
        hold=929,
        billing=929,
    ),
    # 1000 JPY (no minor unit) at 0.0062 plus 1 % = 6.262 EUR -> 626 cents.
    Case(
        "JPY on a EUR account at the programme's rate",
        "00",
        "approved",
        request={"currency": "392", "amount": 1_000},
        rules=FX_RULES,
        hold=626,
        billing=626,
    ),
    Case(
        "GBP on a EUR account, rates for other pairs only",
        "57",
        "currency_not_supported",
        request={"currency": "826"},
        rules=FX_RULES,
    ),
    Case(
        "USD on a EUR account, billing amount in another currency: still no rate",
        "57",
        "currency_not_supported",
        request={"currency": "840", "billing_amount": "000000000920", "billing_currency": "826"},
    ),
    Case(
        "USD on a USD account",
        "00",
        "approved",
        request={"currency": "840"},
        account={"currency": "USD"},
        hold=1_000,
    ),
    # 00 balance inquiry: nothing held, whatever the amount says.
    Case(
        "balance inquiry without amount",
        "00",
        "balance_inquiry",
        request={"processing_code": "310000", "amount": None},
        balance_inquiry=True,
    ),
    Case(
        "balance inquiry with an amount",
        "00",
        "balance_inquiry",
        request={"processing_code": "312000", "amount": 5_000_000},
        balance_inquiry=True,
    ),
    # 13: amount.
    Case("zero amount", "85", "account_verified", request={"amount": 0}),
    Case(
        "zero amount of cash",
        "13",
        "invalid_amount",
        request={"amount": 0, "processing_code": "010000"},
    ),
    Case("absent amount", "13", "invalid_amount", request={"amount": None}),
    # 57: MCC rules, programme first (spend controls; the full matrix is in test_controls.py).
    Case(
        "MCC blocked by the programme",
        "57",
        "mcc_blocked",
        request={"mcc": "5933"},
        programme=PAWN_SHOPS_BLOCKED,
    ),
    Case(
        "MCC blocked by the programme through its category",
        "57",
        "mcc_category_blocked:gambling",
        request={"mcc": "7995"},
        rules=CATALOG_RULES,
        programme=GAMBLING_BLOCKED,
    ),
    Case(
        "MCC blocked by the card",
        "57",
        "mcc_blocked",
        request={"mcc": "7995"},
        card={"controls": Controls(blocked_mccs=("7995", "5933"))},
    ),
    Case(
        "MCC blocked by both: programme wins",
        "57",
        "mcc_category_blocked:gambling",
        request={"mcc": "7995"},
        card={"controls": Controls(blocked_mccs=("7995",))},
        rules=CATALOG_RULES,
        programme=GAMBLING_BLOCKED,
    ),
    Case(
        "other MCC passes both blocks",
        "00",
        "approved",
        request={"mcc": "5411"},
        card={"controls": Controls(blocked_mccs=("5933",))},
        rules=CATALOG_RULES,
        programme=GAMBLING_BLOCKED,
        hold=1_000,
    ),
    Case(
        "legacy card record fields are its controls (nothing rewrote such records)",
        "57",
        "mcc_blocked",
        request={"mcc": "5933", "amount": 2_000},
        card={"per_transaction_limit": 1, "blocked_mccs": ("5933",)},
    ),
    Case(
        "a legacy per-transaction limit is a per-authorisation amount limit",
        "61",
        "per_authorization_amount_limit",
        request={"mcc": "5411", "amount": 2_000},
        card={"per_transaction_limit": 1_000},
    ),
    # 61: per-authorisation amount limit (inclusive).
    Case(
        "amount equal to the per-authorisation limit",
        "00",
        "approved",
        request={"amount": 50_000},
        card={"controls": per_authorization(50_000)},
        hold=50_000,
    ),
    Case(
        "amount one above the per-authorisation limit",
        "61",
        "per_authorization_amount_limit",
        request={"amount": 50_001},
        card={"controls": per_authorization(50_000)},
    ),
    Case(
        "zero per-authorisation limit",
        "61",
        "per_authorization_amount_limit",
        request={"amount": 1},
        card={"controls": per_authorization(0)},
    ),
    Case(
        "per-authorisation limit of the programme",
        "61",
        "per_authorization_amount_limit",
        request={"amount": 50_001},
        programme=per_authorization(50_000),
    ),
    Case(
        "limit in another currency than the account's does not apply",
        "00",
        "approved",
        request={"amount": 50_001},
        programme=per_authorization(50_000, "USD"),
        hold=50_001,
    ),
    # The limit is checked on the amount in the account currency: 10.00 USD -> 9.29 EUR.
    Case(
        "converted amount exactly at the limit",
        "00",
        "approved",
        request={"currency": "840", "amount": 1_000},
        rules=FX_RULES,
        card={"controls": per_authorization(929)},
        hold=929,
        billing=929,
    ),
    Case(
        "converted amount one above the limit",
        "61",
        "per_authorization_amount_limit",
        request={"currency": "840", "amount": 1_000},
        rules=FX_RULES,
        card={"controls": per_authorization(928)},
    ),
    Case(
        "over the limit and over the balance: the limit answers",
        "61",
        "per_authorization_amount_limit",
        request={"amount": 100_001},
        card={"controls": per_authorization(50_000)},
    ),
    Case(
        "within the limit, over the balance",
        "51",
        "insufficient_funds",
        request={"amount": 100_001},
        card={"controls": per_authorization(200_000)},
    ),
    # 65: count limit (none used yet, so only a zero limit refuses the first approval).
    Case(
        "zero daily count limit",
        "65",
        "daily_count_limit",
        card={"controls": Controls(count_limits=(CountLimit(count=0, interval="daily"),))},
    ),
    Case(
        "balance inquiry is not subject to controls",
        "00",
        "balance_inquiry",
        request={"processing_code": "310000", "amount": None, "mcc": "5933"},
        programme=Controls(blocked_mccs=("5933",), allowed_mccs=("0001",)),
        card={"controls": per_authorization(0)},
        balance_inquiry=True,
    ),
    # 51: available = posted + credit_limit - held (inclusive).
    Case(
        "amount equal to available",
        "00",
        "approved",
        request={"amount": 100_000},
        hold=100_000,
    ),
    Case("amount one above available", "51", "insufficient_funds", request={"amount": 100_001}),
    Case(
        "credit limit extends available",
        "00",
        "approved",
        request={"amount": 150_000},
        account={"credit_limit": 50_000},
        hold=150_000,
    ),
    Case(
        "one above posted plus credit limit",
        "51",
        "insufficient_funds",
        request={"amount": 150_001},
        account={"credit_limit": 50_000},
    ),
    Case(
        "held reduces available: exactly what is left",
        "00",
        "approved",
        request={"amount": 70_000},
        account={"held": 30_000},
        hold=70_000,
    ),
    Case(
        "held reduces available: one above what is left",
        "51",
        "insufficient_funds",
        request={"amount": 70_001},
        account={"held": 30_000},
    ),
    Case(
        "overdrawn account within its credit limit",
        "00",
        "approved",
        request={"amount": 300},
        account={"posted": -200, "credit_limit": 500},
        hold=300,
    ),
    Case(
        "overdrawn account beyond what its credit limit leaves",
        "51",
        "insufficient_funds",
        request={"amount": 301},
        account={"posted": -200, "credit_limit": 500},
    ),
    # 10: a partial approval for what is available, and every condition it needs (field 48
    # subelement 61 position 1 = 1; a purchase; no conversion; something available).
    Case(
        "short, partial supported: partial approval for what is available",
        "10",
        "partial_approval",
        request={"amount": 100_500, "additional_data": PARTIAL_OK},
        hold=100_000,
    ),
    Case(
        "short, partial supported, held reduces what is available",
        "10",
        "partial_approval",
        request={"amount": 100_000, "additional_data": PARTIAL_OK},
        account={"held": 99_999},
        hold=1,
    ),
    Case(
        "short, partial supported but nothing available",
        "51",
        "insufficient_funds",
        request={"amount": 1, "additional_data": PARTIAL_OK},
        account={"held": 100_000},
    ),
    Case(
        "short, partial supported but the account is overdrawn",
        "51",
        "insufficient_funds",
        request={"amount": 1, "additional_data": PARTIAL_OK},
        account={"posted": -10},
    ),
    Case(
        "short, partial supported but cash",
        "51",
        "insufficient_funds",
        request={"amount": 100_500, "additional_data": PARTIAL_OK, "processing_code": "010000"},
    ),
    Case(
        "short, partial supported but purchase with cashback",
        "51",
        "insufficient_funds",
        request={"amount": 100_500, "additional_data": PARTIAL_OK, "processing_code": "090000"},
    ),
    Case(
        "short, partial supported but converted from another currency",
        "51",
        "insufficient_funds",
        request={"amount": 200_000, "currency": "840", "additional_data": PARTIAL_OK},
        rules=FX_RULES,
    ),
    Case(
        "short, partial not supported (position 1 = 0)",
        "51",
        "insufficient_funds",
        request={"amount": 100_500, "additional_data": "R" + "61" + "03" + "000"},
    ),
    Case(
        "within available, partial supported: a full approval",
        "00",
        "approved",
        request={"amount": 1_000, "additional_data": PARTIAL_OK},
        hold=1_000,
    ),
    # 00: approval holds exactly the amount, for every supported transaction type.
    Case("purchase", "00", "approved", hold=1_000),
    Case("cash", "00", "approved", request={"processing_code": "010000"}, hold=1_000),
    Case(
        "purchase with cashback",
        "00",
        "approved",
        request={"processing_code": "090000"},
        hold=1_000,
    ),
    Case("1-unit purchase", "00", "approved", request={"amount": 1}, hold=1),
]


def inputs(case: Case) -> tuple[AuthorizationRequest, Card | None, Account | None]:
    request = make_request(**case.request)
    card = None if case.card is None else make_card(**case.card)
    account = None if case.account is None else make_account(**case.account)
    return request, card, account


def spend(case: Case) -> Spend:
    return Spend(case.programme, Usage(), Usage(), PERIODS)


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_decision_table(case: Case) -> None:
    request, card, account = inputs(case)

    decision = decide(request, card, account, case.rules, case.now_yymm, spend(case))

    assert decision == Decision(
        case.code,
        case.reason,
        hold_amount=case.hold,
        balance_inquiry=case.balance_inquiry,
        billing_amount=case.billing,
    )
    assert decision.approved is (case.code in ("00", "10"))


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_every_decision_has_a_machine_reason(case: Case) -> None:
    request, card, account = inputs(case)

    decision = decide(request, card, account, case.rules, case.now_yymm, spend(case))

    # snake_case, optionally qualified: mcc_category_blocked:gambling, daily_amount_limit:cash.
    assert re.fullmatch(r"[a-z][a-z_]*[a-z](:[A-Za-z0-9_+]+)?", decision.reason), decision.reason
    # Only approvals hold; a decline never carries an amount to hold.
    assert (decision.hold_amount > 0) is (decision.reason in ("approved", "partial_approval"))


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_decide_is_deterministic_and_does_not_mutate_inputs(case: Case) -> None:
    request, card, account = inputs(case)
    spent = spend(case)
    before = msgspec.msgpack.encode((request, card, account, case.rules, spent))

    first = decide(request, card, account, case.rules, case.now_yymm, spent)
    second = decide(request, card, account, case.rules, case.now_yymm, spent)
    # Equal inputs built afresh give the equal decision: nothing depends on identity or state.
    fresh = decide(*inputs(case), case.rules, case.now_yymm, spend(case))

    assert first == second == fresh
    assert msgspec.msgpack.encode((request, card, account, case.rules, spent)) == before


CONTROLLED = [c for c in CASES if c.programme is not None or "controls" in (c.card or {})]


@pytest.mark.parametrize("case", CONTROLLED, ids=[case.name for case in CONTROLLED])
def test_without_spend_no_controls_apply(case: Case) -> None:
    # spend=None (tools, tests of the other checks) means no controls at any level, card
    # controls included: the decision equals the row's with every control removed.
    request, card, account = inputs(case)
    card_fields = {k: v for k, v in (case.card or {}).items() if k != "controls"}
    plain = case._replace(programme=None, card=card_fields)

    expected = decide(*inputs(plain), case.rules, case.now_yymm, spend(plain))

    assert decide(request, card, account, case.rules, case.now_yymm) == expected
    assert expected.response_code not in ("61", "65")


def test_table_covers_every_response_code_of_the_precedence() -> None:
    codes = {case.code for case in CASES}
    assert codes == {
        "00", "10", "12", "13", "14", "41", "43", "51", "54", "57", "61", "62", "65", "85", "96"
    }  # fmt: skip


@pytest.mark.parametrize(
    ("now", "expected"),
    [
        (datetime(2026, 11, 24, 12, 0, tzinfo=UTC), 2611),
        (datetime(2026, 12, 31, 23, 59, 59, tzinfo=UTC), 2612),
        (datetime(2027, 1, 1, 0, 0, tzinfo=UTC), 2701),
        (datetime(2030, 5, 1, tzinfo=UTC), 3005),
    ],
)
def test_yymm(now: datetime, expected: int) -> None:
    assert yymm(now) == expected


def test_expiry_comparison_across_year_boundary_uses_yymm() -> None:
    # December 2026 card: good on the last second of 2026, expired on the first of 2027.
    request, card, account = make_request(), make_card(expiry="2612"), make_account()
    last_second = yymm(datetime(2026, 12, 31, 23, 59, 59, tzinfo=UTC))
    first_second = yymm(datetime(2027, 1, 1, 0, 0, 0, tzinfo=UTC))

    assert decide(request, card, account, NO_RULES, last_second).response_code == "00"
    assert decide(request, card, account, NO_RULES, first_second).reason == "card_expired"


@pytest.mark.parametrize(
    ("expiry", "now", "is_expired"),
    [
        ("0012", datetime(2099, 12, 1, tzinfo=UTC), False),  # valid through December 2100
        ("0101", datetime(2097, 1, 1, tzinfo=UTC), False),  # issued for four years in 2097
        ("9912", datetime(2100, 1, 1, tzinfo=UTC), True),
        ("2611", datetime(2026, 11, 30, tzinfo=UTC), False),  # its own month
        ("2610", datetime(2026, 11, 1, tzinfo=UTC), True),
        ("7610", datetime(2026, 11, 1, tzinfo=UTC), False),  # under fifty years ahead
        ("7611", datetime(2026, 11, 1, tzinfo=UTC), True),  # fifty: read as a century ago
    ],
)
def test_a_card_expiry_is_read_across_the_century(
    expiry: str, now: datetime, is_expired: bool
) -> None:
    """YYMM compared as a number: a card valid through 2100 was expired from 2099 on."""
    request, card, account = make_request(), make_card(expiry=expiry), make_account()
    decision = decide(request, card, account, NO_RULES, yymm(now))
    assert (decision.reason == "card_expired") == is_expired, decision
