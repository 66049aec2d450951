"""Name the likely cause when a peer's first message does not decode on a listener.

A peer configured for another dialect (binary bitmap on an ascii listener, a network header the
listener does not expect, a length prefix that counts itself) sends nothing this listener can
decode, and dropping every message leaves the peer waiting out its own timeout on each one. The
daemon closes such a link at once; this module tries the neighbouring dialects on the message
that failed so the log line says what to change. It runs once per misconfigured link, never on
the hot path.
"""

from __future__ import annotations

from functools import cache

from processor import limits
from processor.types import Bitmap, Framing
from processor.wire.codec import Codec
from processor.wire.errors import InvalidMessage, UndecodableMessage
from processor.wire.spec import load_spec


@cache
def _codec(bitmap: Bitmap) -> Codec:
    return Codec(load_spec(bitmap))


def _decodes(bitmap: Bitmap, message: bytes) -> bool:
    try:
        _codec(bitmap).decode(message)
    except UndecodableMessage:
        return False
    except InvalidMessage as error:
        return not error.unparsed  # it parsed: a bad value is a matter of content, not dialect
    return True


def undecodable_cause(
    frame: bytes, *, bitmap: Bitmap, header_bytes: int, framing: Framing
) -> str | None:
    """The dialect `frame` (header and message as framed) decodes in, said as a mismatch.

    None when no neighbouring dialect decodes it either (garbage, or a dialect too far away),
    or when the frame is longer than an authorisation ever is (not worth the work).
    """
    if len(frame) > limits.dialect_diagnosis_bytes_max:
        return None
    other: Bitmap = "binary" if bitmap == "ascii" else "ascii"
    article = "an" if bitmap == "ascii" else "a"
    trims = (0, 2) if framing == "len2" else (0,)
    for trim in trims:
        body = frame[: len(frame) - trim] if trim else frame
        for offset in range(min(limits.header_bytes_max, len(body)) + 1):
            for candidate in (bitmap, other):
                if candidate == bitmap and offset == header_bytes and not trim:
                    continue  # the listener's own dialect: that is what failed
                if not _decodes(candidate, body[offset:]):
                    continue
                causes = []
                if candidate != bitmap:
                    causes.append(f"{candidate} bitmap on {article} {bitmap} listener")
                if offset != header_bytes:
                    causes.append(
                        f"a {offset}-byte header before the MTI where the listener has "
                        f"header_bytes = {header_bytes}"
                    )
                if trim:
                    causes.append(
                        'a length prefix that counts its own 2 bytes (framing = "len2_inclusive")'
                    )
                return "; ".join(causes)
    return None


def framing_cause(first_bytes: bytes, framing: Framing) -> str | None:
    """What the first bytes of a link that broke framing look like, if it is a known mismatch."""
    digits = len(first_bytes) >= 4 and first_bytes[:4].isdigit()
    if framing != "ascii4" and digits:
        return f"4 ASCII digits at the start: ascii4 framing on a {framing} listener"
    if framing == "ascii4" and not digits and len(first_bytes) >= 2:
        return "no ASCII length at the start: a binary length prefix (len2) on an ascii4 listener"
    return None
