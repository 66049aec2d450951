"""What each financial-class message does to the ledger, inside the batch's write transaction.

One handler per message class, each returning a `Result` (the answer and what it touched); the
Authorizer wraps them with retransmission handling and answer storage. Semantics follow
DESIGN.md's two-phase model: an authorisation holds (pending), a completion posts and closes the
hold, a reversal voids or shrinks it, a 0200 posts at once, an advice records what the network
already told the cardholder.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Mapping
from datetime import UTC, tzinfo
from typing import Final

import msgspec

from processor import limits
from processor.currency import numeric_code
from processor.cvc2 import NO_KEYS, CardVerificationKeys
from processor.engine import Decision, ProgrammeRules, Spend, decide
from processor.engine.controls import Periods, periods_at, record_usages, release_usage
from processor.engine.decide import (
    ACCOUNT_VERIFIED,
    AMOUNT_MAX,
    SPEND_TRANSACTION_TYPES,
    CardCheck,
    Cvc2Result,
    billing_amount,
    card_not_present,
    network_billing,
)
from processor.engine.fx import scale
from processor.engine.settle import capture_verdict, repost_amount, void_verdict
from processor.ledger.controls import Controls, Usage
from processor.ledger.records import (
    Account,
    Card,
    CardState,
    Hold,
    OutboxRecord,
    StoredAnswer,
    change_event,
)
from processor.ledger.store import REVERSED_BEFORE_ORIGINAL, Writer, answer_time
from processor.randomness import BufferedRandom
from processor.wire.messages import AuthorizationRequest, rrn_key, transaction_key
from processor.wire.responses import approved_fields, balances

# Message classes whose answers a reversal or completion may point at.
ORIGINAL_CLASSES: Final = ("0100", "0200", "0120")
# Advices tell what already happened: always acknowledged with 00.
ADVICE_CLASSES: Final = ("0120", "0220", "0420")
# An 0120 about a transaction this issuer approved itself: it stands for that approval.
ADVICE_OF_APPROVAL: Final = "advice_of_issuer_approval"
# An 0120 about a purchase already posted (a completion or presentment came first).
ADVICE_OF_POSTING: Final = "advice_of_posted_purchase"


def confirmed_original(
    writer: Writer, key: bytes, answer: StoredAnswer | None
) -> tuple[bytes, StoredAnswer] | None:
    """The original a message naming `key` (answered `answer`) means, when the network stood
    in for it: completions, reversals and clearing reach the one hold whichever of the two
    messages (0100, 0120) they name. An 0120 that confirmed the issuer's approval stands for
    it; an 0100 declined or never received stands for the 0120 that approved it in its place
    and opened the hold (an acquirer's reversal names the 0100). Else the answer itself."""
    if key.startswith(b"0120|"):
        if answer is None or answer.reason not in (ADVICE_OF_APPROVAL, ADVICE_OF_POSTING):
            return None if answer is None else (key, answer)
        approval_key = b"0100" + key[4:]
        approval = writer.answer(approval_key)
        return (key, answer) if approval is None else (approval_key, approval)
    if key.startswith(b"0100|") and (
        answer is None or (answer.response_code not in ("00", "10") and not answer.posted_amount)
    ):
        # Not when a completion or presentment already posted it (marked on the declined
        # answer): the stand-in's hold is then the same purchase held again, not its original.
        stand_in_key = b"0120" + key[4:]
        stand_in = writer.answer(stand_in_key)
        if (
            stand_in is not None
            and stand_in.hold is not None
            and (answer is None or answer.card_id is None or answer.card_id == stand_in.card_id)
        ):
            return stand_in_key, stand_in
    return None if answer is None else (key, answer)


class Batch(msgspec.Struct, frozen=True, gc=False):
    """What every request of one batch shares: its time, read once, and programme controls."""

    now_ms: int
    now_yymm: int
    periods: Periods  # calendar periods of now_ms in the programme's time zone
    programme: Controls | None  # read inside the batch's transaction: never stale


class _Answer(msgspec.Struct, gc=False):
    response_code: str
    reason: str


class Result(_Answer, kw_only=True, gc=False):
    extra: dict[str, str] | None = None  # response fields beyond the echo and 39
    account_id: str | None = None
    card_id: str | None = None
    hold_id: int | None = None
    posted_amount: int = 0
    usage_amount: int = 0  # counted in the card's and account's spend-control usage
    usage_mcc: str = ""
    cvc2: Cvc2Result | None = None  # what the CVC2 sent showed, for the event
    event_after: OutboxRecord | None = None  # a second event the answer caused (a lock-out)
    # What a reversal or completion moved on the account, in the account's currency, when
    # that is not the message's field 4 (converted, or a partial reversal): the event's
    # billing amount (an approval's is its answer's field 6, or 4 when partial).
    billed: int | None = None
    # Whether a reversal or completion without field 90 finds this answer by its RRN (an 0120
    # that stands for an earlier approval leaves the RRN to that approval).
    rrn_indexed: bool = True


APPROVAL_CODES: Final = 1_000_000  # six digits


def new_approval_code(state: CardState, day: int, draw: Callable[[int], int]) -> str:
    """Six digits nobody can predict, unlike the card's other codes of `day`.

    A code proves to the merchant and the cardholder that this issuer approved: a sequence
    (every fresh ledger issuing 007919, 015838, ...) could be guessed, so codes are drawn from
    `draw` (the OS CSPRNG in the daemon, processor.randomness) and the card's codes of the day
    are remembered, sorted (a bisection finds a repeat: searching packed bytes cost 2-3 us per
    approval on a busy card). A card approved more often in a day is kept unlike its first ones
    only.
    """
    if state.approval_day != day:
        state.approval_day, state.approval_codes = day, []
    issued = state.approval_codes
    for _ in range(limits.approval_code_draws_max):
        number = draw(APPROVAL_CODES)
        index = bisect_left(issued, number)
        if index == len(issued) or issued[index] != number:
            if len(issued) < limits.approval_codes_remembered_max:
                issued.insert(index, number)
            return f"{number:06d}"
    raise AssertionError(f"{limits.approval_code_draws_max} approval codes drawn, all taken")


def _holder_rejected(writer: Writer, cardholder_id: str | None) -> bool:
    """Whether the cardholder's KYC is rejected: read at each authorisation (one lookup, only
    for cards issued to cardholders), so a rejection stops their cards at once and a later
    approval lets them work again, as the provider says, without touching each card."""
    if cardholder_id is None:
        return False
    holder = writer.cardholder(cardholder_id)
    return holder is not None and holder.kyc_status == "rejected"


def _cvc2_expected(request: AuthorizationRequest) -> bool:
    """Card-not-present with the cardholder taking part: not a stored credential (field 22 =
    10, where no CVC2 may be kept), not merchant-initiated or recurring."""
    entry = request.pos_entry_mode or ""
    return card_not_present(request) and entry[:2] != "10" and not request.sca_out_of_scope


def _billed(request: AuthorizationRequest, account: Account, moved: int) -> int | None:
    """Result.billed: `moved` (the account's currency) unless the message's field 4, in the
    account's currency, says it already. A receiver otherwise had no figure for a converted
    completion or reversal, nor for what a partial reversal gave back."""
    if request.currency == numeric_code(account.currency) and request.amount == moved:
        return None
    return moved


def usage_of(record: CardState | Account) -> Usage:
    """The usage kept with a card's state or an account, made empty on first use."""
    if record.usage is None:
        record.usage = Usage()
    return record.usage


class Lifecycle:
    def __init__(
        self,
        rules: ProgrammeRules,
        *,
        hold_lifetime_seconds: int,
        hold_lifetime_by_mcc: Mapping[str, int],
        zone: tzinfo = UTC,
        draw: Callable[[int], int] | None = None,
        card_keys: CardVerificationKeys = NO_KEYS,
        cvc2_attempts_max: int = 3,
        cvc2_required_card_not_present: bool = False,
    ) -> None:
        self._rules = rules
        self._card_keys = card_keys
        self._cvc2_attempts_max = cvc2_attempts_max
        self._cvc2_required = cvc2_required_card_not_present
        self._zone = zone
        # Approval codes: the OS CSPRNG, read in bulk; injectable so tests can replay a draw.
        self._draw = draw if draw is not None else BufferedRandom().below
        self._hold_lifetime_ms = hold_lifetime_seconds * 1000
        self._hold_lifetime_by_mcc_ms = {
            mcc: seconds * 1000 for mcc, seconds in hold_lifetime_by_mcc.items()
        }
        self.handlers: dict[
            str, Callable[[Writer, AuthorizationRequest, bytes, bytes, Batch], Result]
        ] = {
            "0100": self.authorization,
            "0200": self.financial,
            "0120": self.stand_in_advice,
            "0220": self.completion,
            "0400": self.reversal,
            "0420": self.reversal,
        }

    # --- holds ---------------------------------------------------------------------------------

    def _hold(
        self,
        writer: Writer,
        account: Account,
        card: Card,
        request: AuthorizationRequest,
        amount: int,
        key: bytes,
        batch: Batch,
    ) -> Hold:
        hold_id = writer.next_hold_id()
        now_ms = batch.now_ms
        lifetime = self._hold_lifetime_by_mcc_ms.get(request.mcc, self._hold_lifetime_ms)
        hold = Hold(
            hold_id=hold_id,
            account_id=account.id,
            card_id=card.card_id,
            amount=amount,
            currency=account.currency,
            created_ms=now_ms,
            expires_ms=now_ms + lifetime,
            approval_code=self._approval_code(writer, card, batch),
            identity=key,
            mcc=request.mcc,
            rrn=request.rrn,
        )
        writer.open_hold(account, hold)
        writer.put_account(account)
        return hold

    def _approval_code(self, writer: Writer, card: Card, batch: Batch) -> str:
        return new_approval_code(writer.changed_card_state(card), batch.periods.daily, self._draw)

    def _decided(
        self,
        writer: Writer,
        request: AuthorizationRequest,
        card_key: bytes,
        batch: Batch,
    ) -> tuple[Card | None, Account | None, Decision, CardCheck | None]:
        card = writer.card(card_key)
        if card is None:
            return None, None, decide(request, None, None, self._rules, batch.now_yymm), None
        account = writer.account(card.account_id)
        if account is None:
            return card, None, decide(request, card, None, self._rules, batch.now_yymm), None
        state = writer.card_state(card)
        spend = Spend(
            batch.programme,
            usage_of(state),
            usage_of(account),
            batch.periods,
            state.sca_exempt_count,
            state.sca_exempt_amount,
        )
        check = self._card_check(request, card, state)
        # Read only where it can decide: a card or account not active is declined before.
        rejected = card.status == account.status == "active" and (
            _holder_rejected(writer, card.cardholder_id)
            or (
                account.cardholder_id != card.cardholder_id
                and _holder_rejected(writer, account.cardholder_id)
            )
        )
        decision = decide(
            request, card, account, self._rules, batch.now_yymm, spend, check, rejected
        )
        return card, account, decision, check

    def _card_check(
        self, request: AuthorizationRequest, card: Card, state: CardState
    ) -> CardCheck | None:
        """The CVC2 sent, checked with the card's key; None when there is nothing to weigh."""
        blocked = 0 < self._cvc2_attempts_max <= state.cvc2_failures
        sent = request.cvc2
        key = card.cvc2_key
        if sent is None:
            if self._cvc2_required and key is not None and _cvc2_expected(request):
                return CardCheck("missing", blocked)
            return CardCheck(None, blocked) if blocked else None
        if key is None:  # registered or loaded: the processor does not know its CVC2
            return CardCheck("not_checked", blocked)
        matched = self._card_keys.verify(key, request.pan, card.expiry, sent)
        if matched is None:
            return CardCheck("key_unavailable", blocked)
        return CardCheck("match" if matched else "mismatch", blocked)

    @staticmethod
    def _count_sca_exemption(
        writer: Writer, card: Card, request: AuthorizationRequest, decision: Decision
    ) -> None:
        """Low-value exemptions add up until the cardholder next authenticates (specs/sca.md)."""
        if decision.low_value_exemption:
            state = writer.changed_card_state(card)
            state.sca_exempt_count += 1
            state.sca_exempt_amount += decision.hold_amount
        elif request.cardholder_authenticated and writer.card_state(card).sca_exempt_count:
            state = writer.changed_card_state(card)
            state.sca_exempt_count = state.sca_exempt_amount = 0

    def _count_cvc2(
        self, writer: Writer, card: Card, decision: Decision, result: Result, batch: Batch
    ) -> None:
        """Mismatches in a row lock card-not-present use at the limit (with an event); an
        approval or an account verification (how a merchant or a wallet checks a CVC2 before
        it keeps the card) with a matching CVC2 starts the count again."""
        if decision.reason == "cvc2_mismatch":
            state = writer.changed_card_state(card)
            state.cvc2_failures += 1
            if state.cvc2_failures == self._cvc2_attempts_max:
                result.event_after = change_event(
                    "card.cvc2_locked", "cvc2_attempts_exceeded", batch.now_ms, card=card
                )
        elif (
            (decision.approved or decision is ACCOUNT_VERIFIED)
            and result.cvc2 == "match"
            and writer.card_state(card).cvc2_failures
        ):
            writer.changed_card_state(card).cvc2_failures = 0

    def apply_cvc2_limit(self, writer: Writer, now_ms: int) -> int:
        """Record the limit as configured now; when it is lower than the one the ledger last
        ran with (or the lock was off), the cards it locks from now on get the
        `card.cvc2_locked` event no decline gave them. Scans the cards only then. Returns how
        many were locked.

        Not the other way: a raised limit unlocks cards without an event (the programme is
        not misled: it may reset any card it likes). A ledger that never recorded a limit
        records this one and locks nothing: what its counts were held against is not known.
        """
        limit = self._cvc2_attempts_max
        before = writer.cvc2_attempts_max()
        if before == limit:
            return 0
        writer.put_cvc2_attempts_max(limit)
        if before is None or limit == 0 or 0 < before < limit:
            return 0
        locked = 0
        for card in writer.cards():
            failures = writer.card_state(card).cvc2_failures
            if limit <= failures and (before == 0 or failures < before):
                writer.emit_change(now_ms, "card.cvc2_locked", "cvc2_attempts_exceeded", card=card)
                locked += 1
        return locked

    # --- spend-control usage --------------------------------------------------------------------

    def _count_usage(
        self, writer: Writer, card: Card, account: Account, amount: int, mcc: str, batch: Batch
    ) -> None:
        state = writer.changed_card_state(card)
        # At the time its answer will carry (moved past a load only just committed), so that
        # its reversal gives it back to the periods and the window time it was counted in.
        at_ms = answer_time(batch.now_ms, state, account)
        periods = batch.periods if at_ms == batch.now_ms else periods_at(at_ms, self._zone)
        record_usages(
            (usage_of(state), usage_of(account)),
            amount,
            self._rules.catalog.category(mcc),
            periods,
        )
        writer.put_account(account)

    def _give_back_usage(
        self,
        writer: Writer,
        card_key: bytes,
        original: StoredAnswer,
        amount: int,
        full: bool,
        batch: Batch,
    ) -> None:
        """A reversal returns what the original counted: `amount`, and the approval when full."""
        if not original.usage_mcc or original.card_id is None or original.account_id is None:
            return  # never counted (declined, or answered before controls existed)
        amount = min(amount, original.usage_amount)
        if amount <= 0 and not full:
            return
        category = self._rules.catalog.category(original.usage_mcc)
        approved = periods_at(original.answered_ms, self._zone)
        count = 1 if full else 0
        # The amount comes back only to usage whose amounts have counted since the approval:
        # a load since may have changed the account's currency, or moved the card to an
        # account of another (and maybe back): its amounts then started again at zero, and
        # giving back minor units counted before would free allowance the cardholder never
        # had. The approval's count and time come back whatever the currency.
        answered = original.answered_ms
        card = writer.card_of(original.card_id, card_key)
        if card is not None:
            state = writer.changed_card_state(card)
            given = amount if state.usage_since_ms <= answered else 0
            release_usage(usage_of(state), given, count, category, approved, batch.periods)
        account = writer.account(original.account_id)
        if account is not None:
            given = amount if account.counts_in_its_currency(answered) else 0
            release_usage(usage_of(account), given, count, category, approved, batch.periods)
            writer.put_account(account)
        original.usage_amount -= amount
        if full:
            original.usage_mcc = ""  # given back whole: nothing more to return, ever

    # --- 0100 authorisation (holds) and 0200 financial request (posts at once) -----------------

    def authorization(
        self,
        writer: Writer,
        request: AuthorizationRequest,
        card_key: bytes,
        key: bytes,
        batch: Batch,
    ) -> Result:
        return self._decided_result(writer, request, card_key, key, batch, post=False)

    def financial(
        self,
        writer: Writer,
        request: AuthorizationRequest,
        card_key: bytes,
        key: bytes,
        batch: Batch,
    ) -> Result:
        return self._decided_result(writer, request, card_key, key, batch, post=True)

    def _decided_result(
        self,
        writer: Writer,
        request: AuthorizationRequest,
        card_key: bytes,
        key: bytes,
        batch: Batch,
        *,
        post: bool,
    ) -> Result:
        card, account, decision, check = self._decided(writer, request, card_key, batch)
        result = Result(
            decision.response_code,
            decision.reason,
            account_id=account.id if account is not None else None,
            card_id=card.card_id if card is not None else None,
        )
        if card is not None and check is not None and check.cvc2 is not None:
            result.cvc2 = check.cvc2
            self._count_cvc2(writer, card, decision, result, batch)
        if decision.hold_amount:
            assert account is not None and card is not None
            currency = numeric_code(account.currency)
            result.extra = approved_fields(
                decision.response_code,
                decision.hold_amount,
                decision.billing_amount,
                currency,
            )
            if (
                decision.response_code == "10"
                and decision.billing_amount is None
                and request.billing_currency == currency
                and request.billing_amount is not None
            ):
                # Partial, in the account's own currency, with the network's field 6 in it
                # too (as Mastercard sends it): the echo would say the whole amount asked.
                result.extra["6"] = f"{decision.hold_amount:012d}"
            self._count_usage(writer, card, account, decision.hold_amount, request.mcc, batch)
            self._count_sca_exemption(writer, card, request, decision)
            result.usage_amount = decision.hold_amount
            result.usage_mcc = request.mcc
            if post:
                account.posted -= decision.hold_amount
                writer.put_account(account)
                result.posted_amount = decision.hold_amount
                result.extra["38"] = self._approval_code(writer, card, batch)
            else:
                hold = self._hold(writer, account, card, request, decision.hold_amount, key, batch)
                result.hold_id = hold.hold_id
                result.extra["38"] = hold.approval_code
        elif decision.balance_inquiry:
            assert account is not None and card is not None
            result.extra = {
                "54": balances(
                    request.processing_code[2:4],
                    numeric_code(account.currency),
                    account.posted,
                    account.available,
                ),
                # An approval carries its code (DESIGN.md, wire contract; the networks' hosts
                # expect field 38 whenever 39 is 00), though it holds nothing.
                "38": self._approval_code(writer, card, batch),
            }
        return result

    # --- 0120: the network stood in and approved -----------------------------------------------

    def stand_in_advice(
        self,
        writer: Writer,
        request: AuthorizationRequest,
        card_key: bytes,
        key: bytes,
        batch: Batch,
    ) -> Result:
        # Advices are always acknowledged (00): the cardholder already has the goods. What we
        # could not record is flagged in the reason, never refused.
        card = writer.card(card_key)
        if request.network_response_code not in (None, "00", "10"):
            # About the card's account all the same: its event belongs in that account's
            # stream (an event of no account reaches the programme's lane only).
            return Result(
                "00",
                "advice_of_decline",
                card_id=None if card is None else card.card_id,
                account_id=None if card is None else card.account_id,
            )
        if card is None:
            return Result("00", "advice_unknown_card")
        if request.transaction_type not in SPEND_TRANSACTION_TYPES:
            # A refund (20) stood in for is a credit that clearing brings, a balance inquiry
            # (31) moves nothing: held as a purchase, either took the cardholder's money.
            return Result(
                "00",
                "advice_unsupported_processing_code",
                card_id=card.card_id,
                account_id=card.account_id,
            )
        approval = self._issuer_approval(writer, request, card)
        if approval is not None:
            return approval
        account = writer.account(card.account_id)
        if account is None:
            return Result("00", "advice_account_missing", card_id=card.card_id)
        if not request.amount:
            return Result(
                "00", "advice_invalid_amount", account_id=account.id, card_id=card.card_id
            )
        amount = billing_amount(request, account, self._rules)
        if amount is None:
            return Result(
                "00", "advice_currency_not_supported", account_id=account.id, card_id=card.card_id
            )
        if amount <= 0:  # a billing amount of 0, or converted to less than a minor unit
            return Result(
                "00", "advice_invalid_amount", account_id=account.id, card_id=card.card_id
            )
        hold = self._hold(writer, account, card, request, amount, key, batch)
        # Spent is spent: a stand-in approval counts against the controls' usage (it was never
        # checked against them), so later authorisations see it.
        self._count_usage(writer, card, account, amount, request.mcc, batch)
        reason = "stand_in_approved" if account.available >= 0 else "stand_in_overdrawn"
        result = Result(
            "00",
            reason,
            account_id=account.id,
            card_id=card.card_id,
            hold_id=hold.hold_id,
            usage_amount=amount,
            usage_mcc=request.mcc,
        )
        currency = numeric_code(account.currency)
        converted_here = request.currency != currency and network_billing(request, account) is None
        if converted_here and amount <= AMOUNT_MAX:
            # The answer says what was held, in fields 6 and 51 as an approval's do (a partial
            # reversal scales field 95 by them, the event shows them). Past 12 digits they
            # cannot be said; the hold stands.
            result.extra = approved_fields("00", amount, amount, currency)
        return result

    @staticmethod
    def _issuer_approval(
        writer: Writer, request: AuthorizationRequest, card: Card
    ) -> Result | None:
        """An 0120 about an 0100 this issuer approved (its answer reached the network too late,
        and the network stood in): that approval's hold, open or captured, holds the money
        already, and a second hold would take it twice. Acknowledged, naming the hold; or
        about a purchase posted already (below). None when there is neither (declined,
        unknown, or its hold released or expired: then the network's stand-in is the only
        approval, and opens its own hold)."""
        key = transaction_key("0100", request.acquirer, request.stan, request.transmission_datetime)
        answer = writer.answer(key)
        if (
            answer is not None
            and answer.reason == REVERSED_BEFORE_ORIGINAL
            and answer.card_id in (None, card.card_id)
        ):
            # The network reversed the 0100 before either it or this advice of its stand-in
            # came: the approval was undone, and a hold now would stand until it expired.
            return Result(
                "00",
                "advice_after_reversal",
                account_id=card.account_id,
                card_id=card.card_id,
                rrn_indexed=False,
            )
        hold = writer.hold_of(key, answer)
        if (
            hold is not None
            and hold.status in ("open", "captured")
            and hold.card_id == card.card_id
        ):
            return Result(
                "00",
                ADVICE_OF_APPROVAL,
                account_id=hold.account_id,
                card_id=card.card_id,
                hold_id=hold.hold_id,
                rrn_indexed=False,
            )
        # Posted already, without a hold: a 0220 or a presentment came before the advice (its
        # 0100 declined, or never seen; found by the 0100's key or through the RRN). A stand-in
        # hold would take the money a second time until it expired.
        posted = answer if answer is not None and answer.posted_amount else None
        if posted is None and request.rrn_key is not None:
            indexed = writer.answer_by_rrn(request.rrn_key)
            found = None if indexed is None else writer.answer(indexed)
            if found is not None and found.posted_amount and found.hold is None:
                posted = found
        if posted is not None and posted.card_id in (None, card.card_id):
            return Result(
                "00",
                ADVICE_OF_POSTING,
                account_id=card.account_id,
                card_id=card.card_id,
                rrn_indexed=False,
            )
        return None

    # --- matching an original ------------------------------------------------------------------

    @staticmethod
    def _card_mismatch(
        writer: Writer, card_key: bytes, original: StoredAnswer | None
    ) -> Result | None:
        """A completion or reversal whose original is another card's: acknowledged (advices)
        and applied never, as clearing rejects it (`card_mismatch`), or card A's message would
        capture, post against or release card B's money."""
        if original is None or original.card_id is None:
            return None
        card = writer.card(card_key)
        if card is not None and card.card_id == original.card_id:
            return None
        return Result("00", "card_mismatch", card_id=None if card is None else card.card_id)

    @staticmethod
    def _converted(writer: Writer, original: StoredAnswer) -> bool:
        """Whether the original's amount was converted into its account's currency."""
        account = writer.account(original.account_id) if original.account_id else None
        currency = original.response.get("49")
        return account is not None and currency != numeric_code(account.currency)

    def _original(
        self, writer: Writer, request: AuthorizationRequest
    ) -> tuple[bytes, StoredAnswer] | None:
        pointed = request.original_key()
        if pointed is not None:
            # A usable field 90 decides alone: falling back to acquirer + STAN + RRN after it
            # named something else could reverse or capture the wrong transaction.
            message_class, key = pointed
            if message_class not in ORIGINAL_CLASSES:
                return None  # a reversal or completion is nobody's original
            return confirmed_original(writer, key, writer.answer(key))
        lookup = request.rrn_key
        if lookup is not None:
            indexed = writer.answer_by_rrn(lookup)
            if indexed is not None:
                answer = writer.answer(indexed)
                if answer is not None:
                    return confirmed_original(writer, indexed, answer)
        return None

    # --- 0220: completion advice ----------------------------------------------------------------

    @staticmethod
    def _about_card(writer: Writer, card_key: bytes, reason: str) -> Result:
        """An acknowledgement that changes nothing, about the card's account all the same: its
        event belongs in that account's stream (one of no account reaches the programme's
        lane only)."""
        card = writer.card(card_key)
        if card is None:
            return Result("00", reason)
        return Result("00", reason, card_id=card.card_id, account_id=card.account_id)

    def completion(
        self,
        writer: Writer,
        request: AuthorizationRequest,
        card_key: bytes,
        key: bytes,
        batch: Batch,
    ) -> Result:
        if not request.amount:  # absent, not digits, or 0: nothing to capture or post
            return self._about_card(writer, card_key, "completion_invalid_amount")
        if request.transaction_type not in SPEND_TRANSACTION_TYPES:
            # A refund's completion (20) is a credit that clearing brings: captured or posted
            # as a purchase, it took the money the cardholder was to get back.
            return self._about_card(writer, card_key, "completion_unsupported_processing_code")
        found = self._original(writer, request)
        original_key, original = found if found is not None else (b"", None)
        mismatch = self._card_mismatch(writer, card_key, original)
        if mismatch is not None:
            return mismatch
        hold = writer.hold_of(original_key, original)
        verdict = capture_verdict(original, hold)
        if verdict == "already_posted":
            assert original is not None
            return Result(
                "00", "already_posted", account_id=original.account_id, card_id=original.card_id
            )
        if verdict == "repost":
            return self._post_again(writer, request, original_key, original, batch)
        if verdict == "already_captured":
            assert hold is not None
            return Result(
                "00",
                "already_captured",
                account_id=hold.account_id,
                card_id=hold.card_id,
                hold_id=hold.hold_id,
            )
        if verdict == "capture":
            assert hold is not None
            account = writer.account(hold.account_id)
            assert account is not None, hold.account_id
            amount = billing_amount(request, account, self._rules)
            if amount is None:
                # No way to price the final amount: capture what was held, and say so.
                amount = hold.amount
            if amount <= 0:  # converted to less than a minor unit: nothing to capture
                return Result(
                    "00", "completion_invalid_amount", account_id=account.id, card_id=hold.card_id
                )
            writer.capture_hold(account, hold, amount, batch.now_ms)
            writer.put_account(account)
            return Result(
                "00",
                "captured",
                account_id=account.id,
                card_id=hold.card_id,
                hold_id=hold.hold_id,
                posted_amount=amount,
                billed=_billed(request, account, amount),
            )
        # No original, or its hold was reversed or expired before the merchant completed: the
        # network's word stands, post it as it is.
        card = writer.card(card_key)
        account = writer.account(card.account_id) if card is not None else None
        if card is None or account is None:
            return Result("00", "completion_unknown_card")
        amount = billing_amount(request, account, self._rules)
        if amount is None:
            return Result(
                "00",
                "completion_currency_not_supported",
                account_id=account.id,
                card_id=card.card_id,
            )
        if amount <= 0:
            return Result(
                "00", "completion_invalid_amount", account_id=account.id, card_id=card.card_id
            )
        lookup = None
        named = request.original_key()
        if original is None and named is not None and named[0] in ORIGINAL_CLASSES:
            # Field 90 names an original nobody answered: the posting is marked under its key
            # (and the original's acquirer, STAN and RRN), for its presentment to find.
            original_key = named[1]
            data = request.original_data or ""
            lookup = rrn_key(data[20:31], data[4:10], request.rrn) if request.rrn else None
        elif (
            original is None
            and request.rrn_key is not None
            and writer.answer_by_rrn(request.rrn_key) is None
        ):
            # No field 90: this answer (posted_amount, stored next) stands for the original
            # its acquirer, STAN and RRN name, unless something else already does.
            writer.index_rrn(request.rrn_key, key)
        writer.force_post(
            account,
            amount,
            original_key,
            original,
            card_id=card.card_id,
            now_ms=batch.now_ms,
            rrn=request.rrn,
            rrn_lookup=lookup,
        )
        return Result(
            "00",
            "force_post",
            account_id=account.id,
            card_id=card.card_id,
            posted_amount=amount,
            billed=_billed(request, account, amount),
        )

    def _post_again(
        self,
        writer: Writer,
        request: AuthorizationRequest,
        original_key: bytes,
        original: StoredAnswer | None,
        batch: Batch,
    ) -> Result:
        """A completion of a purchase posted at once (0200) and reversed since (settle's
        `repost`): the network's word stands over the reversal, as it does over a released
        hold; what its amount is above what still stands of the original is posted."""
        assert original is not None and original.account_id is not None
        account = writer.account(original.account_id)
        assert account is not None, original.account_id
        card_id = original.card_id
        if not account.counts_in_its_currency(original.answered_ms):
            return Result("00", "currency_changed", account_id=account.id, card_id=card_id)
        amount = billing_amount(request, account, self._rules)
        if amount is None:
            reason = "completion_currency_not_supported"
            return Result("00", reason, account_id=account.id, card_id=card_id)
        debit = repost_amount(original, amount)
        if not debit:
            return Result("00", "already_posted", account_id=account.id, card_id=card_id)
        writer.post_again(account, debit, original_key, original, batch.now_ms)
        return Result(
            "00",
            "force_post",
            account_id=account.id,
            card_id=card_id,
            posted_amount=debit,
            billed=_billed(request, account, debit),
        )

    # --- 0400 / 0420: reversal and reversal advice ----------------------------------------------

    def reversal(
        self,
        writer: Writer,
        request: AuthorizationRequest,
        card_key: bytes,
        key: bytes,
        batch: Batch,
    ) -> Result:
        advice = request.message_class == "0420"
        found = self._original(writer, request)
        if found is not None and found[1].reason == REVERSED_BEFORE_ORIGINAL:
            found = None  # an earlier reversal's mark: the original is still unseen
        if found is None:
            card = writer.card(card_key)  # a known card's: its account's event stream has it
            code, reason = ("00", "orphan_reversal") if advice else ("25", "original_not_found")
            named = request.original_key()
            if card is not None and named is not None and named[0] in ORIGINAL_CLASSES:
                writer.mark_reversed_unseen(
                    named[1], card_id=card.card_id, account_id=card.account_id, now_ms=batch.now_ms
                )
            return Result(
                code,
                reason,
                card_id=None if card is None else card.card_id,
                account_id=None if card is None else card.account_id,
            )
        original_key, original = found
        mismatch = self._card_mismatch(writer, card_key, original)
        if mismatch is not None:
            return mismatch if advice else Result("25", "original_not_found")
        account_id, card_id = original.account_id, original.card_id
        replacement = request.replacement_amount()
        target = replacement if replacement else 0  # what the transaction should now be worth
        original_amount, billed = original.response.get("4"), original.response.get("6")
        if (
            target
            and billed
            and original_amount
            and original_amount.isdigit()
            and self._converted(writer, original)
        ):
            # The original was converted: field 95 is in the transaction currency, the hold in
            # the account's. Scale by the original's own rate, not today's. (Field 6 alone
            # does not say so: a request may carry it in the account's own currency, and a
            # partial approval's field 4 is then what was approved, not what was asked.)
            target = scale(target, int(billed), int(original_amount))
        elif target and not billed and self._converted(writer, original):
            # Converted, but by how much is not kept (a stand-in past what field 6 carries):
            # field 95 cannot be put in the account's currency. The hold stays whole rather
            # than shrink by an amount of another currency (it released nearly all of it).
            target = max(target, limits.account_posted_max)  # above any hold: no change
        hold = writer.hold_of(original_key, original)
        verdict = void_verdict(original, hold, target)
        if verdict.action in ("release", "shrink"):
            assert hold is not None
            account = writer.account(hold.account_id)
            assert account is not None, hold.account_id
            self._give_back_usage(writer, card_key, original, verdict.amount, verdict.whole, batch)
            if verdict.action == "release":
                writer.close_hold(account, hold, "released", batch.now_ms)
            else:
                writer.shrink_hold(account, hold, verdict.remaining)
            writer.put_account(account)
            writer.put_answer(original_key, original)  # what is left of its usage
            reason = "reversed" if verdict.whole else "partially_reversed"
            return Result(
                "00",
                reason,
                hold_id=hold.hold_id,
                account_id=account_id,
                card_id=card_id,
                billed=_billed(request, account, verdict.amount),
            )
        if verdict.action == "credit":
            assert original.account_id is not None
            account = writer.account(original.account_id)
            assert account is not None, original.account_id
            if not account.counts_in_its_currency(original.answered_ms):
                # Posted in the currency the account had before a load changed it: crediting
                # those minor units in the new one would be another sum of money. Nothing is
                # applied; the event tells the programme, whose backend settles it by hand.
                return Result("00", "currency_changed", account_id=account_id, card_id=card_id)
            account.posted += verdict.amount
            writer.put_account(account)
            self._give_back_usage(writer, card_key, original, verdict.amount, verdict.whole, batch)
            original.reversed_amount += verdict.amount
            writer.put_answer(original_key, original)
            reason = "reversed" if verdict.whole else "partially_reversed"
            return Result(
                "00",
                reason,
                account_id=account_id,
                card_id=card_id,
                billed=_billed(request, account, verdict.amount),
            )
        if verdict.action == "original_declined":
            return Result("00", "original_declined", account_id=account_id, card_id=card_id)
        if verdict.action in ("already_resolved", "no_change"):
            # Either way the hold (if any) is named, so the event ties it to the reversal.
            reason = "reversal_no_change" if verdict.action == "no_change" else "already_resolved"
            return Result(
                "00", reason, hold_id=original.hold_id, account_id=account_id, card_id=card_id
            )
        return Result("00", "nothing_to_reverse", account_id=account_id, card_id=card_id)
