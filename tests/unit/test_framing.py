"""Framer: length-prefixed ISO 8583 frames on a TCP byte stream, checked against golden bytes."""

import pytest

from processor.types import FRAME_BYTES_CEILING
from processor.wire.errors import FramingError, WireError
from processor.wire.framing import EMPTY_FRAME, Framer

# --- len2: 2-byte big-endian binary length -------------------------------------------------


def test_len2_single_frame() -> None:
    framer = Framer("len2", max_frame_bytes=8192)
    assert framer.feed(b"\x00\x05hello") == [(b"", b"hello")]
    assert framer.buffered_bytes == 0


def test_len2_length_is_big_endian() -> None:
    # 0x0102 = 258 bytes; little-endian would read 513 and wait for more.
    body = bytes(range(256)) + b"xy"
    framer = Framer("len2", max_frame_bytes=8192)
    assert framer.feed(b"\x01\x02" + body) == [(b"", body)]
    assert framer.buffered_bytes == 0


def test_len2_several_frames_in_one_feed() -> None:
    framer = Framer("len2", max_frame_bytes=8192)
    stream = b"\x00\x03one" + b"\x00\x03two" + b"\x00\x05three"
    assert framer.feed(stream) == [(b"", b"one"), (b"", b"two"), (b"", b"three")]
    assert framer.buffered_bytes == 0


def test_len2_frame_split_across_feeds() -> None:
    framer = Framer("len2", max_frame_bytes=8192)
    assert framer.feed(b"\x00") == []  # half a prefix
    assert framer.buffered_bytes == 1
    assert framer.feed(b"\x0a0800") == []  # prefix complete, 4 of 10 bytes
    assert framer.buffered_bytes == 6
    assert framer.feed(b"82200") == []
    assert framer.feed(b"0\x00\x02") == [(b"", b"0800822000")]  # next frame's prefix follows
    assert framer.buffered_bytes == 2
    assert framer.feed(b"ok") == [(b"", b"ok")]
    assert framer.buffered_bytes == 0


def test_len2_byte_by_byte() -> None:
    framer = Framer("len2", max_frame_bytes=8192)
    stream = b"\x00\x04abcd\x00\x02ef"
    frames = []
    for index in range(len(stream)):
        frames += framer.feed(stream[index : index + 1])
    assert frames == [(b"", b"abcd"), (b"", b"ef")]
    assert framer.buffered_bytes == 0


def test_len2_zero_length_frames_are_handed_out_in_order() -> None:
    # Counted as bad messages by the server: the framer reports each, where it was.
    framer = Framer("len2", max_frame_bytes=8192)
    assert framer.feed(b"\x00\x00") == [EMPTY_FRAME]
    assert framer.buffered_bytes == 0
    stream = b"\x00\x00\x00\x00\x00\x02hi\x00\x00"
    assert framer.feed(stream) == [EMPTY_FRAME, EMPTY_FRAME, (b"", b"hi"), EMPTY_FRAME]
    assert framer.buffered_bytes == 0


def test_len2_empty_feed() -> None:
    framer = Framer("len2", max_frame_bytes=8192)
    assert framer.feed(b"") == []
    assert framer.buffered_bytes == 0


def test_len2_frame_of_exactly_max_is_accepted() -> None:
    framer = Framer("len2", max_frame_bytes=300)
    body = b"A" * 300
    assert framer.feed(b"\x01\x2c" + body) == [(b"", body)]


def test_len2_oversize_prefix_raises_before_body_is_buffered() -> None:
    framer = Framer("len2", max_frame_bytes=300)
    # 0x012d = 301: the prefix alone is enough to refuse the frame.
    with pytest.raises(FramingError) as caught:
        framer.feed(b"\x01\x2d")
    assert isinstance(caught.value, WireError)
    assert framer.buffered_bytes <= 2


def test_len2_huge_prefix_raises() -> None:
    framer = Framer("len2", max_frame_bytes=8192)
    with pytest.raises(FramingError):
        framer.feed(b"\xff\xff" + b"x" * 100)


