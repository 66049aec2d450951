"""Codec: ISO 8583:1987 ASCII messages written out by hand, decoded into typed requests.

The golden messages below are byte literals field by field; `bitmap()` only sets bits, and is
itself checked against bitmaps worked out by hand. Nothing here is produced by Codec.encode.
"""

import traceback

import pytest

from processor.wire.codec import Codec
from processor.wire.errors import InvalidMessage, UndecodableMessage, WireError
from processor.wire.messages import (
    AuthorizationRequest,
    NetworkManagementRequest,
    UnsupportedRequest,
)
from processor.wire.responses import balance_block, format_error_response, response_mti
from processor.wire.spec import load_spec

PAN = "4111111111111111"


def bitmap(*bits: int, lower: bool = False) -> bytes:
    """Hex-ASCII primary bitmap, plus the secondary (and bit 1) when any bit is above 64."""
    fields = set(bits)
    if any(bit > 64 for bit in fields):
        fields.add(1)
    width = 128 if 1 in fields else 64
    value = 0
    for bit in fields:
        value |= 1 << (width - bit)
    text = f"{value:0{width // 4}X}"
    return (text.lower() if lower else text).encode("ascii")


def binary_bitmap(*bits: int) -> bytes:
    return bytes.fromhex(bitmap(*bits).decode("ascii"))


def build(mti: bytes, parts: dict[int, bytes], *, binary: bool = False) -> bytes:
    """MTI + bitmap of the fields in `parts` + their hand-written wire bytes in field order."""
    head = binary_bitmap(*parts) if binary else bitmap(*parts)
    return mti + head + b"".join(parts[key] for key in sorted(parts))


# Wire bytes of each field of a full 0100, LL/LLL length digits included.
FIELDS_0100: dict[int, bytes] = {
    2: b"16" + PAN.encode(),
    3: b"000000",
    4: b"000000012345",
    6: b"000000013579",
    7: b"0612143015",
    11: b"004711",
    12: b"143015",
    13: b"0612",
    14: b"2712",
    18: b"5411",
    22: b"051",
    25: b"00",
    32: b"06123456",
    33: b"049876",
    37: b"416314123456",
    41: b"TERM0001",
    42: b"MERCHANT0000001",
    43: b"ACME GROCERY #12         BERLIN       DE",
    48: b"008R9203123",
    49: b"978",
    51: b"840",
}

GOLDEN_0100 = (
    b"0100"
    b"763C448188E1A000"
    b"164111111111111111"
    b"000000"
    b"000000012345"
    b"000000013579"
    b"0612143015"
    b"004711"
    b"143015"
    b"0612"
    b"2712"
    b"5411"
    b"051"
    b"00"
    b"06123456"
    b"049876"
    b"416314123456"
    b"TERM0001"
    b"MERCHANT0000001"
    b"ACME GROCERY #12         BERLIN       DE"
    b"008R9203123"
    b"978"
    b"840"
)

# 0800 sign-on: bits 1 (secondary present), 7, 11 and 70.
GOLDEN_0800 = b"0800822000000000000004000000000000000612143015000042001"

MANDATORY_0100 = (2, 3, 7, 11, 18, 32, 49)


@pytest.fixture(scope="module")
def codec() -> Codec:
    return Codec(load_spec())


@pytest.fixture(scope="module")
def binary_codec() -> Codec:
    return Codec(load_spec("binary"))


def without(*keys: int) -> dict[int, bytes]:
    return {k: v for k, v in FIELDS_0100.items() if k not in keys}


def with_field(key: int, value: bytes) -> dict[int, bytes]:
    return {**FIELDS_0100, key: value}


def assert_no_pan(error: BaseException, pan: str = PAN) -> None:
    """The PAN must not reach a log line: not the message, args, attributes or traceback."""
    assert pan not in str(error)
    assert pan not in repr(error)
    assert pan not in repr(error.args)
    attributes = {k: v for k, v in vars(error).items() if k != "echo"}
    assert pan not in repr(attributes)
    assert error.__cause__ is None
    formatted = "".join(traceback.format_exception(error))
    assert pan not in formatted


# --- the test helpers themselves -----------------------------------------------------------


