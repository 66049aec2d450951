"""`processor ledger load`: upsert accounts and cards from a TOML file (a contract for tools).

Accounts are upserted by id and cards by PAN (through its keyed hash), so loading the same file
twice changes nothing the second time. An account's held amount is never taken from the file: it
is the sum of its open holds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import msgspec
from msgspec import Meta

from processor import limits
from processor.currency import UnknownCurrency, exponent, numeric_code
from processor.ledger.records import Account, AccountStatus, Card, CardStatus
from processor.ledger.store import Ledger
from processor.security import PanHasher, luhn_valid

MinorUnits = Annotated[int, Meta(ge=0, le=10**15)]
AccountId = Annotated[
    str, Meta(min_length=1, max_length=limits.account_id_bytes_max, pattern=r"^[A-Za-z0-9_.:-]+$")
]


class LoadError(Exception):
    """A load file that cannot be applied; the message names the record and the field."""


class AccountEntry(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    id: AccountId
    currency: Annotated[str, Meta(pattern=r"^[A-Z]{3}$")]
    balance: Annotated[int, Meta(ge=-(10**15), le=10**15)]
    credit_limit: MinorUnits = 0
    status: AccountStatus = "active"


class CardEntry(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    # 13-19 digits: for shorter PANs the display rule (first 6, last 4) would reveal most digits.
    pan: Annotated[str, Meta(pattern=r"^[0-9]{13,19}$")]
    account: AccountId
    expiry: Annotated[str, Meta(pattern=r"^[0-9]{2}(0[1-9]|1[0-2])$")]
    status: CardStatus = "active"
    per_transaction_limit: MinorUnits | None = None
    blocked_mccs: tuple[Annotated[str, Meta(pattern=r"^[0-9]{4}$")], ...] = ()


class LoadFile(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    accounts: tuple[AccountEntry, ...] = ()
    cards: tuple[CardEntry, ...] = ()


class LoadSummary(msgspec.Struct, frozen=True):
    accounts_created: int
    accounts_updated: int
    cards_created: int
    cards_updated: int


def parse_load_file(text: bytes, source: str) -> LoadFile:
    try:
        data = msgspec.toml.decode(text, type=LoadFile)
    except msgspec.ValidationError as error:
        # msgspec names the path ($.cards[2].pan) but never echoes the value, so no PAN leaks.
        raise LoadError(f"{source}: {error}") from None
    except msgspec.DecodeError as error:
        raise LoadError(f"{source}: not valid TOML: {error}") from None
    for index, card in enumerate(data.cards):
        if not luhn_valid(card.pan):
            raise LoadError(f"{source}: $.cards[{index}].pan fails the Luhn check")
    for index, account in enumerate(data.accounts):
        try:
            numeric_code(account.currency)
            exponent(account.currency)
        except UnknownCurrency as error:
            raise LoadError(f"{source}: $.accounts[{index}].currency: {error}") from None
    return data


def card_id_for(card_key: bytes) -> str:
    return "card_" + card_key[:10].hex()


def apply_load_file(ledger: Ledger, data: LoadFile, hasher: PanHasher, source: str) -> LoadSummary:
    counts = {"accounts_created": 0, "accounts_updated": 0, "cards_created": 0, "cards_updated": 0}
    with ledger.write() as writer:
        for index, entry in enumerate(data.accounts):
            existing = writer.account(entry.id)
            if existing is None:
                counts["accounts_created"] += 1
                writer.put_account(
                    Account(
                        id=entry.id,
                        currency=entry.currency,
                        posted=entry.balance,
                        credit_limit=entry.credit_limit,
                        status=entry.status,
                    )
                )
                continue
            counts["accounts_updated"] += 1
            if existing.currency != entry.currency and existing.held:
                raise LoadError(
                    f"{source}: $.accounts[{index}].currency: account {entry.id} has open "
                    f"holds in {existing.currency}; cannot change it to {entry.currency}"
                )
            # Updated in place: held (the open holds) and the event sequence are the ledger's.
            existing.currency = entry.currency
            existing.posted = entry.balance
            existing.credit_limit = entry.credit_limit
            existing.status = entry.status
            writer.put_account(existing)
        for index, card_entry in enumerate(data.cards):
            if writer.account(card_entry.account) is None:
                raise LoadError(
                    f"{source}: $.cards[{index}].account: no account {card_entry.account!r}"
                )
            card_key = hasher.card_key(card_entry.pan)
            previous = writer.card(card_key)
            counts["cards_created" if previous is None else "cards_updated"] += 1
            pan = card_entry.pan
            writer.put_card(
                card_key,
                Card(
                    card_id=card_id_for(card_key),
                    account_id=card_entry.account,
                    bin=pan[:6],
                    last4=pan[-4:],
                    pan_length=len(pan),
                    expiry=card_entry.expiry,
                    status=card_entry.status,
                    per_transaction_limit=card_entry.per_transaction_limit,
                    blocked_mccs=card_entry.blocked_mccs,
                ),
                previous.account_id if previous is not None else None,
            )
    return LoadSummary(**counts)


def load_path(ledger: Ledger, path: str | Path, hasher: PanHasher) -> LoadSummary:
    try:
        text = Path(path).read_bytes()
    except OSError as error:
        raise LoadError(f"{path}: cannot read: {error.strerror}") from None
    return apply_load_file(ledger, parse_load_file(text, str(path)), hasher, str(path))
