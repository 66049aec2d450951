"""The control API's changes to the ledger: functions of (writer, now_ms), run by the daemon.

Each one runs inside a group-commit write transaction (`Daemon.execute`), before that batch's
ISO 8583 requests, so a change answered to the programme is in force for the next message on
any link. A command checks everything first and raises `Refused` only before it writes (the
Authorizer's contract: a refusal must leave nothing behind); its result is a `Reply`, the JSON
the API answers.

Idempotency-Key: `idempotent` wraps a command so that, in the same transaction as the effect,
the outcome is kept under the key's scope; a repeat finds it there and gets it back without a
second effect. Because the record is read and written inside the (single-writer) transaction,
two concurrent repeats cannot both apply.
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Final, Literal

import msgspec

from processor import limits
from processor.api.views import (
    CardholderDetails,
    Individual,
    MovementResult,
    account_view,
    card_view,
    cardholder_view,
    entry_view,
    issued_card,
)
from processor.authorizer import Command
from processor.authorizer import CommandRefused as Refused  # returned to the API as the result
from processor.config import CardIssuingConfig
from processor.cvc2 import NO_KEYS, CardVerificationKeys, compute_cvc2
from processor.ledger.card_stops import hand_on_freeze, stopped
from processor.ledger.controls import Controls, stored_controls, with_shorthands
from processor.ledger.load import card_record
from processor.ledger.records import (
    CARD_STATUSES_FINAL,
    Account,
    Card,
    Cardholder,
    CardholderKind,
    CardSecret,
    CardStatus,
    IdempotentResponse,
    KycStatus,
    RevealToken,
)
from processor.ledger.store import Writer
from processor.pan_vault import PanVault
from processor.personal_data import PersonalDataCipher
from processor.security import PanHasher, luhn_check_digit

# Random numbers drawn before giving up on a free card number: with a sane BIN range a
# collision is rare, and many in a row mean the range is nearly used up.
PAN_ATTEMPTS_MAX: Final = 32

_encode = msgspec.json.encode


class Reply(msgspec.Struct, kw_only=True):
    """What the API answers: status and JSON body."""

    status: int
    body: bytes
    replayed: bool = False  # taken from an earlier request with the same Idempotency-Key
    # What a replay answers when it must differ from `body` (a new card's number is given once).
    kept: bytes | None = None


Operation = Callable[[Writer, int], Reply]


# --- idempotency -----------------------------------------------------------------------------


class Idempotency(msgspec.Struct, frozen=True, kw_only=True):
    """A key is the programme's, whatever it is sent with (as Stripe's are): reused for
    another operation, path or body, it is refused, not applied as a new request."""

    scope: bytes  # digest of the key: bounded size, whatever the key
    # Keyed digest of method, path and body: a registration body holds a PAN, never kept
    # in clear.
    body_digest: bytes
    # Before keys were the programme's, a key's scope was method + path + key and the digest
    # the body's alone: records of then are still found (and replayed) until they expire.
    legacy_scope: bytes | None = None
    legacy_body_digest: bytes | None = None


_stored = msgspec.msgpack.Decoder(IdempotentResponse)
_msgpack = msgspec.msgpack.Encoder()


def idempotent(key: Idempotency | None, operation: Operation) -> Command:
    """The operation applied at most once per key; without a key, as often as asked.

    Only successful outcomes are kept: a refusal (409 insufficient funds, ...) changed
    nothing, so retrying with the same key after fixing the cause is allowed.
    """

    def run(writer: Writer, now_ms: int) -> Reply:
        if key is None:
            return operation(writer, now_ms)
        raw, digest = writer.idempotent(key.scope), key.body_digest
        if raw is None and key.legacy_scope is not None and key.legacy_body_digest is not None:
            raw, digest = writer.idempotent(key.legacy_scope), key.legacy_body_digest
        if raw is not None:
            stored = _stored.decode(raw)
            if stored.body_digest != digest:
                raise Refused(
                    409,
                    "idempotency_key_reused",
                    "this Idempotency-Key was used for another request (another operation, "
                    "path or body); use a new key for a new request",
                    field="Idempotency-Key",
                )
            return Reply(status=stored.status, body=stored.body, replayed=True)
        reply = operation(writer, now_ms)
        writer.put_idempotent(
            key.scope,
            _msgpack.encode(
                IdempotentResponse(
                    body_digest=key.body_digest,
                    status=reply.status,
                    body=reply.kept if reply.kept is not None else reply.body,
                    created_ms=now_ms,
                )
            ),
        )
        return reply

    return run


# --- lookups that refuse ---------------------------------------------------------------------


def _account(writer: Writer, account_id: str, *, field: str | None = None) -> Account:
    account = writer.account(account_id)
    if account is None:
        raise Refused(404, "account_not_found", f"no account {account_id!r}", field=field)
    return account


def _open_account(writer: Writer, account_id: str, *, field: str | None = None) -> Account:
    account = _account(writer, account_id, field=field)
    if account.status == "closed":
        raise Refused(409, "account_closed", f"account {account_id!r} is closed", field=field)
    return account


def _card(writer: Writer, card_id: str) -> tuple[bytes, Card]:
    found = writer.card_by_id(card_id)
    if found is None:
        raise Refused(404, "card_not_found", f"no card {card_id!r}")
    return found


# --- accounts --------------------------------------------------------------------------------


def create_account(
    account_id: str,
    currency: str,
    credit_limit: int,
    controls: Controls | None,
    cardholder_id: str | None = None,
) -> Operation:
    def run(writer: Writer, now_ms: int) -> Reply:
        if writer.account(account_id) is not None:
            raise Refused(
                409, "account_exists", f"account {account_id!r} already exists", field="$.id"
            )
        if cardholder_id is not None:
            _cardholder(writer, cardholder_id, field="$.cardholder_id")
        account = Account(
            id=account_id,
            currency=currency,
            posted=0,
            credit_limit=credit_limit,
            controls=stored_controls(controls),
            created_ms=now_ms,
            cardholder_id=cardholder_id,
        )
        writer.put_account(account)
        writer.emit_change(now_ms, "account.created", "api_account", account_id=account.id)
        return Reply(status=201, body=_encode(account_view(account)))

    return run


def move_funds(
    account_id: str, kind: Literal["fund", "debit"], amount: int, reason: str
) -> Operation:
    """Fund (credit) or debit the posted balance, recorded as a ledger entry."""

    def run(writer: Writer, now_ms: int) -> Reply:
        account = _open_account(writer, account_id)
        if kind == "debit" and amount > account.available:
            raise Refused(
                409,
                "insufficient_funds",
                f"debit of {amount} exceeds the available {account.available} "
                f"{account.currency} minor units of account {account_id!r}",
                field="$.amount",
            )
        if kind == "fund" and account.posted + amount > limits.account_posted_max:
            raise Refused(
                409,
                "balance_limit",
                f"funding {amount} would take account {account_id!r} above the most a posted "
                f"balance may hold ({limits.account_posted_max} minor units)",
                field="$.amount",
            )
        entry = writer.append_entry(
            account, kind, amount if kind == "fund" else -amount, reason, now_ms
        )
        writer.put_account(account)
        writer.emit_change(
            now_ms,
            "account.funded" if kind == "fund" else "account.debited",
            f"api_{kind}",
            account_id=account.id,
            amount=amount,
            entry_sequence=entry.sequence,
        )
        result = MovementResult(entry=entry_view(entry), account=account_view(account))
        return Reply(status=200, body=_encode(result))

    return run


def close_account(account_id: str) -> Operation:
    def run(writer: Writer, now_ms: int) -> Reply:
        account = _open_account(writer, account_id)
        if account.posted != 0 or account.held != 0:
            raise Refused(
                409,
                "account_not_empty",
                f"account {account_id!r} has posted {account.posted} and held {account.held} "
                "minor units; debit or fund it to zero and wait for its holds to close first",
            )
        # Its cards close with it: a closed account is never reopened, and they kept their
        # sealed PANs and reveal tokens for good (shown on request) though none could be used.
        for card in writer.account_cards(account.id):
            _stop(writer, now_ms, card.card_id, "closed")
        account.status = "closed"
        writer.put_account(account)
        writer.emit_change(now_ms, "account.updated", "account_closed", account_id=account.id)
        return Reply(status=200, body=_encode(account_view(account)))

    return run


# --- controls --------------------------------------------------------------------------------


def set_programme_controls(controls: Controls) -> Operation:
    def run(writer: Writer, now_ms: int) -> Reply:
        writer.put_programme_controls(controls)
        writer.emit_change(now_ms, "controls.updated", "programme_controls")
        return Reply(status=200, body=_encode(controls))

    return run


def set_account_controls(account_id: str, controls: Controls) -> Operation:
    def run(writer: Writer, now_ms: int) -> Reply:
        account = _account(writer, account_id)
        account.controls = stored_controls(controls)
        writer.put_account(account)
        writer.emit_change(now_ms, "controls.updated", "account_controls", account_id=account.id)
        return Reply(status=200, body=_encode(controls))

    return run


def set_card_controls(card_id: str, controls: Controls) -> Operation:
    def run(writer: Writer, now_ms: int) -> Reply:
        card_key, card = _card(writer, card_id)
        # The new controls replace an older record's shorthands too (the engine reads those
        # as controls: left, they still declined with nothing on screen to say why).
        changed = msgspec.structs.replace(
            card, controls=stored_controls(controls), per_transaction_limit=None, blocked_mccs=()
        )
        writer.put_card(card_key, changed, card.account_id)
        writer.emit_change(now_ms, "controls.updated", "card_controls", card=changed)
        return Reply(status=200, body=_encode(controls))

    return run


# --- cards -----------------------------------------------------------------------------------

CardAction = Literal["freeze", "unfreeze", "report-lost", "report-stolen", "close"]
CARD_ACTIONS: Final[tuple[CardAction, ...]] = (
    "freeze",
    "unfreeze",
    "report-lost",
    "report-stolen",
    "close",
)

# action -> (states it may start from, the state it leads to). lost, stolen and closed are
# terminal: a card reported lost stays lost (the network may still see its number used).
TRANSITIONS: Final[dict[str, tuple[frozenset[CardStatus], CardStatus]]] = {
    "freeze": (frozenset({"active"}), "frozen"),
    "unfreeze": (frozenset({"frozen"}), "active"),
    "report-lost": (frozenset({"active", "inactive", "frozen"}), "lost"),
    "report-stolen": (frozenset({"active", "inactive", "frozen"}), "stolen"),
    "close": (frozenset({"active", "inactive", "frozen"}), "closed"),
}


def change_card_status(card_id: str, action: CardAction) -> Operation:
    starts, target = TRANSITIONS[action]

    def run(writer: Writer, now_ms: int) -> Reply:
        card_key, card = _card(writer, card_id)
        if card.status not in starts:
            raise Refused(
                409,
                "invalid_card_transition",
                f"card {card_id} is {card.status}; {action} needs it "
                f"{' or '.join(sorted(starts))} (lost, stolen and closed are final)",
                details={"from": card.status, "to": target},
            )
        final = target in CARD_STATUSES_FINAL
        changed = stopped(card, target) if final else msgspec.structs.replace(card, status=target)
        writer.put_card(card_key, changed, card.account_id)
        writer.emit_change(now_ms, "card.status_changed", f"card_{target}", card=changed)
        if final:
            hand_on_freeze(writer, changed)
        return _card_reply(writer, changed)

    return run


def reset_cvc2(card_id: str) -> Operation:
    """Count the card's CVC2 mismatches from zero again, lifting a card-not-present block
    (after the programme has heard from its cardholder). An event when it changed anything."""

    def run(writer: Writer, now_ms: int) -> Reply:
        _, card = _card(writer, card_id)
        if writer.card_state(card).cvc2_failures:
            writer.changed_card_state(card).cvc2_failures = 0
            writer.emit_change(now_ms, "card.cvc2_reset", "cvc2_reset", card=card)
        return _card_reply(writer, card)

    return run


def _issuing_to(
    writer: Writer, cardholder_id: str | None, issuing: CardIssuingConfig
) -> str | None:
    """The cardholder a new card goes to: it must exist and its KYC be approved."""
    if cardholder_id is None:
        if issuing.require_cardholder:
            raise Refused(
                409,
                "cardholder_required",
                "a card is issued only to a verified cardholder: name one (cardholder_id), or "
                "open the account for one",
                field="$.cardholder_id",
            )
        return None
    return _approved(writer, cardholder_id)


def _approved(writer: Writer, cardholder_id: str) -> str:
    """The cardholder, which must exist and whose KYC must be approved."""
    holder = _cardholder(writer, cardholder_id, field="$.cardholder_id")
    if holder.kyc_status != "approved":
        raise Refused(
            409,
            "kyc_not_approved",
            f"cardholder {holder.id} has KYC status {holder.kyc_status}; a card is issued only "
            "once it is approved",
            field="$.cardholder_id",
            details={"status": holder.kyc_status},
        )
    return holder.id


def _account_holder_verified(writer: Writer, account: Account, holder: str | None) -> None:
    """A card for someone else on an account (a business's employee) needs the account's own
    cardholder approved too: naming another cardholder must not get round a rejection."""
    if account.cardholder_id is not None and account.cardholder_id != holder:
        _approved(writer, account.cardholder_id)


def _cardholder(writer: Writer, cardholder_id: str, *, field: str | None = None) -> Cardholder:
    holder = writer.cardholder(cardholder_id)
    if holder is None:
        raise Refused(404, "cardholder_not_found", f"no cardholder {cardholder_id!r}", field=field)
    return holder


# --- cardholders -----------------------------------------------------------------------------


def create_cardholder(details: CardholderDetails, cipher: PersonalDataCipher) -> Operation:
    """A cardholder whose KYC is pending, its personal data sealed before it is stored. The
    idempotent replay answers the cardholder without `details` (never kept in the clear)."""
    kind: CardholderKind = "individual" if isinstance(details, Individual) else "business"
    cardholder_id = "ch_" + secrets.token_hex(10)
    plaintext = msgspec.json.encode(details)

    def run(writer: Writer, now_ms: int) -> Reply:
        sealed_with, sealed = cipher.seal(plaintext, cardholder_id)
        holder = Cardholder(
            id=cardholder_id,
            kind=kind,
            kyc_status="pending",
            created_ms=now_ms,
            updated_ms=now_ms,
            sealed_with=sealed_with,
            sealed=sealed,
        )
        writer.put_cardholder(holder)
        writer.emit_change(now_ms, "cardholder.created", "kyc_pending", cardholder=holder)
        return Reply(
            status=201,
            body=_encode(cardholder_view(holder, details)),
            kept=_encode(cardholder_view(holder)),
        )

    return run


def set_kyc_status(cardholder_id: str, status: KycStatus) -> Operation:
    """The programme's verification provider decided; an event when the status changed."""

    def run(writer: Writer, now_ms: int) -> Reply:
        holder = _cardholder(writer, cardholder_id)
        if holder.kyc_status != status:
            holder = msgspec.structs.replace(holder, kyc_status=status, updated_ms=now_ms)
            writer.put_cardholder(holder)
            writer.emit_change(now_ms, "cardholder.kyc_updated", f"kyc_{status}", cardholder=holder)
        return Reply(status=200, body=_encode(cardholder_view(holder)))

    return run


def random_pan(bin_prefix: str, length: int) -> str:
    free = length - len(bin_prefix) - 1
    body = bin_prefix + f"{secrets.randbelow(10**free):0{free}d}"
    return body + luhn_check_digit(body)


def expiry_after(now_ms: int, months: int) -> str:
    """YYMM `months` after the month of `now_ms` (UTC); a card is valid to that month's end."""
    now = datetime.fromtimestamp(now_ms / 1000, UTC)
    index = now.year * 12 + (now.month - 1) + months
    return f"{(index // 12) % 100:02d}{index % 12 + 1:02d}"


class Issuing(msgspec.Struct, frozen=True, kw_only=True):
    """What every new card of the programme needs: its range, keys and number source."""

    hasher: PanHasher
    config: CardIssuingConfig
    card_keys: CardVerificationKeys = NO_KEYS
    draw: Callable[[str, int], str] = random_pan
    vault: PanVault | None = None  # keeps the PAN for the cardholder's one-time reveal


def shipping_owner(account_id: str) -> str:
    """What a shipping address is sealed for (its associated data): the account it ships for."""
    return f"shipping:{account_id}"


def card_shipping_owner(card: Card) -> str:
    """What the card's shipping address was sealed for: the account it was ordered on, which a
    load may have moved it from (records from before `shipping_account`: its own)."""
    return shipping_owner(card.shipping_account or card.account_id)


class Shipping(msgspec.Struct, frozen=True, kw_only=True):
    """Where a physical card goes: sealed like all personal data (processor/personal_data)."""

    key: str
    sealed: bytes
    account_id: str  # the account it was sealed for (its associated data names it)


def issue_virtual_card(
    account_id: str,
    controls: Controls | None,
    hasher: PanHasher,
    issuing: CardIssuingConfig,
    draw: Callable[[str, int], str] = random_pan,
    *,
    card_keys: CardVerificationKeys = NO_KEYS,
    cardholder_id: str | None = None,
    vault: PanVault | None = None,
) -> Operation:
    """A new card number in the programme's BIN range, never one already in the ledger, with
    its CVC2 when the range has a card verification key; active at once.

    The reply carries the full number and the CVC2; the copy kept for idempotent replays does
    not (neither is stored anywhere).
    """
    source = Issuing(hasher=hasher, config=issuing, card_keys=card_keys, draw=draw, vault=vault)

    def run(writer: Writer, now_ms: int) -> Reply:
        account = _open_account(writer, account_id, field="$.account_id")
        holder = _issuing_to(writer, cardholder_id or account.cardholder_id, issuing)
        _account_holder_verified(writer, account, holder)
        return _issue(writer, now_ms, source, account, holder, stored_controls(controls))

    return run


def order_physical_card(
    account_id: str,
    controls: Controls | None,
    source: Issuing,
    shipping: Shipping,
    cardholder_id: str | None = None,
) -> Operation:
    """A card the bureau prints and ships: `inactive`, fulfilment `ordered`, until the
    cardholder activates it once it has shipped. The reply holds its number and CVC2 for the
    bureau, once, as a virtual card's does."""

    def run(writer: Writer, now_ms: int) -> Reply:
        account = _open_account(writer, account_id, field="$.account_id")
        holder = _issuing_to(writer, cardholder_id or account.cardholder_id, source.config)
        _account_holder_verified(writer, account, holder)
        return _issue(
            writer, now_ms, source, account, holder, stored_controls(controls), shipping=shipping
        )

    return run


def _issue(
    writer: Writer,
    now_ms: int,
    source: Issuing,
    account: Account,
    holder: str | None,
    controls: Controls | None,
    *,
    shipping: Shipping | None = None,
    replaces: str | None = None,
    frozen: bool = False,
) -> Reply:
    issuing = source.config
    expiry = expiry_after(now_ms, issuing.expiry_months)
    for _ in range(PAN_ATTEMPTS_MAX):
        pan = source.draw(issuing.bin_prefix, issuing.pan_length)
        card_key = source.hasher.card_key(pan)
        if writer.card(card_key) is not None:
            continue
        key = source.card_keys.issuing(pan)
        cvc2 = None if key is None else compute_cvc2(key[1], pan, expiry)
        if key is None or cvc2 is not None:  # else one of the rare numbers without one
            break
    else:
        raise Refused(
            503,
            "card_numbers_exhausted",
            f"no free card number found in {PAN_ATTEMPTS_MAX} draws in BIN range "
            f"{issuing.bin_prefix}; widen programme.card_issuing",
        )
    card = card_record(
        card_key,
        pan,
        account_id=account.id,
        expiry=expiry,
        status="inactive" if shipping is not None else "frozen" if frozen else "active",
        controls=controls,
        created_ms=now_ms,
        virtual=shipping is None,
        cvc2_key=None if key is None else key[0],
        cardholder_id=holder,
    )
    if shipping is not None:
        card = msgspec.structs.replace(
            card,
            fulfilment="ordered",
            shipping_key=shipping.key,
            shipping_sealed=shipping.sealed,
            shipping_account=shipping.account_id,
            replaces=replaces,
        )
    elif replaces is not None:
        card = msgspec.structs.replace(card, replaces=replaces)
    writer.put_card(card_key, card, None)
    # How it came: issued virtual, ordered physical, or either as a replacement (the card's
    # `replaces` names the one it replaces).
    how = "replacement" if replaces is not None else "physical" if shipping else "virtual"
    writer.emit_change(now_ms, "card.created", f"{how}_card", card=card)
    if source.vault is not None:
        writer.put_card_secret(card.card_id, source.vault.seal(card.card_id, pan))
    return Reply(
        status=201,
        body=_encode(issued_card(card, pan, cvc2)),
        kept=_encode(card_view(card)),
    )


# Fulfilment states a physical card moves through, as the bureau reports them.
FULFILMENT: Final[tuple[str, ...]] = ("ordered", "in_production", "shipped", "delivered")


def update_fulfilment(card_id: str, status: str) -> Operation:
    """The bureau's word: forward only (a report may skip a state), an event each change."""

    def run(writer: Writer, now_ms: int) -> Reply:
        card_key, card = _card(writer, card_id)
        if card.fulfilment is None:
            raise Refused(409, "not_a_physical_card", f"card {card_id} is not a physical card")
        if FULFILMENT.index(status) < FULFILMENT.index(card.fulfilment):
            raise Refused(
                409,
                "invalid_fulfilment_transition",
                f"card {card_id} is {card.fulfilment} already; fulfilment only moves forward",
                details={"from": card.fulfilment, "to": status},
            )
        if status != card.fulfilment:
            card = msgspec.structs.replace(card, fulfilment=status)
            writer.put_card(card_key, card, card.account_id)
            writer.emit_change(now_ms, "card.fulfilment_updated", f"fulfilment_{status}", card=card)
        return _card_reply(writer, card)

    return run


def activate_card(card_id: str) -> Operation:
    """The cardholder has the physical card: it authorises from now on. The card it replaces
    (expiring or damaged) stops now; if the programme has that card frozen, the new one is
    frozen instead of active (the cardholder's activation got round the freeze)."""

    def run(writer: Writer, now_ms: int) -> Reply:
        card_key, card = _card(writer, card_id)
        if (
            card.fulfilment not in ("shipped", "delivered")
            or card.status != "inactive"
            or card.replaced_by is not None
        ):
            raise Refused(
                409,
                "card_not_activatable",
                f"card {card_id} is {card.status}, fulfilment {card.fulfilment}"
                + ("" if card.replaced_by is None else f", replaced by {card.replaced_by}")
                + ": only a physical card that has shipped, was never activated and was not "
                "replaced can be",
                details={"status": card.status, "fulfilment": card.fulfilment or "none"},
            )
        # As at issuing: the account open, the cardholder (and the account's own) verified;
        # a card ordered before a rejection or a closure is not switched on after it.
        account = _open_account(writer, card.account_id)
        # (a card ordered before cardholders names none: only what it names must be approved)
        holder = None if card.cardholder_id is None else _approved(writer, card.cardholder_id)
        _account_holder_verified(writer, account, holder)
        predecessor = None if card.replaces is None else writer.card_by_id(card.replaces)
        if predecessor is not None and predecessor[1].status not in CARD_STATUSES_FINAL:
            frozen = predecessor[1].status == "frozen"  # still in use: as it is now
        else:  # stopped (lost, stolen): as it was when this one was ordered
            frozen = card.frozen_when_activated
        status: CardStatus = "frozen" if frozen else "active"
        card = msgspec.structs.replace(card, status=status)
        writer.put_card(card_key, card, card.account_id)
        writer.emit_change(now_ms, "card.status_changed", f"card_{status}", card=card)
        if card.replaces is not None:
            _stop(writer, now_ms, card.replaces, "closed")
        return _card_reply(writer, card)

    return run


ReplaceReason = Literal["lost", "stolen", "damaged", "expiring"]


def replace_card(
    card_id: str, reason: ReplaceReason, source: Issuing, shipping: Shipping | None
) -> Operation:
    """A new number on the same account, for the same cardholder, of the same kind. A lost or
    stolen card stops at once; an expiring or damaged one when its replacement is activated
    (a virtual replacement is active at once, so then)."""

    def run(writer: Writer, now_ms: int) -> Reply:
        _, old = _card(writer, card_id)
        successor = None if old.replaced_by is None else writer.card_by_id(old.replaced_by)
        if successor is not None and successor[1].status != "closed":
            # Its replacement is on its way, in use, or itself lost or stolen: replace that
            # one. (A second replacement of the same card skipped the chain: the card still
            # in use was then replaced by nothing anyone would activate.) A replacement closed
            # before it came leaves this card to be replaced again.
            raise Refused(
                409,
                "card_not_replaceable",
                f"card {card_id} is replaced by {old.replaced_by} already; replace that one",
            )
        if old.status == "closed":
            raise Refused(409, "card_not_replaceable", f"card {card_id} is closed")
        if not old.virtual and old.fulfilment is None:
            raise Refused(  # registered or loaded: its number is another issuer's
                409,
                "card_not_replaceable",
                f"card {card_id} was issued elsewhere: its issuer replaces it (register the "
                "new number)",
            )
        account = _open_account(writer, old.account_id)
        physical = old.fulfilment is not None
        ship = shipping
        if physical and ship is None and old.shipping_key and old.shipping_sealed:
            ship = Shipping(
                key=old.shipping_key,
                sealed=old.shipping_sealed,
                account_id=old.shipping_account or old.account_id,
            )
        if physical and ship is None:
            raise Refused(
                400,
                "invalid_body",
                "a physical card's replacement needs a shipping_address",
                field="$.shipping_address",
            )
        # Still verified (and the account's own holder, for someone else's card on it, as
        # at issuing: a replacement got round a rejection); a card from before cardholders
        # goes to its account's.
        holder = _issuing_to(writer, old.cardholder_id or account.cardholder_id, source.config)
        _account_holder_verified(writer, account, holder)
        # A replacement never activated hands on what it was to replace: activating the new
        # card stops the one still in the cardholder's wallet. Never activated and lost, too:
        # its predecessor, still in use, is what the new card replaces (else it stayed
        # active for good, replaced by a card that never came).
        predecessor = None if old.replaces is None else writer.card_by_id(old.replaces)
        handed_on = predecessor is not None and (
            old.status == "inactive"
            or (
                predecessor[1].replaced_by == old.card_id
                and predecessor[1].status not in CARD_STATUSES_FINAL
            )
        )
        replaces = old.replaces if handed_on and old.replaces else old.card_id
        reply = _issue(
            writer,
            now_ms,
            source,
            account,
            holder,
            # An older record's shorthands are its controls: the new card keeps them too.
            with_shorthands(
                old.controls, old.per_transaction_limit, old.blocked_mccs, account.currency
            ),
            shipping=ship if physical else None,
            replaces=replaces,
            # A card the programme froze stays frozen in its replacement (a virtual one is
            # live at once: a damaged report got round the freeze), and so does one it had
            # frozen when it was reported lost or stolen (a report, then a replacement, got
            # round it: what the stopped card recorded, as hand_on_freeze does for a physical one).
            frozen=old.status == "frozen"
            or (old.status in CARD_STATUSES_FINAL and old.frozen_when_activated),
        )
        new_id = msgspec.json.decode(reply.body)["id"]
        for each in {old.card_id, replaces}:  # each points at the card that now replaces it
            found = writer.card_by_id(each)
            if found is not None:
                key, card = found
                writer.put_card(
                    key, msgspec.structs.replace(card, replaced_by=new_id), card.account_id
                )
        if old.status in CARD_STATUSES_FINAL:  # reported lost first, replaced now
            found = writer.card_by_id(old.card_id)
            if found is not None:
                hand_on_freeze(writer, found[1])  # what it recorded when it stopped
        if reason in ("lost", "stolen"):
            _stop(writer, now_ms, old.card_id, reason)
        elif not physical:
            _stop(writer, now_ms, replaces, "closed")
            _stop(writer, now_ms, old.card_id, "closed")
        elif old.status == "inactive":
            _stop(writer, now_ms, old.card_id, "closed")  # never in use: nothing to wait for
        return reply

    return run


def create_reveal_token(card_id: str, digest: bytes, expires_ms: int) -> Operation:
    """Permission to show this card's details once, until `expires_ms`: kept by the token's
    digest (the token is answered to the programme's backend and never stored)."""

    def run(writer: Writer, now_ms: int) -> Reply:
        _, card = _card(writer, card_id)
        # The status first: a card stops with its sealed PAN deleted, and one the processor
        # issued was then said never to have been issued with its PAN kept.
        if card.status in CARD_STATUSES_FINAL:
            raise Refused(409, "card_not_revealable", f"card {card_id} is {card.status}")
        if _account_closed(writer, card):
            raise Refused(409, "card_not_revealable", f"card {card_id}: its account is closed")
        if writer.card_secret(card.card_id) is None:
            raise Refused(
                409,
                "card_not_revealable",
                f"card {card_id} was not issued by this processor with its PAN kept: there is "
                "nothing to show",
            )
        # One live token per card: this one replaces any earlier one.
        writer.put_reveal_token(card.card_id, RevealToken(digest=digest, expires_ms=expires_ms))
        return Reply(status=201, body=b"{}")

    return run


class Revealed(msgspec.Struct, frozen=True):
    card: Card
    secret: CardSecret


def take_reveal_token(card_id: str, digest: bytes) -> Command:
    """Use the token once: the card and its sealed PAN when the token is this card's, unused
    and unexpired; None otherwise (the page then shows one error for every case)."""

    def run(writer: Writer, now_ms: int) -> Revealed | None:
        token = writer.reveal_token(card_id)
        if token is None or not hmac.compare_digest(token.digest, digest):
            return None
        writer.delete_reveal_token(card_id)  # used, or expired: either way gone
        if token.expires_ms <= now_ms:
            return None
        found = writer.card_by_id(card_id)
        secret = writer.card_secret(card_id)
        if found is None or secret is None or found[1].status in CARD_STATUSES_FINAL:
            return None
        if _account_closed(writer, found[1]):  # closed by a load, say, with its cards left
            return None
        return Revealed(card=found[1], secret=secret)

    return run


def _account_closed(writer: Writer, card: Card) -> bool:
    account = writer.account(card.account_id)
    return account is None or account.status == "closed"


def _card_reply(writer: Writer, card: Card) -> Reply:
    account = writer.account(card.account_id)
    currency = None if account is None else account.currency
    failures = writer.card_state(card).cvc2_failures
    return Reply(status=200, body=_encode(card_view(card, failures, currency)))


def _stop(writer: Writer, now_ms: int, card_id: str, status: CardStatus) -> None:
    """The card stops authorising (lost, stolen or closed), with its event, if not already."""
    found = writer.card_by_id(card_id)
    if found is None:
        return
    card_key, card = found
    if card.status in CARD_STATUSES_FINAL:
        return
    changed = stopped(card, status)
    writer.put_card(card_key, changed, card.account_id)
    writer.emit_change(now_ms, "card.status_changed", f"card_{status}", card=changed)
    hand_on_freeze(writer, changed)


def register_card(
    pan: str, expiry: str, account_id: str, controls: Controls | None, hasher: PanHasher
) -> Operation:
    """A card with a number issued elsewhere; the number is kept only as its keyed hash."""
    card_key = hasher.card_key(pan)

    def run(writer: Writer, now_ms: int) -> Reply:
        account = _open_account(writer, account_id, field="$.account_id")
        existing = writer.card(card_key)
        if existing is not None:
            raise Refused(
                409,
                "card_exists",
                f"a card with this number is already registered as {existing.card_id}",
                field="$.pan",
            )
        card = card_record(
            card_key,
            pan,
            account_id=account.id,
            expiry=expiry,
            controls=stored_controls(controls),
            created_ms=now_ms,
        )
        writer.put_card(card_key, card, None)
        writer.emit_change(now_ms, "card.created", "registered_card", card=card)
        return Reply(status=201, body=_encode(card_view(card)))

    return run
