"""The published development keys, in one place.

`processor serve --demo` runs on them so that it needs no secret; they are in this source, so
anyone can use them. Outside `--demo` none of them is accepted in any slot (the PAN-hashing
key, the PAN vault's or personal data's AES keys, a card verification key), written as bytes
or as hex text: with the published PAN key, a card id and its masked PAN (in every event and
API answer) give back the whole PAN in seconds.
"""

from __future__ import annotations

from typing import Final

PAN_KEY: Final = b"processor-insecure-development-pan-key"
PAN_VAULT_KEY: Final = bytes.fromhex("fedcba9876543210" * 4)
PERSONAL_DATA_KEY: Final = bytes.fromhex("00112233445566778899aabbccddeeff" * 2)
CARD_VERIFICATION_KEY: Final = bytes.fromhex("0123456789ABCDEFFEDCBA9876543210")

_KEYS: Final = (PAN_KEY, PAN_VAULT_KEY, PERSONAL_DATA_KEY, CARD_VERIFICATION_KEY)
_PUBLISHED: Final = frozenset(
    (
        *_KEYS,
        *(key.hex().encode("ascii") for key in _KEYS),
        *(key.hex().upper().encode("ascii") for key in _KEYS),
    )
)


def without_parity(key: bytes) -> bytes:
    """A DES key's bytes without their parity bits (the lowest of each), which DES ignores:
    keys that differ only there are one key."""
    return bytes(byte & 0xFE for byte in key)


_CVK_WITHOUT_PARITY: Final = without_parity(CARD_VERIFICATION_KEY)


def is_published(key: bytes) -> bool:
    """Whether `key` is one of the published development keys, of any purpose (the card
    verification key also with other parity bits)."""
    return key in _PUBLISHED or (
        len(key) == len(CARD_VERIFICATION_KEY) and without_parity(key) == _CVK_WITHOUT_PARITY
    )
