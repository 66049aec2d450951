"""Constrained types that several layers name, each defined once (config and wire both use them).

The bottom of the import graph: this module imports nothing from the processor.
"""

from __future__ import annotations

from typing import Final, Literal

# How a listener delimits messages: len2 = 2-byte big-endian length of what follows,
# len2_inclusive = the same counting its own 2 bytes, ascii4 = 4 ASCII digits.
Framing = Literal["len2", "len2_inclusive", "ascii4"]
# The longest body (header + message) each framing can announce.
FRAME_BYTES_CEILING: Final[dict[str, int]] = {
    "len2": 65535,
    "len2_inclusive": 65533,
    "ascii4": 9999,
}
# Bitmaps as 16 hex ASCII characters or 8 raw bytes.
Bitmap = Literal["ascii", "binary"]

# What happened, as the programme's webhooks and the events API name it (processor/events.py);
# an endpoint's event_types (config) names these or "*".
EventType = Literal[
    "authorization.approved",
    "authorization.declined",
    "authorization.balance_inquiry",
    "authorization.advice",
    "authorization.reversed",
    "authorization.expired",
    "reversal.orphaned",
    "transaction.posted",
    "transaction.completed",
    "transaction.cleared",
    "transaction.refunded",
    "account.funded",
    "account.debited",
    "account.updated",
    "account.created",
    "card.created",
    "card.status_changed",
    "card.fulfilment_updated",
    "card.updated",
    "card.cvc2_locked",
    "card.cvc2_reset",
    "controls.updated",
    "cardholder.created",
    "cardholder.kyc_updated",
]

# --- patterns of input fields ----------------------------------------------------------------

# Ended with `\Z`, never `$`: msgspec matches a pattern with re.search, and Python's `$` also
# matches before a final newline, so "000001\n" passed ^[0-9]{6}$ (a clearing record then
# missed its hold and was debited again; a load wrote a card no read could decode).
# processor/schemas.py writes them with `$` for JSON Schema, whose `$` is the end alone.
PAN_PATTERN: Final = r"^[0-9]{13,19}\Z"
CURRENCY_PATTERN: Final = r"^[A-Z]{3}\Z"  # ISO 4217 alphabetic
EXPIRY_PATTERN: Final = r"^[0-9]{2}(0[1-9]|1[0-2])\Z"  # YYMM
MCC_PATTERN: Final = r"^[0-9]{4}\Z"
# Field 7 and its parts, each within its range (days up to 31 in any month: the ranges, not
# the calendar): the wire checks a message's, clearing a record's with the same parts.
MONTH_PART: Final = "(0[1-9]|1[0-2])"
DAY_PART: Final = "(0[1-9]|[12][0-9]|3[01])"
HOUR_PART: Final = "([01][0-9]|2[0-3])"
MINUTE_OR_SECOND_PART: Final = "[0-5][0-9]"
TRANSMISSION_DATETIME_PATTERN: Final = (
    f"^{MONTH_PART}{DAY_PART}{HOUR_PART}{MINUTE_OR_SECOND_PART}{MINUTE_OR_SECOND_PART}\\Z"
)
# Text a person typed (names, addresses): no control characters (C0, DEL, C1), which break the
# card bureau's labels and every log or screen that shows them, and which no name has.
TEXT_PATTERN: Final = r"^[^\x00-\x1f\x7f-\x9f]*\Z"