def test_bitmap_helper_matches_hand_computed_bitmaps() -> None:
    # 2,3,4,6,7 -> 0111 0110; 11..14 -> 0011 1100; 18,22 -> 0100 0100; 25,32 -> 1000 0001;
    # 33,37 -> 1000 1000; 41,42,43,48 -> 1110 0001; 49,51 -> 1010 0000; none -> 0000 0000.
    assert bitmap(*FIELDS_0100) == b"763C448188E1A000"
    assert bitmap(7, 11, 70) == b"8220000000000000" + b"0400000000000000"
    assert bitmap(7, 11, 39, 70) == b"8220000002000000" + b"0400000000000000"
    assert binary_bitmap(7, 11, 70) == b"\x82\x20" + b"\x00" * 6 + b"\x04" + b"\x00" * 7


def test_build_helper_matches_golden_literal() -> None:
    assert build(b"0100", FIELDS_0100) == GOLDEN_0100
    assert build(b"0800", {7: b"0612143015", 11: b"000042", 70: b"001"}) == GOLDEN_0800
    assert len(FIELDS_0100[43]) == 40


# --- 0100 authorisation --------------------------------------------------------------------


def test_decode_0100_names_every_field(codec: Codec) -> None:
    request = codec.decode(GOLDEN_0100)
    assert isinstance(request, AuthorizationRequest)
    assert request.mti == "0100"
    assert request.pan == PAN
    assert request.processing_code == "000000"
    assert request.transaction_type == "00"
    assert request.amount == 12345
    assert request.billing_amount == "000000013579"
    assert request.transmission_datetime == "0612143015"
    assert request.stan == "004711"
    assert request.expiry == "2712"
    assert request.mcc == "5411"
    assert request.pos_entry_mode == "051"
    assert request.pos_condition == "00"
    assert request.acquirer == "123456"
    assert request.forwarding == "9876"
    assert request.rrn == "416314123456"
    assert request.terminal == "TERM0001"
    assert request.merchant_id == "MERCHANT0000001"
    assert request.merchant_name_location == "ACME GROCERY #12         BERLIN       DE"
    assert request.additional_data == "R9203123"
    assert request.currency == "978"
    assert request.billing_currency == "840"
    assert request.identity == b"123456|004711|0612143015"
    assert request.echo == {
        "2": PAN,
        "3": "000000",
        "4": "000000012345",
        "6": "000000013579",
        "7": "0612143015",
        "11": "004711",
        "12": "143015",
        "13": "0612",
        "32": "123456",
        "37": "416314123456",
        "41": "TERM0001",
        "42": "MERCHANT0000001",
        "49": "978",
        "51": "840",
    }


def test_decode_0101_repeat(codec: Codec) -> None:
    request = codec.decode(b"0101" + GOLDEN_0100[4:])
    assert isinstance(request, AuthorizationRequest)
    assert request.mti == "0101"
    assert request.stan == "004711"


def test_decode_minimal_0100_leaves_optional_fields_none(codec: Codec) -> None:
    # Worked out by hand: 2,3,7 -> 0x62; 11 -> 0x20; 18 -> 0x40; 32 -> 0x01; 49 -> 0x80.
    message = b"010062204001000080001641111111111111113100000612143015000001601103999826"
    assert message[4:20] == bitmap(*MANDATORY_0100)
    request = codec.decode(message)
    assert isinstance(request, AuthorizationRequest)
    assert (request.pan, request.processing_code, request.transaction_type) == (
        PAN,
        "310000",
        "31",
    )
    assert (request.stan, request.mcc, request.acquirer, request.currency) == (
        "000001",
        "6011",
        "999",
        "826",
    )
    assert request.amount is None
    for name in (
        "expiry",
        "pos_entry_mode",
        "pos_condition",
        "forwarding",
        "rrn",
        "terminal",
        "merchant_id",
        "merchant_name_location",
        "additional_data",
        "billing_amount",
        "billing_currency",
    ):
        assert getattr(request, name) is None, name
    assert set(request.echo) == {"2", "3", "7", "11", "32", "49"}


def test_decode_lower_case_bitmap(codec: Codec) -> None:
    message = b"0100" + b"763c448188e1a000" + GOLDEN_0100[20:]
    assert bitmap(*FIELDS_0100, lower=True) == b"763c448188e1a000"
    assert codec.decode(message) == codec.decode(GOLDEN_0100)


def test_decode_all_zero_secondary_bitmap(codec: Codec) -> None:
    # Bit 1 says a secondary bitmap follows; it names no field. Still a valid 0100.
    message = b"0100" + b"F63C448188E1A000" + b"0000000000000000" + GOLDEN_0100[20:]
    request = codec.decode(message)
    assert isinstance(request, AuthorizationRequest)
    assert request == codec.decode(GOLDEN_0100)


