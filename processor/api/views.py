"""Bodies of the control API: what it reads (requests) and what it answers (views).

These Structs are the contract of specs/openapi.yaml: the document's component schemas are
generated from them (`python -m processor.api.views` rewrites that section), and
tests/unit/test_api_openapi.py fails when the two drift. Views are rendered from ledger
records here, so no handler or command formats a record by hand (and none can put a PAN where
only a masked one belongs).
"""

from __future__ import annotations

import sys
import textwrap
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Annotated, Any, Final, Literal

import msgspec
from msgspec import UNSET, Meta, UnsetType

from processor.currency import alpha_code
from processor.engine.controls import Periods, period_start, recent_count, used
from processor.ledger.controls import (
    NO_CONTROLS,
    TRAILING_WINDOW_SECONDS_MAX,
    Controls,
    Usage,
    with_shorthands,
)
from processor.ledger.load import ACCOUNT_ID_CHARACTERS
from processor.ledger.records import (
    Account,
    AccountStatus,
    Card,
    Cardholder,
    CardholderKind,
    CardStatus,
    EntryKind,
    Hold,
    HoldStatus,
    KycStatus,
    LedgerEntry,
    StoredAnswer,
)
from processor.schemas import normalise_schema
from processor.types import CURRENCY_PATTERN, EXPIRY_PATTERN, PAN_PATTERN, TEXT_PATTERN

# --- field types -----------------------------------------------------------------------------

# The load file's account-id rule (processor/ledger/load.py), with its length bound spelt into
# the pattern so the document states it once.
ACCOUNT_ID_PATTERN: Final = rf"^{ACCOUNT_ID_CHARACTERS}{{1,64}}\Z"
CARD_ID_PATTERN: Final = r"^card_[0-9a-f]{20}\Z"
AccountId = Annotated[
    str,
    Meta(
        min_length=1,
        max_length=64,
        pattern=ACCOUNT_ID_PATTERN,
        description="Letters, digits and `_ . : -` (not dots alone), at most 64; never a card "
        "number (ids are shown in clear).",
    ),
]
CardId = Annotated[str, Meta(pattern=CARD_ID_PATTERN)]
CARDHOLDER_ID_PATTERN: Final = r"^ch_[0-9a-f]{20}\Z"
CardholderId = Annotated[str, Meta(pattern=CARDHOLDER_ID_PATTERN)]
CurrencyCode = Annotated[
    str,
    Meta(
        pattern=CURRENCY_PATTERN,
        description="ISO 4217 alphabetic code of a currency with a minor unit (EUR, JPY, BHD).",
    ),
]
MinorUnits = Annotated[
    int, Meta(ge=0, le=10**15, description="Minor units (cents), never a float.")
]
PositiveMinorUnits = Annotated[
    int, Meta(ge=1, le=10**15, description="Minor units of the account currency, above zero.")
]
SignedMinorUnits = Annotated[int, Meta(description="Minor units; negative when overdrawn.")]
# No control characters either: the reason goes on into the account's entries and whatever
# the programme prints them on (a NUL or an escape sequence in a statement line or a log).
Reason = Annotated[
    str,
    Meta(
        min_length=1,
        max_length=200,
        pattern=TEXT_PATTERN,
        description="Why, for the ledger entry (1-200 chars, no control characters); never a "
        "card number.",
    ),
]
Pan = Annotated[
    str,
    Meta(
        pattern=PAN_PATTERN,
        description="The full card number, 13-19 digits, Luhn-valid. Never answered back.",
    ),
]
Expiry = Annotated[str, Meta(pattern=EXPIRY_PATTERN, description="YYMM, valid to month end.")]
Timestamp = Annotated[datetime, Meta(tz=True, description="RFC 3339, UTC.")]
# In answers: no upper bound (a sum of many amounts may pass what one request may carry).
Amount = Annotated[int, Meta(ge=0, description="Minor units of the currency, never a float.")]


# --- errors ----------------------------------------------------------------------------------


class ErrorDetail(msgspec.Struct, kw_only=True, omit_defaults=True):
    """What went wrong: `code` is stable (program against it), `message` is for people."""

    code: Annotated[str, Meta(pattern=r"^[a-z][a-z0-9_]*\Z")]
    message: str
    # The one input at fault: a JSON path into the body ($.amount_limits[0].currency), or the
    # name of the query parameter or header (limit, Idempotency-Key).
    field: str | None = None
    details: dict[str, str] | None = None  # e.g. {"from": "lost", "to": "active"}


