"""`processor ledger load`: upsert accounts and cards from a TOML file (a contract for tools).

Accounts are upserted by id and cards by PAN (through its keyed hash), so loading the same file
twice changes nothing the second time. An account's held amount is never taken from the file: it
is the sum of its open holds.

A load changes money and cards the way the control API does: a balance that differs from the
ledger's is moved to the file's by a ledger entry (`load_fund` or `load_debit`) with its
`account.funded` or `account.debited` event, and a changed card status or set of controls gets
its `card.status_changed` or `controls.updated` event, in the chunk's transaction. The programme's
systems follow the ledger through its events, so nothing may change without one.
"""

from __future__ import annotations

import time
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Annotated, Final, Literal, TypeVar

import msgspec
from msgspec import Meta

from processor import limits
from processor.currency import UnknownCurrency, exponent, numeric_code
from processor.ledger.card_stops import hand_on_freeze, stopped
from processor.ledger.controls import (
    Catalog,
    Controls,
    control_errors,
    stored_controls,
    with_shorthands,
    without_amounts,
)
from processor.ledger.records import (
    CARD_STATUSES_FINAL,
    Account,
    AccountStatus,
    Card,
    CardStatus,
)
from processor.ledger.store import Ledger, LedgerFull, Reader, Writer
from processor.schemas import readable
from processor.security import PanHasher, luhn_valid, mask_pan, typed_card_numbers
from processor.types import CURRENCY_PATTERN, EXPIRY_PATTERN, MCC_PATTERN, PAN_PATTERN

MinorUnits = Annotated[int, Meta(ge=0, le=10**15)]
# Letters, digits and `_ . : -`, but not dots alone: `.` and `..` are path segments every
# HTTP client removes (RFC 3986), so /v1/accounts/. could never be reached again.
ACCOUNT_ID_CHARACTERS: Final = r"(?!\.+\Z)[A-Za-z0-9_.:-]"
AccountId = Annotated[
    str,
    Meta(
        min_length=1,
        max_length=limits.account_id_bytes_max,
        pattern=rf"^{ACCOUNT_ID_CHARACTERS}+\Z",
    ),
]


T = TypeVar("T")


class LoadError(Exception):
    """A load file that cannot be applied; the message names the record and the field."""


