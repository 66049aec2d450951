"""The PAN vault (envelope encryption) and the one-time reveal tokens' rules."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from processor.api import commands
from processor.api.reveal import token_digest
from processor.authorizer import CommandRefused as Refused
from processor.config import CardIssuingConfig
from processor.ledger.store import Ledger
from processor.pan_vault import PanVault, VaultError, key_id, vault_from_environment
from processor.security import PanHasher

HASHER = PanHasher(b"vault-test-key")
NOW_MS = 1_795_000_000_000
KEK, NEXT_KEK = bytes(range(32)), bytes(range(1, 33))
VAULT = PanVault([KEK])
SOURCE = commands.Issuing(
    hasher=HASHER,
    config=CardIssuingConfig(bin_prefix="476173", require_cardholder=False),
    vault=VAULT,
)


def test_the_primitives_give_the_published_values() -> None:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from cryptography.hazmat.primitives.keywrap import aes_key_wrap

    # RFC 3394, 4.6: 256 bits of key data wrapped with a 256-bit KEK.
    kek = bytes.fromhex("000102030405060708090A0B0C0D0E0F101112131415161718191A1B1C1D1E1F")
    data = bytes.fromhex("00112233445566778899AABBCCDDEEFF000102030405060708090A0B0C0D0E0F")
    assert aes_key_wrap(kek, data).hex().upper() == (
        "28C9F404C4B810F4CBCCB35CFB87F8263F5786E2D80ED326CBC7F0E71A99F43BFB988B9B7A02DD21"
    )
    # The GCM specification (McGrew and Viega), test case 14: AES-256, zero key, IV and block.
    sealed = AESGCM(bytes(32)).encrypt(bytes(12), bytes(16), None)
    assert sealed.hex() == "cea7403d4d606b6e074ec5d3baf39d18" + "d0d1c8a799996bf0265b98b5d48ab919"


def test_a_pan_opens_only_for_its_card_untouched_and_with_its_key() -> None:
    secret = VAULT.seal("card_1", "4761739001010085")
    assert b"4761739001010085" not in secret.sealed_pan + secret.wrapped_key
    assert secret.key_id == key_id(KEK) and len(secret.wrapped_key) == 40  # 32 + RFC 3394's 8
    assert VAULT.open("card_1", secret) == "4761739001010085"
    with pytest.raises(VaultError, match="does not open"):
        VAULT.open("card_2", secret)  # copied onto another card
    altered = secret.__class__(
        key_id=secret.key_id,
        wrapped_key=secret.wrapped_key,
        sealed_pan=secret.sealed_pan[:-1] + bytes([secret.sealed_pan[-1] ^ 1]),
    )
    with pytest.raises(VaultError, match="does not open"):
        VAULT.open("card_1", altered)
    rotated = PanVault([NEXT_KEK, KEK])  # the new key wraps, the old still unwraps
    assert rotated.open("card_1", secret) == "4761739001010085"
    assert rotated.seal("card_3", "4761739001010093").key_id == key_id(NEXT_KEK)
    with pytest.raises(VaultError, match="not configured"):
        PanVault([NEXT_KEK]).open("card_1", secret)
    assert KEK.hex() not in repr(rotated)
    # Two seals of one PAN share nothing: a data key and a nonce each.
    again = VAULT.seal("card_1", "4761739001010085")
    assert again.sealed_pan != secret.sealed_pan and again.wrapped_key != secret.wrapped_key


def test_keys_from_the_environment() -> None:
    with pytest.raises(VaultError, match=r"\(V\) is not set"):
        vault_from_environment(("V",), {}, demo=False)
    with pytest.raises(VaultError, match=r"\(V\) holds 16 bytes; AES-256 needs 32"):
        vault_from_environment(("V",), {"V": "ab" * 16}, demo=False)
    assert vault_from_environment(("V",), {}, demo=True).insecure
    assert not vault_from_environment(("V",), {"V": KEK.hex()}, demo=False).insecure


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    ledger = Ledger(tmp_path, durability="process", map_size_bytes=64 << 20)
    with ledger.write() as writer:
        commands.create_account("a1", "EUR", 0, None)(writer, NOW_MS)
    yield ledger
    ledger.close()


def issue(ledger: Ledger, source: commands.Issuing = SOURCE) -> tuple[str, str]:
    with ledger.write() as writer:
        reply = commands.issue_virtual_card(
            "a1", None, source.hasher, source.config, vault=source.vault
        )(writer, NOW_MS)
    body = msgspec.json.decode(reply.body)
    return body["id"], body["pan"]


def take(ledger: Ledger, card_id: str, token: str, now_ms: int = NOW_MS) -> object:
    with ledger.write() as writer:
        return commands.take_reveal_token(card_id, token_digest(token))(writer, now_ms)


def grant(ledger: Ledger, card_id: str, token: str, expires_ms: int) -> None:
    with ledger.write() as writer:
        commands.create_reveal_token(card_id, token_digest(token), expires_ms)(writer, NOW_MS)


def test_an_issued_cards_pan_is_kept_sealed_and_shown_once(ledger: Ledger) -> None:
    card_id, pan = issue(ledger)
    with ledger.read() as reader:
        secret = reader.card_secret(card_id)
    assert secret is not None and VAULT.open(card_id, secret) == pan
    assert pan.encode() not in (Path(ledger.path) / "data.mdb").read_bytes()
    grant(ledger, card_id, "t0ken-one", NOW_MS + 300_000)
    shown = take(ledger, card_id, "t0ken-one")
    assert isinstance(shown, commands.Revealed) and VAULT.open(card_id, shown.secret) == pan
    assert take(ledger, card_id, "t0ken-one") is None  # used
    with ledger.read() as reader:  # the token itself is never kept, only its digest
        assert b"t0ken-one" not in (Path(ledger.path) / "data.mdb").read_bytes()


def test_a_token_works_for_its_card_only_and_not_after_it_expires(ledger: Ledger) -> None:
    card_a, _ = issue(ledger)
    card_b, _ = issue(ledger)
    grant(ledger, card_a, "for-a", NOW_MS + 300_000)
    assert take(ledger, card_b, "for-a") is None  # another card's token
    grant(ledger, card_a, "late", NOW_MS + 300_000)
    assert take(ledger, card_a, "late", now_ms=NOW_MS + 300_000) is None  # expired
    assert take(ledger, card_a, "never-granted") is None


def test_no_token_for_a_card_without_a_kept_pan_or_one_that_stopped(ledger: Ledger) -> None:
    plain = commands.Issuing(hasher=HASHER, config=SOURCE.config)  # no vault: no PAN kept
    card_id, _ = issue(ledger, plain)
    with ledger.write() as writer, pytest.raises(Refused) as caught:
        commands.create_reveal_token(card_id, token_digest("x"), NOW_MS + 1)(writer, NOW_MS)
    assert caught.value.code == "card_not_revealable"
    kept, _ = issue(ledger)
    with ledger.write() as writer:
        commands.change_card_status(kept, "close")(writer, NOW_MS)
    with ledger.write() as writer, pytest.raises(Refused) as caught:
        commands.create_reveal_token(kept, token_digest("y"), NOW_MS + 1)(writer, NOW_MS)
    assert caught.value.code == "card_not_revealable"
    # Said as it is: the card stopped (its sealed PAN went with it), not "never kept".
    assert caught.value.message == f"card {kept} is closed"


@pytest.mark.parametrize("action", ["close", "report-lost", "report-stolen"])
def test_a_card_that_stops_forgets_its_sealed_pan_and_its_token(
    ledger: Ledger, action: commands.CardAction
) -> None:
    card_id, _ = issue(ledger)
    other, _ = issue(ledger)
    grant(ledger, card_id, "live-token", NOW_MS + 300_000)
    with ledger.write() as writer:
        commands.change_card_status(card_id, action)(writer, NOW_MS)
    with ledger.read() as reader:
        assert reader.card_secret(card_id) is None
        assert reader.reveal_token(card_id) is None
        assert reader.card_secret(other) is not None  # only the stopped card's
    assert take(ledger, card_id, "live-token") is None


def test_the_migration_from_schema_5_forgets_what_stopped_cards_kept(tmp_path: Path) -> None:
    """Schema 5 kept a stopped card's sealed PAN and token; opening it with schema 6 drops
    them, and only theirs."""
    ledger = Ledger(tmp_path, durability="process", map_size_bytes=64 << 20)
    with ledger.write() as writer:
        commands.create_account("a1", "EUR", 0, None)(writer, NOW_MS)
    stopped, _ = issue(ledger)
    kept, _ = issue(ledger)
    grant(ledger, kept, "still-live", NOW_MS + 300_000)
    with ledger.write() as writer:
        commands.change_card_status(stopped, "close")(writer, NOW_MS)
        # What schema 5 left behind: the sealed PAN and a token of a closed card.
        writer.put_card_secret(stopped, VAULT.seal(stopped, "4761730000000000"))
        writer.put_reveal_token(stopped, commands.RevealToken(digest=b"d" * 32, expires_ms=1))
        writer._txn.put(b"schema", b"5", db=writer._dbs["meta"])
    ledger.close()
    ledger = Ledger(tmp_path, durability="process", map_size_bytes=64 << 20)
    try:
        assert ledger.migrated_from == b"5"
        with ledger.read() as reader:
            assert reader.card_secret(stopped) is None
            assert reader.reveal_token(stopped) is None
            assert reader.card_secret(kept) is not None
            assert reader.reveal_token(kept) is not None
    finally:
        ledger.close()
