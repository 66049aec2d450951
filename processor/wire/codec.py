"""Decode ISO 8583 frames into typed requests and encode responses, via pyiso8583.

Validation happens here, before anything reaches the engine: a request class MTI, a STAN, the
mandatory fields of its MTI, ASCII digits in every numeric field (field 4 included: 30, as
specs/messages.md says), dates and times in range. A format error's answer never echoes the
field at fault.
"""

from __future__ import annotations

import re
from itertools import takewhile
from typing import Final

import iso8583
from iso8583.decoder import DecodeError
from iso8583.encoder import EncodeError

from processor.types import (
    DAY_PART,
    HOUR_PART,
    MINUTE_OR_SECOND_PART,
    MONTH_PART,
    TRANSMISSION_DATETIME_PATTERN,
)
from processor.wire.errors import InvalidMessage, UndecodableMessage
from processor.wire.fastcodec import FastCodec
from processor.wire.messages import (
    AuthorizationRequest,
    NetworkManagementRequest,
    Request,
    UnsupportedRequest,
)
from processor.wire.spec import Spec

# Responses to financial-class requests echo these (DESIGN.md, wire contract).
AUTHORIZATION_ECHO: Final = (
    "2",
    "3",
    "4",
    "6",
    "7",
    "11",
    "12",
    "13",
    "32",
    "37",
    "41",
    "42",
    "49",
    "51",
    "90",
    "95",
)
NETWORK_ECHO: Final = ("7", "11", "70")
_REQUEST: Final = ("2", "3", "7", "11", "18", "32", "49")
_ADVICE: Final = ("2", "3", "4", "7", "11", "32", "49")
MANDATORY: Final[dict[str, tuple[str, ...]]] = {
    "0800": ("7", "11", "70"),
    # Authorisations and financial requests: decided, so the MCC is needed.
    "0100": _REQUEST,
    "0101": _REQUEST,
    "0200": _REQUEST,
    "0201": _REQUEST,
    # Advices and reversals: recorded as told; the amount is what they are about.
    "0120": (*_ADVICE, "18"),
    "0121": (*_ADVICE, "18"),
    "0220": _ADVICE,
    "0221": _ADVICE,
    "0400": _ADVICE,
    "0401": _ADVICE,
    "0420": _ADVICE,
    "0421": _ADVICE,
}
# Date and time fields, checked as such beyond their digits: a minute of 80 is a format
# error, not a time. One compiled pattern per field (the check runs on every request: parsing
# the parts as integers cost 3 us per message). Each part within its range; days up to 31 in
# any month: the contract checks ranges, not the calendar.
_CALENDAR_FIELDS: Final = {
    "7": ("MMDDhhmmss", re.compile(TRANSMISSION_DATETIME_PATTERN).search),
    "12": ("hhmmss", re.compile(HOUR_PART + MINUTE_OR_SECOND_PART * 2).fullmatch),
    "13": ("MMDD", re.compile(MONTH_PART + DAY_PART).fullmatch),
    "14": ("YYMM", re.compile("[0-9][0-9]" + MONTH_PART).fullmatch),
}
_CALENDAR_SEEN_MAX: Final = 4096  # valid values remembered per field, forgotten all at once


def is_request_mti(mti: str) -> bool:
    # Third digit: message function (0 request, 2 advice, 4 notification); fourth: origin
    # (0 acquirer, 1 acquirer repeat). Responses (odd function) are not ours to answer.
    return len(mti) == 4 and mti.isdigit() and mti[2] in "024" and mti[3] in "01"


# A hex bitmap: 16 digits (with bit 65 set, pyiso8583 reads a tertiary bitmap into the same
# field: 32).
_HEX_DIGITS: Final = re.compile(rb"(?:[0-9A-Fa-f]{16}){1,2}")


