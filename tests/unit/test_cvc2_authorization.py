"""CVC2 in authorisations: checked for cards with a key, counted, locked out, reset."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import pytest
from support import authorization, demo_ledger

from processor.api import commands
from processor.authorizer import Authorizer, Outcome
from processor.config import CardVerificationRange
from processor.cvc2 import NO_KEYS, CardVerificationKeys, compute_cvc2, keys_from_environment
from processor.engine import ProgrammeRules
from processor.ledger.store import Ledger
from processor.security import PanHasher
from processor.wire.messages import AuthorizationRequest

HASHER = PanHasher(b"cvc2-test-key")
NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
PAN = "4761739001010085"  # demo-main, expiry 3012 in the demo data
REGISTERED = "4761739001010069"  # demo-low: loaded with its PAN, no key
KEY = "4A6F686E4361726473313233343536FE"  # any double-length key but the published one
KEYS = keys_from_environment(
    (CardVerificationRange(bin_prefix="476173", key_envs=("CVK",)),), {"CVK": KEY}
)
KCV = KEYS.issuing(PAN)[0]  # type: ignore[index]
RIGHT = compute_cvc2(bytes.fromhex(KEY), PAN, "3012")
assert RIGHT is not None
WRONG = f"{(int(RIGHT) + 1) % 1000:03d}"
ECOMMERCE = {"22": "810", "25": "59"}
CHIP = {"22": "051", "25": "00"}


def message(
    stan: str, cvc2: str | None, pan: str = PAN, amount: int = 100, **channel: str
) -> AuthorizationRequest:
    extra = {"48": f"R92{len(cvc2):02d}{cvc2}"} if cvc2 is not None else {}
    return authorization(
        pan, stan, amount, **{"37": f"63301200{stan[-4:]}"}, **(channel or ECOMMERCE), **extra
    )


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    ledger = demo_ledger(tmp_path, HASHER)
    # As if the processor had issued demo-main's card: its CVC2 computed with the range's key.
    with ledger.write() as writer:
        card = writer.card(HASHER.card_key(PAN))
        assert card is not None and card.expiry == "3012"
        writer.put_card(
            HASHER.card_key(PAN), msgspec.structs.replace(card, cvc2_key=KCV), card.account_id
        )
    yield ledger
    ledger.close()


def authorizer(
    ledger: Ledger, keys: CardVerificationKeys = KEYS, *, required: bool = False
) -> Authorizer:
    return Authorizer(
        ledger,
        HASHER,
        ProgrammeRules(),
        hold_lifetime_seconds=3600,
        card_keys=keys,
        cvc2_attempts_max=3,
        cvc2_required_card_not_present=required,
    )


def answer(
    ledger: Ledger, request: AuthorizationRequest, keys: CardVerificationKeys = KEYS
) -> Outcome:
    [outcome] = authorizer(ledger, keys).authorize_batch([request], NOW)
    return outcome


def events_after(ledger: Ledger, first: int) -> list[tuple[str, str, str | None]]:
    """(type, reason, cvc2 outcome) of the events from sequence `first` on."""
    with ledger.read() as reader:
        return [(r.type, r.reason, r.cvc2) for r in reader.outbox(first, 100)]


def last_event(ledger: Ledger) -> int:
    with ledger.read() as reader:
        return reader.outbox_last_sequence()


def failures(ledger: Ledger) -> int:
    with ledger.read() as reader:
        card = reader.card(HASHER.card_key(PAN))
        assert card is not None
        return reader.card_state(card).cvc2_failures


def test_the_right_cvc2_is_approved_and_the_event_says_it_matched(ledger: Ledger) -> None:
    first = last_event(ledger) + 1
    outcome = answer(ledger, message("000001", RIGHT))
    assert (outcome.response_code, outcome.reason) == ("00", "approved")
    assert events_after(ledger, first) == [("authorization.approved", "approved", "match")]


def test_three_wrong_in_a_row_block_card_not_present_use_until_reset(ledger: Ledger) -> None:
    first = last_event(ledger) + 1
    for n in range(3):
        outcome = answer(ledger, message(f"00000{n + 1}", WRONG))
        assert (outcome.response_code, outcome.reason) == ("82", "cvc2_mismatch")
        assert failures(ledger) == n + 1
    assert events_after(ledger, first) == [
        ("authorization.declined", "cvc2_mismatch", "mismatch"),
        ("authorization.declined", "cvc2_mismatch", "mismatch"),
        ("authorization.declined", "cvc2_mismatch", "mismatch"),
        ("card.cvc2_locked", "cvc2_attempts_exceeded", None),  # after the decline that locked
    ]
    # Now even the right CVC2, or none, is refused on the web; the card still works in a shop.
    for stan, cvc2 in (("000004", RIGHT), ("000005", None)):
        outcome = answer(ledger, message(stan, cvc2))
        assert (outcome.response_code, outcome.reason) == ("57", "cvc2_attempts_exceeded")
    assert answer(ledger, message("000006", None, **CHIP)).response_code == "00"
    assert failures(ledger) == 3

    card_id = events_of_card(ledger)
    before = last_event(ledger)
    reply = run(ledger, commands.reset_cvc2(card_id))
    assert reply["cvc2_failures"] == 0 and reply["cvc2_checked"] is True
    assert events_after(ledger, before + 1) == [("card.cvc2_reset", "cvc2_reset", None)]
    run(ledger, commands.reset_cvc2(card_id))  # nothing to reset: no event
    assert last_event(ledger) == before + 1
    assert answer(ledger, message("000007", RIGHT)).response_code == "00"


def test_a_locked_card_takes_no_cvc2_on_any_channel(ledger: Ledger) -> None:
    for n in range(3):
        answer(ledger, message(f"00008{n}", WRONG))
    # A request that says "chip" but carries a CVC2 is refused too: no guessing past the lock,
    # and no match lifting it.
    for stan, cvc2 in (("000090", WRONG), ("000091", RIGHT)):
        outcome = answer(ledger, message(stan, cvc2, **CHIP))
        assert (outcome.response_code, outcome.reason) == ("57", "cvc2_attempts_exceeded")
    assert failures(ledger) == 3


def test_an_approval_with_the_right_cvc2_starts_the_count_again(ledger: Ledger) -> None:
    for n in range(2):
        assert answer(ledger, message(f"00001{n}", WRONG)).response_code == "82"
    assert failures(ledger) == 2
    assert answer(ledger, message("000020", RIGHT)).response_code == "00"
    assert failures(ledger) == 0
    assert answer(ledger, message("000021", WRONG)).response_code == "82"
    assert failures(ledger) == 1  # not locked: the count began again


def test_an_account_verification_with_the_right_cvc2_starts_the_count_again(
    ledger: Ledger,
) -> None:
    """How a merchant or a wallet checks a CVC2 before it keeps the card: answered 85, it
    left the count standing, and one more typo later locked the card."""
    for n in range(2):
        assert answer(ledger, message(f"00001{n}", WRONG)).response_code == "82"
    verified = answer(ledger, message("000020", RIGHT, amount=0))
    assert (verified.response_code, verified.reason) == ("85", "account_verified")
    assert failures(ledger) == 0
    assert answer(ledger, message("000021", WRONG)).response_code == "82"
    assert answer(ledger, message("000022", RIGHT)).response_code == "00"  # not locked
    wrong = answer(ledger, message("000023", WRONG, amount=0))  # a verification counts too
    assert (wrong.response_code, failures(ledger)) == ("82", 1)


def test_a_card_registered_with_its_pan_is_not_checked_and_the_event_says_so(
    ledger: Ledger,
) -> None:
    first = last_event(ledger) + 1
    outcome = answer(ledger, message("000030", WRONG, pan=REGISTERED))
    assert outcome.response_code == "00"
    assert events_after(ledger, first) == [("authorization.approved", "approved", "not_checked")]


def test_a_card_whose_key_is_gone_is_a_system_error_not_a_mismatch(ledger: Ledger) -> None:
    outcome = answer(ledger, message("000040", RIGHT), keys=NO_KEYS)
    assert (outcome.response_code, outcome.reason) == ("96", "cvc2_key_unavailable")
    assert failures(ledger) == 0


def test_a_malformed_cvc2_is_a_wrong_one(ledger: Ledger) -> None:
    assert answer(ledger, message("000050", "12")).reason == "cvc2_mismatch"
    assert answer(ledger, message("000051", "1a3")).reason == "cvc2_mismatch"


def test_no_cvc2_in_the_stored_answer_or_event(ledger: Ledger) -> None:
    answer(ledger, message("000060", RIGHT))
    marker = f"R9203{RIGHT}"
    with ledger.read() as reader:
        request = message("000060", RIGHT)
        stored = reader.answer(request.answer_key)
        records = reader.outbox(1, 100)
    assert stored is not None and marker not in repr(stored) and "48" not in stored.response
    assert all(marker not in repr(record) for record in records)
    # What an event may say of a CVC2 is one of four words, never digits.
    assert {record.cvc2 for record in records} <= {None, "match", "mismatch", "not_checked"}


def events_of_card(ledger: Ledger) -> str:
    with ledger.read() as reader:
        card = reader.card(HASHER.card_key(PAN))
    assert card is not None
    return card.card_id


def run(ledger: Ledger, operation: commands.Operation) -> dict[str, object]:
    with ledger.write() as writer:
        reply = operation(writer, int(NOW.timestamp() * 1000))
    assert isinstance(reply, commands.Reply) and reply.status == 200
    decoded: dict[str, object] = msgspec.json.decode(reply.body)
    return decoded


def test_a_cvc2_can_be_required_online_except_where_none_can_be_sent(ledger: Ledger) -> None:
    strict = authorizer(ledger, required=True)

    def answered(request: AuthorizationRequest) -> tuple[str, str]:
        [outcome] = strict.authorize_batch([request], NOW)
        return outcome.response_code, outcome.reason

    assert answered(message("000100", None)) == ("82", "cvc2_missing")
    assert failures(ledger) == 0  # not a guess: not counted
    assert answered(message("000101", RIGHT)) == ("00", "approved")
    assert answered(message("000102", None, **CHIP)) == ("00", "approved")  # card present
    stored = {"22": "100", "25": "59"}  # a stored credential: no CVC2 may be kept
    assert answered(message("000103", None, **stored)) == ("00", "approved")
    recurring = authorization(PAN, "000104", 100, **ECOMMERCE, **{"48": "R220202"})
    assert answered(recurring) == ("00", "approved")
    registered = message("000105", None, pan=REGISTERED)  # no key: nothing to require
    assert answered(registered) == ("00", "approved")
    # Off (the default): no CVC2 online is approved, as before.
    assert answer(ledger, message("000106", None)).response_code == "00"


def limit_applied(ledger: Ledger, limit: int) -> tuple[int, list[tuple[str, str, str | None]]]:
    """A daemon start with security.cvc2_attempts_max = `limit`: how many cards it locked,
    and the events it wrote (type, reason, card id)."""
    before = last_event(ledger)
    started = Authorizer(
        ledger, HASHER, ProgrammeRules(), hold_lifetime_seconds=3600, cvc2_attempts_max=limit
    )
    locked = started.apply_cvc2_limit(NOW)
    with ledger.read() as reader:
        records = reader.outbox(before + 1, 100)
    return locked, sorted((r.type, r.reason, r.card_id) for r in records)


def test_a_lowered_cvc2_limit_locks_the_cards_now_past_it_with_an_event(ledger: Ledger) -> None:
    cards = {}
    with ledger.write() as writer:
        for pan, count in ((PAN, 2), (REGISTERED, 4)):
            card = writer.card(HASHER.card_key(pan))
            assert card is not None
            writer.changed_card_state(card).cvc2_failures = count
            cards[pan] = card.card_id
    locked = ("card.cvc2_locked", "cvc2_attempts_exceeded")
    # The first start that records its limit: what the counts were held against is not known.
    assert limit_applied(ledger, 5) == (0, [])
    # Lowered to 2: both cards are past it, and neither was told at 5.
    assert limit_applied(ledger, 2) == (
        2,
        sorted([(*locked, cards[PAN]), (*locked, cards[REGISTERED])]),
    )
    strict = Authorizer(
        ledger,
        HASHER,
        ProgrammeRules(),
        hold_lifetime_seconds=3600,
        card_keys=KEYS,
        cvc2_attempts_max=2,
    )
    [outcome] = strict.authorize_batch([message("000001", RIGHT)], NOW)
    assert (outcome.response_code, outcome.reason) == ("57", "cvc2_attempts_exceeded")
    assert limit_applied(ledger, 2) == (0, [])  # the same limit again: nothing new
    assert limit_applied(ledger, 4) == (0, [])  # raised: the card at 2 is usable again
    # Lowered from 4 to 3: the card at 4 was locked at 4 already, the one at 2 is not past 3.
    assert limit_applied(ledger, 3) == (0, [])
    # Off, then on at 2: whatever was counted while it was off locks now, with its event.
    assert limit_applied(ledger, 0) == (0, [])
    assert limit_applied(ledger, 2) == (
        2,
        sorted([(*locked, cards[PAN]), (*locked, cards[REGISTERED])]),
    )
