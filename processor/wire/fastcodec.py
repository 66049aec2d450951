"""A spec-driven ISO 8583 codec for the hot path, equal to pyiso8583 wherever it answers.

Why hand-written: pyiso8583 is general (BCD, EBCDIC, nibble lengths, tertiary bitmaps) and
spends ~34 us decoding an 0100 and ~24 us encoding an 0110 on our machine, three quarters of
the CPU of an authorisation. Our spec is one narrow case (ASCII data, ASCII lengths, hex-ASCII or
binary bitmaps), which a flat loop over a precomputed field table decodes several times faster.

Correctness rule: `decode` returns exactly what `iso8583.decode(...)[0]` returns, or None when
the input is anything but plainly well formed (non-digit lengths, non-ASCII data, bit 65,
truncation, trailing bytes, ...). `encode` returns exactly `iso8583.encode(...)[0]`, or None
when a value does not fit. On None the caller uses pyiso8583, whose errors are precise. Property
tests (tests/property/test_fastcodec_properties.py) hold both halves to that.
"""

from __future__ import annotations

from typing import Final

from processor.wire.spec import Spec

_HEX_DIGITS: Final = b"0123456789abcdefABCDEF"
_ASCII_DIGITS: Final = b"0123456789"


# _SET_BITS[position][byte]: the field numbers a bitmap byte at that position switches on.
_SET_BITS: Final = tuple(
    tuple(
        tuple(position * 8 + bit + 1 for bit in range(8) if value & (0x80 >> bit))
        for value in range(256)
    )
    for position in range(16)
)


class FastCodec:
    __slots__ = ("_binary_bitmap", "_bitmap_bytes", "_numbers", "_plan")

    def __init__(self, spec: Spec) -> None:
        iso = spec.iso
        for key in ("t", *map(str, range(2, 129))):
            field = iso[key]
            if field["data_enc"] != "ascii" or field.get("len_count", "bytes") != "bytes":
                raise ValueError(f"fast codec: field {key} is not ASCII data counted in bytes")
            if field["len_type"] and field["len_enc"] != "ascii":
                raise ValueError(f"fast codec: field {key} length is not ASCII digits")
        if iso["h"]["max_len"] != 0 or iso["t"]["max_len"] != 4:
            raise ValueError("fast codec: expects no ISO header and a 4-byte MTI")
        self._binary_bitmap = iso["p"]["data_enc"] == "b"
        self._bitmap_bytes = 8 if self._binary_bitmap else 16
        # plan[number] = (document key, length digits (0 = fixed), maximum or fixed length)
        self._plan: list[tuple[str, int, int]] = [("", 0, 0), ("1", 0, 0)] + [
            (str(n), iso[str(n)]["len_type"], iso[str(n)]["max_len"]) for n in range(2, 129)
        ]
        # Document key -> field number, for the keys a response may carry (2..128).
        self._numbers: dict[str, int] = {str(n): n for n in range(2, 129)}

    def _bitmap(self, data: bytes) -> tuple[bytes, str] | None:
        """Bitmap as raw bytes, and the string pyiso8583 puts in its document."""
        if self._binary_bitmap:
            return data, data.hex().upper()
        if data.translate(None, _HEX_DIGITS):
            return None  # not all hex digits (fromhex would skip spaces)
        return bytes.fromhex(data.decode("ascii")), data.decode("ascii")

    def decode(self, message: bytes) -> dict[str, str] | None:
        size = len(message)
        width = self._bitmap_bytes
        if size < 4 + width:
            return None
        try:
            fields: dict[str, str] = {"t": message[:4].decode("ascii")}
        except UnicodeDecodeError:
            return None
        primary = self._bitmap(message[4 : 4 + width])
        if primary is None:
            return None
        bitmap, fields["p"] = primary
        index = 4 + width
        if bitmap[0] & 0x80:
            if size < index + width:
                return None
            secondary = self._bitmap(message[index : index + width])
            if secondary is None:
                return None
            if secondary[0][0] & 0x80:
                return None  # bit 65: a tertiary bitmap, which only pyiso8583 reads
            fields["1"] = secondary[1]
            bitmap += secondary[0]
            index += width
        # One decode of the whole body, then str slices: ASCII, so characters are bytes.
        try:
            body = message[index:].decode("ascii")
        except UnicodeDecodeError:
            return None
        size = len(body)
        index = 0
        plan = self._plan
        for position, byte in enumerate(bitmap):
            if not byte:
                continue
            for number in _SET_BITS[position][byte]:
                if number == 1:
                    continue
                key, length_type, length = plan[number]
                if length_type:
                    prefix = body[index : index + length_type]
                    if len(prefix) != length_type or not prefix.isdigit():
                        return None
                    maximum = length
                    length = int(prefix)
                    if length > maximum:
                        return None
                    index += length_type
                end = index + length
                if end > size:
                    return None
                fields[key] = body[index:end]
                index = end
        if index != size:
            return None
        return fields

    def encode(self, fields: dict[str, str]) -> bytes | None:
        numbers_by_key = self._numbers
        try:
            numbers = sorted(numbers_by_key[key] for key in fields if key != "t")
            mti = fields["t"]
        except KeyError:
            return None
        if len(mti) != 4 or (numbers and numbers[0] < 2):
            return None
        extended = bool(numbers) and numbers[-1] > 64
        count = 128 if extended else 64
        bits = 1 << 127 if extended else 0
        plan = self._plan
        parts = [mti, ""]
        for number in numbers:
            bits |= 1 << (count - number)
            key, length_type, length = plan[number]
            data = fields[key]
            if length_type:
                if len(data) > length:
                    return None
                parts.append(f"{len(data):0{length_type}d}")
            elif len(data) != length:
                return None
            parts.append(data)
        width = count // 8
        if self._binary_bitmap:
            parts[1] = ""
            try:
                text = "".join(parts).encode("ascii")
            except UnicodeEncodeError:
                return None
            return text[:4] + bits.to_bytes(width, "big") + text[4:]
        parts[1] = f"{bits:0{width * 2}X}"
        try:
            # One encode of the whole message: it also proves every value was ASCII, which
            # the length checks above (in characters) rely on.
            return "".join(parts).encode("ascii")
        except UnicodeEncodeError:
            return None
