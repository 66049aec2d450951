"""The only exceptions the wire layer raises on hostile input.

Errors carry context as attributes and never the field's value: a decoded ISO 8583 message
holds a PAN, so a message or traceback that quoted field data could leak one into a log.
"""

from __future__ import annotations


class WireError(Exception):
    """Base of every error raised for bad bytes from a peer."""


class FramingError(WireError):
    """The byte stream itself is broken (bad or oversize length prefix): close the link."""


class UndecodableMessage(WireError):
    """An intact frame whose MTI or STAN cannot be read: count it and drop it."""

    def __init__(self, reason: str, field: str | None = None, position: int | None = None):
        super().__init__(reason if field is None else f"field {field}: {reason}")
        self.reason = reason
        self.field = field
        self.position = position


class InvalidMessage(WireError):
    """A frame with a readable MTI and STAN that breaks the contract: answer it with 39 = 30.

    `echo` holds the fields that decoded and may be echoed in the format-error response.
    `unparsed`: the message did not parse (not just a bad value in a field that did), which
    on a link's first message may mean a peer in another dialect.
    """

    def __init__(
        self,
        reason: str,
        field: str | None,
        mti: str,
        echo: dict[str, str],
        *,
        unparsed: bool = False,
    ):
        super().__init__(reason if field is None else f"field {field}: {reason}")
        self.reason = reason
        self.field = field
        self.mti = mti
        self.echo = echo
        self.unparsed = unparsed
