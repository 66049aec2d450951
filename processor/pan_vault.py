"""The PANs of the cards this processor issued, kept so the cardholder can be shown them.

Envelope encryption: each card's PAN is sealed with AES-256-GCM under a data key of its own
(random, used once), with the card id as associated data; the data key is wrapped (AES key
wrap, RFC 3394) under a key-encryption key from the environment, named in the record by an id
derived from it, so keys rotate: the first listed wraps, every listed one unwraps. Nothing
else in the ledger can give the PAN back (cards are found by a keyed hash); only the one-time
reveal (processor/api/reveal.py) opens it. pyca/cryptography does the cryptography.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Mapping
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap, aes_key_wrap

from processor.aes_keys import KEY_BYTES, aes_keys_from_environment
from processor.development_keys import PAN_VAULT_KEY
from processor.ledger.records import CardSecret

NONCE_BYTES: Final = 12
# For `processor serve --demo` only: published, so anyone can open what it wrapped.
INSECURE_DEVELOPMENT_KEY: Final = PAN_VAULT_KEY


class VaultError(ValueError):
    """A key that cannot be used or a record that does not open; never names a key or PAN."""


def key_id(key: bytes) -> str:
    return hmac.new(key, b"processor/pan-vault-key-id", hashlib.sha256).hexdigest()[:8]


class PanVault:
    __slots__ = ("_keys", "_wrapping", "insecure")

    def __init__(self, keys: list[bytes], *, insecure: bool = False) -> None:
        if not keys:
            raise VaultError("no PAN vault key")
        self._keys = {key_id(key): key for key in keys}
        self._wrapping = key_id(keys[0])
        self.insecure = insecure

    def seal(self, card_id: str, pan: str) -> CardSecret:
        data_key = os.urandom(KEY_BYTES)
        nonce = os.urandom(NONCE_BYTES)
        sealed = nonce + AESGCM(data_key).encrypt(nonce, pan.encode("ascii"), card_id.encode())
        wrapped = aes_key_wrap(self._keys[self._wrapping], data_key)
        return CardSecret(key_id=self._wrapping, wrapped_key=wrapped, sealed_pan=sealed)

    def open(self, card_id: str, secret: CardSecret) -> str:
        kek = self._keys.get(secret.key_id)
        if kek is None:
            raise VaultError(
                f"card {card_id}: its PAN is wrapped under key {secret.key_id}, "
                "which is not configured"
            )
        try:
            data_key = aes_key_unwrap(kek, secret.wrapped_key)
            sealed = secret.sealed_pan
            plain = AESGCM(data_key).decrypt(
                sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], card_id.encode()
            )
        except (InvalidUnwrap, InvalidTag):
            raise VaultError(f"card {card_id}: its sealed PAN does not open (altered?)") from None
        return plain.decode("ascii")

    def __repr__(self) -> str:  # never the keys
        return f"PanVault(wrapping={self._wrapping}, keys={sorted(self._keys)})"


def vault_from_environment(
    variables: tuple[str, ...], environ: Mapping[str, str], *, demo: bool
) -> PanVault:
    """The keys the variables hold; under `demo` with none set, the published development
    key."""
    try:
        keys = aes_keys_from_environment(
            variables,
            environ,
            setting="security.pan_vault_key_envs",
            purpose="the PANs of issued cards are kept under it for the cardholder to see",
            published=INSECURE_DEVELOPMENT_KEY,
            demo=demo,
        )
    except ValueError as error:
        raise VaultError(str(error)) from None
    if keys is None:
        return PanVault([INSECURE_DEVELOPMENT_KEY], insecure=True)
    return PanVault(keys)
