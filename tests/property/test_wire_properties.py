"""Properties of the wire layer: codec round trip, hostile bytes, and stream splitting."""

from __future__ import annotations

from collections import Counter
from itertools import pairwise

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from processor.wire.codec import AUTHORIZATION_ECHO, Codec
from processor.wire.errors import FramingError, InvalidMessage, UndecodableMessage
from processor.wire.framing import Framer
from processor.wire.messages import (
    AuthorizationRequest,
    NetworkManagementRequest,
    UnsupportedRequest,
)
from processor.wire.responses import format_error_response, response_mti
from processor.wire.spec import load_spec

SETTINGS = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

ASCII_CODEC = Codec(load_spec())
BINARY_CODEC = Codec(load_spec("binary"))
CODECS = pytest.mark.parametrize("codec", [ASCII_CODEC, BINARY_CODEC], ids=["ascii", "binary"])

DIGITS = "0123456789"
ALNUM = DIGITS + "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
PRINTABLE = "".join(chr(c) for c in range(0x20, 0x7F))


def digits(min_size: int, max_size: int | None = None) -> st.SearchStrategy[str]:
    return st.text(DIGITS, min_size=min_size, max_size=min_size if max_size is None else max_size)


def text(alphabet: str, size: int) -> st.SearchStrategy[str]:
    return st.text(alphabet, min_size=size, max_size=size)


def two_digit_parts(*ranges: tuple[int, int]) -> st.SearchStrategy[str]:
    """A date or time: each two-digit part drawn within its range (days up to 31 in any month:
    the wire contract checks each part's range, not the calendar)."""
    return st.tuples(*(st.integers(low, high) for low, high in ranges)).map(
        lambda parts: "".join(f"{part:02d}" for part in parts)
    )


MONTH, DAY, HOUR, MINUTE, SECOND = (1, 12), (1, 31), (0, 23), (0, 59), (0, 59)

MANDATORY_0100 = {
    "2": digits(12, 19),
    "3": digits(6),
    "4": digits(12),
    "7": two_digit_parts(MONTH, DAY, HOUR, MINUTE, SECOND),
    "11": digits(6),
    "18": digits(4),
    "32": digits(1, 11),
    "49": digits(3),
}
OPTIONAL_0100 = {
    "6": digits(12),
    "12": two_digit_parts(HOUR, MINUTE, SECOND),
    "13": two_digit_parts(MONTH, DAY),
    "14": two_digit_parts((0, 99), MONTH),
    "22": digits(3),
    "25": digits(2),
    "33": digits(1, 11),
    "37": text(ALNUM, 12),
    "41": text(PRINTABLE, 8),
    "42": text(PRINTABLE, 15),
    "43": text(PRINTABLE, 40),
    "48": st.text(PRINTABLE, min_size=1, max_size=120),
    "51": digits(3),
}


@st.composite
def authorization_fields(draw: st.DrawFn) -> dict[str, str]:
    fields = {"t": draw(st.sampled_from(["0100", "0101"]))}
    fields.update({key: draw(strategy) for key, strategy in MANDATORY_0100.items()})
    for key, strategy in OPTIONAL_0100.items():
        if draw(st.booleans()):
            fields[key] = draw(strategy)
    return fields


# --- (a) round trip ------------------------------------------------------------------------


