"""A card stopping for good (lost, stolen, closed): the one rule every path that stops one uses
(the control API's status changes and replacements, a load file's status).

A physical replacement that is not activated yet keeps the freeze the programme had on the card
it replaces. What counts is that card's status when it stops for good, not when the replacement
was ordered (the programme may freeze or unfreeze it in between): the stopped card records it
(`Card.frozen_when_activated`), and hands it on to its replacement, now or when one is ordered
later. A replacement lost in the post hands on what it carried.
"""

from __future__ import annotations

import msgspec

from processor.ledger.records import Card, CardStatus
from processor.ledger.store import Writer


def stopped(card: Card, status: CardStatus) -> Card:
    """`card` stopped with `status`, remembering whether the programme had it frozen (or, a
    replacement not activated, whether the card it was to replace was)."""
    frozen = card.status == "frozen" or card.frozen_when_activated
    return msgspec.structs.replace(card, status=status, frozen_when_activated=frozen)


def hand_on_freeze(writer: Writer, card: Card) -> None:
    """`card`, stopped, hands on its freeze to its replacement, if that is not activated yet."""
    if card.replaced_by is None:
        return
    found = writer.card_by_id(card.replaced_by)
    if found is None or found[1].status != "inactive":
        return
    key, successor = found
    if successor.frozen_when_activated != card.frozen_when_activated:
        successor = msgspec.structs.replace(
            successor, frozen_when_activated=card.frozen_when_activated
        )
        writer.put_card(key, successor, successor.account_id)
