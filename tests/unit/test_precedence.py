"""Walks specs/decision_precedence.toml against decide().

Start from a request, card and account that fail every check of the table at once, then remove
one problem at a time, in table order: each step must be decided by the next reason of the table,
and the last state must be approved. The fixes are keyed by the reason they remove, so the walk
order comes from the table itself, not from this file.
"""

from __future__ import annotations

import importlib
import tomllib
from collections.abc import Callable
from typing import Any

import msgspec
import pytest

from processor.catalog import default_catalog
from processor.engine import Decision, ProgrammeRules, Spend, decide
from processor.engine.controls import periods_at, record_usage
from processor.engine.decide import CardCheck
from processor.ledger.controls import (
    AmountLimit,
    Channels,
    Controls,
    CountLimit,
    StrongAuthentication,
    Usage,
)
from processor.ledger.records import Account, Card
from processor.resources import spec_path
from processor.wire.messages import AuthorizationRequest

NOW_YYMM = 2611
NOW_MS = 1_795_000_000_000  # 2026-11-18, inside NOW_YYMM
PERIODS = periods_at(NOW_MS)
RULES = ProgrammeRules(catalog=default_catalog())


def merchant(country: str) -> str:
    """Field 43: name 25, city 13, country 2."""
    return f"{'CORNER SHOP':<25}{'SOMEWHERE':<13}{country}"


def used_once(amount: int, mcc: str) -> Usage:
    usage = Usage()
    record_usage(usage, amount, default_catalog().category(mcc), PERIODS)
    return usage


def eur(interval: str, amount: int, *categories: str) -> AmountLimit:
    return AmountLimit(
        interval=interval,  # type: ignore[arg-type]
        amount=amount,
        currency="EUR",
        categories=categories,
    )


# The module, not the function processor.engine re-exports under the same name.
decide_module = importlib.import_module("processor.engine.decide")


def load_table() -> list[dict[str, Any]]:
    rows = tomllib.loads(spec_path("decision_precedence.toml").read_text())["checks"]
    assert rows, "empty precedence table"
    return rows


TABLE = load_table()


class State(msgspec.Struct, kw_only=True):
    request: AuthorizationRequest
    card: Card | None
    account: Account
    programme: Controls
    card_usage: Usage
    account_usage: Usage
    account_missing: bool = False  # the card's account is absent from the ledger
    holder_rejected: bool = True  # the cardholder's KYC is rejected
    # A wrong CVC2 on a card whose card-not-present use is blocked (the request is e-commerce)
    card_check: CardCheck = CardCheck("mismatch", card_not_present_blocked=True)

    def decide(self) -> Decision:
        account = None if self.account_missing else self.account
        spend = Spend(self.programme, self.card_usage, self.account_usage, PERIODS)
        return decide(
            self.request,
            self.card,
            account,
            RULES,
            NOW_YYMM,
            spend,
            self.card_check,
            self.holder_rejected,
        )


def failing_everything() -> State:
    """Each field holds the first problem of a chain; each fix uncovers the next."""
    request = AuthorizationRequest(
        mti="0100",
        pan="4761739001010010",
        processing_code="990000",  # unsupported; fixed to 31 (a balance inquiry stops early)
        amount=0,  # invalid
        transmission_datetime="1124120000",
        stan="000001",
        expiry="2901",  # differs from the card's expiry
        mcc="7995",  # blocked as an MCC, then as a category; fixed to 5411, then to 6011 (cash)
        pos_entry_mode="051",
        pos_condition="59",  # e-commerce, switched off by the programme
        acquirer="123456",
        forwarding=None,
        rrn="000000000001",
        terminal="TERM0001",
        merchant_id="MERCHANT0000001",
        merchant_name_location=merchant("US"),  # blocked, then not in the EEA, then unknown
        additional_data=None,
        currency="000",  # not ISO 4217; fixed to USD, which has no rate to EUR
        billing_amount=None,
        billing_currency=None,
        echo={},
    )
    return State(
        request=request,
        card=None,  # unknown
        account=Account(
            id="acct-1",
            currency="EUR",
            posted=1_000,
            status="frozen",
            controls=Controls(
                blocked_categories=("gambling",),
                allowed_countries=("eea",),
                amount_limits=(eur("daily", 2_000, "cash"),),  # 1 000 of cash already used
            ),
        ),
        programme=Controls(
            channels=Channels(ecommerce=False),
            blocked_mccs=("7995",),
            blocked_countries=("US",),
            amount_limits=(eur("per_authorization", 1_000),),
            require_sca=StrongAuthentication(currency="EUR"),
        ),
        card_usage=used_once(1_000, "6011"),
        account_usage=used_once(1_000, "6011"),
        account_missing=True,
    )