@CODECS
@SETTINGS
@given(fields=authorization_fields())
def test_authorization_round_trip(codec: Codec, fields: dict[str, str]) -> None:
    request = codec.decode(codec.encode(fields))
    assert isinstance(request, AuthorizationRequest)
    get = fields.get
    assert request.mti == fields["t"]
    assert request.pan == fields["2"]
    assert request.processing_code == fields["3"]
    assert request.amount == int(fields["4"])
    assert request.transmission_datetime == fields["7"]
    assert request.stan == fields["11"]
    assert request.mcc == fields["18"]
    assert request.acquirer == fields["32"]
    assert request.currency == fields["49"]
    assert request.billing_amount == get("6")
    assert request.expiry == get("14")
    assert request.pos_entry_mode == get("22")
    assert request.pos_condition == get("25")
    assert request.forwarding == get("33")
    assert request.rrn == get("37")
    assert request.terminal == get("41")
    assert request.merchant_id == get("42")
    assert request.merchant_name_location == get("43")
    assert request.additional_data == get("48")
    assert request.billing_currency == get("51")
    assert request.echo == {k: fields[k] for k in AUTHORIZATION_ECHO if k in fields}


@SETTINGS
@given(fields=authorization_fields())
def test_bitmap_variants_decode_alike(fields: dict[str, str]) -> None:
    ascii_message = ASCII_CODEC.encode(fields)
    binary_message = BINARY_CODEC.encode(fields)
    assert len(ascii_message) == len(binary_message) + 8  # 16 hex characters vs 8 bytes
    assert ASCII_CODEC.decode(ascii_message) == BINARY_CODEC.decode(binary_message)


@CODECS
@SETTINGS
@given(
    datetime=two_digit_parts(MONTH, DAY, HOUR, MINUTE, SECOND),
    stan=digits(6),
    code=st.sampled_from(["001", "002", "301"]) | digits(3),
)
def test_network_management_round_trip(codec: Codec, datetime: str, stan: str, code: str) -> None:
    message = codec.encode({"t": "0800", "7": datetime, "11": stan, "70": code})
    request = codec.decode(message)
    assert request == NetworkManagementRequest(
        mti="0800", stan=stan, code=code, echo={"7": datetime, "11": stan, "70": code}
    )


# --- (b) hostile bytes into Codec.decode ---------------------------------------------------

REQUESTS = (AuthorizationRequest, NetworkManagementRequest, UnsupportedRequest)


def check_decode(codec: Codec, message: bytes, pan: str | None = None) -> None:
    """Decode must return a request or raise one of its two typed errors, nothing else.

    Whatever it returns or raises must also be answerable (or droppable) without leaking.
    """
    try:
        result = codec.decode(message)
    except InvalidMessage as error:
        assert len(error.mti) == 4
        assert error.mti.isdigit()
        assert len(error.echo["11"]) == 6
        assert error.echo["11"].isdigit()
        # Answering 30 must always be possible.
        response = codec.encode(format_error_response(error))
        assert response[:4] == response_mti(error.mti).encode()
        if pan is not None:
            assert pan not in str(error)
            assert pan not in repr(error.args)
    except UndecodableMessage as error:
        if pan is not None:
            assert pan not in str(error)
            assert pan not in repr(error.args)
    else:
        assert isinstance(result, REQUESTS)
        assert len(result.stan) == 6
        assert result.stan.isdigit()
        # Every decoded request can be answered with its echo.
        codec.encode({**result.echo, "t": response_mti(result.mti), "39": "96"})


@CODECS
@settings(max_examples=500, deadline=None)
@given(message=st.binary(max_size=400))
def test_arbitrary_bytes_raise_only_wire_errors(codec: Codec, message: bytes) -> None:
    check_decode(codec, message)


HEX = "0123456789ABCDEFabcdef"


@CODECS
@SETTINGS
@given(
    mti=st.sampled_from([b"0100", b"0101", b"0800", b"0200", b"0400", b"0110", b"9999"]),
    bitmaps=st.lists(st.text(HEX, min_size=16, max_size=16), min_size=1, max_size=3),
    body=st.binary(max_size=300) | st.text(DIGITS + " AZ", max_size=300).map(str.encode),
)
def test_request_mti_with_random_body(
    codec: Codec, mti: bytes, bitmaps: list[str], body: bytes
) -> None:
    if codec is BINARY_CODEC:
        head = b"".join(bytes.fromhex(bitmap) for bitmap in bitmaps)
    else:
        head = "".join(bitmaps).encode()
    check_decode(codec, mti + head + body)


