"""Sans-I/O framing of ISO 8583 messages on a TCP byte stream.

`len2`: 2-byte big-endian length of what follows. `len2_inclusive`: the same, counting its own
two bytes (some hosts and client libraries frame so). `ascii4`: 4 ASCII digits. An optional fixed
header (e.g. a network's routing header) may sit between the prefix and the MTI; it is handed out
with each message so the server can echo it. The buffer is bounded: a prefix announcing more than
`max_frame_bytes` is a FramingError before any of that frame is buffered.

A zero-length frame (a prefix of 0, or 2 for len2_inclusive) is handed out as `(b"", b"")`:
some channels send them as keep-alives, but ISO 8583 has a message for that (0800 echo), and
a peer must not be able to make the server parse prefixes for free, so the server counts each
as a bad message (specs/messages.md, bad input). With a header configured, no real frame has
an empty header, so `(b"", b"")` is never anything else.
"""

from __future__ import annotations

from typing import Final

from processor.types import FRAME_BYTES_CEILING, Framing
from processor.wire.errors import FramingError

EMPTY_FRAME: Final = (b"", b"")  # (header, message) of a zero-length frame


class Framer:
    __slots__ = (
        "_buffer",
        "_ceiling",
        "_counted",
        "_header_bytes",
        "_max_frame_bytes",
        "_prefix",
        "_prefix_bytes",
        "error",
    )

    def __init__(self, prefix: Framing = "len2", *, header_bytes: int = 0, max_frame_bytes: int):
        if prefix not in ("len2", "len2_inclusive", "ascii4"):
            raise ValueError(f"framing: unknown prefix {prefix!r}")
        ceiling = FRAME_BYTES_CEILING[prefix]
        if not 0 < max_frame_bytes <= ceiling:
            raise ValueError(f"framing: max_frame_bytes {max_frame_bytes} outside 1..{ceiling}")
        if not 0 <= header_bytes < max_frame_bytes:
            raise ValueError(f"framing: header_bytes {header_bytes} not below max_frame_bytes")
        self._prefix = prefix
        self._ceiling = ceiling
        self._prefix_bytes = 4 if prefix == "ascii4" else 2
        # What the prefix counts beyond the frame's body: its own bytes, for len2_inclusive.
        self._counted = 2 if prefix == "len2_inclusive" else 0
        self._header_bytes = header_bytes
        self._max_frame_bytes = max_frame_bytes
        self._buffer = bytearray()
        # The framing error found behind the frames a call returned: raised by the next call.
        self.error: FramingError | None = None

    @property
    def buffered_bytes(self) -> int:
        return len(self._buffer)

    def head(self, count: int) -> bytes:
        """The first `count` buffered bytes: where a frame that broke framing starts."""
        return bytes(self._buffer[:count])

    def feed(self, data: bytes, limit: int | None = None) -> list[tuple[bytes, bytes]]:
        """Add received bytes; return the complete frames as (header, message) pairs, a
        zero-length frame as `(b"", b"")`. With `limit`, at most that many: the rest stays
        buffered for the next call (which may add nothing: `feed(b"", limit)`).

        FramingError when the stream cannot be framed any further. Found behind complete
        frames, those are returned first and the error kept in `error`, raised by the next
        call: frames a peer sent whole are answered before its link is closed."""
        if self.error is not None:
            raise self.error
        buffer = self._buffer
        buffer += data
        frames: list[tuple[bytes, bytes]] = []
        offset = 0
        size = len(buffer)
        prefix_bytes = self._prefix_bytes
        left = size if limit is None else limit
        try:
            while size - offset >= prefix_bytes and left:
                left -= 1
                length = self._length(buffer, offset)
                if length > self._max_frame_bytes:
                    raise FramingError(
                        f"frame length {length} exceeds max_frame_bytes {self._max_frame_bytes}"
                    )
                end = offset + prefix_bytes + length
                if end > size:
                    break
                if length:
                    if length < self._header_bytes:
                        raise FramingError(
                            f"frame length {length} shorter than header_bytes {self._header_bytes}"
                        )
                    body_start = offset + prefix_bytes + self._header_bytes
                    frames.append(
                        (
                            bytes(buffer[offset + prefix_bytes : body_start]),
                            bytes(buffer[body_start:end]),
                        )
                    )
                else:
                    frames.append(EMPTY_FRAME)
                offset = end
        except FramingError as error:
            if not frames:
                raise
            self.error = error  # `offset` is where the frame that broke framing starts
        if offset:
            del buffer[:offset]
        return frames

    def _length(self, buffer: bytearray, offset: int) -> int:
        if self._prefix != "ascii4":
            length = (buffer[offset] << 8) | buffer[offset + 1]
            if length == 0:
                return 0  # zero-length as plain len2 peers send it: a zero-length frame on either
            if length < self._counted:
                raise FramingError(f"{self._prefix} length prefix {length} below its own 2 bytes")
            return length - self._counted
        digits = buffer[offset : offset + 4]
        if not digits.isdigit():
            raise FramingError("ascii4 length prefix is not 4 ASCII digits")
        return int(digits)

    def frame(self, header: bytes, message: bytes) -> bytes:
        """Prefix `header + message` with its length.

        `max_frame_bytes` bounds what a peer may make us buffer, not what we answer: an answer
        echoes its request's fields and adds its own (38, 39, 54, ...), so it can be longer
        than a request that fitted, and refusing it would leave a decided request unanswered.
        Only a length the prefix cannot express is a FramingError."""
        length = len(header) + len(message)
        if length > self._ceiling:
            raise FramingError(
                f"outgoing frame {length} exceeds what {self._prefix} framing can express "
                f"({self._ceiling})"
            )
        if self._prefix != "ascii4":
            return (length + self._counted).to_bytes(2, "big") + header + message
        return b"%04d" % length + header + message
