"""Cardholders: personal data sealed at rest, KYC statuses and their events, the issuing gate."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import date
from pathlib import Path

import msgspec
import pytest

from processor.api import commands
from processor.api.views import Address, Business, Individual
from processor.authorizer import CommandRefused as Refused
from processor.config import CardIssuingConfig
from processor.ledger.store import Ledger
from processor.personal_data import (
    PersonalDataCipher,
    PersonalDataError,
    cipher_from_environment,
    key_id,
)
from processor.security import PanHasher

HASHER = PanHasher(b"cardholder-test-key")
NOW_MS = 1_795_000_000_000
KEY = bytes(range(32))
NEXT_KEY = bytes(range(32, 64))
CIPHER = PersonalDataCipher([KEY])
ISSUING = CardIssuingConfig(bin_prefix="476173", pan_length=16, expiry_months=36)
ADA = Individual(
    name="Ada Quietwater",
    date_of_birth=date(1985, 12, 10),
    address=Address(line1="Kastanienallee 12", city="Berlin", postal_code="10435", country="DE"),
    email="ada.quietwater@example.org",
    phone="+4930123456789",
)


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    ledger = Ledger(tmp_path, durability="process", map_size_bytes=64 << 20)
    yield ledger
    ledger.close()


def run(ledger: Ledger, operation: commands.Operation) -> commands.Reply | Refused:
    try:
        with ledger.write() as writer:
            return operation(writer, NOW_MS)
    except Refused as refused:
        return refused


def body(reply: commands.Reply | Refused) -> dict[str, object]:
    assert isinstance(reply, commands.Reply), reply
    decoded: dict[str, object] = msgspec.json.decode(reply.body)
    return decoded


def new_cardholder(ledger: Ledger, details: Individual | Business = ADA) -> str:
    created = body(run(ledger, commands.create_cardholder(details, CIPHER)))
    assert created["kyc_status"] == "pending"
    return str(created["id"])


def events(ledger: Ledger) -> list[tuple[str, str, str | None, str | None]]:
    with ledger.read() as reader:
        return [(r.type, r.reason, r.cardholder_id, r.kyc_status) for r in reader.outbox(1, 100)]


# --- sealing -----------------------------------------------------------------------------------


def test_sealed_data_opens_only_for_its_owner_untouched_and_with_its_key() -> None:
    key, sealed = CIPHER.seal(b"personal", "ch_1")
    assert key == key_id(KEY) and b"personal" not in sealed
    assert CIPHER.open(key, sealed, "ch_1") == b"personal"
    with pytest.raises(PersonalDataError, match="does not open"):
        CIPHER.open(key, sealed, "ch_2")  # moved onto another cardholder
    altered = sealed[:-1] + bytes([sealed[-1] ^ 1])
    with pytest.raises(PersonalDataError, match="does not open"):
        CIPHER.open(key, altered, "ch_1")
    # Rotation: the new key seals, the old one still opens what it sealed.
    rotated = PersonalDataCipher([NEXT_KEY, KEY])
    assert rotated.open(key, sealed, "ch_1") == b"personal"
    assert rotated.seal(b"x", "ch_3")[0] == key_id(NEXT_KEY)
    with pytest.raises(PersonalDataError, match="not configured"):
        PersonalDataCipher([NEXT_KEY]).open(key, sealed, "ch_1")
    assert KEY.hex() not in repr(rotated)


def test_keys_come_from_the_environment() -> None:
    cipher = cipher_from_environment(("A", "B"), {"A": NEXT_KEY.hex(), "B": KEY.hex()}, demo=False)
    assert cipher.seal(b"x", "c")[0] == key_id(NEXT_KEY)
    with pytest.raises(PersonalDataError, match=r"\[1\] \(B\) is not set"):
        cipher_from_environment(("A", "B"), {"A": KEY.hex()}, demo=True)  # set ones must all be
    assert cipher_from_environment(("A",), {}, demo=True).insecure


# --- the API's commands -----------------------------------------------------------------------


def test_a_cardholder_is_stored_sealed_and_its_event_names_no_personal_data(
    ledger: Ledger,
) -> None:
    cardholder_id = new_cardholder(ledger)
    with ledger.read() as reader:
        holder = reader.cardholder(cardholder_id)
    assert holder is not None and (holder.kind, holder.kyc_status) == ("individual", "pending")
    opened = msgspec.json.decode(
        CIPHER.open(holder.sealed_with, holder.sealed, cardholder_id), type=Individual
    )
    assert opened == ADA
    assert events(ledger) == [("cardholder.created", "kyc_pending", cardholder_id, "pending")]
    stored = (Path(ledger.path) / "data.mdb").read_bytes()
    for secret in ("Quietwater", "Kastanienallee", "ada.quietwater", "4930123456789", "1985-12"):
        assert secret.encode() not in stored, secret
    # The idempotent replay is kept without the details.
    reply = run(ledger, commands.create_cardholder(ADA, CIPHER))
    assert isinstance(reply, commands.Reply) and reply.kept is not None
    assert b"details" in reply.body and b"details" not in reply.kept


def test_kyc_changes_are_events_and_the_same_status_changes_nothing(ledger: Ledger) -> None:
    cardholder_id = new_cardholder(ledger)
    for status in ("review", "approved", "approved"):
        assert (
            body(run(ledger, commands.set_kyc_status(cardholder_id, status)))["kyc_status"]
            == status
        )  # type: ignore[arg-type]
    assert events(ledger)[1:] == [
        ("cardholder.kyc_updated", "kyc_review", cardholder_id, "review"),
        ("cardholder.kyc_updated", "kyc_approved", cardholder_id, "approved"),
    ]
    missing = run(ledger, commands.set_kyc_status("ch_" + "0" * 20, "approved"))
    assert isinstance(missing, Refused) and missing.code == "cardholder_not_found"


def test_a_card_is_issued_only_to_an_approved_cardholder(ledger: Ledger) -> None:
    run(ledger, commands.create_account("a1", "EUR", 0, None))
    refused = run(ledger, commands.issue_virtual_card("a1", None, HASHER, ISSUING))
    assert isinstance(refused, Refused) and (refused.status, refused.code) == (
        409,
        "cardholder_required",
    )
    unknown = "ch_" + "0" * 20
    refused = run(
        ledger, commands.issue_virtual_card("a1", None, HASHER, ISSUING, cardholder_id=unknown)
    )
    assert isinstance(refused, Refused) and refused.code == "cardholder_not_found"
    cardholder_id = new_cardholder(ledger)
    for status in ("pending", "rejected", "review"):
        run(ledger, commands.set_kyc_status(cardholder_id, status))  # type: ignore[arg-type]
        refused = run(
            ledger,
            commands.issue_virtual_card("a1", None, HASHER, ISSUING, cardholder_id=cardholder_id),
        )
        assert isinstance(refused, Refused) and refused.code == "kyc_not_approved"
        assert refused.details == {"status": status} and status in refused.message
    run(ledger, commands.set_kyc_status(cardholder_id, "approved"))
    issued = body(
        run(
            ledger,
            commands.issue_virtual_card("a1", None, HASHER, ISSUING, cardholder_id=cardholder_id),
        )
    )
    assert issued["cardholder_id"] == cardholder_id
    with ledger.read() as reader:
        assert len(reader.account_cards("a1")) == 1


def test_an_account_opened_for_a_cardholder_gives_its_cards_to_it(ledger: Ledger) -> None:
    business = Business(
        legal_name="Quietwater Logistics GmbH",
        registration_number="HRB 123456",
        address=ADA.address,
    )
    cardholder_id = new_cardholder(ledger, business)
    missing = run(ledger, commands.create_account("a2", "EUR", 0, None, "ch_" + "1" * 20))
    assert isinstance(missing, Refused) and missing.code == "cardholder_not_found"
    opened = body(run(ledger, commands.create_account("a2", "EUR", 0, None, cardholder_id)))
    assert opened["cardholder_id"] == cardholder_id
    run(ledger, commands.set_kyc_status(cardholder_id, "approved"))
    issued = body(run(ledger, commands.issue_virtual_card("a2", None, HASHER, ISSUING)))
    assert issued["cardholder_id"] == cardholder_id


def test_naming_another_cardholder_does_not_get_round_the_accounts_rejection(
    ledger: Ledger,
) -> None:
    owner, other = new_cardholder(ledger), new_cardholder(ledger)
    run(ledger, commands.create_account("a3", "EUR", 0, None, owner))
    run(ledger, commands.set_kyc_status(owner, "rejected"))
    run(ledger, commands.set_kyc_status(other, "approved"))
    refused = run(
        ledger, commands.issue_virtual_card("a3", None, HASHER, ISSUING, cardholder_id=other)
    )
    assert isinstance(refused, Refused) and refused.code == "kyc_not_approved"
    assert refused.details == {"status": "rejected"}
    run(ledger, commands.set_kyc_status(owner, "approved"))  # an employee of an approved firm
    issued = body(
        run(ledger, commands.issue_virtual_card("a3", None, HASHER, ISSUING, cardholder_id=other))
    )
    assert issued["cardholder_id"] == other


def test_a_replacement_does_not_get_round_the_accounts_rejection(ledger: Ledger) -> None:
    """Issuing checked the account's own holder; replacing did not: an employee's card was
    replaced (a new active card) after the firm's KYC was rejected."""
    owner, other = new_cardholder(ledger), new_cardholder(ledger)
    run(ledger, commands.create_account("a3", "EUR", 0, None, owner))
    run(ledger, commands.set_kyc_status(owner, "approved"))
    run(ledger, commands.set_kyc_status(other, "approved"))
    card = body(
        run(ledger, commands.issue_virtual_card("a3", None, HASHER, ISSUING, cardholder_id=other))
    )
    run(ledger, commands.set_kyc_status(owner, "rejected"))
    source = commands.Issuing(hasher=HASHER, config=ISSUING)
    refused = run(ledger, commands.replace_card(str(card["id"]), "damaged", source, None))
    assert isinstance(refused, Refused) and refused.code == "kyc_not_approved"


