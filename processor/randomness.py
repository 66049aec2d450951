"""Unpredictable numbers for approval codes, from the operating system's CSPRNG, read in bulk.

`secrets.randbelow` makes a getrandom system call per number (~1 us here, on every approval);
reading 4 KiB at a time, unpacked into 20-bit numbers once, gives the same unpredictable
numbers for a small part of that. Numbers past the largest multiple of the bound are drawn
again (rejection sampling), so every value below the bound is equally likely.
"""

from __future__ import annotations

import os
import struct
from typing import Final

_NUMBERS_PER_READ: Final = 1024
_UNPACK: Final = struct.Struct(f"<{_NUMBERS_PER_READ}I").unpack
_DRAW_BITS: Final = 20  # enough for six digits: 2**20 = 1,048,576 >= 10**6
_MASK: Final = (1 << _DRAW_BITS) - 1


class BufferedRandom:
    __slots__ = ("_numbers",)

    def __init__(self) -> None:
        self._numbers: list[int] = []

    def below(self, bound: int) -> int:
        """A uniformly drawn integer in [0, bound), for bound <= 2**20."""
        assert 0 < bound <= 1 << _DRAW_BITS, bound
        # The largest multiple of `bound` that 20 bits reach: numbers below it, reduced modulo
        # `bound`, give each value equally often; the few at or above it are drawn again.
        limit = ((1 << _DRAW_BITS) // bound) * bound
        numbers = self._numbers
        while True:
            if not numbers:
                read = _UNPACK(os.urandom(4 * _NUMBERS_PER_READ))
                numbers.extend(value & _MASK for value in read)
            number = numbers.pop()
            if number < limit:
                return number % bound