@pytest.mark.parametrize(
    "amount", [b"00000001234A", b"       12345", b"-00000012345", b"+00000012345"]
)
def test_non_digit_amount_is_a_format_error(codec: Codec, amount: bytes) -> None:
    # A field the spec says is numeric and is not is a malformed message (30), like any other
    # numeric field: 13 is for an amount that is well formed but not acceptable (zero).
    with pytest.raises(InvalidMessage) as caught:
        codec.decode(build(b"0100", with_field(4, amount)))
    assert caught.value.field == "4"
    assert "4" not in caught.value.echo  # never echo what is malformed
    assert caught.value.echo["11"] == "004711"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        (2, b"+9411111111"),
        (2, b" 9411111111"),
        (32, b" 6123456"),
        (48, b"0_8R9203123"),
        (48, b"-00"),
    ],
)
def test_a_length_prefix_that_is_not_digits_is_a_format_error(
    codec: Codec, field: int, value: bytes
) -> None:
    """pyiso8583 reads a prefix with int(): " 9", "+9", "0_8" and "-00" were decided as if
    well formed."""
    with pytest.raises(InvalidMessage, match="length prefix") as caught:
        codec.decode(build(b"0100", with_field(field, value)))
    assert caught.value.field == str(field)
    # What decoded through the bad prefix is not what was sent: never echoed.
    assert str(field) not in caught.value.echo


def test_a_bad_prefix_that_puts_later_fields_out_of_step_trusts_nothing_after_it(
    codec: Codec,
) -> None:
    """A PAN of 16 digits sent with the prefix " 9": pyiso8583 read 9 digits, every field
    after from the wrong place, and failed at the end; the 30 then blamed field 49 and
    echoed the misread fields: a STAN made of field 7's digits, PAN digits as field 3. Past
    a prefix so malformed nothing read is the sender's: without the STAN before it, no answer
    (counted and dropped); with it, a 30 of what came before."""
    shifted = with_field(2, b" 9" + PAN.encode())
    with pytest.raises(UndecodableMessage) as dropped:
        codec.decode(build(b"0100", shifted))
    assert dropped.value.field == "2"
    assert_no_pan(dropped.value)
    # Field 32 of 3 digits where 6 were sent: 49 read "456", then 3 bytes left over.
    late = with_field(32, b" 3123456")
    with pytest.raises(InvalidMessage, match="length prefix") as caught:
        codec.decode(build(b"0100", late))
    assert caught.value.field == "32"
    assert caught.value.echo["11"] == "004711"
    assert not {"32", "37", "41", "42", "49", "51"} & set(caught.value.echo)


def test_a_bitmap_with_spaces_is_a_format_error(codec: Codec) -> None:
    """bytes.fromhex() skips spaces: a bitmap ending in two was read as one ending in 00."""
    message = build(b"0100", FIELDS_0100)
    spaced = message[:18] + b"  " + message[20:]
    assert message[18:20] == b"00"  # the pair replaced names no field
    with pytest.raises(InvalidMessage, match="bitmap"):
        codec.decode(spaced)


@pytest.mark.parametrize("replacement", [b"00000000040O", b"         400"])
def test_a_replacement_amount_that_is_not_digits_is_a_format_error(
    codec: Codec, replacement: bytes
) -> None:
    """Read as no replacement, it turned a partial reversal into a full one: the whole hold
    released for an amount the network never sent."""
    field_95 = replacement + b"0" * 12 + b" " * 18
    with pytest.raises(InvalidMessage) as caught:
        codec.decode(build(b"0400", with_field(95, field_95)))
    assert caught.value.field == "95"
    assert "95" not in caught.value.echo  # the field at fault is never echoed
    spaces_after = b"000000000400" + b" " * 30  # its later parts may be spaces
    request = codec.decode(build(b"0400", with_field(95, spaces_after)))
    assert isinstance(request, AuthorizationRequest) and request.replacement_amount() == 400


@pytest.mark.parametrize(
    ("field", "value", "layout"),
    [
        (7, b"1324101010", "MMDDhhmmss"),  # month 13
        (7, b"1100101010", "MMDDhhmmss"),  # day 0
        (7, b"1132101010", "MMDDhhmmss"),  # day 32
        (7, b"1124241010", "MMDDhhmmss"),  # hour 24
        (7, b"1124108010", "MMDDhhmmss"),  # minute 80
        (7, b"1124101060", "MMDDhhmmss"),  # second 60
        (12, b"246000", "hhmmss"),
        (13, b"0001", "MMDD"),  # month 0
        (14, b"2813", "YYMM"),
        (14, b"2800", "YYMM"),
    ],
)
def test_dates_and_times_out_of_range_are_format_errors(
    codec: Codec, field: int, value: bytes, layout: str
) -> None:
    with pytest.raises(InvalidMessage, match=layout) as caught:
        codec.decode(build(b"0100", with_field(field, value)))
    assert caught.value.field == str(field)
    assert str(field) not in caught.value.echo  # the answer does not repeat it


