"""GET /v1/authorizations' view: what a request moved on its account, in the account's currency."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from support import authorization, demo_ledger

from processor.api.control import _account_currency
from processor.api.views import AuthorizationView, authorization_view
from processor.authorizer import Authorizer
from processor.engine import ProgrammeRules
from processor.ledger.store import Ledger
from processor.security import PanHasher
from processor.wire.messages import AuthorizationRequest

HASHER = PanHasher(b"view-test-key")
NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
LOAD = "4761739001010085"  # demo-main, EUR


def view(ledger: Ledger, request: AuthorizationRequest) -> AuthorizationView:
    key = request.answer_key
    with ledger.read() as reader:
        answer = reader.answer(key)
        assert answer is not None
        hold = reader.hold_of(key, answer)
        return authorization_view(key, answer, hold, _account_currency(reader, answer.account_id))


def test_a_view_shows_the_hold_as_it_stands_and_amounts_in_the_accounts_currency(
    tmp_path: Path,
) -> None:
    """A partial reversal's hold of 60.00 read as the 100.00 approved, nothing saying what was
    held; a converted purchase's posted 9.00 EUR stood beside field 49's USD alone."""
    ledger = demo_ledger(tmp_path, HASHER)
    try:
        authorizer = Authorizer(ledger, HASHER, ProgrammeRules(), hold_lifetime_seconds=3600)
        original = authorization(LOAD, "000001", 10_000)
        pointing = f"0100000001{original.transmission_datetime}{123456:011d}{0:011d}"
        reversal = authorization(
            LOAD, "000002", 10_000, t="0400", **{"90": pointing, "95": f"{6000:012d}" + "0" * 30}
        )
        converted = authorization(
            LOAD, "000003", 1_000, t="0200", **{"49": "840", "6": "000000000900", "51": "978"}
        )
        outcomes = [
            authorizer.authorize_batch([request], NOW)[0]
            for request in (original, reversal, converted)
        ]
        assert [o.reason for o in outcomes] == ["approved", "partially_reversed", "approved"]
        held = view(ledger, original)
        assert (held.amount, held.currency, held.hold_status) == (10_000, "EUR", "open")
        assert (held.hold_amount, held.captured_amount, held.billing_currency) == (6_000, 0, "EUR")
        posted = view(ledger, converted)
        assert (posted.amount, posted.currency) == (1_000, "USD")
        assert (posted.posted_amount, posted.billing_currency, posted.hold_amount) == (
            900,
            "EUR",
            None,
        )
    finally:
        ledger.close()
