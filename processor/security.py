"""PAN protection: keyed hashing for ledger keys and masking for anything a person may see.

The ledger never holds a PAN. Cards are found by HMAC-SHA256(key, PAN); the key comes from the
environment so that a copy of the ledger files alone cannot be brute-forced over the (small) PAN
space of one BIN.
"""

from __future__ import annotations

import hashlib
import hmac
import os

INSECURE_DEVELOPMENT_KEY = b"processor-insecure-development-pan-key"


class PanHasher:
    __slots__ = ("_key", "fingerprint", "insecure")

    def __init__(self, key: bytes, *, insecure: bool = False) -> None:
        if not key:
            raise ValueError("PAN key: must not be empty")
        self._key = key
        self.insecure = insecure
        # Stored in the ledger so a restart with another key refuses to run instead of silently
        # answering 14 (no such card) for every card.
        self.fingerprint = hmac.new(key, b"processor/pan-key-fingerprint", "sha256").hexdigest()[
            :16
        ]

    def card_key(self, pan: str) -> bytes:
        return hmac.new(self._key, pan.encode("ascii"), hashlib.sha256).digest()

    def digest(self, data: bytes) -> bytes:
        """Keyed digest of arbitrary request content (duplicate detection without storing it)."""
        return hmac.new(self._key, data, hashlib.sha256).digest()[:16]


def hasher_from_environment(variable: str) -> PanHasher:
    value = os.environ.get(variable, "")
    if value:
        return PanHasher(value.encode("utf-8"))
    return PanHasher(INSECURE_DEVELOPMENT_KEY, insecure=True)


def mask_pan(pan: str) -> str:
    """First six and last four digits, the rest starred (PCI DSS display rule)."""
    if len(pan) < 13:
        return "*" * len(pan)
    return f"{pan[:6]}{'*' * (len(pan) - 10)}{pan[-4:]}"


def luhn_valid(pan: str) -> bool:
    if not pan.isdigit():
        return False
    total = 0
    for index, char in enumerate(reversed(pan)):
        digit = ord(char) - 48
        if index % 2 == 1:
            digit *= 2
            if digit > 9:
                digit -= 9
        total += digit
    return total % 10 == 0
