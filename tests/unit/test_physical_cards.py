"""Physical cards: ordered inactive, the bureau's fulfilment, activation, replacement."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import pytest
from support import authorization

from processor.api import commands
from processor.api.views import Address
from processor.authorizer import Authorizer
from processor.authorizer import CommandRefused as Refused
from processor.config import CardIssuingConfig
from processor.engine import ProgrammeRules
from processor.ledger.records import Cardholder
from processor.ledger.store import Ledger
from processor.personal_data import PersonalDataCipher
from processor.security import PanHasher

HASHER = PanHasher(b"physical-test-key")
NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
NOW_MS = int(NOW.timestamp() * 1000)
CIPHER = PersonalDataCipher([bytes(range(32))])
SOURCE = commands.Issuing(
    hasher=HASHER, config=CardIssuingConfig(bin_prefix="476173", pan_length=16, expiry_months=36)
)
HOME = Address(line1="Kastanienallee 12", city="Berlin", postal_code="10435", country="DE")


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    ledger = Ledger(tmp_path, durability="process", map_size_bytes=64 << 20)
    approved_cardholder(ledger, "ch_" + "a" * 20)  # and a funded account for it
    run(ledger, commands.create_account("a1", "EUR", 0, None, "ch_" + "a" * 20))
    run(ledger, commands.move_funds("a1", "fund", 100_000, "test"))
    yield ledger
    ledger.close()


def approved_cardholder(ledger: Ledger, cardholder_id: str) -> None:
    with ledger.write() as writer:
        writer.put_cardholder(
            Cardholder(
                id=cardholder_id,
                kind="individual",
                kyc_status="approved",
                created_ms=NOW_MS,
                updated_ms=NOW_MS,
                sealed_with="x",
                sealed=b"",
            )
        )


def run(ledger: Ledger, operation: commands.Operation) -> dict[str, object] | Refused:
    try:
        with ledger.write() as writer:
            reply = operation(writer, NOW_MS)
    except Refused as refused:
        return refused
    decoded: dict[str, object] = msgspec.json.decode(reply.body)
    return decoded


def ok(answer: dict[str, object] | Refused) -> dict[str, object]:
    assert not isinstance(answer, Refused), answer
    return answer


def shipping() -> commands.Shipping:
    key, sealed = CIPHER.seal(msgspec.json.encode(HOME), commands.shipping_owner("a1"))
    return commands.Shipping(key=key, sealed=sealed, account_id="a1")


def order(ledger: Ledger) -> dict[str, object]:
    return ok(run(ledger, commands.order_physical_card("a1", None, SOURCE, shipping())))


def swipe(ledger: Ledger, pan: str, stan: str) -> tuple[str, str]:
    request = authorization(pan, stan, 100, **{"22": "051", "25": "00"})
    authorizer = Authorizer(ledger, HASHER, ProgrammeRules(), hold_lifetime_seconds=3600)
    [outcome] = authorizer.authorize_batch([request], NOW)
    return outcome.response_code, outcome.reason


def event_reasons(ledger: Ledger) -> list[tuple[str, str]]:
    with ledger.read() as reader:
        return [(r.type, r.reason) for r in reader.outbox(1, 100) if r.type.startswith("card.")]


def test_a_physical_card_authorises_only_once_shipped_and_activated(ledger: Ledger) -> None:
    card = order(ledger)
    assert (card["status"], card["fulfilment"], card["virtual"]) == ("inactive", "ordered", False)
    assert card["cardholder_id"] == "ch_" + "a" * 20 and "pan" in card and "cvc2" not in card
    card_id, pan = str(card["id"]), str(card["pan"])
    assert swipe(ledger, pan, "000001") == ("62", "card_inactive")
    refused = run(ledger, commands.activate_card(card_id))
    assert isinstance(refused, Refused) and refused.code == "card_not_activatable"
    assert refused.details == {"status": "inactive", "fulfilment": "ordered"}
    for status in ("in_production", "shipped", "shipped"):
        assert ok(run(ledger, commands.update_fulfilment(card_id, status)))["fulfilment"] == status
    backwards = run(ledger, commands.update_fulfilment(card_id, "ordered"))
    assert isinstance(backwards, Refused) and backwards.code == "invalid_fulfilment_transition"
    assert ok(run(ledger, commands.activate_card(card_id)))["status"] == "active"
    assert swipe(ledger, pan, "000002") == ("00", "approved")
    again = run(ledger, commands.activate_card(card_id))
    assert isinstance(again, Refused) and again.code == "card_not_activatable"
    assert event_reasons(ledger) == [
        ("card.created", "physical_card"),
        ("card.fulfilment_updated", "fulfilment_in_production"),
        ("card.fulfilment_updated", "fulfilment_shipped"),
        ("card.status_changed", "card_active"),
    ]


def test_a_virtual_card_has_no_fulfilment(ledger: Ledger) -> None:
    card = ok(run(ledger, commands.issue_virtual_card("a1", None, HASHER, SOURCE.config)))
    refused = run(ledger, commands.update_fulfilment(str(card["id"]), "shipped"))
    assert isinstance(refused, Refused) and refused.code == "not_a_physical_card"


def test_a_lost_card_stops_at_once_and_its_replacement_ships_where_it_went(
    ledger: Ledger,
) -> None:
    old = order(ledger)
    old_id = str(old["id"])
    for status in ("shipped",):
        run(ledger, commands.update_fulfilment(old_id, status))
    run(ledger, commands.activate_card(old_id))
    new = ok(run(ledger, commands.replace_card(old_id, "lost", SOURCE, None)))
    assert (new["status"], new["fulfilment"], new["replaces"]) == ("inactive", "ordered", old_id)
    assert new["pan"] != old["pan"] and new["cardholder_id"] == old["cardholder_id"]
    assert swipe(ledger, str(old["pan"]), "000003") == ("41", "card_lost")
    with ledger.read() as reader:
        found = reader.card_by_id(old_id)
        assert found is not None and found[1].replaced_by == new["id"]
        replacement = reader.card_by_id(str(new["id"]))
        assert replacement is not None and replacement[1].shipping_sealed is not None
    twice = run(ledger, commands.replace_card(old_id, "lost", SOURCE, None))
    assert isinstance(twice, Refused) and twice.code == "card_not_replaceable"


def test_an_expiring_card_works_until_its_replacement_is_activated(ledger: Ledger) -> None:
    old = order(ledger)
    old_id = str(old["id"])
    run(ledger, commands.update_fulfilment(old_id, "delivered"))
    run(ledger, commands.activate_card(old_id))
    new = ok(run(ledger, commands.replace_card(old_id, "expiring", SOURCE, shipping())))
    assert swipe(ledger, str(old["pan"]), "000004") == ("00", "approved")  # still works
    run(ledger, commands.update_fulfilment(str(new["id"]), "shipped"))
    run(ledger, commands.activate_card(str(new["id"])))
    assert swipe(ledger, str(old["pan"]), "000005") == ("62", "card_closed")
    assert swipe(ledger, str(new["pan"]), "000006") == ("00", "approved")


def test_a_virtual_replacement_is_active_at_once_and_closes_the_old_card(ledger: Ledger) -> None:
    old = ok(run(ledger, commands.issue_virtual_card("a1", None, HASHER, SOURCE.config)))
    new = ok(run(ledger, commands.replace_card(str(old["id"]), "damaged", SOURCE, None)))
    assert (new["status"], new["virtual"], new["fulfilment"]) == ("active", True, None)
    assert swipe(ledger, str(old["pan"]), "000007") == ("62", "card_closed")
    assert swipe(ledger, str(new["pan"]), "000008") == ("00", "approved")


def activated(ledger: Ledger, card: dict[str, object]) -> None:
    run(ledger, commands.update_fulfilment(str(card["id"]), "shipped"))
    assert ok(run(ledger, commands.activate_card(str(card["id"]))))["status"] == "active"


def test_a_replacement_lost_in_the_post_hands_on_the_card_it_was_to_replace(
    ledger: Ledger,
) -> None:
    a = order(ledger)
    activated(ledger, a)
    b = ok(run(ledger, commands.replace_card(str(a["id"]), "damaged", SOURCE, None)))
    refused = run(ledger, commands.activate_card(str(a["id"])))  # A was replaced: never again
    assert isinstance(refused, Refused) and refused.code == "card_not_activatable"
    c = ok(run(ledger, commands.replace_card(str(b["id"]), "lost", SOURCE, None)))
    assert c["replaces"] == a["id"]
    assert swipe(ledger, str(a["pan"]), "000010") == ("00", "approved")  # until C arrives
    activated(ledger, c)
    assert swipe(ledger, str(a["pan"]), "000011") == ("62", "card_closed")
    assert swipe(ledger, str(b["pan"]), "000012") == ("41", "card_lost")
    assert swipe(ledger, str(c["pan"]), "000013") == ("00", "approved")


def test_a_replacement_reported_lost_before_it_came_hands_on_the_card_still_in_use(
    ledger: Ledger,
) -> None:
    """B, replacing A, was reported lost in the post, then replaced: C replaced B, not A, and
    activating C left A active for good (replaced by a lost card that never came)."""
    a = order(ledger)
    activated(ledger, a)
    b = ok(run(ledger, commands.replace_card(str(a["id"]), "damaged", SOURCE, None)))
    ok(run(ledger, commands.change_card_status(str(b["id"]), "report-lost")))
    c = ok(run(ledger, commands.replace_card(str(b["id"]), "lost", SOURCE, None)))
    assert c["replaces"] == a["id"]
    activated(ledger, c)
    assert swipe(ledger, str(a["pan"]), "000012") == ("62", "card_closed")
    assert swipe(ledger, str(c["pan"]), "000013") == ("00", "approved")


def test_replacements_lost_one_after_another_still_close_the_card_in_use(ledger: Ledger) -> None:
    """B replaced A and was lost, C replaced B (for A) and was lost too: replacing B again
    made D replace B, and activating D left A active for good. B is replaced by C already:
    C is the one to replace, and its replacement replaces A."""
    a = order(ledger)
    activated(ledger, a)
    b = ok(run(ledger, commands.replace_card(str(a["id"]), "damaged", SOURCE, None)))
    ok(run(ledger, commands.change_card_status(str(b["id"]), "report-lost")))
    c = ok(run(ledger, commands.replace_card(str(b["id"]), "lost", SOURCE, None)))
    ok(run(ledger, commands.change_card_status(str(c["id"]), "report-lost")))
    again = run(ledger, commands.replace_card(str(b["id"]), "lost", SOURCE, None))
    assert isinstance(again, Refused) and again.code == "card_not_replaceable"
    d = ok(run(ledger, commands.replace_card(str(c["id"]), "lost", SOURCE, None)))
    assert d["replaces"] == a["id"]
    activated(ledger, d)
    assert swipe(ledger, str(a["pan"]), "000021") == ("62", "card_closed")


def test_a_card_whose_replacement_was_closed_before_it_came_can_be_replaced_again(
    ledger: Ledger,
) -> None:
    """B (replacing A) closed before activation: A, still in use, was refused a replacement
    ("replace that one") and B too (closed): A could never be replaced."""
    a = order(ledger)
    activated(ledger, a)
    b = ok(run(ledger, commands.replace_card(str(a["id"]), "expiring", SOURCE, None)))
    ok(run(ledger, commands.change_card_status(str(b["id"]), "close")))
    assert swipe(ledger, str(a["pan"]), "000031") == ("00", "approved")
    c = ok(run(ledger, commands.replace_card(str(a["id"]), "expiring", SOURCE, None)))
    assert c["replaces"] == a["id"]


def with_legacy_limits(ledger: Ledger, card_id: str) -> None:
    """The card's record as one written before card controls: shorthands of its own."""
    with ledger.write() as writer:
        found = writer.card_by_id(card_id)
        assert found is not None
        key, card = found
        legacy = msgspec.structs.replace(card, per_transaction_limit=50, blocked_mccs=("5411",))
        writer.put_card(key, legacy, card.account_id)