class ErrorBody(msgspec.Struct, kw_only=True):
    error: ErrorDetail


# --- requests --------------------------------------------------------------------------------


class NewAccount(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """An account to open, with a zero balance (fund it with POST .../fund)."""

    id: AccountId | None = None  # absent: the processor makes one ("acct_" + 24 hex digits)
    currency: CurrencyCode
    credit_limit: MinorUnits = 0
    controls: Controls | None = None
    cardholder_id: CardholderId | None = None  # whose account (must exist)


class Movement(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Funds in (fund) or out (debit) of an account's posted balance, as a ledger entry."""

    amount: PositiveMinorUnits
    reason: Reason


class NewVirtualCard(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    account_id: AccountId
    controls: Controls | None = None
    # Who gets it; absent: the account's cardholder. Its KYC must be approved
    # (programme.card_issuing.require_cardholder).
    cardholder_id: CardholderId | None = None


PRINTABLE: Final = Meta(pattern=TEXT_PATTERN, description="No control characters.")


class Address(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    line1: Annotated[str, Meta(min_length=1, max_length=100), PRINTABLE]
    line2: Annotated[str, Meta(max_length=100), PRINTABLE] | None = None
    city: Annotated[str, Meta(min_length=1, max_length=60), PRINTABLE]
    postal_code: Annotated[str, Meta(min_length=1, max_length=16), PRINTABLE]
    country: Annotated[str, Meta(pattern=r"^[A-Z]{2}\Z")]  # ISO 3166-1 alpha-2


class Individual(
    msgspec.Struct,
    kw_only=True,
    forbid_unknown_fields=True,
    omit_defaults=True,
    tag="individual",
    tag_field="type",
):
    """A person. Kept sealed (AES-256-GCM); never in logs, metrics or events."""

    name: Annotated[str, Meta(min_length=1, max_length=140), PRINTABLE]
    date_of_birth: Annotated[
        date, Meta(description="From 1900-01-01 to today (control.check_date_of_birth).")
    ]
    address: Address
    # No whitespace and no control characters (as PRINTABLE, in the one pattern msgspec takes).
    email: (
        Annotated[
            str,
            Meta(pattern=r"^[^@\s\x00-\x1f\x7f-\x9f]+@[^@\s\x00-\x1f\x7f-\x9f]+\Z", max_length=254),
        ]
        | None
    ) = None
    phone: Annotated[str, Meta(pattern=r"^\+[1-9][0-9]{6,14}\Z")] | None = None  # E.164


class Business(
    msgspec.Struct, kw_only=True, forbid_unknown_fields=True, tag="business", tag_field="type"
):
    """A company (KYB). Kept sealed like a person's data."""

    legal_name: Annotated[str, Meta(min_length=1, max_length=140), PRINTABLE]
    registration_number: Annotated[str, Meta(min_length=1, max_length=40), PRINTABLE]
    address: Address


CardholderDetails = Individual | Business  # the body's "type" says which


class NewCardholder(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A person or business to verify; KYC starts `pending` (POST .../kyc sets it)."""

    details: CardholderDetails


class NewPhysicalCard(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A card to print and ship; it authorises once the cardholder activates it."""

    account_id: AccountId
    shipping_address: Address
    controls: Controls | None = None
    cardholder_id: CardholderId | None = None  # absent: the account's cardholder


class FulfilmentUpdate(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The card bureau's progress on a physical card (forward only)."""

    status: Literal["ordered", "in_production", "shipped", "delivered"]


class CardReplacement(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Why the card is replaced; a physical card's replacement ships to `shipping_address`,
    or where the card it replaces went."""

    reason: Literal["lost", "stolen", "damaged", "expiring"]
    shipping_address: Address | None = None


class KycUpdate(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The programme's verification provider decided (or wants another look)."""

    status: KycStatus


class CardRegistration(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A card whose number was issued elsewhere (a card manufacturer, another processor)."""

    pan: Pan
    expiry: Expiry
    account_id: AccountId
    controls: Controls | None = None


# --- views -----------------------------------------------------------------------------------


class AccountView(msgspec.Struct, kw_only=True):
    """An account; `available` = posted + credit_limit - held."""

    id: str
    currency: str
    posted: SignedMinorUnits
    held: Amount
    available: SignedMinorUnits
    credit_limit: Amount
    status: AccountStatus
    controls: Controls
    created: Timestamp | None  # null for accounts loaded from a file before this was recorded
    cardholder_id: str | None  # whose account; null when none was named


class RevealTokenView(msgspec.Struct, kw_only=True):
    """A one-time token for the card-details page. Hand `url` (relative to this port) to the
    cardholder's browser; the token works once, for this card, until `expires`."""

    token: str
    url: str
    expires: Timestamp


class CardholderView(msgspec.Struct, kw_only=True):
    """A cardholder. `details` (the personal data) is answered on creation and to GET; the
    creating request's idempotent replay and the KYC update leave it out."""

    id: str
    type: CardholderKind
    kyc_status: KycStatus
    created: Timestamp
    updated: Timestamp
    details: CardholderDetails | UnsetType = UNSET


class EntryView(msgspec.Struct, kw_only=True):
    """One change of an account's posted balance made through the API (never an overwrite)."""

    sequence: Annotated[int, Meta(ge=1)]
    kind: EntryKind
    amount: Amount  # positive; `kind` says the direction
    reason: str
    created: Timestamp
    posted_after: SignedMinorUnits


class MovementResult(msgspec.Struct, kw_only=True):
    entry: EntryView
    account: AccountView


class EntriesPage(msgspec.Struct, kw_only=True):
    items: list[EntryView]  # newest first
    next_cursor: str | None  # pass as ?cursor= for the next page; null on the last page


class CardView(msgspec.Struct, kw_only=True):
    """A card as anyone may see it: the number masked (first six, last four)."""

    id: str
    account_id: str
    masked_pan: str
    expiry: Expiry
    status: CardStatus
    controls: Controls
    virtual: bool  # a virtual card of this processor's (false: physical, registered, loaded)
    created: Timestamp | None  # null for cards loaded from a file before this was recorded
    # The processor computed its CVC2 (a card it issued, virtual or physical) and checks the
    # CVC2 its authorisations carry; false: a registered or loaded card, whose CVC2 it never
    # knew.
    cvc2_checked: bool
    # CVC2 mismatches in a row; at security.cvc2_attempts_max its card-not-present use is
    # blocked until POST /v1/cards/{id}/reset-cvc2.
    cvc2_failures: Annotated[int, Meta(ge=0)]
    cardholder_id: str | None  # who holds it; null for cards from before cardholders
    # A physical card's fulfilment (ordered, in_production, shipped, delivered); null for a
    # virtual or registered card.
    fulfilment: str | None
    replaces: str | None  # the card this one replaces
    replaced_by: str | None  # the card that replaces this one


class IssuedCard(CardView, kw_only=True):
    """A new card (virtual, physical, or a replacement). `pan` is answered exactly once, in
    the response that created it.

    A replay of the request (same Idempotency-Key, same body) answers the same card WITHOUT
    `pan`: the processor never stores a card number, so it cannot give it again.
    """

    pan: Annotated[str, Meta(pattern=PAN_PATTERN)] | UnsetType = UNSET
    # The CVC2 to print or show, answered with `pan` and as rarely: computed, never stored.
    cvc2: Annotated[str, Meta(pattern=r"^[0-9]{3}\Z")] | UnsetType = UNSET


class CategoryUsage(msgspec.Struct, kw_only=True):
    amount: Amount
    count: Annotated[int, Meta(ge=0)]


class PeriodView(msgspec.Struct, kw_only=True):
    """Approved spend in the current period; 0 when nothing was approved in it yet."""

    start: date | None  # the period's first local day; null for all_time
    amount: Amount  # all spend, in the account currency
    count: Annotated[int, Meta(ge=0)]
    categories: dict[str, CategoryUsage]  # MCC category -> its share of the above


class TrailingView(msgspec.Struct, kw_only=True):
    """Approvals in the last 24 hours, what trailing-window count limits count."""

    window_seconds: int
    count: Annotated[int, Meta(ge=0)]
    categories: dict[str, Annotated[int, Meta(ge=0)]]


class UsageView(msgspec.Struct, kw_only=True):
    """What a card or an account has used against its spend controls, now.

    Calendar periods are those of the programme's time zone; a period that has ended shows 0.
    """

    scope: Literal["card", "account"]
    id: str
    currency: str  # the account currency, in which all amounts are
    time_zone: str
    as_of: Timestamp
    daily: PeriodView
    weekly: PeriodView
    monthly: PeriodView
    yearly: PeriodView
    all_time: PeriodView
    trailing: TrailingView


class AuthorizationView(msgspec.Struct, kw_only=True):
    """The processor's answer to one ISO 8583 request (authorisation, reversal, advice, ...)."""

    id: str  # message class|acquirer|STAN|transmission date-time; URL-encode it in paths
    mti: str  # the request's message type
    card_id: str | None
    account_id: str | None
    response_code: Annotated[str, Meta(pattern=r"^[0-9A-Z]{2}\Z")]  # field 39
    reason: str  # machine reason: approved, card_frozen, daily_amount_limit, ...
    amount: Amount | None  # field 4 of the answer (a partial approval's approved amount)
    currency: str | None  # ISO 4217 alphabetic, from field 49
    approval_code: str | None  # field 38
    hold_id: int | None  # the hold it opened, or the one a reversal or completion acted on
    # The state of the hold this request opened; null on a reversal or completion (the
    # authorisation that opened the hold shows its state).
    hold_status: HoldStatus | None
    # What the request moved on its account, in the account's currency (`billing_currency`),
    # which is not field 49's when the amount was converted: posted at once (0200, a
    # completion), credited back by reversals, and the hold it opened as it stands now
    # (shrunk by partial reversals; null without one) and what a completion captured of it.
    posted_amount: Amount
    reversed_amount: Amount
    hold_amount: Amount | None = None
    captured_amount: Amount | None = None
    billing_currency: str | None = None  # ISO 4217 alphabetic: the account's currency
    created: Timestamp


class AuthorizationsPage(msgspec.Struct, kw_only=True):
    items: list[AuthorizationView]  # newest first
    next_cursor: str | None  # pass as ?cursor= for the next page; null on the last page


# --- rendering -------------------------------------------------------------------------------


def timestamp(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


def _created(ms: int) -> datetime | None:
    return timestamp(ms) if ms else None


def account_view(account: Account) -> AccountView:
    return AccountView(
        id=account.id,
        currency=account.currency,
        posted=account.posted,
        held=account.held,
        available=account.available,
        credit_limit=account.credit_limit,
        status=account.status,
        controls=account.controls or NO_CONTROLS,
        created=_created(account.created_ms),
        cardholder_id=account.cardholder_id,
    )


def cardholder_view(holder: Cardholder, details: CardholderDetails | None = None) -> CardholderView:
    """`details` only where the caller opened the sealed data and may answer it."""
    return CardholderView(
        id=holder.id,
        type=holder.kind,
        kyc_status=holder.kyc_status,
        created=timestamp(holder.created_ms),
        updated=timestamp(holder.updated_ms),
        details=UNSET if details is None else details,
    )


def entry_view(entry: LedgerEntry) -> EntryView:
    return EntryView(
        sequence=entry.sequence,
        kind=entry.kind,
        amount=entry.amount,
        reason=entry.reason,
        created=timestamp(entry.created_ms),
        posted_after=entry.posted_after,
    )


def card_view(card: Card, cvc2_failures: int = 0, currency: str | None = None) -> CardView:
    """`cvc2_failures` from the card's state (CardState), which the card record does not hold;
    `currency` the account's, for a card whose record still has the older per-transaction
    limit: the controls shown are the ones the engine enforces (it folds them in too)."""
    return CardView(
        id=card.card_id,
        account_id=card.account_id,
        masked_pan=card.masked_pan,
        expiry=card.expiry,
        status=card.status,
        controls=card_controls(card, currency),
        virtual=card.virtual,
        created=_created(card.created_ms),
        cvc2_checked=card.cvc2_key is not None,
        cvc2_failures=cvc2_failures,
        cardholder_id=card.cardholder_id,
        fulfilment=card.fulfilment,
        replaces=card.replaces,
        replaced_by=card.replaced_by,
    )


def card_controls(card: Card, currency: str | None) -> Controls:
    """A card's controls as the engine enforces them: with the two shorthands an older card
    record (or a load file's) still carries folded in, the limit in `currency`."""
    limit = card.per_transaction_limit if currency is not None else None
    folded = with_shorthands(card.controls, limit, card.blocked_mccs, currency or "")
    return folded or NO_CONTROLS


def issued_card(card: Card, pan: str, cvc2: str | None) -> IssuedCard:
    view = card_view(card)
    return IssuedCard(**msgspec.structs.asdict(view), pan=pan, cvc2=UNSET if cvc2 is None else cvc2)


def _period_view(usage: Usage, interval: str, periods: Periods) -> PeriodView:
    amount, count = used(usage, interval, periods)
    categories: dict[str, CategoryUsage] = {}
    for name in sorted(usage.counters):
        if name:
            spent, times = used(usage, interval, periods, (name,))
            if times or spent:
                categories[name] = CategoryUsage(amount=spent, count=times)
    start = None if interval == "all_time" else period_start(periods, interval)
    return PeriodView(start=start, amount=amount, count=count, categories=categories)


def usage_view(
    scope: Literal["card", "account"],
    owner_id: str,
    currency: str,
    usage: Usage,
    periods: Periods,
    time_zone: str,
) -> UsageView:
    since = periods.at_ms - TRAILING_WINDOW_SECONDS_MAX * 1000
    categories = {}
    for name in sorted(usage.recent):
        if name:
            count = recent_count(usage, since, (name,))
            if count:
                categories[name] = count
    return UsageView(
        scope=scope,
        id=owner_id,
        currency=currency,
        time_zone=time_zone,
        as_of=timestamp(periods.at_ms),
        daily=_period_view(usage, "daily", periods),
        weekly=_period_view(usage, "weekly", periods),
        monthly=_period_view(usage, "monthly", periods),
        yearly=_period_view(usage, "yearly", periods),
        all_time=_period_view(usage, "all_time", periods),
        trailing=TrailingView(
            window_seconds=TRAILING_WINDOW_SECONDS_MAX,
            count=recent_count(usage, since, ()),
            categories=categories,
        ),
    )


def authorization_view(
    key: bytes, answer: StoredAnswer, hold: Hold | None, account_currency: str | None
) -> AuthorizationView:
    response = answer.response
    amount = response.get("4")
    currency = response.get("49")
    return AuthorizationView(
        id=key.decode("ascii"),
        mti=answer.mti or "",
        card_id=answer.card_id,
        account_id=answer.account_id,
        response_code=answer.response_code,
        reason=answer.reason,
        amount=int(amount) if amount is not None and amount.isdigit() else None,
        currency=alpha_code(currency) if currency is not None else None,
        approval_code=response.get("38"),
        hold_id=answer.hold_id,
        hold_status=None if hold is None else hold.status,
        posted_amount=answer.posted_amount,
        reversed_amount=answer.reversed_amount,
        hold_amount=None if hold is None else hold.amount,
        captured_amount=None if hold is None else hold.captured_amount,
        billing_currency=hold.currency if hold is not None else account_currency,
        created=timestamp(answer.answered_ms),
    )


# --- the OpenAPI document's component schemas ------------------------------------------------

SCHEMA_TYPES: Final[tuple[Any, ...]] = (
    ErrorBody,
    NewAccount,
    Movement,
    NewVirtualCard,
    CardRegistration,
    AccountView,
    MovementResult,
    EntriesPage,
    CardView,
    IssuedCard,
    UsageView,
    AuthorizationView,
    AuthorizationsPage,
    Controls,
    NewCardholder,
    KycUpdate,
    CardholderView,
    NewPhysicalCard,
    FulfilmentUpdate,
    CardReplacement,
    RevealTokenView,
)


def component_schemas() -> dict[str, Any]:
    """The `components.schemas` of specs/openapi.yaml, generated from the Structs above."""
    _, components = msgspec.json.schema_components(
        SCHEMA_TYPES, ref_template="#/components/schemas/{name}"
    )
    # Through JSON and back: defaults such as () become the [] a YAML or JSON reader sees.
    normalised: dict[str, Any] = normalise_schema(
        msgspec.json.decode(msgspec.json.encode(components))
    )
    return dict(sorted(normalised.items()))


SCHEMAS_MARKER: Final = "  schemas:"


def write_component_schemas(path: Path) -> None:
    """Rewrite the document's `components.schemas` (its last section) from the Structs."""
    import yaml  # a development tool's dependency (the `test` extra), not the daemon's

    text = path.read_text()
    head, found, _ = text.rpartition("\n" + SCHEMAS_MARKER)
    if not found:
        raise SystemExit(f"{path}: no line {SCHEMAS_MARKER!r} to replace")
    schemas = yaml.safe_dump(
        {"schemas": component_schemas()}, sort_keys=False, width=96, allow_unicode=True
    )
    path.write_text(head + "\n" + textwrap.indent(schemas, "  "))


if __name__ == "__main__":
    write_component_schemas(Path(sys.argv[1] if len(sys.argv) > 1 else "specs/openapi.yaml"))
