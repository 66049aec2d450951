"""Cardholders' personal data, sealed with AES-256-GCM before it reaches the ledger.

The ledger keeps a cardholder's id, kind and KYC status in the clear (authorisations, events and
metrics need nothing more) and the rest, name, date of birth, address, contacts, sealed: a
random 96-bit nonce, the ciphertext and its tag, under a key from the environment, with the
cardholder id as associated data (a sealed record copied onto another cardholder does not open).
Each record names its key by an id derived from the key, so keys rotate: the first key listed
seals, every key listed opens what it sealed. The AEAD is pyca/cryptography's.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Mapping
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from processor.aes_keys import aes_keys_from_environment
from processor.development_keys import PERSONAL_DATA_KEY

NONCE_BYTES: Final = 12
# For `processor serve --demo` only: published, so anyone can open what it sealed.
INSECURE_DEVELOPMENT_KEY: Final = PERSONAL_DATA_KEY


class PersonalDataError(ValueError):
    """A key that cannot be used, or a sealed record that does not open; names the setting or
    the record, never a key or the data."""


def key_id(key: bytes) -> str:
    """A short name for the key, derived from it one way (safe to store beside the records)."""
    return hmac.new(key, b"processor/personal-data-key-id", hashlib.sha256).hexdigest()[:8]


class PersonalDataCipher:
    """Seals with the first key, opens with any."""

    __slots__ = ("_keys", "_sealing", "insecure")

    def __init__(self, keys: list[bytes], *, insecure: bool = False) -> None:
        if not keys:
            raise PersonalDataError("no personal-data key")
        self._keys = {key_id(key): AESGCM(key) for key in keys}
        self._sealing = key_id(keys[0])
        self.insecure = insecure

    def seal(self, plaintext: bytes, owner: str) -> tuple[str, bytes]:
        """(key id, nonce + ciphertext + tag) of `plaintext`, bound to `owner` (its id)."""
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._keys[self._sealing].encrypt(nonce, plaintext, owner.encode())
        return self._sealing, nonce + sealed

    def open(self, key: str, sealed: bytes, owner: str) -> bytes:
        aead = self._keys.get(key)
        if aead is None:
            raise PersonalDataError(f"{owner}: sealed with key {key}, which is not configured")
        try:
            return aead.decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], owner.encode())
        except InvalidTag:
            raise PersonalDataError(f"{owner}: its sealed data does not open (altered?)") from None

    def __repr__(self) -> str:  # never the keys
        return f"PersonalDataCipher(sealing={self._sealing}, keys={sorted(self._keys)})"


def cipher_from_environment(
    variables: tuple[str, ...], environ: Mapping[str, str], *, demo: bool
) -> PersonalDataCipher:
    """The keys the variables hold; under `demo` with none set, the published development
    key."""
    try:
        keys = aes_keys_from_environment(
            variables,
            environ,
            setting="security.personal_data_key_envs",
            purpose="cardholders' personal data is sealed with it",
            published=INSECURE_DEVELOPMENT_KEY,
            demo=demo,
        )
    except ValueError as error:
        raise PersonalDataError(str(error)) from None
    if keys is None:
        return PersonalDataCipher([INSECURE_DEVELOPMENT_KEY], insecure=True)
    return PersonalDataCipher(keys)
