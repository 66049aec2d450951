"""The programme control API's handlers: validate the request, read or run a command, answer.

Reads use a read transaction on the loop thread (microseconds). Changes are commands
(processor/api/commands.py) that the daemon runs inside its next group-commit transaction, so
an answered change is in force for the next ISO 8583 message on any link. No business rule
lives here beyond checking that a request is well formed; specs/openapi.yaml documents it all.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, date, datetime
from typing import Any, Final, Literal, TypeVar

import lmdb
import msgspec
from aiohttp import web

from processor.api import commands
from processor.api.commands import CARD_ACTIONS, CardAction, Idempotency, Operation, Reply
from processor.api.port import Processor
from processor.api.reveal import token_digest
from processor.api.views import (
    ACCOUNT_ID_PATTERN,
    CARD_ID_PATTERN,
    CARDHOLDER_ID_PATTERN,
    Address,
    AuthorizationsPage,
    CardholderDetails,
    CardRegistration,
    CardReplacement,
    EntriesPage,
    FulfilmentUpdate,
    Individual,
    KycUpdate,
    Movement,
    NewAccount,
    NewCardholder,
    NewPhysicalCard,
    NewVirtualCard,
    RevealTokenView,
    account_view,
    authorization_view,
    card_controls,
    card_view,
    cardholder_view,
    entry_view,
    usage_view,
)
from processor.authorizer import Command, CommandRefused
from processor.catalog import default_catalog
from processor.currency import UnknownCurrency, exponent, numeric_code
from processor.engine.controls import Periods, control_errors, periods_at
from processor.ledger.controls import NO_CONTROLS, Controls, account_scope, card_scope
from processor.ledger.records import Card
from processor.ledger.store import LedgerError, LedgerFull, Reader
from processor.personal_data import PersonalDataCipher, PersonalDataError
from processor.schemas import readable, repeated_key
from processor.security import PanHasher, luhn_valid, typed_card_numbers

log = logging.getLogger("processor.api")

BODY_BYTES_MAX: Final = 64 * 1024
ENTRY_SEQUENCE_MAX: Final = 2**64 - 1  # an account's entries are keyed by a u64 sequence
PAGE_LIMIT_DEFAULT: Final = 50
PAGE_LIMIT_MAX: Final = 100
IDEMPOTENCY_KEY_BYTES_MAX: Final = 255
AUTHORIZATION_ID_BYTES_MAX: Final = 128

T = TypeVar("T")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ApiError(Exception):
    """An answer other than success: becomes {"error": {code, message, field?, details?}}."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        field: str | None = None,
        details: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.details = details
        self.headers = headers or {}


# --- request parsing -------------------------------------------------------------------------

_AT = re.compile(r" - at `(\$[^`]*)`$")
_NAMED_FIELD = re.compile(r"^Object (?:missing required|contains unknown) field `([^`]*)`")


def validation_error(error: msgspec.ValidationError) -> ApiError:
    """msgspec's message names the path ($.controls.amount_limits[0].amount) and never the
    value, so a card number sent in the wrong place is not echoed back."""
    text = readable(error)
    at = _AT.search(text)
    path = at.group(1) if at else "$"
    named = _NAMED_FIELD.search(text)
    if named:
        path = f"{path}.{named.group(1)}"
    return ApiError(400, "invalid_body", text, field=path)


def is_json(content_type: str) -> bool:
    return content_type == "application/json" or (
        content_type.startswith("application/") and content_type.endswith("+json")
    )


async def json_body(request: web.Request, of: type[T]) -> tuple[bytes, T]:
    """The raw body (for the idempotency digest) and its decoded, validated Struct."""
    if not is_json(request.content_type):
        raise ApiError(
            415,
            "unsupported_media_type",
            f"send the body as application/json, not {request.content_type!r}",
            field="Content-Type",
        )
    raw = await request.read()  # client_max_size bounds it: 413 beyond BODY_BYTES_MAX
    try:
        decoded = msgspec.json.decode(raw, type=of)
    except msgspec.ValidationError as error:
        raise validation_error(error) from None
    except msgspec.DecodeError as error:
        raise ApiError(400, "invalid_json", f"body is not valid JSON: {error}", field="$") from None
    try:
        repeated = repeated_key(raw)
    except RecursionError:
        raise ApiError(400, "invalid_body", "the body is nested too deeply", field="$") from None
    if repeated is not None:
        # A gateway or signer in front that reads the first of the two would have passed
        # another request than the one applied (msgspec, like most parsers, keeps the last).
        raise ApiError(
            400, "invalid_body", f"{repeated} is given twice; send each key once", field=repeated
        )
    return raw, decoded