def with_card(state: State, **changes: Any) -> State:
    assert state.card is not None
    return msgspec.structs.replace(state, card=msgspec.structs.replace(state.card, **changes))


def with_account(state: State, **changes: Any) -> State:
    return msgspec.structs.replace(state, account=msgspec.structs.replace(state.account, **changes))


def with_request(state: State, **changes: Any) -> State:
    return msgspec.structs.replace(state, request=msgspec.structs.replace(state.request, **changes))


def known_lost_card(state: State) -> State:
    card = Card(
        card_id="card_00112233445566778899",
        account_id=state.account.id,
        bin="476173",
        last4="0010",
        pan_length=16,
        expiry="2401",  # expired
        status="lost",
        controls=Controls(
            allowed_categories=("cash",),
            # Each already used 1 000 (or once) in its current period: the 1 500 asked breaks
            # them one after the other.
            amount_limits=tuple(
                eur(interval, 2_000)
                for interval in ("daily", "weekly", "monthly", "yearly", "all_time")
            ),
            count_limits=(
                *(
                    CountLimit(count=1, interval=interval)  # type: ignore[arg-type]
                    for interval in ("daily", "weekly", "monthly", "yearly", "all_time")
                ),
                CountLimit(count=1, window_seconds=3600),
            ),
        ),
    )
    return msgspec.structs.replace(state, card=card)


def with_programme(state: State, **changes: Any) -> State:
    return msgspec.structs.replace(
        state, programme=msgspec.structs.replace(state.programme, **changes)
    )


def with_account_controls(state: State, **changes: Any) -> State:
    assert state.account.controls is not None
    return with_account(state, controls=msgspec.structs.replace(state.account.controls, **changes))


def drop_first_card_limit(field: str) -> Callable[[State], State]:
    def fix(state: State) -> State:
        assert state.card is not None and state.card.controls is not None
        controls = state.card.controls
        remaining = getattr(controls, field)[1:]
        return with_card(state, controls=msgspec.structs.replace(controls, **{field: remaining}))

    return fix


# reason -> the change that removes exactly that problem (and may uncover the next one).
FIXES: dict[str, Callable[[State], State]] = {
    "card_not_found": known_lost_card,
    "card_account_missing": lambda s: msgspec.structs.replace(s, account_missing=False),
    "card_lost": lambda s: with_card(s, status="stolen"),
    "card_stolen": lambda s: with_card(s, status="frozen"),
    "card_frozen": lambda s: with_card(s, status="inactive"),
    "card_inactive": lambda s: with_card(s, status="closed"),
    "card_closed": lambda s: with_card(s, status="active"),
    "account_frozen": lambda s: with_account(s, status="closed"),
    "account_closed": lambda s: with_account(s, status="active"),
    "cardholder_rejected": lambda s: msgspec.structs.replace(s, holder_rejected=False),
    "card_expired": lambda s: with_card(s, expiry="3012"),
    "expiry_mismatch": lambda s: with_request(s, expiry="3012"),
    "cvc2_attempts_exceeded": lambda s: msgspec.structs.replace(
        s, card_check=CardCheck("mismatch")
    ),
    "cvc2_mismatch": lambda s: msgspec.structs.replace(s, card_check=CardCheck("missing")),
    "cvc2_missing": lambda s: msgspec.structs.replace(s, card_check=CardCheck("key_unavailable")),
    "cvc2_key_unavailable": lambda s: msgspec.structs.replace(s, card_check=CardCheck("match")),
    "unsupported_processing_code": lambda s: with_request(s, processing_code="310000"),
    "unknown_currency": lambda s: with_request(s, currency="840"),
    "currency_not_supported": lambda s: with_request(s, currency="978"),
    "balance_inquiry": lambda s: with_request(s, processing_code="000000"),
    "account_verified": lambda s: with_request(s, amount=None),
    "invalid_amount": lambda s: with_request(s, amount=1_500),
    "channel_blocked:ecommerce": lambda s: with_programme(s, channels=Channels()),
    "mcc_blocked": lambda s: with_programme(s, blocked_mccs=()),
    "mcc_category_blocked:gambling": lambda s: with_request(s, mcc="5411"),
    "mcc_not_allowed": lambda s: with_request(s, mcc="6011"),
    "country_blocked:US": lambda s: with_programme(s, blocked_countries=()),
    "country_not_allowed:US": lambda s: with_request(s, merchant_name_location=None),
    "country_unknown": lambda s: with_request(s, merchant_name_location=merchant("DE")),
    "per_authorization_amount_limit": lambda s: with_programme(s, amount_limits=()),
    "daily_amount_limit:cash": lambda s: with_account_controls(s, amount_limits=()),
    **{
        f"{interval}_amount_limit": drop_first_card_limit("amount_limits")
        for interval in ("daily", "weekly", "monthly", "yearly", "all_time")
    },
    **{
        f"{interval}_count_limit": drop_first_card_limit("count_limits")
        for interval in ("daily", "weekly", "monthly", "yearly", "all_time")
    },
    "trailing_count_limit": drop_first_card_limit("count_limits"),
    "insufficient_funds": lambda s: with_account(s, credit_limit=500),
    # The cardholder authenticated with 3-D Secure (field 48 subelement 42, position 3 = 2).
    "sca_required": lambda s: with_request(s, additional_data="R4203212"),
}


