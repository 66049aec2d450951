"""Typed requests named by meaning; field numbers stop at this module's boundary."""

from __future__ import annotations

import msgspec


class NetworkManagementRequest(msgspec.Struct, frozen=True, gc=False):
    mti: str  # 0800
    stan: str  # field 11
    code: str  # field 70: 001 sign-on, 002 sign-off, 301 echo test
    echo: dict[str, str]  # fields the 0810 carries back


class AuthorizationRequest(msgspec.Struct, frozen=True, gc=False):
    mti: str  # 0100, or 0101 repeat
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
    echo: dict[str, str]  # fields the 0110 carries back (includes the PAN: do not store)

    @property
    def transaction_type(self) -> str:
        return self.processing_code[:2]

    @property
    def identity(self) -> bytes:
        """Acquirer + STAN + transmission date-time: what a repeat or a reversal points at."""
        return f"{self.acquirer}|{self.stan}|{self.transmission_datetime}".encode("ascii")


class UnsupportedRequest(msgspec.Struct, frozen=True, gc=False):
    """A well-formed request of a message type this processor does not handle (yet)."""

    mti: str
    stan: str
    echo: dict[str, str]


Request = NetworkManagementRequest | AuthorizationRequest | UnsupportedRequest