def test_len2_oversize_after_good_frames_in_same_feed_returns_them_then_raises() -> None:
    """The frames sent whole before the error were thrown away: never decoded, answered or
    counted. They come first now; the error is kept and raised by the next call."""
    framer = Framer("len2", max_frame_bytes=16)
    assert framer.feed(b"\x00\x02ok\x00\x00\x00\x11" + b"y" * 17) == [(b"", b"ok"), (b"", b"")]
    assert framer.error is not None and "exceeds max_frame_bytes" in str(framer.error)
    assert framer.head(2) == b"\x00\x11"  # where the frame that broke framing starts
    with pytest.raises(FramingError):
        framer.feed(b"")
    with pytest.raises(FramingError):
        framer.feed(b"\x00\x02ok")  # stays failed


def test_len2_framer_stays_failed_after_oversize() -> None:
    # The link is to be closed; the framer must not resynchronise on garbage meanwhile.
    framer = Framer("len2", max_frame_bytes=16)
    with pytest.raises(FramingError):
        framer.feed(b"\x00\x11")
    with pytest.raises(FramingError):
        framer.feed(b"\x00\x02ok")


def test_buffer_is_bounded_by_max_frame() -> None:
    """A peer trickling the largest legal frame never makes the buffer exceed prefix + max."""
    framer = Framer("len2", max_frame_bytes=64)
    stream = b"\x00\x40" + b"z" * 64
    peak = 0
    frames = []
    for index in range(len(stream)):
        frames += framer.feed(stream[index : index + 1])
        peak = max(peak, framer.buffered_bytes)
    assert frames == [(b"", b"z" * 64)]
    assert peak == 2 + 63
    assert framer.buffered_bytes == 0


# --- ascii4: 4 ASCII digits ----------------------------------------------------------------


def test_ascii4_single_frame() -> None:
    framer = Framer("ascii4", max_frame_bytes=9999)
    assert framer.feed(b"0005hello") == [(b"", b"hello")]
    assert framer.buffered_bytes == 0


def test_ascii4_length_is_decimal() -> None:
    # "0012" is twelve, not 0x12 = 18.
    framer = Framer("ascii4", max_frame_bytes=9999)
    assert framer.feed(b"0012abcdefghijkl0001m") == [(b"", b"abcdefghijkl"), (b"", b"m")]


def test_ascii4_several_frames_and_split() -> None:
    framer = Framer("ascii4", max_frame_bytes=9999)
    assert framer.feed(b"0003one00") == [(b"", b"one")]
    assert framer.buffered_bytes == 2
    assert framer.feed(b"03tw") == []
    assert framer.feed(b"o0002hi") == [(b"", b"two"), (b"", b"hi")]
    assert framer.buffered_bytes == 0


def test_ascii4_zero_length_frame() -> None:
    framer = Framer("ascii4", max_frame_bytes=9999)
    assert framer.feed(b"0000") == [EMPTY_FRAME]
    stream = b"00000000" + b"0002ok" + b"0000"
    assert framer.feed(stream) == [EMPTY_FRAME, EMPTY_FRAME, (b"", b"ok"), EMPTY_FRAME]
    assert framer.buffered_bytes == 0


@pytest.mark.parametrize(
    "prefix",
    [
        b"00a5",
        b"12 4",
        b" 123",
        b"+123",
        b"-001",
        b"0x10",
        b"\x00\x00\x00\x05",
        b"\xd9\xa1\xd9\xa2",
    ],
)
def test_ascii4_non_digit_prefix_raises(prefix: bytes) -> None:
    framer = Framer("ascii4", max_frame_bytes=9999)
    with pytest.raises(FramingError):
        framer.feed(prefix + b"hello")


def test_ascii4_oversize_prefix_raises() -> None:
    framer = Framer("ascii4", max_frame_bytes=100)
    assert framer.feed(b"0100" + b"x" * 100) == [(b"", b"x" * 100)]
    with pytest.raises(FramingError):
        framer.feed(b"0101")
    assert framer.buffered_bytes <= 4


