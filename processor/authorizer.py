"""Applies decoded requests to the ledger: prefetch, decide, apply, answer.

A batch of financial-class requests is handled in ONE LMDB write transaction: for each request
in arrival order, look up a stored answer (retransmission, or 94 when the content differs), run
the handler of its message class (processor/lifecycle.py) and store the answer. Requests later
in the batch see the changes of earlier ones because they read through the same write
transaction. Nothing here awaits, so what
was checked stays true until it is written.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, tzinfo
from typing import Final

import lmdb
import msgspec

from processor import limits
from processor.cvc2 import NO_KEYS, CardVerificationKeys
from processor.engine import ProgrammeRules, yymm
from processor.engine.controls import periods_at
from processor.ledger.records import OutboxRecord, StoredAnswer
from processor.ledger.retention import Retention, SweepStep
from processor.ledger.store import (
    REVERSED_BEFORE_ORIGINAL,
    Ledger,
    LedgerError,
    LedgerFull,
    Writer,
)
from processor.lifecycle import ADVICE_CLASSES, ORIGINAL_CLASSES, Batch, Lifecycle
from processor.outbox import event_type, request_facts
from processor.security import PanHasher
from processor.wire.errors import InvalidMessage
from processor.wire.messages import (
    AuthorizationRequest,
    NetworkManagementRequest,
    UnsupportedRequest,
)
from processor.wire.responses import (
    format_error_response,
    replayed_response,
    reply_fields,
    stored_response,
)

log = logging.getLogger("processor.authorizer")

NETWORK_CODES: Final = {"001": "sign_on", "002": "sign_off", "301": "echo"}


class CommandRefused(Exception):
    """A control-API command that found it cannot apply; raised before it wrote anything.

    Carries what the API's error body says: HTTP status, stable code, message, and the field
    at fault and further details when there are.
    """

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        field: str | None = None,
        details: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.details = details


# A change from the control API, applied inside a batch's write transaction at `now_ms`.
Command = Callable[[Writer, int], object]


class Outcome(msgspec.Struct, frozen=True, gc=False):
    """What to answer: the response's fields, which the link encodes in its listener's dialect
    after the commit, and for metrics and logs the request MTI, code and reason (no PAN)."""

    fields: dict[str, str]  # the response's fields, the PAN (field 2) included
    mti: str
    response_code: str
    reason: str


class _StepFailed(Exception):
    """A retention step failed inside a batch's transaction: the batch runs again without it."""


class _CommandFailed(Exception):
    """A control-API command raised what no command should (a bug, not a refusal): the batch
    runs again without it, and its caller gets the error (a 500). Failing the batch cost every
    authorisation in it a 96."""

    def __init__(self, index: int, error: Exception) -> None:
        super().__init__(f"command {index} failed: {error!r}")
        self.index = index
        self.error = error


