"""decide(): one authorisation request against one card and account, as of `now_yymm`.

A ladder of early returns in the precedence of specs/decision_precedence.toml (a test walks that
table against this function). Declines are values, never exceptions. Time is passed in so the
same inputs always give the same decision.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Final, Literal

import msgspec

from processor.currency import alpha_code
from processor.engine.controls import (
    EMPTY_CATALOG,
    Catalog,
    Periods,
    channels_of,
    country_of,
    limit_refusal,
    place_refusal,
)
from processor.engine.fx import convert
from processor.ledger.controls import Controls, Usage, with_shorthands
from processor.ledger.records import Account, Card
from processor.wire.messages import AuthorizationRequest


class Decision(msgspec.Struct, frozen=True, gc=False):
    response_code: str  # ISO 8583 field 39
    reason: str  # machine reason, stable: programmes and dashboards key on it
    hold_amount: int = 0  # minor units of the account currency to hold when approved
    balance_inquiry: bool = False
    # Set when the transaction currency differs from the account's: the amount in the account
    # currency, answered in fields 6 and 51.
    billing_amount: int | None = None
    # Approved without strong customer authentication under the low-value exemption: the
    # card's count since its last authenticated approval grows (specs/sca.md).
    low_value_exemption: bool = False

    @property
    def approved(self) -> bool:
        return self.response_code in ("00", "10")


class ProgrammeRules(msgspec.Struct, frozen=True):
    # (transaction currency, account currency) -> account units per transaction unit
    rates: dict[tuple[str, str], Decimal] = msgspec.field(default_factory=dict)
    fx_markup_bps: int = 0
    catalog: Catalog = EMPTY_CATALOG  # MCC categories and country groups the controls name


Cvc2Result = Literal["match", "mismatch", "not_checked", "key_unavailable", "missing"]


class CardCheck(msgspec.Struct, frozen=True, gc=False):
    """What the card's security codes showed (processor/lifecycle.py holds the keys and
    computes; decide() only weighs the outcome, in its place in the precedence)."""

    cvc2: Cvc2Result | None  # None: the request carried no CVC2
    card_not_present_blocked: bool = False  # security.cvc2_attempts_max mismatches in a row


class Spend(msgspec.Struct, frozen=True, gc=False):
    """What the spend controls need beyond the request, card and account."""

    programme: Controls | None  # programme-level controls, read in the batch's transaction
    card_usage: Usage
    account_usage: Usage
    periods: Periods  # the calendar periods of "now" in the programme's time zone
    # Low-value SCA exemptions used since the card's last authenticated approval (CardState).
    sca_exempt_count: int = 0
    sca_exempt_amount: int = 0


def billing_amount(
    request: AuthorizationRequest, account: Account, rules: ProgrammeRules
) -> int | None:
    """The request's amount in the account currency, or None when it cannot be known.

    Same currency: field 4. Otherwise the network's cardholder billing amount (field 6) when it
    is in the account currency (field 51), else a conversion with the programme's rates.
    """
    amount = request.amount
    if amount is None:
        return None
    source = alpha_code(request.currency)
    if source == account.currency:
        return amount
    billed = network_billing(request, account)
    if billed is not None:
        return billed
    if source is None:
        return None
    return convert(amount, source, account.currency, rules.rates, rules.fx_markup_bps)


def network_billing(request: AuthorizationRequest, account: Account) -> int | None:
    """The network's own conversion: field 6 when field 51 says it is the account's currency."""
    billing = request.billing_amount
    if (
        billing is not None
        and billing.isdigit()
        and request.billing_currency is not None
        and alpha_code(request.billing_currency) == account.currency
    ):
        return int(billing)
    return None


PURCHASE: Final = "00"
CASH: Final = "01"
PURCHASE_WITH_CASHBACK: Final = "09"
BALANCE_INQUIRY: Final = "31"
# What moves the cardholder's money towards a merchant: held (0100, 0120), posted (0200, 0220).
SPEND_TRANSACTION_TYPES: Final = frozenset({PURCHASE, CASH, PURCHASE_WITH_CASHBACK})
SUPPORTED_TRANSACTION_TYPES: Final = SPEND_TRANSACTION_TYPES | {BALANCE_INQUIRY}

# Preallocated: a decline allocates nothing on the hot path.
UNKNOWN_CARD: Final = Decision("14", "card_not_found")
ACCOUNT_VERIFIED: Final = Decision("85", "account_verified")  # ISO 8583: no reason to decline
ACCOUNT_MISSING: Final = Decision("96", "card_account_missing")
CARD_LOST: Final = Decision("41", "card_lost")
CARD_STOLEN: Final = Decision("43", "card_stolen")
CARD_RESTRICTED: Final = {
    "frozen": Decision("62", "card_frozen"),
    "inactive": Decision("62", "card_inactive"),
    "closed": Decision("62", "card_closed"),
}
ACCOUNT_RESTRICTED: Final = {
    "frozen": Decision("62", "account_frozen"),
    "closed": Decision("62", "account_closed"),
}
# The card's cardholder (or its account's) failed KYC after the card was issued.
CARDHOLDER_REJECTED: Final = Decision("62", "cardholder_rejected")
CARD_EXPIRED: Final = Decision("54", "card_expired")
EXPIRY_MISMATCH: Final = Decision("54", "expiry_mismatch")
CVC2_ATTEMPTS_EXCEEDED: Final = Decision("57", "cvc2_attempts_exceeded")
CVC2_MISMATCH: Final = Decision("82", "cvc2_mismatch")
CVC2_MISSING: Final = Decision("82", "cvc2_missing")
CVC2_KEY_UNAVAILABLE: Final = Decision("96", "cvc2_key_unavailable")
UNSUPPORTED_PROCESSING_CODE: Final = Decision("12", "unsupported_processing_code")
UNKNOWN_CURRENCY: Final = Decision("12", "unknown_currency")
CURRENCY_NOT_SUPPORTED: Final = Decision("57", "currency_not_supported")
BALANCE: Final = Decision("00", "balance_inquiry", balance_inquiry=True)
INVALID_AMOUNT: Final = Decision("13", "invalid_amount")
AMOUNT_MAX: Final = 999_999_999_999  # what an n12 amount field (4, 6) can carry
INSUFFICIENT_FUNDS: Final = Decision("51", "insufficient_funds")
# The schemes' soft declines for "authenticate and try again" (PSD2): Visa-style 1A,
# Mastercard-style 65, by the card's scheme (its first digit).
SCA_REQUIRED_VISA: Final = Decision("1A", "sca_required")
SCA_REQUIRED_MASTERCARD: Final = Decision("65", "sca_required")


def card_not_present(request: AuthorizationRequest) -> bool:
    """E-commerce or mail/telephone order (fields 22 and 25): where a CVC2 stands in for
    the card."""
    channels = channels_of(request.processing_code, request.pos_entry_mode, request.pos_condition)
    return "ecommerce" in channels or "manual" in channels


def yymm(now: datetime) -> int:
    """2026-11-24 -> 2611: the form of a card's expiry (see expired)."""
    return (now.year % 100) * 100 + now.month