def test_ascii4_incomplete_prefix_waits() -> None:
    framer = Framer("ascii4", max_frame_bytes=9999)
    assert framer.feed(b"00") == []
    assert framer.feed(b"0") == []
    assert framer.feed(b"2x") == []
    assert framer.feed(b"y") == [(b"", b"xy")]


# --- fixed header --------------------------------------------------------------------------


def test_header_is_split_off_len2() -> None:
    framer = Framer("len2", header_bytes=5, max_frame_bytes=8192)
    # length 13 = 5 header + 8 message
    assert framer.feed(b"\x00\x0dHDR01msg-0800") == [(b"HDR01", b"msg-0800")]


def test_header_is_split_off_ascii4_across_feeds() -> None:
    framer = Framer("ascii4", header_bytes=3, max_frame_bytes=9999)
    assert framer.feed(b"0007IS") == []
    assert framer.feed(b"O0100") == [(b"ISO", b"0100")]
    assert framer.feed(b"0005ABCde0003XYZ") == [(b"ABC", b"de"), (b"XYZ", b"")]


def test_header_only_frame_gives_empty_message() -> None:
    framer = Framer("len2", header_bytes=4, max_frame_bytes=8192)
    assert framer.feed(b"\x00\x04\x01\x02\x03\x04") == [(b"\x01\x02\x03\x04", b"")]


def test_zero_length_frame_with_header_configured_has_no_header() -> None:
    framer = Framer("len2", header_bytes=4, max_frame_bytes=8192)
    assert framer.feed(b"\x00\x00\x00\x06HEADok") == [EMPTY_FRAME, (b"HEAD", b"ok")]


def test_frame_shorter_than_header_raises() -> None:
    framer = Framer("len2", header_bytes=5, max_frame_bytes=8192)
    with pytest.raises(FramingError):
        framer.feed(b"\x00\x03abc")


# --- frame(): outgoing ---------------------------------------------------------------------


def test_frame_len2_golden() -> None:
    framer = Framer("len2", max_frame_bytes=8192)
    assert framer.frame(b"", b"08108220") == b"\x00\x0808108220"
    assert framer.frame(b"", b"x" * 258) == b"\x01\x02" + b"x" * 258


def test_frame_ascii4_golden() -> None:
    framer = Framer("ascii4", max_frame_bytes=9999)
    assert framer.frame(b"", b"0810") == b"00040810"
    assert framer.frame(b"", b"y" * 1234) == b"1234" + b"y" * 1234


def test_frame_counts_header_in_length() -> None:
    assert Framer("len2", header_bytes=3, max_frame_bytes=100).frame(b"HDR", b"0110") == (
        b"\x00\x07HDR0110"
    )
    assert Framer("ascii4", header_bytes=3, max_frame_bytes=100).frame(b"HDR", b"0110") == (
        b"0007HDR0110"
    )


def test_frame_empty_message() -> None:
    assert Framer("len2", max_frame_bytes=10).frame(b"", b"") == b"\x00\x00"
    assert Framer("ascii4", max_frame_bytes=10).frame(b"", b"") == b"0000"


def test_frame_output_is_read_back_by_feed() -> None:
    for prefix in ("len2", "ascii4"):
        framer = Framer(prefix, header_bytes=2, max_frame_bytes=500)
        wire = framer.frame(b"H1", b"payload") + framer.frame(b"H2", b"more")
        assert Framer(prefix, header_bytes=2, max_frame_bytes=500).feed(wire) == [
            (b"H1", b"payload"),
            (b"H2", b"more"),
        ]


@pytest.mark.parametrize("prefix", ["len2", "len2_inclusive", "ascii4"])
def test_an_outgoing_frame_is_bounded_by_what_its_prefix_can_express(prefix: str) -> None:
    """max_frame_bytes bounds what a peer sends; an answer may be longer than the request that
    fitted (it adds fields), and is framed up to what the length prefix can say."""
    framer = Framer(prefix, max_frame_bytes=10)
    ceiling = FRAME_BYTES_CEILING[prefix]
    eleven = {"len2": b"\x00\x0b", "len2_inclusive": b"\x00\x0d", "ascii4": b"0011"}[prefix]
    assert framer.frame(b"", b"x" * 11) == eleven + b"x" * 11  # longer than max: framed
    assert len(framer.frame(b"", b"x" * ceiling)) == ceiling + (4 if prefix == "ascii4" else 2)
    with pytest.raises(FramingError, match="can express"):
        framer.frame(b"", b"x" * (ceiling + 1))
    with pytest.raises(FramingError, match="can express"):
        Framer(prefix, header_bytes=2, max_frame_bytes=10).frame(b"HH", b"x" * (ceiling - 1))


