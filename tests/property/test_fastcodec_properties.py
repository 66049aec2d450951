"""The hot-path codec against pyiso8583: same answer wherever it answers, None otherwise."""

from __future__ import annotations

from collections import Counter

import iso8583
import pytest
from hypothesis import HealthCheck, event, example, given, settings
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


NON_ASCII = st.characters(min_codepoint=0x80, blacklist_categories=("Cs",))
FIELD_NUMBERS = st.integers(2, 128).filter(lambda n: n != 65)


def bitmap_bytes(numbers: set[int], variant: str, lower: bool) -> bytes:
    """Primary bitmap, and secondary (bit 1 set) when a field above 64 is present."""
    words = 2 if any(n > 64 for n in numbers) else 1
    value = (1 << (64 * words - 1) if words == 2 else 0) | sum(
        1 << (64 * words - n) for n in numbers
    )
    raw = value.to_bytes(8 * words, "big")
    if variant == "binary":
        return raw
    hexed = raw.hex()
    return (hexed if lower else hexed.upper()).encode()


@st.composite
def field_bytes(draw: st.DrawFn, number: int, variant: str) -> bytes:
    """Field data as it sits on the wire: well formed most of the time, else a defect."""
    field = SPECS[variant].iso[str(number)]
    length_type, maximum = field["len_type"], field["max_len"]
    kind = draw(st.sampled_from(["good"] * 6 + ["random", "long", "non_ascii", "bad_prefix"]))
    if kind == "random":
        return draw(st.binary(max_size=12))
    size = maximum if not length_type else draw(st.integers(0, min(maximum, 30)))
    data = bytearray(draw(st.text(PRINTABLE, min_size=size, max_size=size)).encode())
    if kind == "non_ascii" and data:
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0x80, 0xFF))
    if not length_type:
        return bytes(data)
    announced = maximum + draw(st.integers(1, 3)) if kind == "long" else size
    prefix = b"%0*d" % (length_type, announced)
    if kind == "bad_prefix":
        prefix = draw(st.binary(min_size=length_type, max_size=length_type))
    return prefix[-length_type:] + bytes(data)


@st.composite
def plausible_messages(draw: st.DrawFn, variant: str) -> bytes:
    """A real MTI and bitmap(s), then each named field's bytes (mostly well formed), then
    trailing bytes half the time: a good share decode, and refusals of every kind occur."""
    numbers = draw(st.sets(FIELD_NUMBERS, max_size=10))
    mti = draw(st.text("0123456789", min_size=4, max_size=4)).encode()
    message = mti + bitmap_bytes(numbers, variant, lower=draw(st.booleans()))
    for number in sorted(numbers):
        message += draw(field_bytes(number, variant))
    if draw(st.booleans()):
        message += draw(st.binary(min_size=1, max_size=5))
    return message


@pytest.mark.parametrize("variant", VARIANTS)
def test_arbitrary_bytes_decode_like_pyiso8583_or_not_at_all(variant: str) -> None:
    outcomes: Counter[str] = Counter()

    @SETTINGS
    @example(message=b"0100" + bitmap_bytes({11}, variant, lower=False) + b"123456")
    @example(message=b"0100" + bitmap_bytes({11}, variant, lower=False) + b"1234567")
    @example(message=b"0100" + bitmap_bytes({2}, variant, lower=True) + b"0412349")
    @given(message=plausible_messages(variant))
    def check(message: bytes) -> None:
        fast = FAST[variant].decode(message)
        reference = reference_decode(message, variant)
        if reference is None:
            assert fast is None, f"fast codec decoded what pyiso8583 refuses: {message!r}"
        assert fast is None or fast == reference
        outcome = "refused" if reference is None else "decoded" if fast else "left"
        event(outcome)
        outcomes[outcome] += 1

    check()
    # The comparisons above ran on real decodes, not only on refusals.
    assert outcomes["decoded"] >= 50, outcomes
    assert outcomes["refused"] >= 50, outcomes


@st.composite
def bad_documents(draw: st.DrawFn, variant: str) -> tuple[str, dict[str, str]]:
    """A valid document, then (most of the time) exactly one defect in it."""
    document = draw(documents(variant))
    kinds = ["none", "non_ascii", "wrong_mti", "no_mti"]
    fixed = [k for k in document if k != "t" and not SPECS[variant].iso[k]["len_type"]]
    variable = [k for k in document if k != "t" and SPECS[variant].iso[k]["len_type"]]
    kinds += ["wrong_fixed_length"] * 2 if fixed else []
    kinds += ["too_long"] * 2 if variable else []
    kind = draw(st.sampled_from(kinds))
    if kind == "non_ascii":
        # Same length in characters: only the ASCII check can refuse it.
        key = draw(st.sampled_from(sorted(document)))
        value = document[key] or draw(st.text(PRINTABLE, min_size=1, max_size=1))
        position = draw(st.integers(0, len(value) - 1))
        document[key] = value[:position] + draw(NON_ASCII) + value[position + 1 :]
    elif kind == "wrong_mti":
        size = draw(st.sampled_from([0, 1, 2, 3, 5, 6]))
        document["t"] = draw(st.text("0123456789", min_size=size, max_size=size))
    elif kind == "no_mti":
        del document["t"]
    elif kind == "wrong_fixed_length":
        key = draw(st.sampled_from(fixed))
        size = SPECS[variant].iso[key]["max_len"]
        size = draw(st.integers(0, size - 1) | st.integers(size + 1, size + 3))
        document[key] = draw(st.text(PRINTABLE, min_size=size, max_size=size))
    elif kind == "too_long":
        key = draw(st.sampled_from(variable))
        size = SPECS[variant].iso[key]["max_len"] + draw(st.integers(1, 3))
        document[key] = draw(st.text(PRINTABLE, min_size=size, max_size=size))
    return kind, document


@pytest.mark.parametrize("variant", VARIANTS)
def test_bad_documents_encode_like_pyiso8583_or_not_at_all(variant: str) -> None:
    outcomes: Counter[str] = Counter()

    @SETTINGS
    @example(case=("non_ascii", {"t": "0100", "11": "12345\u00e9"}))
    @example(case=("non_ascii", {"t": "0100", "2": "4\u20ac1", "128": "1" * 16}))
    @example(case=("non_ascii", {"t": "01\u00e90"}))
    @example(case=("too_long", {"t": "0100", "2": "1" * 20}))
    @example(case=("wrong_fixed_length", {"t": "0100", "11": "12345"}))
    @example(case=("none", {"t": "0100", "11": "123456", "70": "301"}))
    @given(case=bad_documents(variant))
    def check(case: tuple[str, dict[str, str]]) -> None:
        kind, document = case
        fast = FAST[variant].encode(dict(document))
        try:
            expected = bytes(iso8583.encode(dict(document), SPECS[variant].iso)[0])
        except EncodeError:
            assert fast is None, f"fast codec encoded what pyiso8583 refuses: {document!r}"
            outcome = "refused"
        else:
            assert fast == expected
            outcome = "encoded"
        event(f"{kind}: {outcome}")
        outcomes[outcome] += 1
        outcomes[kind] += 1

    check()
    # Both branches ran, and every kind of defect was tried.
    assert outcomes["refused"] >= 100, outcomes
    assert outcomes["encoded"] >= 20, outcomes
    assert all(outcomes[k] >= 5 for k in ("non_ascii", "too_long", "wrong_fixed_length")), outcomes


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