def test_an_older_records_limits_go_with_new_controls_and_stay_on_its_replacement(
    ledger: Ledger,
) -> None:
    """The engine reads an older record's shorthands as its controls: new controls through
    the API left them declining with nothing on screen to say why, and a replacement card
    dropped them."""
    a = order(ledger)
    activated(ledger, a)
    with_legacy_limits(ledger, str(a["id"]))
    assert swipe(ledger, str(a["pan"]), "000041") == ("57", "mcc_blocked")
    ok(run(ledger, commands.set_card_controls(str(a["id"]), commands.Controls())))
    assert swipe(ledger, str(a["pan"]), "000042") == ("00", "approved")
    with_legacy_limits(ledger, str(a["id"]))
    b = ok(run(ledger, commands.replace_card(str(a["id"]), "lost", SOURCE, None)))
    activated(ledger, b)
    assert swipe(ledger, str(b["pan"]), "000043") == ("57", "mcc_blocked")


def test_a_card_reported_lost_first_can_still_be_replaced(ledger: Ledger) -> None:
    a = order(ledger)
    activated(ledger, a)
    ok(run(ledger, commands.change_card_status(str(a["id"]), "report-lost")))
    b = ok(run(ledger, commands.replace_card(str(a["id"]), "lost", SOURCE, None)))
    assert b["replaces"] == a["id"]
    again = run(ledger, commands.replace_card(str(a["id"]), "lost", SOURCE, None))
    assert isinstance(again, Refused) and again.code == "card_not_replaceable"  # B is coming