# --- construction --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prefix", "kwargs"),
    [
        ("len4", {"max_frame_bytes": 100}),
        ("len2", {"max_frame_bytes": 0}),
        ("len2", {"max_frame_bytes": 65536}),
        ("ascii4", {"max_frame_bytes": 10000}),
        ("len2", {"max_frame_bytes": 10, "header_bytes": 10}),
        ("len2", {"max_frame_bytes": 10, "header_bytes": -1}),
    ],
)
def test_bad_configuration_is_rejected(prefix: str, kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        Framer(prefix, **kwargs)  # type: ignore[arg-type]


# --- len2_inclusive: the 2-byte length counts its own two bytes ----------------------------


def test_len2_inclusive_golden_bytes_both_ways() -> None:
    framer = Framer("len2_inclusive", max_frame_bytes=8192)
    assert framer.frame(b"", b"hello") == b"\x00\x07hello"  # 5 + 2
    assert framer.feed(b"\x00\x07hello\x00\x05two") == [(b"", b"hello"), (b"", b"two")]
    assert framer.buffered_bytes == 0


def test_len2_inclusive_zero_length_is_the_prefix_alone_or_zero() -> None:
    framer = Framer("len2_inclusive", max_frame_bytes=8192)
    # 2 counts the prefix alone; 0 is how a plain len2 peer sends it.
    assert framer.feed(b"\x00\x02\x00\x00\x00\x02") == [EMPTY_FRAME] * 3
    assert framer.buffered_bytes == 0


def test_len2_inclusive_length_of_one_raises() -> None:
    framer = Framer("len2_inclusive", max_frame_bytes=8192)
    with pytest.raises(FramingError, match="below its own 2 bytes"):
        framer.feed(b"\x00\x01" + b"0800")


def test_len2_inclusive_max_frame_counts_the_body_only() -> None:
    framer = Framer("len2_inclusive", max_frame_bytes=10)
    assert framer.feed(b"\x00\x0c" + b"x" * 10) == [(b"", b"x" * 10)]
    with pytest.raises(FramingError, match="exceeds max_frame_bytes"):
        framer.feed(b"\x00\x0d" + b"x" * 11)


def test_len2_inclusive_ceiling_leaves_room_for_the_prefix() -> None:
    with pytest.raises(ValueError, match="65534"):
        Framer("len2_inclusive", max_frame_bytes=65534)
    framer = Framer("len2_inclusive", max_frame_bytes=65533)
    assert framer.frame(b"", b"x" * 65533)[:2] == b"\xff\xff"


def test_head_shows_where_a_broken_frame_starts() -> None:
    framer = Framer("len2", max_frame_bytes=64)
    with pytest.raises(FramingError):
        framer.feed(b"0123456")
    assert framer.head(4) == b"0123"


@pytest.mark.parametrize("prefix", ["len2", "len2_inclusive", "ascii4"])
def test_a_limit_hands_out_frames_a_share_at_a_time_and_loses_none(prefix: str) -> None:
    sender = Framer(prefix, max_frame_bytes=512)  # type: ignore[arg-type]
    stream = b"".join(sender.frame(b"", b"%04d" % n) for n in range(10)) + b"\x00"  # a part
    framer = Framer(prefix, max_frame_bytes=512)  # type: ignore[arg-type]
    shares = [framer.feed(stream, 4)]
    while len(shares[-1]) == 4:
        shares.append(framer.feed(b"", 4))
    assert [len(share) for share in shares] == [4, 4, 2]
    assert [message for share in shares for _, message in share] == [b"%04d" % n for n in range(10)]
    assert framer.buffered_bytes == 1  # the half-sent prefix waits for the rest