@pytest.mark.parametrize(
    ("field", "value"),
    [(7, b"1231235959"), (7, b"0101000000"), (12, b"000000"), (13, b"0229"), (14, b"0001")],
)
def test_dates_and_times_at_their_bounds_are_accepted(
    codec: Codec, field: int, value: bytes
) -> None:
    request = codec.decode(build(b"0100", with_field(field, value)))
    assert isinstance(request, AuthorizationRequest)


def test_zero_amount_is_zero_not_none(codec: Codec) -> None:
    request = codec.decode(build(b"0100", with_field(4, b"000000000000")))
    assert isinstance(request, AuthorizationRequest)
    assert request.amount == 0


def test_absent_amount_is_none(codec: Codec) -> None:
    request = codec.decode(build(b"0100", without(4)))
    assert isinstance(request, AuthorizationRequest)
    assert request.amount is None
    assert "4" not in request.echo


# --- 0800 network management ---------------------------------------------------------------


@pytest.mark.parametrize("code", [b"001", b"002", b"301"])
def test_decode_0800(codec: Codec, code: bytes) -> None:
    message = b"0800" + b"8220000000000000" + b"0400000000000000" + b"0612143015000042" + code
    request = codec.decode(message)
    assert isinstance(request, NetworkManagementRequest)
    assert request.mti == "0800"
    assert request.stan == "000042"
    assert request.code == code.decode()
    assert request.echo == {"7": "0612143015", "11": "000042", "70": code.decode()}


def test_decode_0800_lower_case_secondary_bitmap(codec: Codec) -> None:
    # Secondary bitmap naming fields 69 and 70: 0000 1100 -> "0c" in lower case.
    assert bitmap(7, 11, 69, 70, lower=True) == b"8220000000000000" + b"0c00000000000000"
    message = b"0800" + b"8220000000000000" + b"0c00000000000000" + b"0612143015000042978301"
    request = codec.decode(message)
    assert isinstance(request, NetworkManagementRequest)
    assert (request.stan, request.code) == ("000042", "301")


def test_decode_0800_missing_field_70_is_format_error(codec: Codec) -> None:
    message = b"0800" + b"8220000000000000" + b"0000000000000000" + b"0612143015000042"
    with pytest.raises(InvalidMessage) as caught:
        codec.decode(message)
    assert caught.value.field == "70"
    assert caught.value.mti == "0800"
    assert caught.value.echo == {"7": "0612143015", "11": "000042"}


# --- binary-bitmap variant -----------------------------------------------------------------


def test_binary_bitmap_spec_decodes_0100(codec: Codec, binary_codec: Codec) -> None:
    message = b"0100" + b"\x76\x3c\x44\x81\x88\xe1\xa0\x00" + GOLDEN_0100[20:]
    assert message == build(b"0100", FIELDS_0100, binary=True)
    request = binary_codec.decode(message)
    assert isinstance(request, AuthorizationRequest)
    assert request == codec.decode(GOLDEN_0100)


def test_binary_bitmap_spec_decodes_0800(binary_codec: Codec) -> None:
    message = (
        b"0800"
        + b"\x82\x20\x00\x00\x00\x00\x00\x00"
        + b"\x04\x00\x00\x00\x00\x00\x00\x00"
        + b"0612143015000042301"
    )
    request = binary_codec.decode(message)
    assert isinstance(request, NetworkManagementRequest)
    assert (request.stan, request.code) == ("000042", "301")


def test_binary_codec_does_not_read_a_hex_bitmap(binary_codec: Codec) -> None:
    with pytest.raises(WireError):
        binary_codec.decode(GOLDEN_0100)


def test_hex_codec_does_not_read_a_binary_bitmap(codec: Codec) -> None:
    with pytest.raises(WireError):
        codec.decode(build(b"0100", FIELDS_0100, binary=True))


