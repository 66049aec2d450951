"""Response fields, built in one place: the echo set, the response MTI, field 39, and what an
approval or an inquiry adds (38, 4, 6, 51, 54). The links encode them in their listener's
dialect; the ledger stores them without the PAN. Nothing here decides anything."""

from __future__ import annotations

from processor.wire.errors import InvalidMessage


def response_mti(mti: str) -> str:
    """0100/0101 -> 0110, 0800 -> 0810, 0420/0421 -> 0430."""
    return f"{mti[:2]}{int(mti[2]) + 1}0"


def reply_fields(echo: dict[str, str], mti: str, code: str) -> dict[str, str]:
    """A response's fields: the request's echo set, the response MTI and field 39."""
    fields = dict(echo)
    fields["t"] = response_mti(mti)
    fields["39"] = code
    return fields


# Response fields a stored answer leaves out, because a retransmission that is replayed brings
# them back exactly: the MTI and 39 follow from the request's MTI and the stored code, and 7 and
# 11 are part of the identity under which the answer was found. The PAN (2) is never stored.
# (Other echoed fields stay stored: 32 is matched as a number, 12 and 13 are not matched.)
REPLAYED_FROM_REQUEST = frozenset(("t", "39", "2", "7", "11"))


def stored_response(fields: dict[str, str]) -> dict[str, str]:
    """What of a response is stored with its answer (schema 3)."""
    return {k: v for k, v in fields.items() if k not in REPLAYED_FROM_REQUEST}


def replayed_response(
    stored: dict[str, str], echo: dict[str, str], mti: str, code: str
) -> dict[str, str]:
    """The stored response again, for a retransmission whose identity and content matched.

    Answers stored before schema 3 kept every field but the PAN; theirs win, and are equal.
    """
    fields = reply_fields({k: echo[k] for k in ("2", "7", "11") if k in echo}, mti, code)
    fields.update(stored)
    return fields


def format_error_response(error: InvalidMessage) -> dict[str, str]:
    """A 30 to a message that broke the contract: its well-formed echo fields, MTI and 39."""
    return reply_fields(error.echo, error.mti, "30")


def approved_fields(
    response_code: str, approved: int, billing: int | None, billing_currency: str
) -> dict[str, str]:
    """What an approval adds: field 4 when partial (10), 6 and 51 when converted.

    `approved` and `billing` in minor units; `billing_currency` ISO 4217 numeric.
    """
    extra: dict[str, str] = {}
    if response_code == "10":  # partial approval: field 4 carries what was approved
        extra["4"] = f"{approved:012d}"
    if billing is not None:  # converted: the cardholder billing amount
        extra["6"] = f"{billing:012d}"
        extra["51"] = billing_currency
    return extra


def balance_block(account_type: str, amount_type: str, currency: str, amount: int) -> str:
    """One 20-character field 54 block: account type, amount type, currency, C/D, 12 digits."""
    sign = "C" if amount >= 0 else "D"
    # The amount is n12 by the standard; a balance beyond it is shown as the largest it can say.
    return f"{account_type}{amount_type}{currency}{sign}{min(abs(amount), 999_999_999_999):012d}"


def balances(account_type: str, currency: str, posted: int, available: int) -> str:
    """Field 54 of a balance inquiry: the ledger (01) and the available (02) balance."""
    return balance_block(account_type, "01", currency, posted) + balance_block(
        account_type, "02", currency, available
    )