def bitmaps_for(bits: set[int], binary: bool) -> bytes:
    """Primary, and secondary/tertiary when bits above 64/128 are set (bits 1 and 65 added)."""
    bits = set(bits)
    if any(bit > 128 for bit in bits):
        bits.add(65)
    if any(bit > 64 for bit in bits):
        bits.add(1)
    words = 3 if any(bit > 128 for bit in bits) else 2 if 1 in bits else 1
    value = 0
    for bit in bits:
        value |= 1 << (64 * words - bit)
    raw = value.to_bytes(8 * words, "big")
    return raw if binary else raw.hex().upper().encode()


@st.composite
def structured_message(draw: st.DrawFn, binary: bool) -> bytes:
    """A plausible message: real MTI, bitmaps naming random fields (up to 192), field data of
    the right shape most of the time, then an optional cut or tail."""
    spec = load_spec("binary" if binary else "ascii").iso
    bits = draw(st.sets(st.integers(2, 192), max_size=8))
    if draw(st.booleans()):
        bits.add(11)
    mti = draw(st.sampled_from([b"0100", b"0101", b"0800", b"0200", b"0420"]))
    body = b""
    for bit in sorted(bits):
        key = str(bit)
        if key not in spec or bit == 65:
            body += draw(st.binary(max_size=20))
            continue
        field = spec[key]
        size = field["max_len"]
        if field["len_type"]:
            size = draw(st.integers(0, min(size, 30)))
        alphabet = DIGITS if draw(st.integers(0, 9)) else PRINTABLE
        data = draw(text(alphabet, size)).encode()
        if field["len_type"]:
            data = b"%0*d" % (field["len_type"], size) + data
        body += data
    message = mti + bitmaps_for(bits, binary) + body
    cut = draw(st.integers(0, len(message)))
    return message[: len(message) - draw(st.sampled_from([0, 0, cut]))] + draw(
        st.binary(max_size=3)
    )


@SETTINGS
@given(message=structured_message(binary=False))
def test_structured_garbage_ascii(message: bytes) -> None:
    check_decode(ASCII_CODEC, message)


@SETTINGS
@given(message=structured_message(binary=True))
def test_structured_garbage_binary(message: bytes) -> None:
    check_decode(BINARY_CODEC, message)


mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10_000), st.integers(0, 255)),
    st.tuples(st.just("digit"), st.integers(0, 10_000), st.sampled_from(b"0123456789AF ")),
    st.tuples(st.just("insert"), st.integers(0, 10_000), st.integers(0, 255)),
    st.tuples(st.just("delete"), st.integers(0, 10_000), st.just(0)),
    st.tuples(st.just("truncate"), st.integers(0, 10_000), st.just(0)),
)


def mutate(message: bytes, mutations: list[tuple[str, int, int]]) -> bytes:
    data = bytearray(message)
    for kind, position, value in mutations:
        index = position % (len(data) + 1)
        if kind == "insert":
            data.insert(index, value)
        elif kind == "truncate":
            del data[index:]
        elif index < len(data):
            if kind == "delete":
                del data[index]
            else:
                data[index] = value
    return bytes(data)


@CODECS
@settings(max_examples=500, deadline=None)
@given(fields=authorization_fields(), mutations=st.lists(mutation, min_size=1, max_size=4))
def test_mutated_valid_message_raises_only_wire_errors(
    codec: Codec, fields: dict[str, str], mutations: list[tuple[str, int, int]]
) -> None:
    message = mutate(codec.encode(fields), mutations)
    check_decode(codec, message, pan=fields["2"])


# --- (c) hostile bytes into Framer.feed ----------------------------------------------------

framer_config = st.tuples(
    st.sampled_from(["len2", "len2_inclusive", "ascii4"]),
    st.integers(0, 6),  # header bytes
    st.integers(7, 300),  # max frame bytes
)