def _first_error(errors: list[str]) -> ApiError:
    return ApiError(400, "invalid_body", "; ".join(errors), field=errors[0].split(":", 1)[0])


def check_controls(controls: Controls | None, currency: str | None, where: str) -> None:
    """Names the catalog and currency must know; the Struct already checked the shapes."""
    if controls is not None:
        errors = control_errors(controls, default_catalog(), currency, where)
        if errors:
            raise _first_error(errors)


def check_currency(currency: str, where: str) -> None:
    try:
        numeric_code(currency)  # the ISO 8583 messages carry it as a number
        exponent(currency)
    except UnknownCurrency as error:
        raise ApiError(400, "invalid_body", f"{where}: {error}", field=where) from None


BORN_AFTER: Final = date(1900, 1, 1)


def check_date_of_birth(born: date, today: date) -> None:
    """A person's date of birth: not before 1900 and not in the future (a typo that KYC would
    carry on with)."""
    if not BORN_AFTER <= born <= today:
        raise ApiError(
            400,
            "invalid_body",
            f"$.details.date_of_birth: {born.isoformat()} is not between "
            f"{BORN_AFTER.isoformat()} and today",
            field="$.details.date_of_birth",
        )


def _account_currency(reader: Reader, account_id: str | None) -> str | None:
    """The currency an answer's posted and reversed amounts are in: its account's."""
    account = None if account_id is None else reader.account(account_id)
    return None if account is None else account.currency


def _id_in_path(request: web.Request, name: str, pattern: str, code: str, what: str) -> str:
    value = request.match_info[name]
    if re.fullmatch(pattern, value) is None:
        raise ApiError(404, code, f"no {what} {value[:80]!r}")
    return value


def account_id_of(request: web.Request) -> str:
    return _id_in_path(request, "account_id", ACCOUNT_ID_PATTERN, "account_not_found", "account")


def card_id_of(request: web.Request) -> str:
    return _id_in_path(request, "card_id", CARD_ID_PATTERN, "card_not_found", "card")


def cardholder_id_of(request: web.Request) -> str:
    return _id_in_path(
        request, "cardholder_id", CARDHOLDER_ID_PATTERN, "cardholder_not_found", "cardholder"
    )


def page_limit(request: web.Request) -> int:
    text = request.query.get("limit")
    if text is None:
        return PAGE_LIMIT_DEFAULT
    if re.fullmatch(r"[0-9]{1,3}", text) is None or not 1 <= int(text) <= PAGE_LIMIT_MAX:
        raise ApiError(
            400,
            "invalid_query",
            f"limit must be a whole number from 1 to {PAGE_LIMIT_MAX}",
            field="limit",
        )
    return int(text)


def encode_cursor(page_key: bytes) -> str:
    return base64.urlsafe_b64encode(page_key).rstrip(b"=").decode("ascii")


def decode_cursor(request: web.Request, prefix: bytes) -> bytes | None:
    """The page key of ?cursor=, which must belong to the listing asked for."""
    text = request.query.get("cursor")
    if text is None:
        return None
    try:
        if re.fullmatch(r"[A-Za-z0-9_-]{1,400}", text) is None:
            raise ValueError(text)
        key = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (ValueError, binascii.Error):
        key = b""
    if not key.startswith(prefix) or len(key) <= len(prefix):
        raise ApiError(
            400, "invalid_query", "cursor is not one this listing gave out", field="cursor"
        )
    return key