def test_a_frozen_virtual_cards_replacement_is_frozen_too(ledger: Ledger) -> None:
    """A virtual replacement is live at once: reported damaged, a card the programme froze
    came back active in its replacement."""
    holder = new_cardholder(ledger)
    run(ledger, commands.set_kyc_status(holder, "approved"))
    run(ledger, commands.create_account("a5", "EUR", 0, None, holder))
    card = body(run(ledger, commands.issue_virtual_card("a5", None, HASHER, ISSUING)))
    run(ledger, commands.change_card_status(str(card["id"]), "freeze"))
    source = commands.Issuing(hasher=HASHER, config=ISSUING)
    new = body(run(ledger, commands.replace_card(str(card["id"]), "damaged", source, None)))
    assert new["status"] == "frozen"


def test_the_stored_idempotent_reply_holds_no_personal_data(ledger: Ledger) -> None:
    from processor.api.commands import Idempotency, idempotent

    key = Idempotency(scope=b"scope-ch-1", body_digest=b"digest")
    reply = run(ledger, idempotent(key, commands.create_cardholder(ADA, CIPHER)))
    assert isinstance(reply, commands.Reply) and b"Quietwater" in reply.body
    with ledger.read() as reader:
        kept = reader.idempotent(b"scope-ch-1")
    assert kept is not None and b"Quietwater" not in kept and b"details" not in kept
