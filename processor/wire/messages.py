"""Typed requests named by meaning; field numbers stop at this module's boundary."""

from __future__ import annotations

import msgspec


class NetworkManagementRequest(msgspec.Struct, frozen=True, gc=False):
    mti: str  # 0800
    stan: str  # field 11
    code: str  # field 70: 001 sign-on, 002 sign-off, 301 echo test
    echo: dict[str, str]  # fields the 0810 carries back


class AuthorizationRequest(msgspec.Struct, frozen=True, gc=False):
    """Any financial-class message: 0100/0120/0200/0220/0400/0420 and their repeats."""

    mti: str  # 0100, 0101 repeat, 0120, 0200, 0220, 0400, 0420, ...
    pan: str  # field 2: in memory for one batch only; never stored, logged or emitted
    processing_code: str  # field 3: transaction type (2) + from account (2) + to account (2)
    amount: int | None  # field 4, minor units of `currency`; None when absent or not digits
    transmission_datetime: str  # field 7, MMDDhhmmss (UTC)
    stan: str  # field 11
    expiry: str | None  # field 14, YYMM
    mcc: str  # field 18
    pos_entry_mode: str | None  # field 22
    pos_condition: str | None  # field 25
    acquirer: str  # field 32
    forwarding: str | None  # field 33
    rrn: str | None  # field 37
    terminal: str | None  # field 41
    merchant_id: str | None  # field 42
    merchant_name_location: str | None  # field 43
    additional_data: str | None  # field 48
    currency: str  # field 49, ISO 4217 numeric
    billing_amount: str | None  # field 6
    billing_currency: str | None  # field 51
    echo: dict[str, str]  # fields the response carries back (includes the PAN: do not store)
    original_data: str | None = None  # field 90: MTI 4, STAN 6, date-time 10, acquirer 11, fwd 11
    replacement_amounts: str | None = None  # field 95: first 12 digits = actual amount
    network_response_code: str | None = None  # field 39 of an advice: what stand-in answered

    @property
    def transaction_type(self) -> str:
        """Field 3 positions 1-2: 00 purchase, 01 cash, 09 cashback, 31 balance inquiry, ..."""
        return self.processing_code[:2]

    @property
    def message_class(self) -> str:
        """0101 -> 0100, 0421 -> 0420: repeats share their original's class."""
        return self.mti[:3] + "0"

    @property
    def identity(self) -> bytes:
        """Acquirer + STAN + transmission date-time: what a repeat or a reversal points at."""
        return transaction_identity(self.acquirer, self.stan, self.transmission_datetime)

    @property
    def answer_key(self) -> bytes:
        """Under which the answer to this message is stored: its class, then its identity."""
        return transaction_key(
            self.message_class, self.acquirer, self.stan, self.transmission_datetime
        )

    @property
    def rrn_key(self) -> bytes | None:
        """RRN|acquirer|STAN: how a reversal without field 90 finds its original."""
        return None if not self.rrn else rrn_key(self.acquirer, self.stan, self.rrn)

    def original_key(self) -> tuple[str, bytes] | None:
        """(original message class, answer key) from field 90, or None when absent or unusable."""
        data = self.original_data
        if data is None or len(data) != 42 or not data.isdigit():
            return None
        message_class = data[:3] + "0"  # 0101 -> 0100: a repeat shares its original's class
        return message_class, transaction_key(message_class, data[20:31], data[4:10], data[10:20])

    @property
    def partial_approval_supported(self) -> bool:
        """Field 48 subelement 61, position 1 = 1: the terminal can take a partial approval."""
        data = self.additional_data
        if not data or "61" not in data:
            return False
        return additional_data_subelements(data).get("61", "")[:1] == "1"

    @property
    def cvc2(self) -> str | None:
        """Field 48 subelement 92: the CVC2 the cardholder gave, when sent (as sent: a value
        that is not 3 digits is a wrong one, not an absent one). Never stored or logged; the
        duplicate fingerprint leaves field 48 out for it."""
        data = self.additional_data
        if not data or "92" not in data:
            return None
        return additional_data_subelements(data).get("92")

    @property
    def cardholder_authenticated(self) -> bool:
        """Field 48 subelement 42 (the electronic-commerce security level indicator), position
        3 = 2: the issuer's access control server authenticated the cardholder (3-D Secure,
        UCAF/AAV in subelement 43). 1 (attempted) and 0 (none) are not strong authentication."""
        data = self.additional_data
        if not data or "42" not in data:
            return False
        return additional_data_subelements(data).get("42", "")[2:3] == "2"

    @property
    def sca_out_of_scope(self) -> bool:
        """Field 48 subelement 22 = 01 (merchant-initiated) or 02 (recurring, after the first):
        payments the cardholder does not take part in, outside PSD2's SCA (specs/sca.md)."""
        data = self.additional_data
        if not data or "22" not in data:
            return False
        return additional_data_subelements(data).get("22", "")[:2] in ("01", "02")

    def replacement_amount(self) -> int | None:
        """Field 95's actual transaction amount (partial reversal), when present and digits."""
        data = self.replacement_amounts
        if data is None or len(data) < 12 or not data[:12].isdigit():
            return None
        return int(data[:12])


class UnsupportedRequest(msgspec.Struct, frozen=True, gc=False):
    """A well-formed request of a message type this processor does not handle (yet)."""

    mti: str
    stan: str
    echo: dict[str, str]


Request = NetworkManagementRequest | AuthorizationRequest | UnsupportedRequest


def additional_data_subelements(data: str) -> dict[str, str]:
    """Field 48, Mastercard layout: a transaction category code, then `TTLLvalue` subelements.

    Parsing stops at the first malformed subelement; what came before it still counts.
    """
    subelements: dict[str, str] = {}
    index = 1
    while index + 4 <= len(data):
        tag, length = data[index : index + 2], data[index + 2 : index + 4]
        if not (tag.isdigit() and length.isdigit()):
            break
        end = index + 4 + int(length)
        if end > len(data):
            break
        subelements[tag] = data[index + 4 : end]
        index = end
    return subelements


def acquirer_number(acquirer: str) -> str:
    """The acquirer compared as a number: field 32 is LLVAR ("123456"), field 90 carries it
    zero-padded to 11 digits ("00000123456")."""
    return acquirer.lstrip("0") or "0"


def transaction_identity(acquirer: str, stan: str, transmission_datetime: str) -> bytes:
    """acquirer|STAN|field 7: a transaction as the network identifies it."""
    return f"{acquirer_number(acquirer)}|{stan}|{transmission_datetime}".encode("ascii")


def transaction_key(
    message_class: str, acquirer: str, stan: str, transmission_datetime: str
) -> bytes:
    """The one format of a transaction's key: class|acquirer|STAN|field 7."""
    return (
        message_class.encode("ascii")
        + b"|"
        + transaction_identity(acquirer, stan, transmission_datetime)
    )


def rrn_key(acquirer: str, stan: str, rrn: str) -> bytes:
    """The one format of the RRN lookup key: RRN|acquirer|STAN.

    The RRN first because networks build it from the date and time (Visa: YDDDhh + sequence),
    so keys of requests arriving together sort together and share the index's leaf pages.
    """
    return f"{rrn}|{acquirer_number(acquirer)}|{stan}".encode("ascii")
