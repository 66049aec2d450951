"""Naming a peer's dialect when its first message does not decode on a listener."""

import pytest

from processor.wire.codec import Codec
from processor.wire.dialect import framing_cause, undecodable_cause
from processor.wire.framing import Framer
from processor.wire.spec import load_spec

ECHO = {"t": "0800", "7": "1124101010", "11": "000001", "70": "301"}
ASCII = Codec(load_spec("ascii")).encode(ECHO)
BINARY = Codec(load_spec("binary")).encode(ECHO)


def cause(frame: bytes, bitmap: str = "ascii", header_bytes: int = 0, framing: str = "len2"):  # type: ignore[no-untyped-def]
    return undecodable_cause(
        frame,
        bitmap=bitmap,  # type: ignore[arg-type]
        header_bytes=header_bytes,
        framing=framing,  # type: ignore[arg-type]
    )


def test_binary_bitmap_on_an_ascii_listener() -> None:
    assert cause(BINARY) == "binary bitmap on an ascii listener"


def test_ascii_bitmap_on_a_binary_listener() -> None:
    assert cause(ASCII, bitmap="binary") == "ascii bitmap on a binary listener"


def test_a_header_the_listener_does_not_expect() -> None:
    assert cause(b"ISO0" + ASCII) == (
        "a 4-byte header before the MTI where the listener has header_bytes = 0"
    )


def test_no_header_where_the_listener_expects_one() -> None:
    assert cause(ASCII, header_bytes=4) == (
        "a 0-byte header before the MTI where the listener has header_bytes = 4"
    )


def test_a_length_prefix_that_counts_itself_on_a_len2_listener() -> None:
    # A len2 framer reads the inclusive length as 2 bytes too many: the next frame's prefix.
    stream = Framer("len2_inclusive", max_frame_bytes=8192).frame(b"", ASCII) * 2
    ((_, first),) = Framer("len2", max_frame_bytes=8192).feed(stream[: len(ASCII) + 4])
    assert (
        cause(first) == 'a length prefix that counts its own 2 bytes (framing = "len2_inclusive")'
    )


def test_several_differences_are_all_named() -> None:
    assert cause(b"HDR1" + BINARY) == (
        "binary bitmap on an ascii listener; "
        "a 4-byte header before the MTI where the listener has header_bytes = 0"
    )


@pytest.mark.parametrize("frame", [b"NOT ISO AT ALL", b"", b"0800" + b"\xff" * 40])
def test_garbage_has_no_likely_cause(frame: bytes) -> None:
    assert cause(frame) is None


def test_framing_causes() -> None:
    assert framing_cause(b"0123", "len2") == (
        "4 ASCII digits at the start: ascii4 framing on a len2 listener"
    )
    assert framing_cause(b"\x00\x4008", "ascii4") == (
        "no ASCII length at the start: a binary length prefix (len2) on an ascii4 listener"
    )
    assert framing_cause(b"\xff\xff\x00\x00", "len2") is None


def test_frames_up_to_the_diagnosis_bound_are_diagnosed_longer_ones_are_not() -> None:
    from processor import limits

    codec = Codec(load_spec("binary"))

    def binary_of_length(length: int) -> bytes:
        fields = dict(ECHO, **{"48": "x" * 999, "62": "y" * 999})
        short = len(codec.encode(dict(fields, **{"63": ""})))
        fields["63"] = "z" * (length - short)
        message = codec.encode(fields)
        assert len(message) == length
        return message

    bound = limits.dialect_diagnosis_bytes_max
    assert cause(binary_of_length(bound)) == "binary bitmap on an ascii listener"
    assert cause(binary_of_length(bound + 1)) is None
