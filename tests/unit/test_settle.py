"""The pure verdicts of posting (capture) and voiding (reversal): every branch of each ladder."""

from __future__ import annotations

import pytest

from processor.engine.settle import Void, capture_verdict, repost_amount, void_verdict
from processor.ledger.records import Hold, StoredAnswer


def answer(  # type: ignore[no-untyped-def]
    code: str = "00",
    hold_id: int | None = None,
    posted: int = 0,
    reversed_: int = 0,
    mti: str = "0200",
    settled: int = 0,
):
    return StoredAnswer(
        fingerprint=b"f" * 16,
        response={},
        response_code=code,
        reason="approved",
        answered_ms=1,
        account_id="acct",
        card_id="card",
        hold_id=hold_id,
        posted_amount=posted,
        reversed_amount=reversed_,
        mti=mti,
        settled_ms=settled,
    )


def hold(status: str = "open", amount: int = 1000) -> Hold:
    return Hold(
        hold_id=7,
        account_id="acct",
        card_id="card",
        amount=amount,
        currency="978",
        created_ms=1,
        expires_ms=2,
        approval_code="123456",
        identity=b"id",
        mcc="5411",
        status=status,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize(
    ("original", "its_hold", "verdict"),
    [
        (None, None, "post"),  # no original: the network's word stands
        (answer(posted=500), None, "already_posted"),  # a 0200 posted at once
        (answer(posted=500, reversed_=500), None, "repost"),  # ... and reversed since
        (answer(posted=500, reversed_=1), None, "repost"),  # ... or reversed in part
        (answer(hold_id=7), hold("open"), "capture"),
        (answer(hold_id=7), hold("captured"), "already_captured"),
        (answer(hold_id=7), hold("released"), "post"),  # reversed before it was completed
        (answer(hold_id=7), hold("expired"), "post"),
        (answer(hold_id=7), None, "post"),  # its hold record is gone
        (answer("51"), None, "post"),  # a declined original holds nothing: post as told
    ],
)
def test_capture_ladder(original, its_hold, verdict) -> None:  # type: ignore[no-untyped-def]
    assert capture_verdict(original, its_hold) == verdict


@pytest.mark.parametrize(
    ("posted", "reversed_", "final", "posts"),
    [
        (700, 700, 700, 700),  # reversed whole, presented whole: all of it again
        (700, 300, 700, 300),  # reversed to 400: the 300 that no longer stands
        (700, 300, 400, 0),  # presented at what stands: nothing
        (700, 300, 100, 0),  # below it: nothing (a refund is a record of its own)
        (1400, 700, 700, 0),  # posted again once already: what stands is the final amount
    ],
)
def test_a_repost_posts_what_the_final_amount_is_above_what_stands(
    posted: int, reversed_: int, final: int, posts: int
) -> None:
    assert repost_amount(answer(posted=posted, reversed_=reversed_), final) == posts


@pytest.mark.parametrize(
    ("original", "its_hold", "target", "verdict"),
    [
        (answer("51"), None, 0, Void("original_declined")),
        (answer("05", hold_id=7), hold(), 0, Void("original_declined")),  # code before hold
        (answer("10", hold_id=7), hold(), 0, Void("release", amount=1000, whole=True)),
        (answer(hold_id=7), hold(), 0, Void("release", amount=1000, whole=True)),
        (answer(hold_id=7), hold(), 400, Void("shrink", amount=600, remaining=400)),
        (answer(hold_id=7), hold(), 999, Void("shrink", amount=1, remaining=999)),
        (answer(hold_id=7), hold(), 1000, Void("no_change", remaining=1000)),  # boundary
        (answer(hold_id=7), hold(), 5000, Void("no_change", remaining=1000)),
        (answer(hold_id=7), hold("released"), 0, Void("already_resolved")),
        (answer(hold_id=7), hold("captured"), 0, Void("already_resolved")),
        (answer(hold_id=7), hold("expired"), 400, Void("already_resolved")),
        (answer(hold_id=7), None, 0, Void("already_resolved")),
        (answer(posted=1000), None, 0, Void("credit", amount=1000, whole=True)),
        (answer(posted=1000), None, 300, Void("credit", amount=700, remaining=300)),
        (answer(posted=1000, reversed_=700), None, 0, Void("credit", amount=300, whole=True)),
        (answer(posted=1000, reversed_=700), None, 300, Void("already_resolved")),  # boundary
        (answer(posted=1000, reversed_=1000), None, 0, Void("already_resolved")),
        # Posted by a completion or presentment that found no hold (force_post): the 0100
        # of a balance inquiry, or the marker of an authorisation never seen (no MTI).
        (answer(posted=1000, mti="0100"), None, 0, Void("already_resolved")),
        (answer(posted=1000, mti=""), None, 0, Void("already_resolved")),
        # Posted again over its reversal by a presentment (settled): nothing goes back.
        (answer(posted=1400, reversed_=700, settled=5), None, 0, Void("already_resolved")),
        (answer(), None, 0, Void("nothing_to_reverse")),  # approved, neither held nor posted
    ],
)
def test_void_ladder(original, its_hold, target, verdict) -> None:  # type: ignore[no-untyped-def]
    assert void_verdict(original, its_hold, target) == verdict


def test_a_posted_original_without_an_account_cannot_be_credited() -> None:
    orphan = answer(posted=1000)
    orphan.account_id = None
    assert void_verdict(orphan, None, 0) == Void("already_resolved")
