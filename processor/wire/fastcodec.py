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
    __slots__ = ("_binary_bitmap", "_bitmap_bytes", "_plan")

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
        plan = self._plan
        for position, byte in enumerate(bitmap):
            if not byte:
                continue
            for number in _SET_BITS[position][byte]:
                if number == 1:
                    continue
                key, length_type, length = plan[number]
                if length_type:
                    prefix = message[index : index + length_type]
                    if len(prefix) != length_type or prefix.translate(None, _ASCII_DIGITS):
                        return None
                    maximum = length
                    length = int(prefix)
                    if length > maximum:
                        return None
                    index += length_type
                end = index + length
                if end > size:
                    return None
                try:
                    fields[key] = message[index:end].decode("ascii")
                except UnicodeDecodeError:
                    return None
                index = end
        if index != size:
            return None
        return fields

    def encode(self, fields: dict[str, str]) -> bytes | None:
        try:
            numbers = sorted(int(key) for key in fields if key != "t")
            mti = fields["t"].encode("ascii")
        except (ValueError, KeyError, UnicodeEncodeError):
            return None
        if len(mti) != 4 or (numbers and (numbers[0] < 2 or numbers[-1] > 128)):
            return None
        extended = bool(numbers) and numbers[-1] > 64
        count = 128 if extended else 64
        bits = 1 << 127 if extended else 0
        plan = self._plan
        parts = [mti, b""]
        for number in numbers:
            bits |= 1 << (count - number)
            key, length_type, length = plan[number]
            try:
                data = fields[key].encode("ascii")
            except UnicodeEncodeError:
                return None
            if length_type:
                if len(data) > length:
                    return None
                parts.append(b"%0*d" % (length_type, len(data)))
            elif len(data) != length:
                return None
            parts.append(data)
        width = count // 8
        if self._binary_bitmap:
            parts[1] = bits.to_bytes(width, "big")
        else:
            parts[1] = b"%0*X" % (width * 2, bits)
        return b"".join(parts)