def expired(expiry: str, now_yymm: int) -> bool:
    """Whether a card valid through `expiry` (YYMM) has expired by the month `now_yymm`.

    YYMM has no century: compared as numbers, a card valid through 2100 ("0012") was expired
    from 2099 on (9912 > 12), and from about 2095 a card issued for five years was declined at
    its first use. The months from now to the expiry are taken modulo a century instead:
    under fifty years ahead is valid, and behind it expired (no card is issued for longer)."""
    value = int(expiry)
    months = (value // 100 * 12 + value % 100) - (now_yymm // 100 * 12 + now_yymm % 100)
    return months % 1200 >= 600


def _control_levels(
    spend: Spend | None, card: Card, account: Account
) -> list[tuple[Controls, Usage]]:
    """(controls, the usage its limits count) of the programme, the account and the card that
    have any, in that order."""
    levels: list[tuple[Controls, Usage]] = []
    if spend is None:
        return levels
    if spend.programme is not None:
        levels.append((spend.programme, spend.card_usage))
    if account.controls is not None:
        levels.append((account.controls, spend.account_usage))
    own = card.controls
    if card.per_transaction_limit is not None or card.blocked_mccs:
        # A record from before card controls: its shorthands are its controls.
        own = with_shorthands(own, card.per_transaction_limit, card.blocked_mccs, account.currency)
    if own is not None:
        levels.append((own, spend.card_usage))
    return levels


def decide(
    request: AuthorizationRequest,
    card: Card | None,
    account: Account | None,
    rules: ProgrammeRules,
    now_yymm: int,
    spend: Spend | None = None,
    card_check: CardCheck | None = None,
    holder_rejected: bool = False,
) -> Decision:
    """`spend` None: no controls at any level (tests of the other checks, tools); `card_check`
    None: no security code was sent or looked at; `holder_rejected`: the KYC of the card's
    cardholder or of its account's is rejected (the programme's provider said no)."""
    if card is None:
        return UNKNOWN_CARD
    if account is None:
        return ACCOUNT_MISSING
    status = card.status
    if status != "active":
        if status == "lost":
            return CARD_LOST
        if status == "stolen":
            return CARD_STOLEN
        return CARD_RESTRICTED[status]
    if account.status != "active":
        return ACCOUNT_RESTRICTED[account.status]
    if holder_rejected:
        return CARDHOLDER_REJECTED
    # A card is valid through the last day of its expiry month.
    if expired(card.expiry, now_yymm):
        return CARD_EXPIRED
    if request.expiry is not None and request.expiry != card.expiry:
        return EXPIRY_MISMATCH
    if card_check is not None:
        # Blocked: card-not-present use, and any request carrying a CVC2 whatever its
        # channel fields say (else the count could be guessed past on a "chip" request).
        if card_check.card_not_present_blocked and (
            card_check.cvc2 is not None or card_not_present(request)
        ):
            return CVC2_ATTEMPTS_EXCEEDED
        cvc2 = card_check.cvc2
        if cvc2 == "mismatch":
            return CVC2_MISMATCH
        if cvc2 == "missing":  # security.cvc2_required_card_not_present
            return CVC2_MISSING
        if cvc2 == "key_unavailable":  # the card's key was removed from the configuration
            return CVC2_KEY_UNAVAILABLE
    transaction_type = request.transaction_type
    if transaction_type not in SUPPORTED_TRANSACTION_TYPES:
        return UNSUPPORTED_PROCESSING_CODE
    source = alpha_code(request.currency)
    if source is None:
        return UNKNOWN_CURRENCY
    if transaction_type == BALANCE_INQUIRY:
        return BALANCE
    levels = _control_levels(spend, card, account)
    if levels:
        refusal = place_refusal(
            levels,
            mcc=request.mcc,
            country=country_of(request.merchant_name_location),
            channels=channels_of(
                request.processing_code, request.pos_entry_mode, request.pos_condition
            ),
            catalog=rules.catalog,
        )
        if refusal is not None:
            return Decision(refusal.response_code, refusal.reason)
    amount = request.amount
    if amount == 0 and transaction_type == PURCHASE:
        # A purchase of zero is an account verification (a card stored on file, added to a
        # wallet): status, expiry, CVC2 and where the card may be used passed above (a card
        # verified at a merchant its controls block was declined at its first purchase). 85,
        # nothing held or counted; a 13 declined every merchant that checks a card before it
        # keeps it.
        return ACCOUNT_VERIFIED
    if not amount:  # absent, or zero outside a purchase
        return INVALID_AMOUNT
    converted = source != account.currency
    if converted:
        amount = billing_amount(request, account, rules)
        if amount is None:
            return CURRENCY_NOT_SUPPORTED
        if amount <= 0 or amount > AMOUNT_MAX:
            # A billing amount (field 6) of 0, or a few units that convert to less than one
            # minor unit: approving it would hold and post nothing. Past what field 6 (n12)
            # carries, the approval would be held with an answer that cannot be encoded,
            # never sent (nor any repeat's).
            return INVALID_AMOUNT
    if levels:
        assert spend is not None  # levels come from it
        refusal = limit_refusal(
            levels,
            mcc=request.mcc,
            amount=amount,
            currency=account.currency,
            periods=spend.periods,
            catalog=rules.catalog,
        )
        if refusal is not None:
            return Decision(refusal.response_code, refusal.reason)
    available = account.posted + account.credit_limit - account.held
    # Partial approvals answer an amount in field 4, the transaction currency: only offered
    # when no conversion stands between the two.
    partial = amount > available
    if partial and not (
        available > 0
        and not converted
        and transaction_type == PURCHASE
        and request.partial_approval_supported
    ):
        return INSUFFICIENT_FUNDS
    # Strong authentication is asked for only what would otherwise be approved: a cardholder
    # is not sent through 3-D Secure to be declined for funds after it. Its thresholds weigh
    # the payment's amount, not the part a partial approval holds (RTS article 16: a 50.00
    # payment is no low-value one because 25.00 of it is approved).
    sca = "" if spend is None else strong_authentication(request, card, account, spend, amount)
    if sca == "required":
        return SCA_REQUIRED_VISA if card.bin[:1] == "4" else SCA_REQUIRED_MASTERCARD
    exempt = sca == "low_value"
    if partial:
        return Decision("10", "partial_approval", hold_amount=available, low_value_exemption=exempt)
    if converted:
        return Decision(
            "00", "approved", hold_amount=amount, billing_amount=amount, low_value_exemption=exempt
        )
    if exempt:
        return Decision("00", "approved", hold_amount=amount, low_value_exemption=True)
    return Decision("00", "approved", hold_amount=amount)


def strong_authentication(
    request: AuthorizationRequest, card: Card, account: Account, spend: Spend, amount: int
) -> Literal["", "required", "low_value"]:
    """Whether PSD2 strong customer authentication stands between this request and approval:
    "required" (soft decline), "low_value" (exempt, and counted), "" (not needed).

    Only e-commerce the network says was not authenticated, and not merchant-initiated or
    recurring, is in scope; every level's `require_sca` in the account's currency applies,
    the strictest deciding.
    """
    # Every approval passes here and nearly none has a rule: out before building anything.
    programme, own, card_level = spend.programme, account.controls, card.controls
    if (
        (programme is None or programme.require_sca is None)
        and (own is None or own.require_sca is None)
        and (card_level is None or card_level.require_sca is None)
    ):
        return ""
    rules = [
        controls.require_sca
        for controls in (programme, own, card_level)
        if controls is not None
        and controls.require_sca is not None
        and controls.require_sca.currency == account.currency
    ]
    if not rules or request.cardholder_authenticated or request.sca_out_of_scope:
        return ""
    channels = channels_of(request.processing_code, request.pos_entry_mode, request.pos_condition)
    if "ecommerce" not in channels:
        return ""
    verdict: Literal["", "required", "low_value"] = ""
    for rule in rules:
        if amount <= rule.above:
            continue
        total, count = rule.low_value_total_max, rule.low_value_count_max
        if (
            (total or count)  # no cap, no exemption: RTS article 16 (stored before refused)
            and amount <= rule.low_value_max
            and (not total or spend.sca_exempt_amount + amount <= total)
            and (not count or spend.sca_exempt_count < count)
        ):
            verdict = "low_value"
            continue
        return "required"
    return verdict
