"""Events for the programme layer: JSON rendered from outbox records, and their JSON Schema.

The schema in specs/events.schema.json is generated from these Structs
(`python -m processor.events > specs/events.schema.json`); a test fails when it drifts.
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from typing import Literal

import msgspec

from processor.currency import UnknownCurrency, alpha_code, exponent
from processor.ledger.records import OutboxRecord
from processor.schemas import normalise_schema
from processor.types import EventType

# What a CVC2 sent with a message showed; absent when none was sent. Never the CVC2.
Cvc2Outcome = Literal["match", "mismatch", "not_checked", "key_unavailable", "missing"]


class Money(msgspec.Struct, frozen=True, kw_only=True):
    """An amount in minor units, with its ISO 4217 currency and exponent (never a float)."""

    amount: int
    currency: str
    exponent: int


class Merchant(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    mcc: str | None = None
    name_location: str | None = None  # field 43 as sent: name, city, country
    terminal: str | None = None
    merchant_id: str | None = None


class Balances(msgspec.Struct, frozen=True, kw_only=True):
    posted: Money
    held: Money
    available: Money


class NetworkIds(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    stan: str | None = None
    rrn: str | None = None
    acquirer: str | None = None
    approval_code: str | None = None


class EventData(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    authorization_id: str | None = None  # message class|acquirer|STAN|transmission date-time
    account_id: str | None = None
    card_id: str | None = None
    masked_pan: str | None = None  # first six and last four at most
    mti: str | None = None
    processing_code: str | None = None
    amount: Money | None = None  # as the network sent it (field 4 and 49)
    # In the account currency: what was held or charged when converted or partly approved;
    # what a reversal or completion moved when `amount` does not say it (specs/events.md).
    billing_amount: Money | None = None
    merchant: Merchant | None = None
    response_code: str | None = None
    reason: str  # machine reason, e.g. approved, card_frozen, orphan_reversal, hold_expired
    network: NetworkIds | None = None
    hold_id: int | None = None
    balance_after: Balances | None = None
    entry: int | None = None  # account.funded/debited: its entry (GET /v1/accounts/{id}/entries)
    # not_checked: the card has no card verification key (registered or loaded with its PAN)
    cvc2: Cvc2Outcome | None = None
    cardholder_id: str | None = None  # cardholder.* events (never personal data)
    kyc_status: str | None = None  # cardholder.* events: pending, approved, rejected, review


class Event(msgspec.Struct, frozen=True, kw_only=True):
    id: str  # unique and stable: the same event keeps its id on every delivery attempt
    type: EventType
    created: datetime
    account_sequence: int  # per account, from 1, so a receiver can order and spot gaps
    data: EventData


def _money(amount: int | None, currency: str | None) -> Money | None:
    if amount is None or currency is None:
        return None
    alpha = currency if not currency.isdigit() else alpha_code(currency)
    if alpha is None:
        return None
    try:
        digits = exponent(alpha)
    except UnknownCurrency:
        return None
    return Money(amount=amount, currency=alpha, exponent=digits)


def event_id(ledger_id: str, sequence: int) -> str:
    return f"evt_{ledger_id}{sequence:012x}"


def render(record: OutboxRecord, ledger_id: str) -> Event:
    balances = None
    currency = record.account_currency
    if currency is not None and record.posted_after is not None and record.held_after is not None:
        posted, held = record.posted_after, record.held_after
        available = posted + (record.credit_limit or 0) - held
        money = [_money(value, currency) for value in (posted, held, available)]
        if all(m is not None for m in money):
            balances = Balances(posted=money[0], held=money[1], available=money[2])  # type: ignore[arg-type]
    merchant = None
    if record.mcc or record.merchant_name_location or record.terminal or record.merchant_id:
        merchant = Merchant(
            mcc=record.mcc,
            name_location=record.merchant_name_location,
            terminal=record.terminal,
            merchant_id=record.merchant_id,
        )
    network = None
    if record.stan or record.rrn or record.acquirer or record.approval_code:
        network = NetworkIds(
            stan=record.stan,
            rrn=record.rrn,
            acquirer=record.acquirer,
            approval_code=record.approval_code,
        )
    return Event(
        id=event_id(ledger_id, record.sequence),
        type=record.type,  # type: ignore[arg-type]
        created=datetime.fromtimestamp(record.created_ms / 1000, UTC),
        account_sequence=record.account_sequence,
        data=EventData(
            authorization_id=record.answer_key,
            account_id=record.account_id,
            card_id=record.card_id,
            masked_pan=record.masked_pan,
            mti=record.mti or None,
            processing_code=record.processing_code,
            amount=_money(record.amount, record.currency or record.account_currency),
            billing_amount=_money(record.billing_amount, record.account_currency),
            merchant=merchant,
            response_code=record.response_code or None,
            reason=record.reason,
            network=network,
            hold_id=record.hold_id,
            balance_after=balances,
            entry=record.entry_sequence,
            cvc2=record.cvc2,  # type: ignore[arg-type]
            cardholder_id=record.cardholder_id,
            kyc_status=record.kyc_status,
        ),
    )


def schema() -> dict[str, object]:
    normalised: dict[str, object] = normalise_schema(msgspec.json.schema(Event))
    return normalised


if __name__ == "__main__":
    sys.stdout.write(msgspec.json.format(msgspec.json.encode(schema()), indent=2).decode() + "\n")
