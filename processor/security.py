"""PAN protection: keyed hashing for ledger keys and masking for anything a person may see.

The ledger never holds a PAN. Cards are found by HMAC-SHA256(key, PAN); the key comes from the
environment so that a copy of the ledger files alone cannot be brute-forced over the (small) PAN
space of one BIN.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from collections.abc import Mapping
from typing import Final

from processor import limits
from processor.development_keys import PAN_KEY, is_published

INSECURE_DEVELOPMENT_KEY: Final = PAN_KEY

_BLOCK_BYTES = 64  # SHA-256's block size, the HMAC pad length


class PanHasher:
    """HMAC-SHA256 with the key's inner and outer pads hashed once (RFC 2104).

    Two HMACs run per request (card key, duplicate fingerprint); copying the pre-keyed SHA-256
    states costs ~1.2 us where `hmac.new` pays ~1.9 us to set the key up again each time.
    tests/property/test_security_properties.py holds it equal to `hmac.new`.
    """

    __slots__ = ("_inner", "_key", "_outer", "fingerprint", "insecure")

    def __init__(self, key: bytes, *, insecure: bool = False) -> None:
        if not key:
            raise ValueError("PAN key: must not be empty")
        self._key = key
        self.insecure = insecure
        block = key if len(key) <= _BLOCK_BYTES else hashlib.sha256(key).digest()
        block = block.ljust(_BLOCK_BYTES, b"\0")
        self._inner = hashlib.sha256(bytes(byte ^ 0x36 for byte in block))
        self._outer = hashlib.sha256(bytes(byte ^ 0x5C for byte in block))
        # Stored in the ledger so a restart with another key refuses to run instead of silently
        # answering 14 (no such card) for every card.
        self.fingerprint = hmac.new(key, b"processor/pan-key-fingerprint", "sha256").hexdigest()[
            :16
        ]

    def _hmac(self, data: bytes) -> bytes:
        inner = self._inner.copy()
        inner.update(data)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()

    def card_key(self, pan: str) -> bytes:
        return self._hmac(pan.encode("ascii"))

    def digest(self, data: bytes) -> bytes:
        """Keyed digest of arbitrary request content (duplicate detection without storing it)."""
        return self._hmac(data)[:16]


def pan_key_weakness(variable: str, key: bytes) -> str | None:
    """Why `key` (from `variable`) may not key a ledger's cards outside --demo, or None: the
    one rule for the daemon's start and the tools. Unset or short, or a published
    development key (with it anyone can recover a PAN from its card id and masked PAN)."""
    if len(key) < limits.pan_key_bytes_min:
        what = "is not set" if not key else f"holds {len(key)} bytes"
        return (
            f"{variable} {what}: the PAN-hashing key must be a secret of at least "
            f"{limits.pan_key_bytes_min} bytes (e.g. openssl rand -hex 32)"
        )
    if is_published(key):
        return (
            f"{variable} holds a published development key: with it anyone can recover a "
            "PAN from its card id and masked PAN (e.g. openssl rand -hex 32 for a secret)"
        )
    return None


def key_from_environment(variable: str, environ: Mapping[str, str] = os.environ) -> bytes:
    """The variable's bytes as the process got them: os.environ decodes them with
    surrogateescape, and a key that is not UTF-8 crashed the start with a traceback when
    encoded back strictly. Any bytes make an HMAC key."""
    return environ.get(variable, "").encode("utf-8", "surrogateescape")


def hasher_from_environment(variable: str) -> PanHasher:
    value = key_from_environment(variable)
    if value:
        return PanHasher(value)
    return PanHasher(INSECURE_DEVELOPMENT_KEY, insecure=True)


def mask_pan(pan: str) -> str:
    """First six and last four digits, the rest starred (PCI DSS display rule)."""
    if len(pan) < 13:
        return "*" * len(pan)
    return f"{pan[:6]}{'*' * (len(pan) - 10)}{pan[-4:]}"


# Digits as card numbers are grouped, split by a space, a dash or any character an id allows
# ("4111.1111.1111.1111", "3782_822463_10005", "4111/1111/..."): four digits, then groups of
# four to six, the last maybe of one to three (13-, 17-, 18- and 19-digit numbers). An account
# id or a path segment may be written so, and its error quoted it in clear. Not a group of
# another size nor one that starts or ends inside a run of digits: times ("1765100000.123456",
# "20261124_120000"), addresses and bounds written in thousands ("1_000_000_000_000_000")
# would read as card numbers (logs mask every long run; a run of zeros passes the Luhn check).
# Looked for first: a run of the kind below could take a grouped number's first group (as in
# "txn 123456789 4111.1111.1111.1111") and leave 12 digits, too few to be masked.
_GROUPED: Final = re.compile(r"(?<!\d)\d{4}(?:[ ._:/-]\d{4,6})+(?:[ ._:/-]\d{1,3})?(?!\d)")
# Then any run of digits, or of digits split by single spaces or dashes, 13 at least.
_DIGIT_RUN: Final = re.compile(r"\d(?:[ -]?\d){12,}")
_SEPARATORS: Final = str.maketrans("", "", " ._:/-")
# A run of more digits than most PANs have is masked whole (but for its first six and last
# four): a card number may sit inside it, followed by its expiry (15 + 4 digits pass no Luhn
# check as a whole), or be one of the rare 17-19-digit PANs. Looking for one at each offset
# would cost a search per window.
_WHOLE_RUN_DIGITS_MIN: Final = 17
_PAN_DIGITS_MIN: Final = 13


def _masked_run(run: str) -> str:
    """The run with every digit but its first six and last four starred, separators kept: a
    card number anywhere in it shows at most its first six or last four digits."""
    total = sum(char.isdigit() for char in run)
    out = []
    seen = 0
    for char in run:
        if char.isdigit():
            out.append(char if seen < 6 or seen >= total - 4 else "*")
            seen += 1
        else:
            out.append(char)
    return "".join(out)


def _holds_a_pan(digits: str) -> bool:
    """Whether 13 or more consecutive of `digits` (at most 16) pass the Luhn check."""
    return bool(_luhn_windows(digits))


def mask_card_numbers(text: str, *, every_run: bool = False) -> str:
    """`text` with every card number in it masked, written as one run or grouped by spaces or
    dashes (or as card numbers are grouped, by `._:/` too), alone or inside a longer run of
    digits (a PAN followed by its expiry): for messages that quote what was sent (an enum value
    msgspec names, an id, a catalog entry), where a card number put in the wrong place must not
    come back in clear.

    A run of 13-16 digits is masked when any 13 or more consecutive digits of it pass the Luhn
    check (a short PAN with its expiry month after it, or a length prefix before it), or,
    with `every_run` (logs and reports, which cannot tell a card number from its
    neighbours), always; a longer run always. Linear in the text.
    """

    def masked(found: re.Match[str]) -> str:
        run = found[0]
        digits = run.translate(_SEPARATORS)
        if len(digits) < _PAN_DIGITS_MIN:
            return run  # groups, but fewer digits than any card number has
        if every_run or len(digits) >= _WHOLE_RUN_DIGITS_MIN or _holds_a_pan(digits):
            return _masked_run(run)
        return run

    return _DIGIT_RUN.sub(masked, _GROUPED.sub(masked, text))


# Digits as a card number may be typed into an id or a reason: one run, or groups split by
# any character an account id allows as well as spaces and dashes ("4761.7390.0101.0010",
# "acct:4761_7390_..."), with other numbers beside it ("order 12 4761...", "... 05/27").
# ASCII digits only: `\d` takes any script's (a reason in Arabic-Indic digits raised here).
_TYPED_DIGITS: Final = re.compile(r"[0-9](?:[ ._:/-]?[0-9])*")


def typed_card_numbers(text: str) -> list[str]:
    """Every 13-19 digits in a row of `text` (separators skipped) that pass the Luhn check:
    what could be a card number typed in it, alone or beside other numbers. A tenth of any
    such windows pass, so callers refuse only those the ledger knows as cards (an id or a
    reason is kept in clear: a card's number typed into one must not be; a customer number
    that merely passes Luhn must stay usable). At most seven windows a digit, each checked
    in constant time from running sums (this runs on the event loop the authorisations share:
    a Luhn pass per window of a 200-digit reason took 5 ms)."""
    found: list[str] = []
    for run in _TYPED_DIGITS.finditer(text):
        found += _luhn_windows(run[0].translate(_SEPARATORS))
    return found


def _luhn_windows(digits: str) -> list[str]:
    """Every 13-19 consecutive of `digits` (decimal digits, of any script) that pass the Luhn
    check, each window checked in constant time from running sums."""
    size = len(digits)
    if size < _PAN_DIGITS_MIN:
        return []
    # sums[p][i]: Luhn contributions of digits[:i] when the digits whose index parity is not
    # p are the doubled ones, as they are in a window whose last digit has parity p.
    sums = [[0] * (size + 1), [0] * (size + 1)]
    for index, char in enumerate(digits):
        value = int(char)
        doubled = _DOUBLED[value]
        for parity in (0, 1):
            sums[parity][index + 1] = sums[parity][index] + (
                value if index % 2 == parity else doubled
            )
    found = []
    for start in range(size - _PAN_DIGITS_MIN + 1):
        for end in range(start + _PAN_DIGITS_MIN, min(size, start + 19) + 1):
            running = sums[(end - 1) % 2]
            if (running[end] - running[start]) % 10 == 0:
                found.append(digits[start:end])
    return found


_DOUBLED: Final = tuple((2 * value) // 10 + (2 * value) % 10 for value in range(10))


def _luhn_sum(digits: str, doubled_parity: int) -> int:
    """The Luhn sum of `digits`, doubling those whose index from the right has this parity."""
    total = 0
    for index, char in enumerate(reversed(digits)):
        digit = ord(char) - 48
        if index % 2 == doubled_parity:
            digit *= 2
            if digit > 9:
                digit -= 9
        total += digit
    return total


def luhn_valid(pan: str) -> bool:
    return pan.isdigit() and _luhn_sum(pan, 1) % 10 == 0


def luhn_check_digit(digits: str) -> str:
    """The digit that makes `digits` + it pass the Luhn check (the check digit is not yet there,
    so the digits doubled are those at even indexes from the right)."""
    return str((10 - _luhn_sum(digits, 0) % 10) % 10)