def test_encode_0810_binary_bitmap_golden(binary_codec: Codec) -> None:
    encoded = binary_codec.encode(
        {"t": "0810", "7": "0612143015", "11": "000042", "39": "00", "70": "301"}
    )
    assert encoded == (
        b"0810\x82\x20\x00\x00\x02\x00\x00\x00\x04\x00\x00\x00\x00\x00\x00\x00061214301500004200301"
    )


# --- format errors (answered 30) -----------------------------------------------------------


@pytest.mark.parametrize("missing", [2, 3, 7, 18, 32, 49])
def test_missing_mandatory_field(codec: Codec, missing: int) -> None:
    with pytest.raises(InvalidMessage) as caught:
        codec.decode(build(b"0100", without(missing)))
    error = caught.value
    assert error.field == str(missing)
    assert error.mti == "0100"
    assert error.echo["11"] == "004711"
    assert str(missing) not in error.echo
    assert_no_pan(error)


def test_missing_mandatory_field_response_golden(codec: Codec) -> None:
    with pytest.raises(InvalidMessage) as caught:
        codec.decode(build(b"0100", without(6, 12, 13, 18, 33, 37, 41, 42, 43, 48, 51)))
    response = format_error_response(caught.value)
    assert response == {
        "t": "0110",
        "2": PAN,
        "3": "000000",
        "4": "000000012345",
        "7": "0612143015",
        "11": "004711",
        "32": "123456",
        "39": "30",
        "49": "978",
    }
    # 2,3,4,7 -> 0x72; 11 -> 0x20; 32 -> 0x01; 39 -> 0x02; 49 -> 0x80.
    assert codec.encode(response) == (
        b"0110722000010200800016411111111111111100000000000001234506121430150047110612345630978"
    )


@pytest.mark.parametrize(
    ("field", "value"),
    [
        (3, b"00A000"),
        (3, b"00 000"),
        (6, b"00000001357X"),
        (7, b"06121430 5"),
        (12, b"14:015"),
        (13, b"O612"),
        (14, b"27l2"),
        (18, b"54I1"),
        (22, b"05-"),
        (25, b"0 "),
        (32, b"0612345X"),
        (33, b"04987."),
        (2, b"16411111111111111X"),
    ],
)
def test_non_digit_numeric_field_is_format_error(codec: Codec, field: int, value: bytes) -> None:
    with pytest.raises(InvalidMessage) as caught:
        codec.decode(build(b"0100", with_field(field, value)))
    error = caught.value
    assert error.field == str(field)
    assert error.mti == "0100"
    assert error.echo["11"] == "004711"
    assert str(field) not in error.echo  # a malformed value is never echoed
    assert_no_pan(error)
    assert_no_pan(error, "411111111111111")
    assert codec.encode(format_error_response(error)).startswith(b"0110")


def test_empty_llvar_pan_is_format_error(codec: Codec) -> None:
    with pytest.raises(InvalidMessage) as caught:
        codec.decode(build(b"0100", with_field(2, b"00")))
    assert caught.value.field == "2"


def test_pan_longer_than_19_is_undecodable(codec: Codec) -> None:
    # Field 2 comes before the STAN: with its length unreadable, nothing after it can be read.
    long_pan = "41111111111111111111"
    with pytest.raises(UndecodableMessage) as caught:
        codec.decode(build(b"0100", with_field(2, b"20" + long_pan.encode())))
    assert caught.value.field == "2"
    assert_no_pan(caught.value, long_pan)


def test_non_digit_llvar_length_is_format_error(codec: Codec) -> None:
    with pytest.raises(InvalidMessage) as caught:
        codec.decode(build(b"0100", with_field(32, b"0A123456")))
    assert caught.value.field == "32"
    assert caught.value.echo["11"] == "004711"


def test_non_ascii_byte_is_format_error(codec: Codec) -> None:
    name = b"CAF\xc9 DE PARIS" + b" " * 12 + b"PARIS" + b" " * 8 + b"FR"
    assert len(name) == 40
    with pytest.raises(InvalidMessage) as caught:
        codec.decode(build(b"0100", with_field(43, name)))
    assert caught.value.field == "43"
    assert_no_pan(caught.value)


def test_trailing_bytes_are_format_error(codec: Codec) -> None:
    with pytest.raises(InvalidMessage) as caught:
        codec.decode(GOLDEN_0100 + b"XX")
    error = caught.value
    assert error.mti == "0100"
    assert error.echo["49"] == "978"
    assert error.echo["11"] == "004711"
    assert_no_pan(error)
    assert codec.encode(format_error_response(error)).startswith(b"0110")