def test_a_physical_cards_cvc2_comes_with_its_order_when_the_range_has_a_key(
    ledger: Ledger,
) -> None:
    from processor.config import CardVerificationRange
    from processor.cvc2 import compute_cvc2, keys_from_environment

    key = "4A6F686E4361726473313233343536FE"
    ranges = (CardVerificationRange(bin_prefix="476173", key_envs=("K",)),)
    keyed = msgspec.structs.replace(SOURCE, card_keys=keys_from_environment(ranges, {"K": key}))
    card = ok(run(ledger, commands.order_physical_card("a1", None, keyed, shipping())))
    expected = compute_cvc2(bytes.fromhex(key), str(card["pan"]), str(card["expiry"]))
    assert card["cvc2"] == expected and card["cvc2_checked"] is True


def test_a_load_keeps_what_it_does_not_know_and_never_moves_a_keyed_expiry(
    ledger: Ledger, tmp_path: Path
) -> None:
    from processor.config import CardVerificationRange
    from processor.cvc2 import keys_from_environment
    from processor.ledger.load import LoadError, load_path

    ranges = (CardVerificationRange(bin_prefix="476173", key_envs=("K",)),)
    keys = keys_from_environment(ranges, {"K": "4A6F686E4361726473313233343536FE"})
    keyed = msgspec.structs.replace(SOURCE, card_keys=keys)
    card = ok(run(ledger, commands.order_physical_card("a1", None, keyed, shipping())))
    run(ledger, commands.update_fulfilment(str(card["id"]), "shipped"))
    same = tmp_path / "same.toml"
    same.write_text(
        f'[[cards]]\npan = "{card["pan"]}"\naccount = "a1"\nexpiry = "{card["expiry"]}"\n'
        'status = "inactive"\n'
    )
    load_path(ledger, same, HASHER)
    with ledger.read() as reader:
        found = reader.card_by_id(str(card["id"]))
    assert found is not None
    assert (found[1].fulfilment, found[1].shipping_sealed is not None) == ("shipped", True)
    assert found[1].cvc2_key is not None
    moved = tmp_path / "moved.toml"
    moved.write_text(same.read_text().replace(f'expiry = "{card["expiry"]}"', 'expiry = "3912"'))
    with pytest.raises(LoadError, match="has a CVC2 computed with its expiry"):
        load_path(ledger, moved, HASHER)