def idempotency(request: web.Request, raw: bytes, hasher: PanHasher) -> Idempotency | None:
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None
    if not (
        1 <= len(key) <= IDEMPOTENCY_KEY_BYTES_MAX
        and all(" " <= char <= "~" for char in key)  # printable ASCII
    ):
        raise ApiError(
            400,
            "invalid_idempotency_key",
            f"Idempotency-Key must be 1-{IDEMPOTENCY_KEY_BYTES_MAX} printable ASCII characters",
            field="Idempotency-Key",
        )
    target = f"{request.method} {request.rel_url.path}\n".encode("utf-8", "surrogatepass")
    return Idempotency(
        scope=hashlib.sha256(b"key\n" + key.encode()).digest(),
        body_digest=hasher.digest(target + raw),
        legacy_scope=hashlib.sha256(target + key.encode()).digest(),
        legacy_body_digest=hasher.digest(raw),
    )


def only_query(handler: Handler, names: tuple[str, ...]) -> Handler:
    """Refuse query parameters the operation does not take: a typo (?limt=5) is not ignored."""

    async def checked(request: web.Request) -> web.StreamResponse:
        for name in request.query:
            if name not in names:
                raise ApiError(
                    400,
                    "invalid_query",
                    f"unknown query parameter {name[:40]!r}"
                    + (f"; this operation takes {', '.join(names)}" if names else ""),
                    field=name[:40],
                )
        return await handler(request)

    return checked


def audit(request: web.Request, reply: Reply) -> None:
    """One line per applied change: who changed what is an operator's first question.
    Paths hold account and card ids only, never a card number; bodies are not logged."""
    log.info(
        "control API: %s %s -> %d%s",
        request.method,
        request.rel_url.path,
        reply.status,
        " (idempotent replay)" if reply.replayed else "",
    )


def json_response(value: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=msgspec.json.encode(value), status=status, content_type="application/json"
    )


# --- handlers --------------------------------------------------------------------------------