# Offset just past field 11 in GOLDEN_0100.
END_OF_STAN = GOLDEN_0100.index(b"004711") + 6


@pytest.mark.parametrize("cut", range(END_OF_STAN, len(GOLDEN_0100)))
def test_truncated_after_stan_is_answered_30(codec: Codec, cut: int) -> None:
    with pytest.raises(InvalidMessage) as caught:
        codec.decode(GOLDEN_0100[:cut])
    error = caught.value
    assert error.mti == "0100"
    assert error.echo["11"] == "004711"
    assert_no_pan(error)
    # The echo must make an encodable 0110: a half-read field must not be echoed.
    response = format_error_response(error)
    assert response["39"] == "30"
    encoded = codec.encode(response)
    assert encoded.startswith(b"0110")


@pytest.mark.parametrize("cut", range(4, END_OF_STAN))
def test_truncated_before_end_of_stan_is_undecodable(codec: Codec, cut: int) -> None:
    with pytest.raises(UndecodableMessage) as caught:
        codec.decode(GOLDEN_0100[:cut])
    assert_no_pan(caught.value)


# --- undecodable (dropped) -----------------------------------------------------------------


@pytest.mark.parametrize(
    "message",
    [
        b"",
        b"0",
        b"010",
        b"01O0" + GOLDEN_0100[4:],
        b" 100" + GOLDEN_0100[4:],
        b"\x00\x01\x00\x00" + GOLDEN_0100[4:],
        b"\xd9\xa0100" + GOLDEN_0100[4:],
        b"\xff" * 40,
    ],
)
def test_unreadable_mti_is_undecodable(codec: Codec, message: bytes) -> None:
    with pytest.raises(UndecodableMessage) as caught:
        codec.decode(message)
    assert caught.value.field == "t"


@pytest.mark.parametrize("mti", [b"0110", b"0810", b"0130", b"0210", b"0410", b"0430", b"0102"])
def test_response_mti_is_undecodable(codec: Codec, mti: bytes) -> None:
    with pytest.raises(UndecodableMessage) as caught:
        codec.decode(mti + GOLDEN_0100[4:])
    assert caught.value.field == "t"
    assert_no_pan(caught.value)


def test_missing_stan_is_undecodable(codec: Codec) -> None:
    with pytest.raises(UndecodableMessage) as caught:
        codec.decode(build(b"0100", without(11)))
    assert caught.value.field == "11"
    assert_no_pan(caught.value)


@pytest.mark.parametrize("stan", [b"00471A", b"     1", b"-00471"])
def test_non_digit_stan_is_undecodable(codec: Codec, stan: bytes) -> None:
    with pytest.raises(UndecodableMessage) as caught:
        codec.decode(build(b"0100", with_field(11, stan)))
    assert caught.value.field == "11"


def test_short_stan_is_undecodable(codec: Codec) -> None:
    # Field 11 is the last field and only 4 of its 6 digits arrived.
    message = b"0800" + b"8220000000000000" + b"0400000000000000" + b"0612143015" + b"0000"
    with pytest.raises(UndecodableMessage) as caught:
        codec.decode(message)
    assert caught.value.field == "11"


def test_non_hex_bitmap_is_undecodable(codec: Codec) -> None:
    with pytest.raises(UndecodableMessage) as caught:
        codec.decode(b"0100" + b"763C4481G8E1A000" + GOLDEN_0100[20:])
    assert caught.value.field == "p"
    assert_no_pan(caught.value)


def test_tertiary_bitmap_is_a_wire_error(codec: Codec) -> None:
    # Bit 65 set in the secondary bitmap makes pyiso8583 read a third bitmap naming fields
    # 129-192, which the 1987 spec does not define: a typed error, not a KeyError.
    message = (
        b"0800"
        b"8220000000000000"
        b"8400000000000000"  # 65 and 70
        b"8000000000000000"  # 129
        b"0612143015"
        b"000042"
        b"301"
        b"X"
    )
    with pytest.raises(WireError) as caught:
        codec.decode(message)
    assert isinstance(caught.value, UndecodableMessage | InvalidMessage)


def test_all_zero_tertiary_bitmap_is_harmless(codec: Codec) -> None:
    message = (
        b"0800"
        b"8220000000000000"
        b"8400000000000000"  # 65 and 70
        b"0000000000000000"
        b"0612143015"
        b"000042"
        b"301"
    )
    request = codec.decode(message)
    assert isinstance(request, NetworkManagementRequest)


