"""CVC2 / CVV2: computed from the card range's card verification key, never stored.

Each card range (a BIN prefix) has one or more card verification keys (CVKs): double-length
3DES keys from the environment. The first listed computes the CVC2 of cards issued from now
on; every listed key still verifies the cards it computed, which is how a key is rotated. A
card records only the key check value (KCV) of its key, as key management systems name keys:
three bytes of the key encrypting zeros, which identify the key without revealing it.

The value is the Visa/Mastercard CVV method with service code 000 (the CVC2 printed on the
card), computed by psec, a payments-cryptography library, over pyca/cryptography's 3DES.
"""

from __future__ import annotations

import hmac
import warnings
from collections.abc import Mapping
from typing import Final

import psec
from cryptography.utils import CryptographyDeprecationWarning

from processor.config import CardVerificationRange
from processor.development_keys import CARD_VERIFICATION_KEY, is_published, without_parity

# psec reaches 3DES through pyca/cryptography's primitives module, which warns that 3DES has
# moved to its `decrepit` module and that two-key 3DES is deprecated. Two-key 3DES is what the
# card schemes specify for CVKs; the warning says nothing an operator can act on.
warnings.filterwarnings("ignore", category=CryptographyDeprecationWarning, module=r"psec\.des")

SERVICE_CODE_CVC2: Final = "000"  # the schemes' service code for the value printed on the card
CVK_BYTES: Final = 16  # double-length 3DES
# A fixed, published key for `processor serve --demo` only: anyone can compute its CVC2s.
INSECURE_DEVELOPMENT_CVK: Final = CARD_VERIFICATION_KEY


class CardVerificationError(ValueError):
    """A card verification key that cannot be used; the message names the setting."""


def compute_cvc2(key: bytes, pan: str, expiry: str) -> str | None:
    """The CVC2 of `pan` with expiry `expiry` (YYMM) under `key`, or None for the rare card
    (about 1 in 20,000) whose value has fewer than three decimal digits.

    The method then takes hexadecimal digits instead; psec leaves that step out, and writing it
    here would mean writing the method by hand. Issuing draws another PAN instead (the API
    already draws until it finds a free one), so no card needs it.
    """
    value: str = psec.cvv.generate_cvv(key, pan, expiry, SERVICE_CODE_CVC2)
    return value if len(value) == 3 else None


def key_check_value(key: bytes) -> str:
    """The key's check value: its first three bytes encrypting eight zero bytes, in hex."""
    kcv: bytes = psec.des.generate_kcv(key, 3)
    return kcv.hex().upper()


class RangeKeys:
    """The keys of one card range, the issuing one first."""

    __slots__ = ("bin_prefix", "keys")

    def __init__(self, bin_prefix: str, keys: list[tuple[str, bytes]]) -> None:
        self.bin_prefix = bin_prefix
        self.keys = keys  # (KCV, key)


class CardVerificationKeys:
    """Every range's keys: which key issues a new card's CVC2, and which verifies a card's."""

    def __init__(self, ranges: list[RangeKeys]) -> None:
        # Longest prefix first, so a narrower range inside a wider one wins.
        self._ranges = sorted(ranges, key=lambda each: -len(each.bin_prefix))
        self._by_kcv = {kcv: key for each in ranges for kcv, key in each.keys}

    def issuing(self, pan: str) -> tuple[str, bytes] | None:
        """(KCV, key) that computes the CVC2 of a new card numbered `pan`; None: no key for
        its range (the card gets no CVC2)."""
        for each in self._ranges:
            if pan.startswith(each.bin_prefix):
                return each.keys[0]
        return None

    def key(self, kcv: str) -> bytes | None:
        """The key a card's CVC2 was computed with, by its KCV; None when no longer configured."""
        return self._by_kcv.get(kcv)

    def verify(self, kcv: str, pan: str, expiry: str, cvc2: str) -> bool | None:
        """Whether `cvc2` is the card's; None when its key is not configured."""
        key = self._by_kcv.get(kcv)
        if key is None:
            return None
        expected = compute_cvc2(key, pan, expiry)
        return expected is not None and hmac.compare_digest(expected, cvc2)

    def __bool__(self) -> bool:
        return bool(self._ranges)

    def __repr__(self) -> str:  # never the keys
        ranges = ", ".join(
            f"{each.bin_prefix}: {[kcv for kcv, _ in each.keys]}" for each in self._ranges
        )
        return f"CardVerificationKeys({ranges})"


NO_KEYS: Final = CardVerificationKeys([])


def keys_from_environment(
    ranges: tuple[CardVerificationRange, ...], environ: Mapping[str, str]
) -> CardVerificationKeys:
    """Each range's keys from the variables it names (hex, 32 digits); an error names the
    setting of the first key that is missing or not a double-length key, or a key listed
    twice (a rotation that forgot to change it)."""
    built: list[RangeKeys] = []
    seen: dict[str, str] = {}
    for index, each in enumerate(ranges):
        keys: list[tuple[str, bytes]] = []
        if each.development_key:
            keys.append((key_check_value(INSECURE_DEVELOPMENT_CVK), INSECURE_DEVELOPMENT_CVK))
        for position, variable in enumerate(each.key_envs):
            where = f"$.security.card_verification_keys[{index}].key_envs[{position}]"
            key = _key_from(environ.get(variable, ""), variable, where)
            kcv = key_check_value(key)
            if kcv in seen:
                raise CardVerificationError(
                    f"{where}: {variable} holds the same key as {seen[kcv]} (check value {kcv})"
                )
            seen[kcv] = where
            keys.append((kcv, key))
        built.append(RangeKeys(each.bin_prefix, keys))
    return CardVerificationKeys(built)


def _key_from(value: str, variable: str, where: str) -> bytes:
    if not value:
        raise CardVerificationError(f"{where}: {variable} is not set")
    try:
        key = bytes.fromhex(value)
    except ValueError:
        raise CardVerificationError(
            f"{where}: {variable} is not hexadecimal (a card verification key is "
            f"{CVK_BYTES * 2} hex digits)"
        ) from None
    if len(key) != CVK_BYTES:
        raise CardVerificationError(
            f"{where}: {variable} holds {len(key)} bytes; a card verification key is a "
            f"double-length 3DES key of {CVK_BYTES} bytes ({CVK_BYTES * 2} hex digits)"
        )
    if is_published(key):
        raise CardVerificationError(
            f"{where}: {variable} holds a published development key (check value "
            f"{key_check_value(key)}): anyone can compute its CVC2s"
        )
    if without_parity(key[:8]) == without_parity(key[8:]):
        # DES ignores the parity bits: halves that differ only there are single DES too.
        raise CardVerificationError(
            f"{where}: {variable} is single-length DES repeated (both halves equal, parity "
            "bits aside), which the schemes do not accept for a card verification key"
        )
    return key