def test_a_card_from_before_cardholders_is_replaced_for_its_accounts(ledger: Ledger) -> None:
    legacy = ok(run(ledger, commands.issue_virtual_card("a1", None, HASHER, SOURCE.config)))
    with ledger.write() as writer:  # as a card issued before cardholders existed
        found = writer.card_by_id(str(legacy["id"]))
        assert found is not None
        key, card = found
        writer.put_card(key, msgspec.structs.replace(card, cardholder_id=None), card.account_id)
    new = ok(run(ledger, commands.replace_card(str(legacy["id"]), "damaged", SOURCE, None)))
    assert new["cardholder_id"] == "ch_" + "a" * 20 and new["virtual"] is True
    registered = ok(
        run(ledger, commands.register_card("4761730000000003", "3012", "a1", None, HASHER))
    )
    refused = run(ledger, commands.replace_card(str(registered["id"]), "lost", SOURCE, None))
    assert isinstance(refused, Refused) and refused.code == "card_not_replaceable"
    assert "issued elsewhere" in refused.message


def test_a_frozen_cards_physical_replacement_is_frozen_when_activated(ledger: Ledger) -> None:
    # The programme froze the card (suspected fraud, say); the damaged-card replacement it
    # ordered became active at the cardholder's activation, round the freeze.
    old = order(ledger)
    activated(ledger, old)
    ok(run(ledger, commands.change_card_status(str(old["id"]), "freeze")))
    new = ok(run(ledger, commands.replace_card(str(old["id"]), "damaged", SOURCE, shipping())))
    run(ledger, commands.update_fulfilment(str(new["id"]), "shipped"))
    assert ok(run(ledger, commands.activate_card(str(new["id"]))))["status"] == "frozen"
    assert swipe(ledger, str(new["pan"]), "000011") == ("62", "card_frozen")
    assert swipe(ledger, str(old["pan"]), "000012") == ("62", "card_closed")
    assert ok(run(ledger, commands.change_card_status(str(new["id"]), "unfreeze")))["status"] == (
        "active"
    )
    assert ("card.status_changed", "card_frozen") in event_reasons(ledger)
    # Unfrozen before the replacement came: it is activated as it should be.
    other = order(ledger)
    activated(ledger, other)
    ok(run(ledger, commands.change_card_status(str(other["id"]), "freeze")))
    later = ok(run(ledger, commands.replace_card(str(other["id"]), "expiring", SOURCE, shipping())))
    ok(run(ledger, commands.change_card_status(str(other["id"]), "unfreeze")))
    activated(ledger, later)