@st.composite
def hostile_stream(
    draw: st.DrawFn, prefix: str, header_bytes: int, max_frame_bytes: int
) -> tuple[bytes, list[tuple[bytes, bytes]], str | None]:
    """Well-formed prefixes announcing 0..max_frame_bytes+3 (empty, shorter than the header,
    legal, too long), now and then a broken prefix, random bodies, the stream maybe cut short.

    Returns the stream, the frames a Framer must hand out, in order, and the framing error it
    must find (None, "prefix", "too long", "short"): a model walking the stream as it does."""
    prefix_bytes = 4 if prefix == "ascii4" else 2
    huge = 9999 if prefix == "ascii4" else 0xFFFF - 2
    segments: list[tuple[bool, int, bytes]] = []  # (broken prefix, announced length, body)
    stream = b""
    for _ in range(draw(st.integers(1, 6))):
        length = draw(
            st.sampled_from(["legal"] * 7 + ["small"] * 2 + ["too long"]).flatmap(
                lambda kind: {
                    "legal": st.integers(0, max_frame_bytes),
                    "small": st.integers(0, header_bytes + 1),  # empty, or short of its header
                    "too long": st.integers(max_frame_bytes + 1, max_frame_bytes + 3)
                    | st.just(huge),
                }[kind]
            )
        )
        broken = prefix != "len2" and draw(st.integers(0, 9)) == 0
        if broken:  # ascii4: not 4 ASCII digits; len2_inclusive: below its own 2 bytes
            head = draw(st.sampled_from([b"12 4", b"+123", b"\xb2000", b"abcd", b"-001"]))
            head = head if prefix == "ascii4" else b"\x00\x01"
        elif prefix == "ascii4":
            head = b"%04d" % length
        elif prefix == "len2_inclusive":  # zero-length: 2, or 0 as plain len2 peers send it
            head = (length + 2 if length or draw(st.booleans()) else 0).to_bytes(2, "big")
        else:
            head = length.to_bytes(2, "big")
        size = min(length, max_frame_bytes + 3)
        body = draw(st.binary(min_size=size, max_size=size))
        segments.append((broken, length, body))
        stream += head + body
    cut = draw(st.integers(0, len(stream)))
    stream = stream[: len(stream) - draw(st.sampled_from([0, 0, cut]))]

    expected: list[tuple[bytes, bytes]] = []
    offset = 0
    for broken, length, body in segments:
        if len(stream) - offset < prefix_bytes:
            return stream, expected, None  # waiting for the rest of a prefix
        if broken or length > max_frame_bytes:  # refused from its prefix alone
            return stream, expected, "prefix" if broken else "too long"
        end = offset + prefix_bytes + length
        if end > len(stream):
            return stream, expected, None  # waiting for the rest of a frame
        if 0 < length < header_bytes:
            return stream, expected, "short"  # complete, but shorter than its header
        expected.append((body[:header_bytes], body[header_bytes:]) if length else (b"", b""))
        offset = end
    return stream, expected, None