class Codec:
    __slots__ = ("_calendar_seen", "_digit_fields", "_fast", "_iso", "spec")

    def __init__(self, spec: Spec) -> None:
        self.spec = spec
        self._iso = spec.iso
        self._digit_fields = spec.numeric_fields
        self._fast = FastCodec(spec)
        self._calendar_seen: dict[str, set[str]] = {key: set() for key in _CALENDAR_FIELDS}

    def decode(self, message: bytes) -> Request:
        """Raise UndecodableMessage (drop) or InvalidMessage (answer 30); nothing else."""
        mti_bytes = message[:4]
        if len(mti_bytes) < 4 or not mti_bytes.isdigit():
            raise UndecodableMessage("MTI is not 4 ASCII digits", "t", 0)
        mti = mti_bytes.decode("ascii")
        if not is_request_mti(mti):
            raise UndecodableMessage(f"MTI {mti} is not a request this side answers", "t", 0)
        fields = self._fast.decode(message)
        if fields is None:
            fields = self._decode_slowly(mti, message)
        stan = fields.get("11")
        if stan is None or len(stan) != 6 or not stan.isdigit():
            raise UndecodableMessage("STAN (field 11) missing or not 6 digits", "11")
        for key in fields:
            if key in self._digit_fields and not fields[key].isdigit():
                raise InvalidMessage("not ASCII digits", key, mti, self._echo(mti, fields))
        replacement = fields.get("95")
        if replacement is not None and not replacement[:12].isdigit():
            # Field 95 is "an" (its later parts may be spaces), but a reversal reads its
            # first 12 as the amount the transaction is now worth: unreadable, a partial
            # reversal would release the whole hold.
            raise InvalidMessage(
                "actual amount not ASCII digits", "95", mti, self._echo(mti, fields, "95")
            )
        for key, (layout, matches) in _CALENDAR_FIELDS.items():
            value = fields.get(key)
            if value is None:
                continue
            seen = self._calendar_seen[key]
            if value in seen:
                continue  # field 7 repeats for a second, 14 for years: a set beats the pattern
            if matches(value) is not None:
                if len(seen) >= _CALENDAR_SEEN_MAX:
                    seen.clear()
                seen.add(value)
            else:
                echo = self._echo(mti, fields)
                echo.pop(key, None)  # digits of the right length, but not to repeat as a time
                raise InvalidMessage(f"not a valid {layout}", key, mti, echo)
        mandatory = MANDATORY.get(mti)
        if mandatory is None:
            return UnsupportedRequest(mti=mti, stan=stan, echo=self._echo(mti, fields))
        for key in mandatory:
            if key not in fields:
                raise InvalidMessage("mandatory field missing", key, mti, self._echo(mti, fields))
        if mti == "0800":
            return NetworkManagementRequest(
                mti=mti,
                stan=stan,
                code=fields["70"],
                echo={k: fields[k] for k in NETWORK_ECHO if k in fields},
            )
        get = fields.get
        amount_text = get("4")
        # Positional, in AuthorizationRequest's field order: msgspec matching 24 keywords by
        # name on every call measured 1 us of a 7.5 us decode. tests/unit/test_codec.py
        # (test_every_attribute_comes_from_its_own_field) catches an order mistake.
        return AuthorizationRequest(
            mti,
            fields["2"],  # pan
            fields["3"],  # processing_code
            int(amount_text) if amount_text and amount_text.isdigit() else None,  # amount
            fields["7"],  # transmission_datetime
            stan,
            get("14"),  # expiry
            get("18") or "",  # mcc
            get("22"),  # pos_entry_mode
            get("25"),  # pos_condition
            fields["32"],  # acquirer
            get("33"),  # forwarding
            get("37"),  # rrn
            get("41"),  # terminal
            get("42"),  # merchant_id
            get("43"),  # merchant_name_location
            get("48"),  # additional_data
            fields["49"],  # currency
            get("6"),  # billing_amount
            get("51"),  # billing_currency
            {k: fields[k] for k in AUTHORIZATION_ECHO if k in fields},  # echo
            get("90"),  # original_data
            get("95"),  # replacement_amounts
            get("39"),  # network_response_code
        )

    def _decode_slowly(self, mti: str, message: bytes) -> dict[str, str]:
        """pyiso8583: for what the fast codec would not vouch for, and for its precise errors."""
        failure: UndecodableMessage | InvalidMessage | None = None
        try:
            fields, encoded = iso8583.decode(message, self._iso)
            failure = self._lenient(mti, fields, encoded)
        except DecodeError as error:
            # Never quote the error itself: its document holds whatever decoded, PAN included.
            partial = {k: v for k, v in error.doc_dec.items() if isinstance(v, str)}
            malformed = self._malformed(error.doc_enc)
            if malformed is None:
                failure = self._invalid(mti, partial, error.msg, error.field, error.pos)
            else:
                # A bad prefix whose value was not the length sent put every later field out
                # of step, and the decode failed further on: the field blamed was innocent,
                # and the STAN, the PAN's digits and the rest read after it were pieces of
                # other fields. Only what was read before it is the sender's; without the
                # STAN among it, nothing can be answered.
                key, reason = malformed
                earlier = takewhile(lambda each: each != key, error.doc_enc)
                before = {k: partial[k] for k in earlier if k in partial}
                failure = self._invalid(mti, before, reason, key, 0)
        except KeyError:
            # Bit 65 set: pyiso8583 then reads a tertiary bitmap and looks up fields 129-192,
            # which a 1987 spec does not define. Nothing past field 128 can be read: drop it.
            failure = UndecodableMessage("bitmap names fields beyond 128", "65")
        if failure is not None:
            # Raised outside the except block so pyiso8583's error (which holds the raw
            # message, PAN included) is not chained as __context__ into our logs.
            raise failure
        return fields

    def _lenient(
        self, mti: str, fields: dict[str, str], encoded: dict[str, dict[str, bytes]]
    ) -> UndecodableMessage | InvalidMessage | None:
        """What pyiso8583 takes and the wire format does not: it reads a length prefix with
        int() (" 9", "+9", "0_8" and "-00" all pass) and a bitmap with bytes.fromhex()
        (which skips spaces). A message written so is malformed, whatever it decoded to."""
        malformed = self._malformed(encoded)
        if malformed is None:
            return None
        key, reason = malformed
        return self._invalid(mti, fields, reason, key, 0)

    def _malformed(self, encoded: dict[str, dict[str, bytes]]) -> tuple[str, str] | None:
        """The first field, in the order decoded, whose length prefix or bitmap pyiso8583
        read though it breaks the wire format (see _lenient), and why."""
        for key, parts in encoded.items():
            length = parts.get("len", b"")
            if length and not length.isdigit():
                return key, "length prefix is not ASCII digits"
            if (
                key in ("p", "1")
                and self._iso[key]["data_enc"] == "ascii"
                and not _HEX_DIGITS.fullmatch(parts.get("data", b""))
            ):
                return key, "bitmap is not hex digits"
        return None

    def _invalid(
        self, mti: str, partial: dict[str, str], reason: str, field: str, position: int
    ) -> UndecodableMessage | InvalidMessage:
        stan = partial.get("11")
        if stan is None or len(stan) != 6 or not stan.isdigit():
            return UndecodableMessage(reason, field, position)
        # The STAN was read well (just checked): pyiso8583 names the last field for data after
        # it, and an answer without 11 cannot be matched.
        echo = self._echo(mti, partial, None if field == "11" else field)
        return InvalidMessage(reason, field, mti, echo, unparsed=True)

    def _echo(self, mti: str, fields: dict[str, str], fault: str | None = None) -> dict[str, str]:
        """Echo-able fields of a bad message: only those that decoded and are well formed, and
        never the field at `fault` (specs/messages.md): what decoded of it through a bad
        length prefix, or an "an" field 95 whose amount is not digits, is not what was sent."""
        keys = NETWORK_ECHO if mti.startswith("08") else AUTHORIZATION_ECHO
        echo = {}
        for key in keys:
            value = fields.get(key)
            if value is None or key == fault or not self._well_formed(key, value):
                continue
            echo[key] = value
        return echo

    def _well_formed(self, key: str, value: str) -> bool:
        # pyiso8583 leaves the field it failed on in the partial document as "": echoing that
        # would make the format-error response itself unencodable.
        field = self._iso[key]
        if field["len_type"] == 0 and len(value) != field["max_len"]:
            return False
        return key not in self.spec.numeric_fields or value.isdigit()

    def encode(self, fields: dict[str, str]) -> bytes:
        """Encode a response; `fields` holds "t" and the data elements by number."""
        fast = self._fast.encode(fields)
        if fast is not None:
            return fast
        try:
            data, _ = iso8583.encode(dict(fields), self._iso)
        except EncodeError as error:
            raise ValueError(f"cannot encode response field {error.field}: {error.msg}") from None
        return bytes(data)
