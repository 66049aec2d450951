"""Constrained types that several layers name, each defined once (config and wire both use them).

The bottom of the import graph: this module imports nothing from the processor.
"""

from __future__ import annotations

from typing import Final, Literal

# How a listener delimits messages: len2 = 2-byte big-endian length of what follows,
# len2_inclusive = the same counting its own 2 bytes, ascii4 = 4 ASCII digits.
Framing = Literal["len2", "len2_inclusive", "ascii4"]
# The longest body (header + message) each framing can announce.
FRAME_BYTES_CEILING: Final[dict[str, int]] = {
    "len2": 65535,
    "len2_inclusive": 65533,
    "ascii4": 9999,
}
# Bitmaps as 16 hex ASCII characters or 8 raw bytes.
Bitmap = Literal["ascii", "binary"]