def decision_constants() -> list[Decision]:
    """Every Decision decide.py can return that is defined at module level."""
    found: list[Decision] = []
    for value in vars(decide_module).values():
        if isinstance(value, Decision):
            found.append(value)
        elif isinstance(value, dict):
            found.extend(v for v in value.values() if isinstance(v, Decision))
    return found


def rows_with_reason(reason: str) -> list[dict[str, Any]]:
    return [row for row in TABLE if reason in row["reasons"]]


def test_table_shape() -> None:
    reasons = [reason for row in TABLE for reason in row["reasons"]]
    assert len(reasons) == len(set(reasons)), "a reason listed in two rows"
    for row in TABLE:
        assert row["check"].strip()
        # Two digits, or a scheme's alphanumeric code (1A: Visa's "authenticate and retry").
        assert len(row["response_code"]) == 2 and row["response_code"].isalnum()
        assert row["reasons"]
    assert TABLE[-1]["response_code"] == "00" and TABLE[-1]["reasons"] == ["approved"]


def test_every_declining_reason_has_a_fix_for_the_walk() -> None:
    # Keeps this walk and the table in step: a new row needs a new fix here.
    table_reasons = {reason for row in TABLE[:-1] for reason in row["reasons"]}
    assert table_reasons == FIXES.keys()


def test_walk_the_table_one_fix_at_a_time() -> None:
    state = failing_everything()
    steps: list[tuple[str, str, str]] = []
    for row in TABLE[:-1]:
        for reason in row["reasons"]:
            decision = state.decide()
            steps.append((row["check"], decision.response_code, decision.reason))
            assert (decision.response_code, decision.reason) == (row["response_code"], reason), (
                f"after {len(steps) - 1} fixes, expected {row['response_code']}/{reason} "
                f"({row['check']}), got {decision.response_code}/{decision.reason}"
            )
            state = FIXES[reason](state)

    final = state.decide()
    last = TABLE[-1]
    assert final.response_code == last["response_code"]
    assert final.reason in last["reasons"]
    assert final.hold_amount == state.request.amount == 1_500
    # Every row of the table was the deciding one at least once along the way.
    assert {check for check, _, _ in steps} == {row["check"] for row in TABLE[:-1]}


def test_walk_start_really_fails_every_check() -> None:
    """Fixing any single problem of the starting state (given a card) never approves."""
    for reason in FIXES:
        state = failing_everything()
        if reason != "card_not_found":
            state = FIXES["card_not_found"](state)
        assert not FIXES[reason](state).decide().approved, reason


@pytest.mark.parametrize(
    "decision",
    [pytest.param(d, id=d.reason) for d in decision_constants()],
)
def test_every_reason_decide_can_return_is_in_the_table(decision: Decision) -> None:
    rows = rows_with_reason(decision.reason)
    assert len(rows) == 1, f"{decision.reason} is in {len(rows)} rows of the table"
    codes = {rows[0]["response_code"], *rows[0].get("response_codes_by_scheme", {}).values()}
    assert decision.response_code in codes


def test_every_table_row_is_a_decision_decide_returns() -> None:
    # "approved" is built per request (it carries the amount), not a module constant; control
    # refusals are built from the control that refused, and the walk above meets each of them.
    returned = {(d.response_code, d.reason) for d in decision_constants()} | {("00", "approved")}
    for row in TABLE:
        if row["check"].startswith("controls:"):
            assert "pattern" in row, row["check"]
            continue
        for reason in row["reasons"]:
            assert (row["response_code"], reason) in returned, row["check"]


def test_decision_constants_are_found() -> None:
    # Guards the introspection above: if it found nothing, the two tests above would be vacuous.
    reasons = {d.reason for d in decision_constants()}
    assert {"card_not_found", "card_frozen", "account_closed", "insufficient_funds"} <= reasons
    assert len(reasons) >= 16