# --- request types this processor does not handle ------------------------------------------


@pytest.mark.parametrize("mti", [b"0200", b"0400", b"0420", b"0120", b"0220", b"0421", b"0401"])
def test_lifecycle_messages_decode_as_transactions(codec: Codec, mti: bytes) -> None:
    request = codec.decode(mti + GOLDEN_0100[4:])
    assert isinstance(request, AuthorizationRequest)
    assert request.mti == mti.decode()
    assert request.message_class == mti.decode()[:3] + "0"


@pytest.mark.parametrize("mti", [b"0300", b"0500", b"0600", b"0620"])
def test_unsupported_request(codec: Codec, mti: bytes) -> None:
    request = codec.decode(mti + GOLDEN_0100[4:])
    assert isinstance(request, UnsupportedRequest)
    assert request.mti == mti.decode()
    assert request.stan == "004711"
    assert request.echo["11"] == "004711"
    assert request.echo["7"] == "0612143015"


def test_unsupported_request_is_still_digit_checked(codec: Codec) -> None:
    with pytest.raises(InvalidMessage) as caught:
        codec.decode(build(b"0600", with_field(3, b"00A000")))
    assert caught.value.field == "3"
    assert caught.value.mti == "0600"


def test_unsupported_request_without_stan_is_undecodable(codec: Codec) -> None:
    with pytest.raises(UndecodableMessage):
        codec.decode(build(b"0600", without(11)))


# --- encoding responses --------------------------------------------------------------------


def test_encode_0810_golden(codec: Codec) -> None:
    encoded = codec.encode(
        {"t": "0810", "7": "0612143015", "11": "000042", "39": "00", "70": "301"}
    )
    assert encoded == (b"081082200000020000000400000000000000061214301500004200301")
    assert isinstance(encoded, bytes)


def test_encode_0110_approval_golden(codec: Codec) -> None:
    encoded = codec.encode(
        {
            "t": "0110",
            "2": PAN,
            "3": "000000",
            "4": "000000012345",
            "7": "0612143015",
            "11": "004711",
            "32": "123456",
            "37": "416314123456",
            "38": "A1B2C3",
            "39": "00",
            "41": "TERM0001",
            "49": "978",
        }
    )
    # 2,3,4,7 -> 0x72; 11 -> 0x20; 32 -> 0x01; 37,38,39 -> 0x0E; 41 -> 0x80; 49 -> 0x80.
    assert encoded == (
        b"0110"
        b"722000010E808000"
        b"164111111111111111"
        b"000000"
        b"000000012345"
        b"0612143015"
        b"004711"
        b"06123456"
        b"416314123456"
        b"A1B2C3"
        b"00"
        b"TERM0001"
        b"978"
    )


def test_encode_up_to_field_64_has_no_secondary_bitmap(codec: Codec) -> None:
    # Field 64 is the last of the primary bitmap: only a field above 64 needs a secondary one.
    encoded = codec.encode({"t": "0110", "11": "004711", "39": "00", "64": "0123456789ABCDEF"})
    # 11 -> byte 2 0x20; 39 -> byte 5 0x02; 64 -> byte 8 0x01; bit 1 (secondary) clear.
    assert encoded == b"01100020000002000001004711000123456789ABCDEF"


def test_encode_field_65_and_up_brings_the_secondary_bitmap(codec: Codec) -> None:
    encoded = codec.encode({"t": "0810", "11": "004711", "39": "00", "70": "301"})
    # bit 1 set (secondary follows): 0x80 | 11 -> 0x20 in byte 2; 70 -> secondary byte 1 0x04.
    assert encoded == b"08108020000002000000040000000000000000471100301"


def test_encode_0110_balance_golden(codec: Codec) -> None:
    balances = balance_block("00", "01", "978", 12345) + balance_block("00", "02", "978", -500)
    encoded = codec.encode({"t": "0110", "3": "310000", "11": "004711", "39": "00", "54": balances})
    # 3 -> 0x20; 11 -> 0x20; 39 -> 0x02; 54 -> 0x04.
    assert encoded == (
        b"01102020000002000400310000004711000400001978C0000000123450002978D000000000500"
    )


def test_encode_rejects_a_malformed_response_with_value_error(codec: Codec) -> None:
    with pytest.raises(ValueError, match="39") as caught:
        codec.encode({"t": "0110", "11": "004711", "39": "000"})
    assert not isinstance(caught.value, WireError)  # our bug, not the peer's
    with pytest.raises(ValueError):
        codec.encode({"t": "0110", "2": "1" * 20, "11": "004711", "39": "30"})


