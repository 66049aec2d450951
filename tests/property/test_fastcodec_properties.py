"""The hot-path codec against pyiso8583: same answer wherever it answers, None otherwise."""

from __future__ import annotations

import iso8583
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from iso8583.decoder import DecodeError
from iso8583.encoder import EncodeError

from processor.wire.fastcodec import FastCodec
from processor.wire.spec import load_spec

VARIANTS = ("ascii", "binary")
SPECS = {variant: load_spec(variant) for variant in VARIANTS}
FAST = {variant: FastCodec(SPECS[variant]) for variant in VARIANTS}
PRINTABLE = st.characters(min_codepoint=0x20, max_codepoint=0x7E)
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def value_for(number: int, variant: str) -> st.SearchStrategy[str]:
    field = SPECS[variant].iso[str(number)]
    if field["len_type"] == 0:
        size = field["max_len"]
        return st.text(PRINTABLE, min_size=size, max_size=size)
    return st.text(PRINTABLE, min_size=0, max_size=min(field["max_len"], 40))


@st.composite
def documents(draw: st.DrawFn, variant: str) -> dict[str, str]:
    # Field 65 is left out: with bit 65 set pyiso8583 reads a tertiary bitmap instead.
    numbers = draw(st.sets(st.integers(2, 128).filter(lambda n: n != 65), min_size=0, max_size=25))
    document = {"t": draw(st.text("0123456789", min_size=4, max_size=4))}
    for number in numbers:
        document[str(number)] = draw(value_for(number, variant))
    return document


def reference_decode(message: bytes, variant: str) -> dict[str, str] | None:
    try:
        return iso8583.decode(message, SPECS[variant].iso)[0]
    except (DecodeError, KeyError):
        return None


@pytest.mark.parametrize("variant", VARIANTS)
@SETTINGS
@given(data=st.data())
def test_encode_and_decode_equal_pyiso8583(variant: str, data: st.DataObject) -> None:
    document = data.draw(documents(variant))
    expected = bytes(iso8583.encode(dict(document), SPECS[variant].iso)[0])
    encoded = FAST[variant].encode(document)
    assert encoded == expected
    assert FAST[variant].decode(expected) == iso8583.decode(expected, SPECS[variant].iso)[0]


@SETTINGS
@given(document=documents("ascii"))
def test_lower_case_bitmaps_decode_like_pyiso8583(document: dict[str, str]) -> None:
    message = bytes(iso8583.encode(dict(document), SPECS["ascii"].iso)[0])
    width = 32 if any(k.isdigit() and int(k) > 64 for k in document) else 16
    lowered = message[:4] + message[4 : 4 + width].lower() + message[4 + width :]
    decoded = FAST["ascii"].decode(lowered)
    assert decoded is not None
    assert decoded == iso8583.decode(lowered, SPECS["ascii"].iso)[0]


@pytest.mark.parametrize("variant", VARIANTS)
@SETTINGS
@given(data=st.data())
def test_mutated_messages_decode_like_pyiso8583_or_not_at_all(
    variant: str, data: st.DataObject
) -> None:
    document = data.draw(documents(variant))
    message = bytearray(iso8583.encode(dict(document), SPECS[variant].iso)[0])
    for _ in range(data.draw(st.integers(1, 4))):
        action = data.draw(st.sampled_from(["flip", "cut", "insert", "delete"]))
        position = data.draw(st.integers(0, max(0, len(message) - 1)))
        if action == "flip" and message:
            message[position] = data.draw(st.integers(0, 255))
        elif action == "cut":
            del message[position:]
        elif action == "insert":
            message.insert(position, data.draw(st.integers(0, 255)))
        elif message:
            del message[position]
    mutated = bytes(message)
    fast = FAST[variant].decode(mutated)
    if fast is not None:
        assert fast == reference_decode(mutated, variant)


@pytest.mark.parametrize("variant", VARIANTS)
@SETTINGS
@given(raw=st.binary(max_size=300))
def test_arbitrary_bytes_decode_like_pyiso8583_or_not_at_all(variant: str, raw: bytes) -> None:
    fast = FAST[variant].decode(raw)
    if fast is not None:
        assert fast == reference_decode(raw, variant)


@pytest.mark.parametrize("variant", VARIANTS)
@SETTINGS
@given(
    document=st.dictionaries(
        st.sampled_from(["t", *map(str, range(2, 129))]),
        st.text(st.characters(max_codepoint=0x2FF), max_size=30),
        max_size=8,
    )
)
def test_bad_documents_encode_like_pyiso8583_or_not_at_all(
    variant: str, document: dict[str, str]
) -> None:
    assume("65" not in document)
    fast = FAST[variant].encode(document)
    if fast is not None:
        try:
            expected = bytes(iso8583.encode(dict(document), SPECS[variant].iso)[0])
        except EncodeError:
            pytest.fail(f"fast codec encoded what pyiso8583 refuses: {document!r}")
        assert fast == expected


@pytest.mark.parametrize("variant", VARIANTS)
def test_bit_65_is_left_to_pyiso8583(variant: str) -> None:
    document = {"t": "0100", "11": "000001", "70": "301"}
    message = bytearray(iso8583.encode(document, SPECS[variant].iso)[0])
    width = 8 if variant == "binary" else 16
    secondary = 4 + width
    if variant == "binary":
        message[secondary] |= 0x80
    else:
        first = int(chr(message[secondary]), 16) | 0x8
        message[secondary] = ord(f"{first:X}")
    assert FAST[variant].decode(bytes(message)) is None


VARIABLE_FIELDS = [
    number
    for number in range(2, 129)
    if number != 65 and SPECS["ascii"].iso[str(number)]["len_type"] and number <= 64
]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("number", VARIABLE_FIELDS)
def test_length_over_the_maximum_is_refused_like_pyiso8583(variant: str, number: int) -> None:
    field = SPECS[variant].iso[str(number)]
    digits, maximum = field["len_type"], field["max_len"]
    bitmap_int = 1 << (64 - number)
    bitmap = bitmap_int.to_bytes(8, "big") if variant == "binary" else b"%016X" % bitmap_int
    for length in (maximum, maximum + 1):
        message = b"0100" + bitmap + b"%0*d" % (digits, length) + b"7" * length
        fast = FAST[variant].decode(message)
        assert fast == reference_decode(message, variant)
        assert (fast is None) == (length > maximum)
