"""Applies decoded requests to the ledger: prefetch, decide, apply, answer.

A batch of authorisations is handled in ONE LMDB write transaction: for each request in arrival
order, look up a stored answer (retransmission), the card and the account, call the pure
`decide()`, apply the hold and store the answer. Requests later in the batch see the changes of
earlier ones because they read through the same write transaction. Nothing here awaits, so what
was checked stays true until it is written.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Final

import lmdb
import msgspec

from processor.currency import numeric_code
from processor.engine import ProgrammeRules, decide, yymm
from processor.ledger.records import Account, Hold, StoredAnswer
from processor.ledger.store import Ledger, LedgerError, Writer
from processor.security import PanHasher
from processor.wire.codec import Codec, balance_block, format_error_response, response_mti
from processor.wire.errors import InvalidMessage
from processor.wire.messages import (
    AuthorizationRequest,
    NetworkManagementRequest,
    UnsupportedRequest,
)

NETWORK_CODES: Final = {"001": "sign_on", "002": "sign_off", "301": "echo"}


class Outcome(msgspec.Struct, frozen=True, gc=False):
    """What was answered, for the link (bytes) and for metrics and logs (no PAN)."""

    response: bytes
    mti: str
    response_code: str
    reason: str


def approval_code(hold_id: int) -> str:
    # Multiplying by a number coprime to 10**6 permutes 0..999999: codes stay unique for a
    # million holds without reading as a plain counter on receipts.
    return f"{(hold_id * 7_919) % 1_000_000:06d}"


class Authorizer:
    def __init__(
        self,
        ledger: Ledger,
        codec: Codec,
        hasher: PanHasher,
        rules: ProgrammeRules,
        *,
        hold_lifetime_seconds: int,
    ) -> None:
        self._ledger = ledger
        self._codec = codec
        self._hasher = hasher
        self._rules = rules
        self._hold_lifetime_ms = hold_lifetime_seconds * 1000
        self._fingerprint_encoder = msgspec.msgpack.Encoder()

    # --- messages that never touch the ledger -------------------------------------------------

    def network_management(self, request: NetworkManagementRequest) -> Outcome:
        reason = NETWORK_CODES.get(request.code)
        code = "00" if reason is not None else "12"
        fields = dict(request.echo)
        fields["t"] = "0810"
        fields["39"] = code
        return Outcome(
            self._codec.encode(fields), "0800", code, reason or "unsupported_network_code"
        )

    def unsupported(self, request: UnsupportedRequest) -> Outcome:
        fields = dict(request.echo)
        fields["t"] = response_mti(request.mti)
        fields["39"] = "12"
        return Outcome(self._codec.encode(fields), request.mti, "12", "unsupported_mti")

    def format_error(self, error: InvalidMessage) -> Outcome:
        response = self._codec.encode(format_error_response(error))
        return Outcome(response, error.mti, "30", "format_error")

    # --- authorisations ----------------------------------------------------------------------

    def authorize_batch(
        self, requests: Sequence[AuthorizationRequest], now: datetime
    ) -> list[Outcome]:
        """Decide and apply `requests` in one durable write transaction.

        Returns one outcome per request, in order, only after the commit; on a ledger failure
        nothing is applied and every request is answered 96.
        """
        now_ms = int(now.timestamp() * 1000)
        now_yymm = yymm(now.astimezone(UTC))
        try:
            with self._ledger.write() as writer:
                return [self._authorize(writer, request, now_ms, now_yymm) for request in requests]
        except (lmdb.Error, LedgerError) as error:
            reason = f"ledger_error:{type(error).__name__}"
            return [self._answer(request, "96", reason) for request in requests]

    def _authorize(
        self, writer: Writer, request: AuthorizationRequest, now_ms: int, now_yymm: int
    ) -> Outcome:
        card_key = self._hasher.card_key(request.pan)
        fingerprint = self._fingerprint(card_key, request)
        identity = b"0100|" + request.identity
        stored = writer.answer(identity)
        if stored is not None:
            if stored.fingerprint != fingerprint:
                return self._answer(request, "94", "duplicate_different_content")
            fields = dict(stored.response)
            fields["2"] = request.pan
            return Outcome(
                self._codec.encode(fields), request.mti, stored.response_code, "retransmission"
            )

        card = writer.card(card_key)
        account = writer.account(card.account_id) if card is not None else None
        decision = decide(request, card, account, self._rules, now_yymm)

        fields = dict(request.echo)
        fields["t"] = "0110"
        fields["39"] = decision.response_code
        hold_id: int | None = None
        if decision.hold_amount:
            assert account is not None and card is not None
            hold_id = writer.next_hold_id()
            code = approval_code(hold_id)
            writer.open_hold(
                account,
                Hold(
                    hold_id=hold_id,
                    account_id=account.id,
                    card_id=card.card_id,
                    amount=decision.hold_amount,
                    currency=account.currency,
                    created_ms=now_ms,
                    expires_ms=now_ms + self._hold_lifetime_ms,
                    approval_code=code,
                    identity=identity,
                    mcc=request.mcc,
                    rrn=request.rrn,
                ),
            )
            writer.put_account(account)
            fields["38"] = code
        elif decision.balance_inquiry:
            assert account is not None
            fields["54"] = _balances(request.processing_code[2:4], account)

        response = self._codec.encode(fields)
        del fields["2"]
        writer.put_answer(
            identity,
            StoredAnswer(
                fingerprint=fingerprint,
                response=fields,
                response_code=decision.response_code,
                reason=decision.reason,
                answered_ms=now_ms,
                card_id=card.card_id if card is not None else None,
                hold_id=hold_id,
            ),
        )
        return Outcome(response, request.mti, decision.response_code, decision.reason)

    def system_error(self, request: AuthorizationRequest) -> Outcome:
        return self._answer(request, "96", "internal_error")

    def _answer(self, request: AuthorizationRequest, code: str, reason: str) -> Outcome:
        fields = dict(request.echo)
        fields["t"] = response_mti(request.mti)
        fields["39"] = code
        return Outcome(self._codec.encode(fields), request.mti, code, reason)

    def _fingerprint(self, card_key: bytes, request: AuthorizationRequest) -> bytes:
        # What makes two requests with one identity "the same": everything the decision reads,
        # without the repeat bit of the MTI. Field 48 stays out: it may carry a CVC2, which must
        # not be kept even as a keyed digest.
        content = (
            card_key,
            request.processing_code,
            request.amount,
            request.expiry,
            request.mcc,
            request.pos_entry_mode,
            request.pos_condition,
            request.forwarding,
            request.rrn,
            request.terminal,
            request.merchant_id,
            request.merchant_name_location,
            request.currency,
            request.billing_amount,
            request.billing_currency,
        )
        return self._hasher.digest(self._fingerprint_encoder.encode(content))


def _balances(account_type: str, account: Account) -> str:
    currency = numeric_code(account.currency)
    return balance_block(account_type, "01", currency, account.posted) + balance_block(
        account_type, "02", currency, account.available
    )