# --- helpers -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_mti", "expected"),
    [
        ("0100", "0110"),
        ("0101", "0110"),
        ("0120", "0130"),
        ("0200", "0210"),
        ("0220", "0230"),
        ("0400", "0410"),
        ("0420", "0430"),
        ("0421", "0430"),
        ("0800", "0810"),
    ],
)
def test_response_mti(request_mti: str, expected: str) -> None:
    assert response_mti(request_mti) == expected


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("00", "01", "978", 12345), "0001978C000000012345"),
        (("10", "02", "840", -1), "1002840D000000000001"),
        (("20", "01", "826", 0), "2001826C000000000000"),
        (("00", "01", "978", 999_999_999_999), "0001978C999999999999"),
        (("00", "02", "978", -999_999_999_999), "0002978D999999999999"),
    ],
)
def test_balance_block(args: tuple[str, str, str, int], expected: str) -> None:
    block = balance_block(*args)
    assert block == expected
    assert len(block) == 20


def test_decode_errors_do_not_chain_the_pyiso8583_error() -> None:
    """pyiso8583's DecodeError holds the whole message (PAN included): it must not be chained."""
    codec = Codec(load_spec())
    good = codec.encode(
        {
            "t": "0100",
            "2": PAN,
            "3": "000000",
            "4": "000000001000",
            "7": "1124101010",
            "11": "000001",
            "18": "5411",
            "32": "123456",
            "37": "000000000001",
            "49": "978",
        }
    )
    for cut in (len(good) - 2, len(good) - 20, 30):
        with pytest.raises(WireError) as caught:
            codec.decode(good[:cut])
        assert caught.value.__context__ is None
        assert caught.value.__cause__ is None


def test_dates_remembered_as_valid_never_let_an_invalid_one_through(codec: Codec) -> None:
    # Valid values are remembered (a set is cheaper than the pattern); invalid ones never are.
    for second in range(60):
        for minute in range(0, 60, 7):
            value = b"112410" + f"{minute:02d}{second:02d}".encode()
            assert isinstance(
                codec.decode(build(b"0100", with_field(7, value))), AuthorizationRequest
            )
    for _ in range(2):
        with pytest.raises(InvalidMessage, match="MMDDhhmmss"):
            codec.decode(build(b"0100", with_field(7, b"1124108010")))


# Which field each AuthorizationRequest attribute is read from (None: not a field's text).
ATTRIBUTE_FIELDS = {
    "mti": "t",
    "pan": "2",
    "processing_code": "3",
    "amount": None,
    "transmission_datetime": "7",
    "stan": "11",
    "expiry": "14",
    "mcc": "18",
    "pos_entry_mode": "22",
    "pos_condition": "25",
    "acquirer": "32",
    "forwarding": "33",
    "rrn": "37",
    "terminal": "41",
    "merchant_id": "42",
    "merchant_name_location": "43",
    "additional_data": "48",
    "currency": "49",
    "billing_amount": "6",
    "billing_currency": "51",
    "echo": None,
    "original_data": "90",
    "replacement_amounts": "95",
    "network_response_code": "39",
}


def test_every_attribute_comes_from_its_own_field(codec: Codec) -> None:
    import msgspec

    from processor.wire.messages import AuthorizationRequest

    fields = {
        "t": "0420",
        "2": "4761739001010085",
        "3": "000000",
        "4": "000000001234",
        "6": "000000004321",
        "7": "1124101010",
        "11": "000042",
        "14": "3012",
        "18": "5411",
        "22": "051",
        "25": "08",
        "32": "123456",
        "33": "654321",
        "37": "433612345600",
        "39": "68",
        "41": "TERM0001",
        "42": "MERCHANT0000001",
        "43": "ACME STORE               BERLIN       DE",
        "48": "DATA48",
        "49": "978",
        "51": "840",
        "90": "0100000041112410101000000123456" + "0" * 11,
        "95": "000000000500" + "0" * 30,
    }
    request = codec.decode(codec.encode(fields))
    assert isinstance(request, AuthorizationRequest)
    names = [field.name for field in msgspec.structs.fields(AuthorizationRequest)]
    assert sorted(names) == sorted(ATTRIBUTE_FIELDS)  # a new attribute gets a row here
    for name, number in ATTRIBUTE_FIELDS.items():
        if number is not None:
            assert getattr(request, name) == fields[number], name
    assert request.amount == 1234