class ControlApi:
    def __init__(self, daemon: Processor, hasher: PanHasher) -> None:
        self.daemon = daemon
        self.hasher = hasher

    def routes(self) -> list[web.RouteDef]:
        account = "/v1/accounts/{account_id}"
        card = "/v1/cards/{card_id}"
        paged = ("limit", "cursor")
        table: list[tuple[str, str, Handler, tuple[str, ...]]] = [
            ("POST", "/v1/accounts", self.create_account, ()),
            ("GET", account, self.get_account, ()),
            ("POST", account + "/fund", self.fund, ()),
            ("POST", account + "/debit", self.debit, ()),
            ("POST", account + "/close", self.close_account, ()),
            ("GET", account + "/entries", self.entries, paged),
            ("GET", account + "/controls", self.get_account_controls, ()),
            ("PUT", account + "/controls", self.put_account_controls, ()),
            ("GET", account + "/usage", self.account_usage, ()),
            ("GET", account + "/authorizations", self.account_authorizations, paged),
            ("POST", "/v1/cards/virtual", self.issue_virtual_card, ()),
            ("POST", "/v1/cards", self.register_card, ()),
            ("GET", card, self.get_card, ()),
            ("GET", card + "/controls", self.get_card_controls, ()),
            ("PUT", card + "/controls", self.put_card_controls, ()),
            ("GET", card + "/usage", self.card_usage, ()),
            ("GET", card + "/authorizations", self.card_authorizations, paged),
            ("GET", "/v1/authorizations/{authorization_id}", self.get_authorization, ()),
            ("GET", "/v1/controls", self.get_programme_controls, ()),
            ("PUT", "/v1/controls", self.put_programme_controls, ()),
        ]
        for action in CARD_ACTIONS:
            table.append(("POST", f"{card}/{action}", self._card_action(action), ()))
        table.append(("POST", card + "/reset-cvc2", self.reset_cvc2, ()))
        table.append(("POST", "/v1/cards/physical", self.order_physical_card, ()))
        table.append(("POST", card + "/fulfilment", self.update_fulfilment, ()))
        table.append(("POST", card + "/activate", self.activate_card, ()))
        table.append(("POST", card + "/replace", self.replace_card, ()))
        table.append(("GET", card + "/shipping-address", self.shipping_address, ()))
        table.append(("POST", card + "/reveal-token", self.reveal_token, ()))
        cardholder = "/v1/cardholders/{cardholder_id}"
        table.append(("POST", "/v1/cardholders", self.create_cardholder, ()))
        table.append(("GET", cardholder, self.get_cardholder, ()))
        table.append(("POST", cardholder + "/kyc", self.set_kyc_status, ()))
        return [
            web.route(method, path, only_query(handler, query))
            for method, path, handler, query in table
        ]

    async def _run(self, command: Command) -> Reply:
        try:
            result = await self.daemon.execute(command)
        except LedgerFull as error:
            log.error("control API: %s; nothing applied", error)
            raise ApiError(
                503,
                "ledger_full",
                "the ledger is full at its ceiling (ledger.map_size_max_bytes); nothing was "
                "applied: raise the ceiling or free space, then retry",
                headers={"Retry-After": "60"},
            ) from None
        except (LedgerError, lmdb.Error) as error:
            # An operating error (disk full, map full): nothing was applied; a retry may work.
            log.error("control API: ledger failed, nothing applied: %s", error)
            raise ApiError(
                503,
                "ledger_unavailable",
                f"the ledger could not apply the change ({type(error).__name__}); "
                "nothing was applied, retry later",
                headers={"Retry-After": "1"},
            ) from None
        if isinstance(result, CommandRefused):
            raise ApiError(
                result.status,
                result.code,
                result.message,
                field=result.field,
                details=result.details,
            )
        assert isinstance(result, Reply), result
        return result

    async def _apply(
        self, request: web.Request, raw: bytes | None, operation: Operation
    ) -> web.Response:
        """Run the operation in the next write transaction: once per Idempotency-Key for a POST
        (`raw`, its body, goes into the key's digest), plain for a PUT (`raw` None), which
        replaces a whole set and so may be repeated harmlessly."""
        key = None if raw is None else idempotency(request, raw, self.hasher)
        reply = await self._run(commands.idempotent(key, operation))
        audit(request, reply)
        response = web.Response(
            body=reply.body, status=reply.status, content_type="application/json"
        )
        if reply.replayed:
            response.headers["Idempotent-Replayed"] = "true"
        return response

    # --- accounts ------------------------------------------------------------------------------

    async def create_account(self, request: web.Request) -> web.Response:
        raw, body = await json_body(request, NewAccount)
        check_currency(body.currency, "$.currency")
        check_controls(body.controls, body.currency, "$.controls")
        if body.id is not None and re.fullmatch(ACCOUNT_ID_PATTERN, body.id) is None:
            raise ApiError(400, "invalid_body", "$.id: letters, digits and _.:- only", field="$.id")
        if body.id is not None:
            self._refuse_card_number(body.id, "$.id")
        account_id = body.id or "acct_" + secrets.token_hex(12)
        operation = commands.create_account(
            account_id, body.currency, body.credit_limit, body.controls, body.cardholder_id
        )
        return await self._apply(request, raw, operation)

    async def get_account(self, request: web.Request) -> web.Response:
        account_id = account_id_of(request)
        with self.daemon.ledger.read() as reader:
            account = reader.account(account_id)
        if account is None:
            raise ApiError(404, "account_not_found", f"no account {account_id!r}")
        return json_response(account_view(account))

    async def fund(self, request: web.Request) -> web.Response:
        return await self._movement(request, "fund")

    async def debit(self, request: web.Request) -> web.Response:
        return await self._movement(request, "debit")

    async def _movement(self, request: web.Request, kind: Literal["fund", "debit"]) -> web.Response:
        account_id = account_id_of(request)
        raw, body = await json_body(request, Movement)
        self._refuse_card_number(body.reason, "$.reason")
        operation = commands.move_funds(account_id, kind, body.amount, body.reason)
        return await self._apply(request, raw, operation)

    async def close_account(self, request: web.Request) -> web.Response:
        account_id = account_id_of(request)
        raw = await request.read()
        return await self._apply(request, raw, commands.close_account(account_id))

    async def entries(self, request: web.Request) -> web.Response:
        account_id = account_id_of(request)
        limit = page_limit(request)
        # The account in the cursor: one from another account's listing is refused, not
        # read as a position in this one.
        prefix = b"e:" + account_id.encode() + b"\x00"
        cursor = decode_cursor(request, prefix)
        before = None
        if cursor is not None:
            number = cursor[len(prefix) :]
            if not number.isdigit() or len(number) > 20 or int(number) > ENTRY_SEQUENCE_MAX:
                raise ApiError(
                    400, "invalid_query", "cursor is not one this listing gave out", field="cursor"
                )
            before = int(number)
        with self.daemon.ledger.read() as reader:
            if reader.account(account_id) is None:
                raise ApiError(404, "account_not_found", f"no account {account_id!r}")
            found = reader.entries(account_id, limit + 1, before)
        items = found[:limit]
        next_cursor = (
            encode_cursor(prefix + str(items[-1].sequence).encode()) if len(found) > limit else None
        )
        return json_response(
            EntriesPage(items=[entry_view(entry) for entry in items], next_cursor=next_cursor)
        )

    async def account_usage(self, request: web.Request) -> web.Response:
        account_id = account_id_of(request)
        with self.daemon.ledger.read() as reader:
            account = reader.account(account_id)
            if account is None:
                raise ApiError(404, "account_not_found", f"no account {account_id!r}")
            usage = reader.usage(account_scope(account_id))
        return json_response(
            usage_view(
                "account", account_id, account.currency, usage, self._periods(), self._zone_name
            )
        )

    async def account_authorizations(self, request: web.Request) -> web.Response:
        account_id = account_id_of(request)
        with self.daemon.ledger.read() as reader:
            if reader.account(account_id) is None:
                raise ApiError(404, "account_not_found", f"no account {account_id!r}")
            return self._history(request, reader, "account", account_id)

    # --- cards ---------------------------------------------------------------------------------

    def _account_currency(self, account_id: str, field: str | None) -> str:
        with self.daemon.ledger.read() as reader:
            account = reader.account(account_id)
        if account is None:
            raise ApiError(404, "account_not_found", f"no account {account_id!r}", field=field)
        return account.currency

    async def issue_virtual_card(self, request: web.Request) -> web.Response:
        raw, body = await json_body(request, NewVirtualCard)
        self._check_account_id(body.account_id)
        currency = self._account_currency(body.account_id, "$.account_id")
        check_controls(body.controls, currency, "$.controls")
        operation = commands.issue_virtual_card(
            body.account_id,
            body.controls,
            self.hasher,
            self.daemon.config.programme.card_issuing,
            card_keys=self.daemon.card_keys,
            cardholder_id=body.cardholder_id,
            vault=self.daemon.pan_vault,
        )
        return await self._apply(request, raw, operation)

    async def register_card(self, request: web.Request) -> web.Response:
        raw, body = await json_body(request, CardRegistration)
        if not luhn_valid(body.pan):
            raise ApiError(400, "invalid_body", "$.pan: fails the Luhn check", field="$.pan")
        if re.fullmatch(r"[0-9]{2}(0[1-9]|1[0-2])", body.expiry) is None:
            raise ApiError(400, "invalid_body", "$.expiry: YYMM", field="$.expiry")
        self._check_account_id(body.account_id)
        currency = self._account_currency(body.account_id, "$.account_id")
        check_controls(body.controls, currency, "$.controls")
        operation = commands.register_card(
            body.pan, body.expiry, body.account_id, body.controls, self.hasher
        )
        return await self._apply(request, raw, operation)

    @staticmethod
    def _check_account_id(account_id: str) -> None:
        if re.fullmatch(ACCOUNT_ID_PATTERN, account_id) is None:
            raise ApiError(404, "account_not_found", "no such account", field="$.account_id")

    async def get_card(self, request: web.Request) -> web.Response:
        card_id = card_id_of(request)
        with self.daemon.ledger.read() as reader:
            card = self._read_card(reader, card_id)
            failures = reader.card_state(card).cvc2_failures
            account = reader.account(card.account_id)
        currency = None if account is None else account.currency
        return json_response(card_view(card, failures, currency))

    @staticmethod
    def _read_card(reader: Reader, card_id: str) -> Card:
        found = reader.card_by_id(card_id)
        if found is None:
            raise ApiError(404, "card_not_found", f"no card {card_id!r}")
        return found[1]

    def _card_action(self, action: CardAction) -> Handler:
        async def handle(request: web.Request) -> web.Response:
            card_id = card_id_of(request)
            raw = await request.read()  # no body expected; it only enters the key's digest
            return await self._apply(request, raw, commands.change_card_status(card_id, action))

        return handle

    def _cipher(self) -> PersonalDataCipher:
        cipher = self.daemon.personal_data
        if cipher is None:  # a process without the keys (workers serve no HTTP)
            raise ApiError(503, "personal_data_unavailable", "no personal-data key here")
        return cipher

    def _open(self, key: str, sealed: bytes, owner: str, what: str) -> bytes:
        """Sealed personal data, opened for one answer; a 503 naming `what` when it cannot be
        (the log line names the owner and key id, never data)."""
        try:
            return self._cipher().open(key, sealed, owner)
        except PersonalDataError as error:
            log.error("control API: %s", error)
            raise ApiError(
                503, "personal_data_unavailable", f"{what}: cannot open its personal data"
            ) from None

    async def create_cardholder(self, request: web.Request) -> web.Response:
        raw, body = await json_body(request, NewCardholder)
        if isinstance(body.details, Individual):
            check_date_of_birth(body.details.date_of_birth, datetime.now(UTC).date())
        operation = commands.create_cardholder(body.details, self._cipher())
        return await self._apply(request, raw, operation)

    async def get_cardholder(self, request: web.Request) -> web.Response:
        cardholder_id = cardholder_id_of(request)
        with self.daemon.ledger.read() as reader:
            holder = reader.cardholder(cardholder_id)
        if holder is None:
            raise ApiError(404, "cardholder_not_found", f"no cardholder {cardholder_id!r}")
        plaintext = self._open(
            holder.sealed_with, holder.sealed, holder.id, f"cardholder {holder.id}"
        )
        details = msgspec.json.decode(plaintext, type=CardholderDetails)
        return json_response(cardholder_view(holder, details))

    async def set_kyc_status(self, request: web.Request) -> web.Response:
        cardholder_id = cardholder_id_of(request)
        raw, body = await json_body(request, KycUpdate)
        return await self._apply(request, raw, commands.set_kyc_status(cardholder_id, body.status))

    def _issuing(self) -> commands.Issuing:
        return commands.Issuing(
            hasher=self.hasher,
            config=self.daemon.config.programme.card_issuing,
            card_keys=self.daemon.card_keys,
            vault=self.daemon.pan_vault,
        )

    async def reveal_token(self, request: web.Request) -> web.Response:
        """A one-time token for the card-details page. Never kept for idempotent replays (a
        retry gets a token of its own; the first expires unused)."""
        card_id = card_id_of(request)
        await request.read()  # no body expected
        token = secrets.token_urlsafe(32)
        seconds = self.daemon.config.security.reveal_token_seconds
        expires_ms = int(time.time() * 1000) + seconds * 1000
        digest = token_digest(token)
        await self._run(commands.create_reveal_token(card_id, digest, expires_ms))
        body = RevealTokenView(
            token=token,
            url=f"/reveal/{card_id}/{token}",
            expires=datetime.fromtimestamp(expires_ms / 1000, UTC),
        )
        log.info("control API: reveal token for card %s, %d s", card_id, seconds)
        return json_response(body, status=201)

    def _refuse_card_number(self, value: str, where: str) -> None:
        """An id or a reason is kept and shown in clear (views, events, the ledger's keys): one
        that carries the number of a card this ledger knows (typed in by mistake, grouped or
        not) is refused, never stored, and the message does not quote it. Other numbers that
        pass the Luhn check (a tenth of all) are customer numbers, not refused."""
        candidates = typed_card_numbers(value)
        if not candidates:
            return
        with self.daemon.ledger.read() as reader:
            known = any(
                reader.card(self.hasher.card_key(digits)) is not None for digits in candidates
            )
        if known:
            raise ApiError(
                400,
                "invalid_body",
                f"{where}: holds a card's number; it would be kept and shown in clear",
                field=where,
            )

    def _shipping(self, address: Address, account_id: str) -> commands.Shipping:
        """The address sealed like all personal data, bound to the account it ships for."""
        plaintext = msgspec.json.encode(address)
        key, sealed = self._cipher().seal(plaintext, commands.shipping_owner(account_id))
        return commands.Shipping(key=key, sealed=sealed, account_id=account_id)

    async def order_physical_card(self, request: web.Request) -> web.Response:
        raw, body = await json_body(request, NewPhysicalCard)
        self._check_account_id(body.account_id)
        currency = self._account_currency(body.account_id, "$.account_id")
        check_controls(body.controls, currency, "$.controls")
        shipping = self._shipping(body.shipping_address, body.account_id)
        operation = commands.order_physical_card(
            body.account_id, body.controls, self._issuing(), shipping, body.cardholder_id
        )
        return await self._apply(request, raw, operation)

    async def shipping_address(self, request: web.Request) -> web.Response:
        """Where the bureau ships a physical card: opened for this answer only."""
        card_id = card_id_of(request)
        with self.daemon.ledger.read() as reader:
            card = self._read_card(reader, card_id)
        if card.shipping_key is None or card.shipping_sealed is None:
            raise ApiError(404, "no_shipping_address", f"card {card_id} is not a physical card")
        owner = commands.card_shipping_owner(card)
        plaintext = self._open(card.shipping_key, card.shipping_sealed, owner, f"card {card_id}")
        return json_response(msgspec.json.decode(plaintext, type=Address))

    async def update_fulfilment(self, request: web.Request) -> web.Response:
        card_id = card_id_of(request)
        raw, body = await json_body(request, FulfilmentUpdate)
        return await self._apply(request, raw, commands.update_fulfilment(card_id, body.status))

    async def activate_card(self, request: web.Request) -> web.Response:
        card_id = card_id_of(request)
        raw = await request.read()  # no body expected; it only enters the key's digest
        return await self._apply(request, raw, commands.activate_card(card_id))

    async def replace_card(self, request: web.Request) -> web.Response:
        card_id = card_id_of(request)
        raw, body = await json_body(request, CardReplacement)
        shipping = None
        if body.shipping_address is not None:
            with self.daemon.ledger.read() as reader:
                card = self._read_card(reader, card_id)
            if card.fulfilment is None:  # its replacement is virtual too: nowhere to ship
                raise ApiError(
                    400,
                    "invalid_body",
                    f"card {card_id} is not a physical card: its replacement is not shipped",
                    field="$.shipping_address",
                )
            shipping = self._shipping(body.shipping_address, card.account_id)
        operation = commands.replace_card(card_id, body.reason, self._issuing(), shipping)
        return await self._apply(request, raw, operation)

    async def reset_cvc2(self, request: web.Request) -> web.Response:
        card_id = card_id_of(request)
        raw = await request.read()  # no body expected; it only enters the key's digest
        return await self._apply(request, raw, commands.reset_cvc2(card_id))

    async def card_usage(self, request: web.Request) -> web.Response:
        card_id = card_id_of(request)
        with self.daemon.ledger.read() as reader:
            card = self._read_card(reader, card_id)
            account = reader.account(card.account_id)
            usage = reader.usage(card_scope(card_id))
        currency = account.currency if account is not None else ""
        return json_response(
            usage_view("card", card_id, currency, usage, self._periods(), self._zone_name)
        )

    async def card_authorizations(self, request: web.Request) -> web.Response:
        card_id = card_id_of(request)
        with self.daemon.ledger.read() as reader:
            self._read_card(reader, card_id)
            return self._history(request, reader, "card", card_id)

    # --- authorisations ------------------------------------------------------------------------

    async def get_authorization(self, request: web.Request) -> web.Response:
        authorization_id = request.match_info["authorization_id"]
        if not (
            1 <= len(authorization_id) <= AUTHORIZATION_ID_BYTES_MAX
            and all("!" <= char <= "~" for char in authorization_id)
        ):
            raise ApiError(404, "authorization_not_found", "no such authorization")
        key = authorization_id.encode("ascii")
        with self.daemon.ledger.read() as reader:
            answer = reader.answer(key)
            if answer is None:
                raise ApiError(
                    404, "authorization_not_found", f"no authorization {authorization_id!r}"
                )
            hold = reader.hold_of(key, answer)
            currency = _account_currency(reader, answer.account_id)
        return json_response(authorization_view(key, answer, hold, currency))

    def _history(
        self, request: web.Request, reader: Reader, of: Literal["card", "account"], owner: str
    ) -> web.Response:
        limit = page_limit(request)
        # The listing's kind in the cursor too: an account may have a card's id as its own,
        # and a card's cursor read in that account's listing ended it, silently, at once.
        kind = b"c:" if of == "card" else b"a:"
        cursor = decode_cursor(request, kind + owner.encode() + b"\x00")
        try:
            found = reader.history(of, owner, limit + 1, None if cursor is None else cursor[2:])
        except ValueError:
            raise ApiError(
                400, "invalid_query", "cursor is not one this listing gave out", field="cursor"
            ) from None
        page = found[:limit]
        items = []
        for key, answer, _ in page:
            hold = reader.hold_of(key, answer)
            currency = _account_currency(reader, answer.account_id)
            items.append(authorization_view(key, answer, hold, currency))
        next_cursor = encode_cursor(kind + page[-1][2]) if len(found) > limit else None
        return json_response(AuthorizationsPage(items=items, next_cursor=next_cursor))

    # --- controls ------------------------------------------------------------------------------

    async def get_programme_controls(self, request: web.Request) -> web.Response:
        with self.daemon.ledger.read() as reader:
            controls = reader.programme_controls()
        return json_response(controls or NO_CONTROLS)

    async def put_programme_controls(self, request: web.Request) -> web.Response:
        _, controls = await json_body(request, Controls)
        check_controls(controls, None, "$")
        return await self._apply(request, None, commands.set_programme_controls(controls))

    async def get_account_controls(self, request: web.Request) -> web.Response:
        account_id = account_id_of(request)
        with self.daemon.ledger.read() as reader:
            account = reader.account(account_id)
        if account is None:
            raise ApiError(404, "account_not_found", f"no account {account_id!r}")
        return json_response(account.controls or NO_CONTROLS)

    async def put_account_controls(self, request: web.Request) -> web.Response:
        account_id = account_id_of(request)
        currency = self._account_currency(account_id, None)
        _, controls = await json_body(request, Controls)
        check_controls(controls, currency, "$")
        return await self._apply(request, None, commands.set_account_controls(account_id, controls))

    async def get_card_controls(self, request: web.Request) -> web.Response:
        card_id = card_id_of(request)
        with self.daemon.ledger.read() as reader:
            card = self._read_card(reader, card_id)
            account = reader.account(card.account_id)
        # As enforced: an older card record's shorthands folded in (views.card_controls).
        return json_response(card_controls(card, None if account is None else account.currency))

    async def put_card_controls(self, request: web.Request) -> web.Response:
        card_id = card_id_of(request)
        with self.daemon.ledger.read() as reader:
            card = self._read_card(reader, card_id)
            account = reader.account(card.account_id)
        _, controls = await json_body(request, Controls)
        check_controls(controls, account.currency if account is not None else None, "$")
        return await self._apply(request, None, commands.set_card_controls(card_id, controls))

    # --- helpers -------------------------------------------------------------------------------

    @property
    def _zone_name(self) -> str:
        return self.daemon.config.programme.time_zone

    def _periods(self) -> Periods:
        return periods_at(int(time.time() * 1000), self.daemon.config.programme.zone)