class Authorizer:
    def __init__(
        self,
        ledger: Ledger,
        hasher: PanHasher,
        rules: ProgrammeRules,
        *,
        hold_lifetime_seconds: int,
        hold_lifetime_by_mcc: Mapping[str, int] | None = None,
        zone: tzinfo = UTC,
        draw: Callable[[int], int] | None = None,
        retention: Retention | None = None,
        expire_in_batches: bool = False,
        retention_every_seconds: float = limits.retention_step_seconds,
        card_keys: CardVerificationKeys = NO_KEYS,
        cvc2_attempts_max: int = 3,
        cvc2_required_card_not_present: bool = False,
    ) -> None:
        self._ledger = ledger
        # The ledger's upkeep rides in each batch's write transaction (no commit or fsync of
        # its own, work in proportion to the batch): holds past their expiry are released and
        # records past their retention horizon pruned, a bounded number each.
        self._retention = retention
        self._expire_in_batches = expire_in_batches
        self._retention_done: SweepStep | None = None  # committed, not yet counted
        # A step rides in a batch at most this often, with the budget the events since the
        # last one earned: deletes of neighbouring records then share their pages' copies.
        self._retention_every = retention_every_seconds
        self._retention_at = -float("inf")  # time.monotonic() of the last step
        self._expired_done = 0  # holds released in committed batches, not yet counted
        self._hasher = hasher
        self._zone = zone
        self._lifecycle = Lifecycle(
            rules,
            hold_lifetime_seconds=hold_lifetime_seconds,
            hold_lifetime_by_mcc=hold_lifetime_by_mcc or {},
            zone=zone,
            draw=draw,
            card_keys=card_keys,
            cvc2_attempts_max=cvc2_attempts_max,
            cvc2_required_card_not_present=cvc2_required_card_not_present,
        )
        self._fingerprint_encoder = msgspec.msgpack.Encoder()

    # --- messages that never touch the ledger -------------------------------------------------

    def network_management(self, request: NetworkManagementRequest) -> Outcome:
        reason = NETWORK_CODES.get(request.code)
        if reason is None:
            return self._reply(request.echo, request.mti, "12", "unsupported_network_code")
        return self._reply(request.echo, request.mti, "00", reason)

    def unsupported(self, request: UnsupportedRequest) -> Outcome:
        return self._reply(request.echo, request.mti, "12", "unsupported_mti")

    def format_error(self, error: InvalidMessage) -> Outcome:
        return Outcome(format_error_response(error), error.mti, "30", "format_error")

    # --- authorisations ----------------------------------------------------------------------

    def authorize_batch(
        self, requests: Sequence[AuthorizationRequest], now: datetime
    ) -> list[Outcome]:
        """Decide and apply `requests` in one durable write transaction.

        Returns one outcome per request, in order, only after the commit; on a ledger failure
        nothing is applied and every request is answered 96.
        """
        return self.run_batch(requests, (), now)[0]

    def run_batch(
        self,
        requests: Sequence[AuthorizationRequest],
        commands: Sequence[Command],
        now: datetime,
    ) -> tuple[list[Outcome], list[object]]:
        """Control-API commands, then requests, in one durable write transaction.

        Commands go first, so an authorisation in the same batch already sees a freeze or a
        new control. Each command's result is its return value or the CommandRefused it
        raised (a command checks before it writes, so a refusal leaves nothing behind), or
        the exception of a bug in it (the batch then runs again without it). On a
        ledger failure nothing is applied: requests are answered 96 and every command's result
        is the error.
        """
        now_ms = int(now.timestamp() * 1000)
        now_yymm = yymm(now.astimezone(UTC))
        periods = periods_at(now_ms, self._zone)
        # Work that needs no ledger is done before the write transaction, and the answers are
        # encoded by the links after the commit: with worker processes the writer lock is held
        # for the ledger work alone, so the other workers' hashing and encoding run meanwhile.
        prepared = []
        for request in requests:
            card_key = self._hasher.card_key(request.pan)
            prepared.append((request, card_key, self._fingerprint(card_key, request)))

        failed: dict[int, Exception] = {}  # commands left out of the attempts after their bug

        def apply(writer: Writer) -> tuple[list[Outcome], list[object]]:
            results: list[object] = []
            at_ms = writer.ledger_time(now_ms)  # not behind an earlier batch's
            batch_periods, batch_yymm = periods, now_yymm
            if at_ms != now_ms:
                batch_periods = periods_at(at_ms, self._zone)
                batch_yymm = yymm(datetime.fromtimestamp(at_ms / 1000, UTC))
            for index, command in enumerate(commands):
                if index in failed:
                    results.append(failed[index])
                    continue
                try:
                    results.append(command(writer, at_ms))
                except CommandRefused as refused:
                    results.append(refused)
                except (lmdb.MapFullError, LedgerError, AssertionError):
                    raise  # the map grows (or 96 for all at its ceiling), a broken invariant
                except Exception as error:
                    # Any other LMDB error of a command too (a key it made too long, a put it
                    # made on the wrong database): the attempt is aborted with its transaction,
                    # and one the ledger itself caused (a disk error) recurs in the rerun,
                    # whose requests are then answered 96 as before. Raised through, a
                    # command's own mistake cost every authorisation in its batch a 96.
                    raise _CommandFailed(index, error) from error
            batch = Batch(at_ms, batch_yymm, batch_periods, writer.programme_controls())
            outcomes = [self._process(writer, *each, batch) for each in prepared]
            changes = len(prepared) + len(commands)
            expired[0] = 0
            if self._expire_in_batches:
                # Not guarded like retention: half a release would leave held out of step with
                # the holds, so a bug in it fails the batch as a whole, as one in a request does.
                expired[0] = self._expire(writer, at_ms, limits.expiry_per_change * changes)
            swept.clear()
            swept.extend(self._sweep(writer, at_ms))
            return outcomes, results

        swept: list[SweepStep] = []  # of the attempt that committed
        expired = [0]
        try:
            # A batch that does not fit is decided again from the start with a larger map.
            # A lone request, or two or three, is answered after the write-ahead log's single
            # flush; a larger batch shares one LMDB commit already, and logging it ahead would
            # add a flush (limits.logged_batch_requests_max).
            log_ahead = len(requests) + len(commands) < limits.logged_batch_requests_max
            while True:  # each command fails at most once; a failed step pauses the steps
                try:
                    done = self._ledger.write_growing(apply, log_ahead=log_ahead)
                    break
                except _StepFailed:
                    # Nothing of that attempt was applied: the batch alone, decided again
                    # (steps are paused now, so this attempt takes none).
                    continue
                except _CommandFailed as failure:
                    log.error(
                        "a control API command failed inside a batch (a bug, or an LMDB error "
                        "its caller gets as a 503; nothing of it is applied); the batch runs "
                        "again without it",
                        exc_info=failure.error,
                    )
                    failed[failure.index] = failure.error
            self._note_swept(swept)
            self._expired_done += expired[0]
            return done
        except LedgerFull as full:  # at the ceiling: 96, not stored
            outcomes = [self._reply(r.echo, r.mti, "96", "ledger_full") for r in requests]
            return outcomes, [full] * len(commands)
        except (lmdb.Error, LedgerError) as error:
            reason = f"ledger_error:{type(error).__name__}"
            outcomes = [self._reply(r.echo, r.mti, "96", reason) for r in requests]
            return outcomes, [error] * len(commands)

    def _sweep(self, writer: Writer, now_ms: int) -> list[SweepStep]:
        """A retention step, at most every `retention_every_seconds` of batches, with the
        visits the ledger's new events earned since the last one (Retention.budget: events
        made by every process, worker processes included). A bug in it must not cost the
        batch: it is logged, steps pause for a while, and the batch runs again without it
        (_StepFailed): committed with the step's writes so far, it left pruned events with
        their answers kept, an RRN unindexed from an answer still stored."""
        if self._retention is None:
            return []
        now = time.monotonic()
        if now - self._retention_at < self._retention_every:
            return []
        self._retention_at = now
        try:
            budget = self._retention.budget(writer, limits.retention_visits_min)
            return [self._retention.step(writer, now_ms, budget)]
        except lmdb.Error:
            raise  # the transaction is unusable: the batch reruns or fails as a whole
        except Exception:
            log.exception(
                "retention step failed; the batch goes on without it, steps pause %d s",
                limits.retention_failure_pause_seconds,
            )
            self._retention_at = now + limits.retention_failure_pause_seconds
            raise _StepFailed from None

    def sweep_retention(self, now: datetime, budget: int) -> SweepStep | None:
        """One retention step in a write transaction of its own (when no batch ran lately),
        of at least `budget` visits per database (more when new events earned more)."""
        if self._retention is None:
            return None
        now_ms = int(now.timestamp() * 1000)
        retention = self._retention

        def step_alone(writer: Writer) -> SweepStep:
            return retention.step(writer, now_ms, retention.budget(writer, budget))

        step = self._ledger.write_growing(step_alone)
        self._note_swept([step])
        return step

    def _note_swept(self, steps: list[SweepStep]) -> None:
        for step in steps:
            if self._retention_done is None:
                self._retention_done = step
            else:
                self._retention_done.add(step)

    def take_expired(self) -> int:
        """Holds released in batches committed since the last call (for metrics)."""
        done, self._expired_done = self._expired_done, 0
        return done

    def take_retention_step(self) -> SweepStep | None:
        """What retention did in the transactions committed since the last call (for metrics)."""
        done, self._retention_done = self._retention_done, None
        return done

    def _process(
        self,
        writer: Writer,
        request: AuthorizationRequest,
        card_key: bytes,
        fingerprint: bytes,
        batch: Batch,
    ) -> Outcome:
        message_class = request.message_class
        key = request.answer_key
        stored = writer.answer(key)
        if (
            stored is not None
            and stored.reason == REVERSED_BEFORE_ORIGINAL
            and self._card_id(writer, card_key) != stored.card_id
        ):
            # Another card's reversal marked this identity: decided as new, its answer in
            # the mark's place.
            writer.replacing_answer(key)
            stored = None
        if stored is not None:
            if stored.fingerprint != fingerprint:
                # Same identity, other content: applied never. A request is declined 94; an
                # advice is acknowledged (a 94 would only make the network resend it forever)
                # and the conflict flagged. A marker (no request's fingerprint) means the
                # original came after its reversal or its posting: late, not a duplicate.
                code = "00" if message_class in ADVICE_CLASSES else "94"
                reason = (
                    "late_original" if not stored.fingerprint else "duplicate_different_content"
                )
                return self._reply(request.echo, request.mti, code, reason)
            code = stored.response_code
            fields = replayed_response(stored.response, request.echo, request.mti, code)
            return Outcome(fields, request.mti, code, "retransmission")

        handler = self._lifecycle.handlers[message_class]
        result = handler(writer, request, card_key, key, batch)
        now_ms = batch.now_ms
        fields = reply_fields(request.echo, request.mti, result.response_code)
        if result.extra:
            fields.update(result.extra)
        writer.record_answer(
            key,
            StoredAnswer(
                fingerprint=fingerprint,
                # Never the PAN; nothing a replay takes from the retransmission itself.
                response=stored_response(fields),
                response_code=result.response_code,
                reason=result.reason,
                answered_ms=now_ms,
                card_id=result.card_id,
                hold_id=result.hold_id,
                account_id=result.account_id,
                posted_amount=result.posted_amount,
                mti=request.mti,
                usage_amount=result.usage_amount,
                usage_mcc=result.usage_mcc,
            ),
            card_key,
        )
        writer.emit(
            request_facts(
                request,
                key,
                now_ms,
                fields,
                type=event_type(message_class, result.response_code, result.reason),
                card_id=result.card_id,
                account_id=result.account_id,
                cvc2=result.cvc2,
                billing_amount=result.billed,
            ),
        )
        if result.event_after is not None:
            writer.emit(result.event_after)
        if message_class in ORIGINAL_CLASSES and result.rrn_indexed:
            lookup = request.rrn_key
            if lookup is not None:
                writer.index_rrn(lookup, key)
        return Outcome(fields, request.mti, result.response_code, result.reason)

    def apply_cvc2_limit(self, now: datetime) -> int:
        """security.cvc2_attempts_max as configured now, recorded; the cards a lower one locks
        get their events (Lifecycle.apply_cvc2_limit). One write transaction at start."""
        now_ms = int(now.timestamp() * 1000)
        return self._ledger.write_growing(
            lambda writer: self._lifecycle.apply_cvc2_limit(writer, writer.ledger_time(now_ms))
        )

    def sweep_expired(self, now: datetime, limit: int) -> int:
        """Release at most `limit` holds whose expiry has passed, in one write transaction."""
        now_ms = int(now.timestamp() * 1000)
        with self._ledger.write() as writer:
            return self._expire(writer, writer.ledger_time(now_ms), limit)

    def _expire(self, writer: Writer, now_ms: int, limit: int) -> int:
        """Release at most `limit` holds whose expiry has passed, in `writer`'s transaction."""
        expired = writer.expired_holds(now_ms, limit)
        for hold in expired:
            account = writer.account(hold.account_id)
            assert account is not None, hold.account_id
            writer.close_hold(account, hold, "expired", now_ms)
            writer.put_account(account)
            writer.emit(
                OutboxRecord(
                    sequence=0,
                    type="authorization.expired",
                    created_ms=now_ms,
                    account_id=account.id,
                    card_id=hold.card_id,
                    answer_key=hold.identity.decode("ascii"),
                    amount=hold.amount,
                    reason="hold_expired",
                    approval_code=hold.approval_code,
                    hold_id=hold.hold_id,
                    mcc=hold.mcc,
                    rrn=hold.rrn,
                ),
            )
        return len(expired)

    def deadline_missed(self, request: AuthorizationRequest) -> Outcome:
        """91: not decided in time (the daemon is overloaded); nothing applied or stored, so a
        repeat is decided afresh."""
        return self._reply(request.echo, request.mti, "91", "issuer_deadline")

    def overloaded(self, request: AuthorizationRequest) -> Outcome:
        """91 at arrival: the queue ahead would outlast the deadline (or the link's queue is
        full); nothing applied or stored, so a repeat is decided afresh."""
        return self._reply(request.echo, request.mti, "91", "issuer_overloaded")

    def not_signed_on(self, request: AuthorizationRequest) -> Outcome:
        """91 on a link that must sign on first and has not: nothing applied or stored, so the
        network's repeat after its sign-on is decided (or, for an advice, recorded) afresh."""
        return self._reply(request.echo, request.mti, "91", "not_signed_on")

    def system_error(self, request: AuthorizationRequest) -> Outcome:
        return self._reply(request.echo, request.mti, "96", "internal_error")

    def _reply(self, echo: dict[str, str], mti: str, code: str, reason: str) -> Outcome:
        """The response MTI, the echoed fields and field 39; nothing stored, nothing applied."""
        return Outcome(reply_fields(echo, mti, code), mti, code, reason)

    @staticmethod
    def _card_id(writer: Writer, card_key: bytes) -> str | None:
        card = writer.card(card_key)
        return None if card is None else card.card_id

    def _fingerprint(self, card_key: bytes, request: AuthorizationRequest) -> bytes:
        # What makes two requests with one identity "the same": what the decision reads,
        # without the repeat bit of the MTI. Field 48 stays out: it may carry a CVC2, which must
        # not be kept even as a keyed digest. So a retransmission whose field 48 differs (a
        # 3-D Secure result added, subelements 42 and 22) gets the first answer: a merchant's
        # retry after an SCA soft decline is a new request, with an identity of its own.
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
            request.original_data,
            request.replacement_amounts,
            request.network_response_code,
        )
        return self._hasher.digest(self._fingerprint_encoder.encode(content))
