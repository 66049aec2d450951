"""Ledger records: msgspec Structs stored as msgpack arrays.

`array_like=True` keeps records small and fast to decode; the price is that fields may only ever
be appended, each with a default, so older records still decode.
"""

from __future__ import annotations

from typing import Literal

import msgspec

CardStatus = Literal["active", "inactive", "frozen", "lost", "stolen", "closed"]
AccountStatus = Literal["active", "frozen", "closed"]
HoldStatus = Literal["open", "released", "captured", "expired"]


class Account(msgspec.Struct, array_like=True, kw_only=True, gc=False):
    id: str
    currency: str  # ISO 4217 alphabetic
    posted: int  # minor units
    held: int = 0  # sum of this account's open holds, kept in step with them
    credit_limit: int = 0
    status: AccountStatus = "active"
    event_sequence: int = 0  # the last per-account sequence number given to an outbox event

    @property
    def available(self) -> int:
        return self.posted + self.credit_limit - self.held


class Card(msgspec.Struct, array_like=True, kw_only=True, gc=False):
    card_id: str  # derived from the keyed PAN hash; safe to show
    account_id: str
    bin: str  # first six digits, for display
    last4: str
    pan_length: int
    expiry: str  # YYMM
    status: CardStatus = "active"
    per_transaction_limit: int | None = None
    blocked_mccs: tuple[str, ...] = ()

    @property
    def masked_pan(self) -> str:
        # Same rule as security.mask_pan: first 6 and last 4, and nothing of a short PAN.
        if self.pan_length < 13:
            return "*" * self.pan_length
        return f"{self.bin}{'*' * (self.pan_length - 10)}{self.last4}"


class Hold(msgspec.Struct, array_like=True, kw_only=True, gc=False):
    hold_id: int
    account_id: str
    card_id: str
    amount: int
    currency: str
    created_ms: int
    expires_ms: int
    approval_code: str
    identity: bytes  # acquirer|STAN|transmission date-time of the authorisation
    mcc: str
    rrn: str | None = None
    status: HoldStatus = "open"
    resolved_ms: int = 0  # when it was released, captured or expired
    captured_amount: int = 0  # the final amount a completion posted for it


class StoredAnswer(msgspec.Struct, array_like=True, kw_only=True, gc=False):
    """The answer given to a request, replayed byte for byte on retransmission.

    `response` holds the response's fields without the PAN (field 2), which the replay takes
    from the retransmitted request itself: its content must match `fingerprint` anyway.
    """

    fingerprint: bytes
    response: dict[str, str]
    response_code: str
    reason: str
    answered_ms: int
    card_id: str | None = None
    hold_id: int | None = None
    account_id: str | None = None
    posted_amount: int = 0  # debited from posted at once (0200 approval, force post)
    reversed_amount: int = 0  # credited back so far by reversals
    mti: str = ""  # the request's MTI


class ClearedRecord(msgspec.Struct, array_like=True, kw_only=True, gc=False):
    """A clearing (presentment) record applied to the ledger, kept under its record id.

    Its presence makes ingesting the record again a no-op; `fingerprint` tells a true duplicate
    from another record that reuses the id.
    """

    outcome: Literal["matched", "already_captured", "already_posted", "force_posted", "refund"]
    fingerprint: bytes  # keyed digest of the record's content, the PAN only as its card key
    processed_ms: int
    card_id: str
    account_id: str
    amount: int  # the record's amount, minor units of `currency`
    currency: str
    hold_id: int | None = None  # the hold it matched, captured or found captured


class OutboxRecord(msgspec.Struct, array_like=True, kw_only=True, gc=False):
    """The facts of one event for the programme, appended in the transaction of the change.

    Compact on purpose: the write path stores facts; processor/events.py renders the JSON
    event (masked PAN, amounts with currency and exponent, balances) off the hot path.
    """

    sequence: int  # global, gap-free within a ledger: the outbox key
    type: str
    created_ms: int
    account_id: str | None = None
    account_sequence: int = 0  # per account, so receivers can order
    card_id: str | None = None
    masked_pan: str | None = None
    answer_key: str | None = None  # the authorisation (message class|identity) it is about
    mti: str = ""
    processing_code: str | None = None
    amount: int | None = None  # field 4, minor units of `currency`
    currency: str | None = None  # field 49, ISO 4217 numeric
    billing_amount: int | None = None  # in the account currency, when converted
    mcc: str | None = None
    merchant_name_location: str | None = None
    terminal: str | None = None
    merchant_id: str | None = None
    response_code: str = ""
    reason: str = ""
    stan: str | None = None
    rrn: str | None = None
    acquirer: str | None = None
    approval_code: str | None = None
    hold_id: int | None = None
    posted_after: int | None = None
    held_after: int | None = None
    credit_limit: int | None = None
    account_currency: str | None = None