@pytest.mark.parametrize("reason", ["lost", "stolen"])
def test_a_frozen_card_replaced_as_lost_keeps_its_freeze_in_the_replacement(
    ledger: Ledger, reason: str
) -> None:
    # A lost card is stopped at once: at activation there was no frozen card left to look at,
    # and the replacement became active (a virtual one is issued frozen).
    old = order(ledger)
    activated(ledger, old)
    ok(run(ledger, commands.change_card_status(str(old["id"]), "freeze")))
    new = ok(run(ledger, commands.replace_card(str(old["id"]), reason, SOURCE, None)))
    run(ledger, commands.update_fulfilment(str(new["id"]), "shipped"))
    assert ok(run(ledger, commands.activate_card(str(new["id"]))))["status"] == "frozen"
    # Not frozen when it was ordered: active.
    fine = order(ledger)
    activated(ledger, fine)
    again = ok(run(ledger, commands.replace_card(str(fine["id"]), reason, SOURCE, None)))
    activated(ledger, again)


def test_the_freeze_handed_on_is_the_one_in_force_when_the_card_stopped(ledger: Ledger) -> None:
    """What counts is the old card's status when it stops, not when its replacement was
    ordered: unfrozen meanwhile, the replacement is active; frozen meanwhile, frozen. And a
    replacement lost in the post hands on what it carried to the one replacing it."""

    def replacement_status(freeze_first: bool, unfreeze_later: bool, freeze_later: bool) -> str:
        old = order(ledger)
        activated(ledger, old)
        old_id = str(old["id"])
        if freeze_first:
            ok(run(ledger, commands.change_card_status(old_id, "freeze")))
        new = ok(run(ledger, commands.replace_card(old_id, "damaged", SOURCE, shipping())))
        if unfreeze_later:
            ok(run(ledger, commands.change_card_status(old_id, "unfreeze")))
        if freeze_later:
            ok(run(ledger, commands.change_card_status(old_id, "freeze")))
        ok(run(ledger, commands.change_card_status(old_id, "report-lost")))
        run(ledger, commands.update_fulfilment(str(new["id"]), "shipped"))
        return str(ok(run(ledger, commands.activate_card(str(new["id"]))))["status"])

    assert replacement_status(True, True, False) == "active"
    assert replacement_status(False, False, True) == "frozen"
    assert replacement_status(False, False, False) == "active"

    first = order(ledger)
    activated(ledger, first)
    ok(run(ledger, commands.change_card_status(str(first["id"]), "freeze")))
    second = ok(run(ledger, commands.replace_card(str(first["id"]), "lost", SOURCE, None)))
    third = ok(run(ledger, commands.replace_card(str(second["id"]), "lost", SOURCE, None)))
    assert third["replaces"] == first["id"]
    run(ledger, commands.update_fulfilment(str(third["id"]), "shipped"))
    assert ok(run(ledger, commands.activate_card(str(third["id"]))))["status"] == "frozen"