def test_framer_raises_only_framing_errors() -> None:
    outcomes: Counter[str] = Counter()

    @SETTINGS
    @given(config=framer_config, data=st.data())
    def check(config: tuple[str, int, int], data: st.DataObject) -> None:
        prefix, header_bytes, max_frame_bytes = config
        stream, expected, error = data.draw(hostile_stream(prefix, header_bytes, max_frame_bytes))
        cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=6))
        bounds = [0, *sorted(cuts), len(stream)]
        chunks = [stream[start:end] for start, end in pairwise(bounds)]
        chunks.append(b"")  # a framing error found behind frames is raised by the next call

        framer = Framer(prefix, header_bytes=header_bytes, max_frame_bytes=max_frame_bytes)  # type: ignore[arg-type]
        prefix_bytes = 4 if prefix == "ascii4" else 2
        received: list[tuple[bytes, bytes]] = []
        raised = False
        for chunk in chunks:
            try:
                frames = framer.feed(chunk)
            except FramingError:
                raised = True
                break
            for header, message in frames:
                assert len(header) + len(message) <= max_frame_bytes
                # A frame carries the full header, or is zero-length (no header, no message).
                assert len(header) == header_bytes or (header, message) == (b"", b"")
            received += frames
            if framer.error is None:
                # Bounded: never more than one incomplete frame of legal size is held.
                assert framer.buffered_bytes < prefix_bytes + max_frame_bytes
        assert received == expected
        assert raised == (error is not None)
        outcomes["frames"] += len(received)
        outcomes["headed frames"] += sum(1 for header, _ in received if header)
        outcomes[f"error: {error}"] += 1
        event(f"error: {error}")

    check()
    # Frames were checked, and each kind of framing error occurred.
    assert outcomes["frames"] >= 200 and outcomes["headed frames"] >= 100, outcomes
    assert all(outcomes[f"error: {k}"] >= 5 for k in ("prefix", "too long", "short")), outcomes
    assert outcomes["error: None"] >= 50, outcomes


# --- (d) stream splitting ------------------------------------------------------------------


@st.composite
def framed_stream(draw: st.DrawFn) -> tuple[str, int, list[tuple[bytes, bytes]], bytes]:
    prefix = draw(st.sampled_from(["len2", "ascii4"]))
    header_bytes = draw(st.sampled_from([0, 0, 1, 4, 10]))
    frames = draw(
        st.lists(
            st.tuples(
                st.binary(min_size=header_bytes, max_size=header_bytes),
                st.binary(max_size=120),
            ),
            max_size=8,
        )
    )
    if draw(st.booleans()):  # with or without a header configured: no header of its own
        frames.insert(draw(st.integers(0, len(frames))), (b"", b""))  # zero-length frame
    stream = b""
    for header, message in frames:
        length = len(header) + len(message)
        stream += length.to_bytes(2, "big") if prefix == "len2" else b"%04d" % length
        stream += header + message
    return prefix, header_bytes, frames, stream


@settings(max_examples=400, deadline=None)
@given(data=framed_stream(), cuts=st.lists(st.integers(0, 2000), max_size=12))
def test_any_split_of_a_stream_yields_the_same_frames(
    data: tuple[str, int, list[tuple[bytes, bytes]], bytes], cuts: list[int]
) -> None:
    prefix, header_bytes, frames, stream = data
    expected = frames  # zero-length frames included, in place

    whole = Framer(prefix, header_bytes=header_bytes, max_frame_bytes=500)  # type: ignore[arg-type]
    assert whole.feed(stream) == expected
    assert whole.buffered_bytes == 0

    points = sorted({cut % (len(stream) + 1) for cut in cuts})
    bounds = [0, *points, len(stream)]
    pieces = [stream[start:end] for start, end in pairwise(bounds)]
    assert b"".join(pieces) == stream
    split = Framer(prefix, header_bytes=header_bytes, max_frame_bytes=500)  # type: ignore[arg-type]
    received: list[tuple[bytes, bytes]] = []
    for piece in pieces:
        received += split.feed(piece)
    assert received == expected
    assert split.buffered_bytes == 0


@settings(max_examples=200, deadline=None)
@given(data=framed_stream())
def test_byte_by_byte_feed_yields_the_same_frames(
    data: tuple[str, int, list[tuple[bytes, bytes]], bytes],
) -> None:
    prefix, header_bytes, frames, stream = data
    framer = Framer(prefix, header_bytes=header_bytes, max_frame_bytes=500)  # type: ignore[arg-type]
    received: list[tuple[bytes, bytes]] = []
    for index in range(len(stream)):
        received += framer.feed(stream[index : index + 1])
    assert received == frames