class AccountEntry(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    id: AccountId
    currency: Annotated[str, Meta(pattern=CURRENCY_PATTERN)]
    balance: Annotated[int, Meta(ge=-(10**15), le=10**15)]
    credit_limit: MinorUnits = 0
    status: AccountStatus = "active"
    controls: Controls | None = None


class CardEntry(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    # 13-19 digits: for shorter PANs the display rule (first 6, last 4) would reveal most digits.
    pan: Annotated[str, Meta(pattern=PAN_PATTERN)]
    account: AccountId
    expiry: Annotated[str, Meta(pattern=EXPIRY_PATTERN)]
    status: CardStatus = "active"
    # Shorthands kept from before `controls`: folded into the card's controls on load.
    per_transaction_limit: MinorUnits | None = None
    blocked_mccs: tuple[Annotated[str, Meta(pattern=MCC_PATTERN)], ...] = ()
    controls: Controls | None = None


class LoadFile(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    # Programme-level spend controls; absent = leave the ledger's as they are.
    programme_controls: Controls | None = None
    accounts: tuple[AccountEntry, ...] = ()
    cards: tuple[CardEntry, ...] = ()


class LoadSummary(msgspec.Struct, frozen=True):
    accounts_created: int
    accounts_updated: int
    cards_created: int
    cards_updated: int


def card_controls(entry: CardEntry, currency: str) -> Controls | None:
    """The card's controls with the legacy shorthands folded in."""
    return with_shorthands(
        entry.controls, entry.per_transaction_limit, entry.blocked_mccs, currency
    )


def controls_errors(data: LoadFile, catalog: Catalog, source: str) -> list[str]:
    errors: list[str] = []
    if data.programme_controls is not None:
        errors += control_errors(data.programme_controls, catalog, None, "$.programme_controls")
    currencies = {account.id: account.currency for account in data.accounts}
    for index, account in enumerate(data.accounts):
        if account.controls is not None:
            errors += control_errors(
                account.controls, catalog, account.currency, f"$.accounts[{index}].controls"
            )
    for index, card in enumerate(data.cards):
        if card.controls is not None:
            errors += control_errors(
                card.controls, catalog, currencies.get(card.account), f"$.cards[{index}].controls"
            )
    return [f"{source}: {error}" for error in errors]


def parse_load_file(text: bytes, source: str) -> LoadFile:
    try:
        data = msgspec.toml.decode(text, type=LoadFile)
    except msgspec.ValidationError as error:
        # msgspec names the path ($.cards[2].pan) but never echoes the value, so no PAN leaks.
        raise LoadError(f"{source}: {readable(error)}") from None
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


def card_record(
    card_key: bytes,
    pan: str,
    *,
    account_id: str,
    expiry: str,
    status: CardStatus = "active",
    controls: Controls | None = None,
    created_ms: int = 0,
    virtual: bool = False,
    cvc2_key: str | None = None,
    cardholder_id: str | None = None,
) -> Card:
    """The one way a PAN becomes a card record: its id from the keyed hash, and of the number
    only what may be shown (BIN, last four, length)."""
    return Card(
        card_id=card_id_for(card_key),
        account_id=account_id,
        bin=pan[:6],
        last4=pan[-4:],
        pan_length=len(pan),
        expiry=expiry,
        status=status,
        controls=controls,
        created_ms=created_ms,
        virtual=virtual,
        cvc2_key=cvc2_key,
        cardholder_id=cardholder_id,
    )


# Records written per write transaction: a load holds LMDB's writer lock, which the daemon's
# batches wait for, one chunk at a time instead of the whole file (a 100,000-card load in one
# transaction stalled every link for its duration).
LOAD_CHUNK_RECORDS: Final = 1000

Indexed = list[tuple[int, T]]  # (index in the file, entry): errors name $.accounts[index]


def apply_load_file(
    ledger: Ledger,
    data: LoadFile,
    hasher: PanHasher,
    source: str,
    catalog: Catalog | None = None,
    *,
    chunk_records: int = LOAD_CHUNK_RECORDS,
    now_ms: int | None = None,
) -> LoadSummary:
    """Upsert the file's programme controls, accounts and cards.

    Everything is checked against the ledger first (one read transaction), so a file with a
    mistake changes nothing; then it is written in chunks of `chunk_records`, accounts before
    the cards that name them, each chunk in a transaction of its own. A map too small for a
    chunk grows (up to its ceiling); the chunks before one that fails stay applied, and
    loading the file again is harmless (an upsert)."""
    from processor.catalog import default_catalog

    chosen = catalog or default_catalog()

    def at_ms() -> int:
        """The time of each chunk's commit (events are stamped as they are made)."""
        return int(time.time() * 1000) if now_ms is None else now_ms

    errors = controls_errors(data, chosen, source)
    in_file_currency = {entry.id: entry.currency for entry in data.accounts}
    with ledger.read() as reader:
        errors += _conflicts(reader, data, chosen, source, hasher)
        # What usage was counted in before the file changes it: an account's currency; and
        # the cards the file moves to another account, with the currency they go to.
        currencies_before: dict[str, str] = {}
        moving: dict[str, str] = {}
        for card_entry in data.cards:
            previous = reader.card(hasher.card_key(card_entry.pan))
            if previous is not None and previous.account_id != card_entry.account:
                destination = in_file_currency.get(card_entry.account)
                if destination is None:
                    found = reader.account(card_entry.account)
                    destination = None if found is None else found.currency
                if destination is not None:
                    moving[previous.card_id] = destination
                held_by = reader.account(previous.account_id)
                if held_by is not None:
                    currencies_before[held_by.id] = held_by.currency
    if errors:
        raise LoadError("\n".join(errors))
    counts: Counter[str] = Counter()
    done = 0
    accounts = list(enumerate(data.accounts))
    cards = list(enumerate(data.cards))
    try:
        if data.programme_controls is not None:
            controls = data.programme_controls
            ledger.write_growing(
                partial(_put_programme_controls, controls=controls, now_ms=at_ms())
            )
        for first in range(0, len(accounts), chunk_records):
            some = accounts[first : first + chunk_records]
            counts += ledger.write_growing(
                partial(_put_accounts, entries=some, source=source, now_ms=at_ms(), moving=moving)
            )
            done += len(some)
        for first in range(0, len(cards), chunk_records):
            more = cards[first : first + chunk_records]
            counts += ledger.write_growing(
                partial(
                    _put_cards,
                    entries=more,
                    hasher=hasher,
                    source=source,
                    now_ms=at_ms(),
                    currencies_before=currencies_before,
                )
            )
            done += len(more)
    except LedgerFull as full:
        raise LedgerFull(f"{source}: {full}: the first {done} records loaded") from None
    return LoadSummary(
        accounts_created=counts["accounts_created"],
        accounts_updated=counts["accounts_updated"],
        cards_created=counts["cards_created"],
        cards_updated=counts["cards_updated"],
    )


def _conflicts(
    reader: Reader, data: LoadFile, catalog: Catalog, source: str, hasher: PanHasher
) -> list[str]:
    """What the ledger as it is makes impossible, and what the file says twice: a currency
    change under open holds, a card on an account neither the file nor the ledger has, card
    controls unfit for the currency of a ledger account the file does not name
    (controls_errors checks the file's own), a change a card's history forbids
    (`_card_conflict`), an account or a card in the file twice (which entry should win?).
    All before anything is written: a file with a mistake changes nothing."""
    errors = []
    in_file = {entry.id: entry.currency for entry in data.accounts}
    card_keys_in_file = {hasher.card_key(entry.pan) for entry in data.cards}
    cards_in_file = {card_id_for(key) for key in card_keys_in_file}
    first_account: dict[str, int] = {}
    for index, entry in enumerate(data.accounts):
        # A new account's id is a key, shown and sent in clear: not the number of a card the
        # ledger or the file has (an existing account keeps the id it has).
        if reader.account(entry.id) is None and any(
            key in card_keys_in_file or reader.card(key) is not None
            for key in map(hasher.card_key, typed_card_numbers(entry.id))
        ):
            errors.append(
                f"{source}: $.accounts[{index}].id: holds a card's number; account ids are "
                "kept and shown in clear"
            )
    for index, entry in enumerate(data.accounts):
        if entry.id in first_account:
            errors.append(
                f"{source}: $.accounts[{index}].id: account {entry.id!r} is in the file twice "
                f"(also $.accounts[{first_account[entry.id]}])"
            )
        first_account.setdefault(entry.id, index)
        existing = reader.account(entry.id)
        conflict = _currency_conflict(source, index, entry, existing)
        if conflict is not None:
            errors.append(conflict)
        if existing is not None and existing.currency != entry.currency:
            # Its cards' limits in the old currency would be skipped for good (a limit
            # weighs only amounts in its own currency): the file must give them anew.
            for held in reader.account_cards(entry.id):
                if (
                    held.card_id not in cards_in_file
                    and held.status not in CARD_STATUSES_FINAL  # it never authorises again
                    and _priced_in(held, existing)
                ):
                    errors.append(
                        f"{source}: $.accounts[{index}].currency: card {held.card_id} on "
                        f"account {entry.id} has limits in {existing.currency}; give its "
                        f"controls in {entry.currency} in the same file"
                    )
    first_card: dict[bytes, int] = {}
    for index, card_entry in enumerate(data.cards):
        card_key = hasher.card_key(card_entry.pan)
        if card_key in first_card:
            errors.append(
                f"{source}: $.cards[{index}].pan: card {mask_pan(card_entry.pan)} is in the "
                f"file twice (also $.cards[{first_card[card_key]}])"
            )
        first_card.setdefault(card_key, index)
        conflict = _card_conflict(source, index, card_entry, reader.card(card_key))
        if conflict is not None:
            errors.append(conflict)
        if card_entry.account in in_file:
            continue
        account = reader.account(card_entry.account)
        if account is None:
            errors.append(_no_account(source, index, card_entry))
            continue
        controls = card_controls(card_entry, account.currency)
        if controls is not None and card_entry.controls is not None:
            where = f"$.cards[{index}].controls"
            found = control_errors(controls, catalog, account.currency, where)
            errors += [f"{source}: {error}" for error in found]
    return errors


def _card_conflict(
    source: str, index: int, card_entry: CardEntry, previous: Card | None
) -> str | None:
    """What a card's history forbids the file to change: its expiry, once CVC2s were computed
    with it (every CVC2 printed on it would mismatch, and lock it out), or a final status (as
    through the API: its sealed PAN went when it stopped)."""
    if previous is None:
        return None
    if previous.cvc2_key and previous.expiry != card_entry.expiry:
        return (
            f"{source}: $.cards[{index}].expiry: card {previous.card_id} has a CVC2 computed "
            f"with its expiry {previous.expiry}; replace the card instead"
        )
    if previous.status in CARD_STATUSES_FINAL and card_entry.status != previous.status:
        return (
            f"{source}: $.cards[{index}].status: card {previous.card_id} is "
            f"{previous.status}, which is final; issue or register a new card instead"
        )
    return None


def _currency_conflict(
    source: str, index: int, entry: AccountEntry, existing: Account | None
) -> str | None:
    if existing is None or existing.currency == entry.currency or not existing.held:
        return None
    return (
        f"{source}: $.accounts[{index}].currency: account {entry.id} has open holds in "
        f"{existing.currency}; cannot change it to {entry.currency}"
    )


def _priced_in(card: Card, account: Account) -> bool:
    """Whether the card's controls weigh amounts in the account's currency (amount limits,
    SCA, and an older record's per-transaction limit, which is read in it)."""
    if card.per_transaction_limit is not None:
        return True
    controls = card.controls
    if controls is None:
        return False
    if controls.require_sca is not None and controls.require_sca.currency == account.currency:
        return True
    return any(limit.currency == account.currency for limit in controls.amount_limits)


def _no_account(source: str, index: int, card_entry: CardEntry) -> str:
    return f"{source}: $.cards[{index}].account: no account {card_entry.account!r}"


def _put_programme_controls(writer: Writer, controls: Controls, now_ms: int) -> None:
    if writer.programme_controls() == controls:
        return
    writer.put_programme_controls(controls)
    writer.emit_change(now_ms, "controls.updated", "programme_controls")


def _put_accounts(
    writer: Writer,
    entries: Indexed[AccountEntry],
    source: str,
    now_ms: int,
    moving: dict[str, str],
) -> Counter[str]:
    counts: Counter[str] = Counter()
    for index, entry in entries:
        controls = stored_controls(entry.controls)
        account = writer.account(entry.id)
        if account is None:
            counts["accounts_created"] += 1
            account = Account(
                id=entry.id,
                currency=entry.currency,
                posted=0,
                credit_limit=entry.credit_limit,
                status=entry.status,
                controls=controls,
                created_ms=now_ms,
            )
            writer.put_account(account)
            writer.emit_change(now_ms, "account.created", "load_account", account_id=account.id)
        else:
            counts["accounts_updated"] += 1
            conflict = _currency_conflict(source, index, entry, account)
            if conflict is not None:  # holds opened since the check
                raise LoadError(conflict)
            _update_account(writer, account, entry, controls, now_ms, moving)
        _move_balance(writer, account, entry.balance, now_ms)
    return counts


def _update_account(
    writer: Writer,
    account: Account,
    entry: AccountEntry,
    controls: Controls | None,
    now_ms: int,
    moving: dict[str, str],
) -> None:
    """The file's terms for an existing account, an event for each that changed. Held (the
    open holds) and the sequences are the ledger's; posted moves in `_move_balance`."""
    if account.currency != entry.currency:
        # Amounts of two currencies do not subtract: the balance leaves in the old currency
        # (an entry and its event), and the file's arrives in the new one after.
        _move_balance(writer, account, 0, now_ms)
        old_currency = account.currency
        account.currency = entry.currency
        since = _reset_stamp(writer, now_ms, account.last_answer)
        account.currency_since_ms = since
        # Spend-control usage counted amounts of the old currency: those start again (counts
        # and approval times stay true), for the account and its cards, but for a card the
        # file moves to an account of the old currency (where they stay true). Done here, not
        # when the card moves: the cards' chunk may fail after this one committed.
        account.usage = without_amounts(account.usage)
        for held in writer.account_cards(account.id):
            if moving.get(held.card_id) != old_currency:
                state = writer.changed_card_state(held)
                state.usage = without_amounts(state.usage)
                state.usage_since_ms = since
                state.sca_exempt_amount = 0
        writer.put_account(account)
        writer.emit_change(now_ms, "account.updated", "currency_changed", account_id=account.id)
    if account.credit_limit != entry.credit_limit:
        account.credit_limit = entry.credit_limit
        writer.put_account(account)
        writer.emit_change(now_ms, "account.updated", "credit_limit_changed", account_id=account.id)
    if account.status != entry.status:
        account.status = entry.status
        writer.put_account(account)
        writer.emit_change(
            now_ms, "account.updated", f"account_{entry.status}", account_id=account.id
        )
    if account.controls != controls:
        account.controls = controls
        writer.put_account(account)
        writer.emit_change(now_ms, "controls.updated", "account_controls", account_id=account.id)


def _move_balance(writer: Writer, account: Account, balance: int, now_ms: int) -> None:
    """Posted to `balance` by a ledger entry with its event, when they differ."""
    change = balance - account.posted
    if not change:
        return
    kind: Literal["fund", "debit"] = "fund" if change > 0 else "debit"
    moved = writer.append_entry(account, kind, change, f"load_{kind}", now_ms)
    writer.put_account(account)
    writer.emit_change(
        now_ms,
        "account.funded" if kind == "fund" else "account.debited",
        f"load_{kind}",
        account_id=account.id,
        amount=abs(change),
        entry_sequence=moved.sequence,
    )


def _put_cards(
    writer: Writer,
    entries: Indexed[CardEntry],
    hasher: PanHasher,
    source: str,
    now_ms: int,
    currencies_before: dict[str, str],
) -> Counter[str]:
    counts: Counter[str] = Counter()
    for index, card_entry in entries:
        account = writer.account(card_entry.account)
        if account is None:  # removed since the check: not possible today
            raise LoadError(_no_account(source, index, card_entry))
        controls = stored_controls(card_controls(card_entry, account.currency))
        card_key = hasher.card_key(card_entry.pan)
        previous = writer.card(card_key)
        conflict = _card_conflict(source, index, card_entry, previous)
        if conflict is not None:  # changed since the check (through the API, while loading)
            raise LoadError(conflict)
        counts["cards_created" if previous is None else "cards_updated"] += 1
        card = card_record(
            card_key,
            card_entry.pan,
            account_id=card_entry.account,
            expiry=card_entry.expiry,
            status=card_entry.status,
            controls=controls,
            created_ms=previous.created_ms if previous is not None else now_ms,
            virtual=previous.virtual if previous is not None else False,
            cvc2_key=previous.cvc2_key if previous is not None else None,  # the card's own
            cardholder_id=previous.cardholder_id if previous is not None else None,
        )
        if previous is not None:  # what the processor knows of it that no file says
            card = msgspec.structs.replace(
                card,
                fulfilment=previous.fulfilment,
                shipping_key=previous.shipping_key,
                shipping_sealed=previous.shipping_sealed,
                # Sealed for the account it was on then: moved, it still opens.
                shipping_account=previous.shipping_account
                or (previous.account_id if previous.shipping_sealed is not None else None),
                replaces=previous.replaces,
                replaced_by=previous.replaced_by,
                frozen_when_activated=previous.frozen_when_activated,
            )
        stopping = (
            previous is not None
            and card.status in CARD_STATUSES_FINAL
            and previous.status not in CARD_STATUSES_FINAL
        )
        if stopping:
            # Stopped by the file as by the API: its freeze goes to its replacement.
            assert previous is not None
            card = stopped(msgspec.structs.replace(card, status=previous.status), card.status)
        writer.put_card(card_key, card, previous.account_id if previous is not None else None)
        if previous is None:
            writer.emit_change(now_ms, "card.created", "load_card", card=card)
        if stopping:
            hand_on_freeze(writer, card)
        if previous is not None:
            before = currencies_before.get(previous.account_id)
            if before is not None and before != account.currency:
                # Moved into another currency: its usage counted the old one's amounts.
                state = writer.changed_card_state(card)
                state.usage = without_amounts(state.usage)
                state.usage_since_ms = _reset_stamp(writer, now_ms, state.last_answer)
                state.sca_exempt_amount = 0
            _card_events(writer, previous, card, now_ms)
    return counts


def _reset_stamp(writer: Writer, now_ms: int, head: bytes | None) -> int:
    """When amounts counted until now stop counting: `now_ms`, or just after the newest answer
    already about them (`head`, its history's), whichever is later. The chunk's time was taken
    before its write waited for the writer lock, and a batch committed meanwhile may have
    answered after it, in the old currency."""
    newest = None if head is None else writer.answer(head)
    return now_ms if newest is None else max(now_ms, newest.answered_ms + 1)


def _card_events(writer: Writer, previous: Card, card: Card, now_ms: int) -> None:
    """An event for each change a load made to an existing card. A card that moved is
    announced to both accounts: each one's events tell its whole story."""
    if previous.account_id != card.account_id:
        writer.emit_change(now_ms, "card.updated", "card_moved_out", card=previous)
        writer.emit_change(now_ms, "card.updated", "card_moved_in", card=card)
    if previous.expiry != card.expiry:
        writer.emit_change(now_ms, "card.updated", "expiry_changed", card=card)
    if previous.status != card.status:
        writer.emit_change(now_ms, "card.status_changed", f"card_{card.status}", card=card)
    if previous.controls != card.controls:
        writer.emit_change(now_ms, "controls.updated", "card_controls", card=card)


def read_load_file(path: str | Path) -> LoadFile:
    """The file at `path`, read and checked: what a tool does before it opens any ledger, so
    a file that cannot be loaded leaves no ledger directory behind."""
    try:
        text = Path(path).read_bytes()
    except OSError as error:
        raise LoadError(f"{path}: cannot read: {error.strerror}") from None
    return parse_load_file(text, str(path))


def load_path(
    ledger: Ledger, path: str | Path, hasher: PanHasher, *, now_ms: int | None = None
) -> LoadSummary:
    return apply_load_file(ledger, read_load_file(path), hasher, str(path), now_ms=now_ms)