def test_a_freeze_is_handed_on_however_the_frozen_card_stops(ledger: Ledger) -> None:
    """Reported lost first and replaced after, stopped by a load file, or a replacement lost
    in the post and replaced: each left the new card active though the card it replaces was
    frozen when it stopped."""
    from processor.ledger.load import CardEntry, LoadFile, apply_load_file

    def frozen_card() -> dict[str, object]:
        card = order(ledger)
        activated(ledger, card)
        ok(run(ledger, commands.change_card_status(str(card["id"]), "freeze")))
        return card

    def activation(card: dict[str, object]) -> str:
        run(ledger, commands.update_fulfilment(str(card["id"]), "shipped"))
        return str(ok(run(ledger, commands.activate_card(str(card["id"]))))["status"])

    first = frozen_card()
    ok(run(ledger, commands.change_card_status(str(first["id"]), "report-lost")))
    assert (
        activation(ok(run(ledger, commands.replace_card(str(first["id"]), "lost", SOURCE, None))))
        == "frozen"
    )

    second = frozen_card()
    new = ok(run(ledger, commands.replace_card(str(second["id"]), "damaged", SOURCE, shipping())))
    with ledger.read() as reader:
        found = reader.card_by_id(str(second["id"]))
        assert found is not None
        expiry = found[1].expiry
    entry = CardEntry(pan=str(second["pan"]), account="a1", expiry=expiry, status="lost")
    apply_load_file(ledger, LoadFile(cards=(entry,)), HASHER, "cards.toml", now_ms=NOW_MS)
    assert activation(new) == "frozen"

    third = frozen_card()
    posted = ok(run(ledger, commands.replace_card(str(third["id"]), "damaged", SOURCE, shipping())))
    ok(run(ledger, commands.change_card_status(str(third["id"]), "report-lost")))
    ok(run(ledger, commands.change_card_status(str(posted["id"]), "report-lost")))
    again = ok(run(ledger, commands.replace_card(str(posted["id"]), "lost", SOURCE, None)))
    assert activation(again) == "frozen"


def test_a_frozen_virtual_card_reported_lost_is_replaced_frozen(ledger: Ledger) -> None:
    """A virtual replacement is live at once: the freeze the lost card recorded when it stopped
    goes into it, or a report and a replacement got round the programme's freeze."""
    old = ok(run(ledger, commands.issue_virtual_card("a1", None, HASHER, SOURCE.config)))
    ok(run(ledger, commands.change_card_status(str(old["id"]), "freeze")))
    ok(run(ledger, commands.change_card_status(str(old["id"]), "report-lost")))
    new = ok(run(ledger, commands.replace_card(str(old["id"]), "lost", SOURCE, None)))
    assert new["status"] == "frozen"
    assert swipe(ledger, str(new["pan"]), "000021") == ("62", "card_frozen")
    # Not frozen when it was reported lost: its replacement is active.
    other = ok(run(ledger, commands.issue_virtual_card("a1", None, HASHER, SOURCE.config)))
    ok(run(ledger, commands.change_card_status(str(other["id"]), "report-lost")))
    fresh = ok(run(ledger, commands.replace_card(str(other["id"]), "lost", SOURCE, None)))
    assert fresh["status"] == "active"


HOLDER = "ch_" + "a" * 20


def test_a_rejected_cardholders_cards_are_declined_until_approved_again(ledger: Ledger) -> None:
    """A rejection after issuing left the cards authorising (00): now 62 while it lasts."""
    card = ok(run(ledger, commands.issue_virtual_card("a1", None, HASHER, SOURCE.config)))
    pan = str(card["pan"])
    assert swipe(ledger, pan, "000031") == ("00", "approved")
    ok(run(ledger, commands.set_kyc_status(HOLDER, "rejected")))
    assert swipe(ledger, pan, "000032") == ("62", "cardholder_rejected")
    ok(run(ledger, commands.set_kyc_status(HOLDER, "review")))  # a review does not stop them
    assert swipe(ledger, pan, "000033") == ("00", "approved")
    ok(run(ledger, commands.set_kyc_status(HOLDER, "rejected")))
    ok(run(ledger, commands.set_kyc_status(HOLDER, "approved")))
    assert swipe(ledger, pan, "000034") == ("00", "approved")


