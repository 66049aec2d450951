"""Append events for the programme to the outbox, in the write transaction of the change.

Because the event is written by the same LMDB transaction as the hold or posting it describes,
there is never a change without its event nor an event for a change that was not committed.
Only facts are stored here (processor.ledger.records.OutboxRecord); rendering the JSON event
happens when it is read (processor/events.py), off the authorisation path.
"""

from __future__ import annotations

from typing import Final

from processor.ledger.records import OutboxRecord
from processor.security import mask_pan
from processor.wire.messages import AuthorizationRequest

# The event type of an answered message, by message class and whether it was approved.
APPROVED_TYPES: Final = {
    "0100": "authorization.approved",
    "0200": "transaction.posted",
    "0120": "authorization.advice",
    "0220": "transaction.completed",
    "0400": "authorization.reversed",
    "0420": "authorization.reversed",
}
DECLINED_TYPES: Final = {
    "0100": "authorization.declined",
    "0200": "authorization.declined",
    "0120": "authorization.advice",
    "0220": "transaction.completed",
    "0400": "reversal.orphaned",
    "0420": "authorization.reversed",
}
ORPHAN_REASONS: Final = frozenset({"orphan_reversal", "original_not_found"})


def event_type(message_class: str, response_code: str, reason: str) -> str:
    if reason == "balance_inquiry":
        return "authorization.balance_inquiry"
    if reason == "account_verified":  # 85: not declined, an approval of nothing
        return "authorization.approved"
    if reason in ORPHAN_REASONS:
        return "reversal.orphaned"
    if response_code in ("00", "10"):
        return APPROVED_TYPES[message_class]
    return DECLINED_TYPES[message_class]


def request_facts(
    request: AuthorizationRequest,
    answer_key: bytes,
    now_ms: int,
    response: dict[str, str],
    *,
    type: str,
    card_id: str | None,
    account_id: str | None,
    cvc2: str | None = None,
    billing_amount: int | None = None,
) -> OutboxRecord:
    """What the event says about a message beyond its stored answer (`answer_key`).

    The answer, stored in the same transaction, already holds the MTI, the echoed fields
    (processing code, amount, currency, terminal, STAN, RRN, acquirer), the approval code, the
    codes and the card; Reader.outbox fills them in. What the answer does not keep is kept
    here: the MCC and merchant, the amount the network asked for when the answer approved
    less (10), the masked PAN of a card the ledger does not know, and what a reversal or
    completion moved in the account's currency when field 4 does not say it (`billing_amount`,
    which the reader keeps).
    """
    asked = request.amount
    return OutboxRecord(
        sequence=0,
        type=type,
        created_ms=now_ms,
        account_id=account_id,
        masked_pan=mask_pan(request.pan) if card_id is None else None,
        answer_key=answer_key.decode("ascii"),
        amount=asked if asked is not None and response.get("4") != f"{asked:012d}" else None,
        mcc=request.mcc or None,
        merchant_name_location=request.merchant_name_location,
        in_answer=True,
        cvc2=cvc2,
        billing_amount=billing_amount,
    )
