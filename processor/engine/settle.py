"""Pure verdicts for what follows an authorisation: posting it (capture) and voiding it (reversal).

The 0220 completion and a clearing presentment both post an earlier authorisation, and a
0400/0420 reverses one; each used to decide between its ledger reads and writes, and the two
posting paths repeated the same ladder. Here each is one function of values the caller has
already read (the original's stored answer and its hold), returning what to do; the caller
applies it with the ledger writer's one operation for it. Nothing here reads or writes.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from processor.ledger.records import Hold, StoredAnswer

# What posting a transaction does, given its original authorisation (if one was found):
#   already_posted   a single-message original (0200) posted at once: posting again doubles it
#   repost           one posted, then reversed in whole or in part: the network's word stands
#                    over the reversal, and what the final amount is above what still stands
#                    of it is posted (repost_amount; nothing when it is not above)
#   already_captured a completion or presentment of the same authorisation posted it already
#   capture          the original's hold is open: close it and post the final amount
#   post             no original, or its hold was released or expired: the network's word stands
Capture = Literal["already_posted", "repost", "already_captured", "capture", "post"]


def capture_verdict(original: StoredAnswer | None, hold: Hold | None) -> Capture:
    """How to post a transaction whose original answer is `original` and its hold `hold`."""
    if original is not None and original.posted_amount:
        return "repost" if original.reversed_amount else "already_posted"
    if hold is not None:
        if hold.status == "captured":
            return "already_captured"
        if hold.status == "open":
            return "capture"
    return "post"


def repost_amount(original: StoredAnswer, final: int) -> int:
    """What a `repost` posts: the final amount (the account's currency) less what still stands
    of the original's posting after its reversals; 0 when that is not less."""
    return max(0, final - (original.posted_amount - original.reversed_amount))


class Void(msgspec.Struct, frozen=True, gc=False):
    """What a reversal does. `amount`: what goes back to the cardholder (held or posted)."""

    action: Literal[
        "original_declined",  # nothing was approved: nothing to give back
        "already_resolved",  # its hold is gone, or its posting was reversed already
        "release",  # release the whole hold
        "shrink",  # lower the hold to `remaining`
        "no_change",  # the replacement amount is not below the hold
        "credit",  # credit `amount` back to posted (a posted single-message original)
        "nothing_to_reverse",  # approved, but neither held nor posted (e.g. balance inquiry)
    ]
    amount: int = 0
    remaining: int = 0  # what the transaction is worth afterwards
    whole: bool = False  # the whole transaction is voided (usage given back with its count)


def void_verdict(original: StoredAnswer, hold: Hold | None, target: int) -> Void:
    """How to reverse `original` (with its hold, if it had one) down to `target` (0: fully).

    `target` is in the account's currency (the caller scales field 95 by the original's rate).
    """
    if original.response_code not in ("00", "10"):
        return Void("original_declined")
    if original.hold_id is not None:
        if hold is None or hold.status != "open":
            return Void("already_resolved")
        if target == 0:
            return Void("release", amount=hold.amount, whole=True)
        # Parts of a presentment may have posted some of it (captured_amount of an open
        # hold): the hold is what the transaction is worth less that.
        held_target = target - hold.captured_amount
        if held_target <= 0:
            return Void("release", amount=hold.amount)
        if held_target < hold.amount:
            return Void("shrink", amount=hold.amount - held_target, remaining=held_target)
        return Void("no_change", remaining=hold.amount)
    if original.posted_amount:
        if original.settled_ms:
            # Posted again over an earlier reversal by a presentment or completion: settled.
            return Void("already_resolved")
        if not original.mti.startswith("020"):
            # Not a purchase posted at once (0200): a completion or presentment posted it
            # without a hold to capture (no authorisation seen, or a balance inquiry's). The
            # authorisation's reversal then comes after the purchase was settled, as one after
            # a capture does: crediting it gave back money the merchant is paid.
            return Void("already_resolved")
        standing = original.posted_amount - original.reversed_amount
        credit = standing - target
        if credit <= 0 or original.account_id is None:
            return Void("already_resolved")
        return Void("credit", amount=credit, remaining=target, whole=target == 0)
    return Void("nothing_to_reverse")