def test_a_cardholder_is_read_only_where_it_can_decide(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A frozen card is declined before its cardholder matters: no lookup on the hot path."""
    from processor.ledger.store import Reader

    card = ok(run(ledger, commands.issue_virtual_card("a1", None, HASHER, SOURCE.config)))
    reads: list[str] = []
    original = Reader.cardholder

    def counted(self: Reader, cardholder_id: str) -> Cardholder | None:
        reads.append(cardholder_id)
        return original(self, cardholder_id)

    monkeypatch.setattr(Reader, "cardholder", counted)
    assert swipe(ledger, str(card["pan"]), "000041") == ("00", "approved")
    assert reads == [HOLDER]
    ok(run(ledger, commands.change_card_status(str(card["id"]), "freeze")))
    reads.clear()
    assert swipe(ledger, str(card["pan"]), "000042") == ("62", "card_frozen")
    assert reads == []


def test_an_accounts_rejected_holder_stops_the_cards_of_others_on_it(ledger: Ledger) -> None:
    """A business's employee card on the business's account: the business rejected (KYB)."""
    employee = "ch_" + "b" * 20
    approved_cardholder(ledger, employee)
    card = ok(
        run(
            ledger,
            commands.issue_virtual_card("a1", None, HASHER, SOURCE.config, cardholder_id=employee),
        )
    )
    assert card["cardholder_id"] == employee
    ok(run(ledger, commands.set_kyc_status(HOLDER, "rejected")))
    assert swipe(ledger, str(card["pan"]), "000035") == ("62", "cardholder_rejected")


def test_a_card_is_activated_only_while_its_cardholder_is_approved_and_its_account_open(
    ledger: Ledger,
) -> None:
    card = order(ledger)
    card_id = str(card["id"])
    run(ledger, commands.update_fulfilment(card_id, "shipped"))
    ok(run(ledger, commands.set_kyc_status(HOLDER, "rejected")))
    refused = run(ledger, commands.activate_card(card_id))
    assert isinstance(refused, Refused) and refused.code == "kyc_not_approved"
    ok(run(ledger, commands.set_kyc_status(HOLDER, "approved")))
    ok(run(ledger, commands.move_funds("a1", "debit", 100_000, "test")))
    ok(run(ledger, commands.close_account("a1")))
    # The card closed with its account: never to be activated.
    closed = run(ledger, commands.activate_card(card_id))
    assert isinstance(closed, Refused) and closed.code == "card_not_activatable"
    assert event_reasons(ledger) == [
        ("card.created", "physical_card"),
        ("card.fulfilment_updated", "fulfilment_shipped"),
        ("card.status_changed", "card_closed"),
    ]


def test_a_shipping_address_still_opens_after_a_load_moves_its_card(
    ledger: Ledger, tmp_path: Path
) -> None:
    """Sealed for the account it was ordered on: moved to another by a load, it answered 503,
    and so did its replacement's, which inherited it."""
    from processor.ledger.load import load_path

    run(ledger, commands.create_account("a2", "EUR", 0, None, HOLDER))
    card = order(ledger)
    moved = tmp_path / "moved.toml"
    moved.write_text(
        f'[[cards]]\npan = "{card["pan"]}"\naccount = "a2"\nexpiry = "{card["expiry"]}"\n'
        'status = "inactive"\n'
    )
    load_path(ledger, moved, HASHER)

    def address(card_id: str) -> Address:
        with ledger.read() as reader:
            found = reader.card_by_id(card_id)
        assert found is not None and found[1].shipping_key and found[1].shipping_sealed
        owner = commands.card_shipping_owner(found[1])
        opened = CIPHER.open(found[1].shipping_key, found[1].shipping_sealed, owner)
        return msgspec.json.decode(opened, type=Address)

    assert address(str(card["id"])) == HOME
    new = ok(run(ledger, commands.replace_card(str(card["id"]), "damaged", SOURCE, None)))
    assert new["account_id"] == "a2"
    assert address(str(new["id"])) == HOME


def test_every_new_card_has_its_created_event(ledger: Ledger) -> None:
    """Issued, ordered or replaced: the programme learns of each card from its events (a
    backend that lost the 201 had no way to learn the new card's id)."""
    virtual = ok(run(ledger, commands.issue_virtual_card("a1", None, HASHER, SOURCE.config)))
    physical = order(ledger)
    new = ok(run(ledger, commands.replace_card(str(virtual["id"]), "damaged", SOURCE, None)))
    with ledger.read() as reader:
        created = [
            (r.reason, r.card_id, r.account_id, r.masked_pan)
            for r in reader.outbox(1, 100)
            if r.type == "card.created"
        ]
    assert created == [
        ("virtual_card", virtual["id"], "a1", virtual["masked_pan"]),
        ("physical_card", physical["id"], "a1", physical["masked_pan"]),
        ("replacement_card", new["id"], "a1", new["masked_pan"]),
    ]
