"""Retention: records past their horizon are pruned, a bounded number per write transaction.

Issue 12: the ledger's size must follow its retention horizons (config `[retention]`,
specs/retention.md), not its age. What the sweep prunes, and what it never prunes:

- **events** (the outbox), from the oldest: older than `events_seconds` and delivered to every
  endpoint (below the delivery floor: the lowest sequence an endpoint or a dead letter still
  names). An undelivered event is never pruned, however old.
- **answers** (with the hold they keep and their RRN index entry): older than
  `answers_seconds`, unless the hold is still open or an event still kept may refer to them
  (answered at or after the oldest event kept: events take their facts from their answer).
- **clearing records**: older than `clearing_seconds`.
- **idempotency responses**: older than `idempotency_seconds`.

Accounts, cards, card states and ledger entries (funding, debits) are never pruned: they are
the state, and the money movements a programme must be able to account for.

The answers, clearing and idempotency databases are keyed at random (or by field 7, a
network's clock), not by time, so each is swept by a clock hand: a cursor that walks the
whole database a few records per step and wraps around, visiting every record once per
cycle. Given more visits per step than records inserted, a record is pruned within a fraction
of a horizon after it passes it. The outbox is keyed by sequence, in time order, and is cut
from its start.

A step runs inside a write transaction the caller commits: the daemon runs one in each batch's
transaction (no commit or fsync of its own, work proportional to the batch) and one of its own
when no batch ran for a while. Its work is bounded by the `budget` of visits per database.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable
from typing import Final

import msgspec

from processor import limits
from processor.config import RetentionConfig
from processor.ledger.records import (
    AnswerTime,
    ClearedRecord,
    EventCodec,
    IdempotentResponse,
    StoredAnswer,
)
from processor.ledger.store import Cursor, Writer, answer_key_of

_U64 = struct.Struct(">Q")
# The record kinds as metrics label them.
RECORDS: Final = ("events", "answers", "clearing", "idempotency")
# Why a record past its horizon was kept.
KEPT_REASONS: Final = ("open_hold", "undelivered", "event_kept", "written_now", "unreadable")


class SweepStep(msgspec.Struct, kw_only=True):
    """What one step did, per record kind; counted by the caller once its transaction commits."""

    visited: dict[str, int] = msgspec.field(default_factory=dict)
    pruned: dict[str, int] = msgspec.field(default_factory=dict)
    kept: dict[tuple[str, str], int] = msgspec.field(default_factory=dict)  # (record, reason)
    wrapped: bool = False  # the answers' clock hand went round once more
    seconds: list[float] = msgspec.field(default_factory=list)  # each step's own time

    def add(self, other: SweepStep) -> None:
        for mine, theirs in ((self.visited, other.visited), (self.pruned, other.pruned)):
            for record, count in theirs.items():
                mine[record] = mine.get(record, 0) + count
        for why, count in other.kept.items():
            self.kept[why] = self.kept.get(why, 0) + count
        self.wrapped = self.wrapped or other.wrapped
        self.seconds.extend(other.seconds)

    def count(self, into: dict[str, int], record: str) -> None:
        into[record] = into.get(record, 0) + 1

    def keep(self, record: str, reason: str) -> None:
        self.kept[(record, reason)] = self.kept.get((record, reason), 0) + 1

    @property
    def busy(self) -> bool:
        """It pruned something: more may be due at once."""
        return any(self.pruned.values())


class Retention:
    def __init__(
        self,
        config: RetentionConfig,
        rrn_lookup: Callable[[str, str, str], bytes],
        delivery_floor: Callable[[], int | None] = lambda: None,
    ) -> None:
        self.config = config
        # The RRN index's key of (acquirer, STAN, RRN): the wire layer's format
        # (processor.wire.messages.rrn_key), which the ledger does not know.
        self._rrn_lookup = rrn_lookup
        # The lowest outbox sequence some webhook endpoint still needs (None: no endpoints).
        self._delivery_floor = delivery_floor
        self._hands: dict[str, bytes | None] = {}  # database -> the key its clock hand is at
        self._events_seen: int | None = None  # the ledger's event count at the last budget
        self._owed = 0  # visits earned by new events and not yet spent
        self._answer = msgspec.msgpack.Decoder(StoredAnswer)
        self._answer_time = msgspec.msgpack.Decoder(AnswerTime)
        self._events_codec = EventCodec()
        self._cleared = msgspec.msgpack.Decoder(ClearedRecord)
        self._idempotent = msgspec.msgpack.Decoder(IdempotentResponse)

    def budget(self, writer: Writer, least: int) -> int:
        """Visits per database for the next step: what the events made since the last call
        earned (`limits.retention_visits_per_event` each; by every process writing the ledger,
        worker processes too, so the sweep keeps up with all of them), plus at most
        `limits.retention_visits_step_max` of what is still owed, and at least `least`."""
        made = writer.events_made()
        earned = 0
        if self._events_seen is not None:
            earned = limits.retention_visits_per_event * max(0, made - self._events_seen)
        self._events_seen = made
        # What the events since the last step earned is spent now, whatever it is: a cap on
        # it would let the clock hand's round grow with the records it leaves, and those with
        # it (a soak of batches of 256 showed the answers outgrowing a cap of 512). Only what
        # earlier steps left (a long gap, a failed step) is spread over later ones.
        carried = min(limits.retention_visits_step_max, self._owed)
        self._owed -= carried
        # After a long gap (the primary idle while workers served) the new events alone can
        # be many: at most `retention_visits_step_ceiling` in one step, the rest owed.
        budget = min(limits.retention_visits_step_ceiling, earned + carried)
        self._owed += earned + carried - budget
        return max(least, budget)

    def step(self, writer: Writer, now_ms: int, budget: int) -> SweepStep:
        """Prune what is due, visiting at most `budget` records of each database."""
        started = time.perf_counter()
        done = SweepStep()
        if not self.config.enabled:
            return done
        oldest_event_ms, last_pruned = self._events(writer, now_ms, budget, done)
        if last_pruned:
            writer.note_pruned_events(last_pruned)
        self._answers(writer, now_ms, budget, oldest_event_ms, done)
        self._timed(writer, "clearing", now_ms - self.config.clearing_seconds * 1000, budget, done)
        cutoff = now_ms - self.config.idempotency_seconds * 1000
        self._timed(writer, "idempotency", cutoff, budget, done)
        done.seconds.append(time.perf_counter() - started)
        return done

    def _events(
        self, writer: Writer, now_ms: int, budget: int, done: SweepStep
    ) -> tuple[int | None, int]:
        """Cut the outbox's start. Returns when the oldest event kept was made (None: none kept)
        and the last sequence pruned (0: none)."""
        cutoff = now_ms - self.config.events_seconds * 1000
        floor = self._delivery_floor()
        cursor = writer.maintenance_cursor("outbox")
        last_pruned = 0
        if not cursor.first():
            return None, last_pruned
        for _ in range(budget):
            try:
                created_ms = self._events_codec.created_ms(cursor.value())
            except msgspec.DecodeError:
                # Never dropped unread; the cut stops here, and so does pruning answers (an
                # event that cannot be read might refer to any of them).
                done.keep("events", "unreadable")
                return 0, last_pruned
            if created_ms >= cutoff:
                return created_ms, last_pruned
            done.count(done.visited, "events")
            sequence = _U64.unpack(cursor.key())[0]
            if floor is not None and sequence >= floor:
                done.keep("events", "undelivered")
                return created_ms, last_pruned
            done.count(done.pruned, "events")
            last_pruned = sequence
            cursor.delete()  # the cursor moves to the next event, if there is one
            if not cursor.key():
                return None, last_pruned
        try:
            return self._events_codec.created_ms(cursor.value()), last_pruned  # more to do
        except msgspec.DecodeError:
            return 0, last_pruned

    def _answers(
        self,
        writer: Writer,
        now_ms: int,
        budget: int,
        oldest_event_ms: int | None,
        done: SweepStep,
    ) -> None:
        cutoff = now_ms - self.config.answers_seconds * 1000
        cursor = self._hand(writer, "answers")
        for _ in range(budget):
            if not cursor.key():
                self._hands["answers"] = None  # round again next step
                done.wrapped = True
                return
            done.count(done.visited, "answers")
            raw = cursor.value()
            try:
                if self._answer_time.decode(raw).answered_ms >= cutoff:
                    cursor.next()  # the usual case: too young, and only its time decoded
                    continue
                answer = self._answer.decode(raw)
            except msgspec.DecodeError:
                done.keep("answers", "unreadable")
                cursor.next()
                continue
            if answer.hold is not None and answer.hold.status == "open":
                done.keep("answers", "open_hold")
                cursor.next()
                continue
            if writer.answer_pending(bytes(cursor.key())):
                # This transaction writes it at commit (a reversal credited an old 0200, say):
                # deleting the stored copy would be undone, and its RRN entry lost.
                done.keep("answers", "written_now")
                cursor.next()
                continue
            if (
                oldest_event_ms is not None
                and answer.answered_ms >= oldest_event_ms - limits.event_order_skew_ms
            ):
                # An event still kept may refer to it. The outbox is in commit order, not in
                # time order: a worker reads its clock before LMDB's writer lock, a clock may
                # step back; so an event behind the first kept may be stamped a little earlier.
                done.keep("answers", "event_kept")
                cursor.next()
                continue
            if answer.hold is not None and answer.hold_id is not None:
                writer.note_pruned_hold(answer.hold_id)
            self._unindex_rrn(writer, bytes(cursor.key()), answer)
            done.count(done.pruned, "answers")
            cursor.delete()
        self._hands["answers"] = bytes(cursor.key()) or None

    def _unindex_rrn(self, writer: Writer, stored_key: bytes, answer: StoredAnswer) -> None:
        """Its RRN index entry goes with it, when the entry still names it."""
        rrn = answer.response.get("37")
        parts = answer_key_of(stored_key).split(b"|")
        if rrn is None or len(parts) != 4:
            return
        lookup = self._rrn_lookup(parts[1].decode("ascii"), parts[2].decode("ascii"), rrn)
        if writer.answer_by_rrn(lookup) == answer_key_of(stored_key):
            writer.maintenance_delete("rrn_index", lookup)

    def _timed(
        self, writer: Writer, database: str, cutoff_ms: int, budget: int, done: SweepStep
    ) -> None:
        """A clock hand over a database whose records say when they were made (the record
        kind metrics name is the database's name)."""
        record = database
        cursor = self._hand(writer, database)
        for _ in range(budget):
            if not cursor.key():
                self._hands[database] = None
                return
            done.count(done.visited, record)
            try:
                made_ms = self._made_ms(database, cursor.value())
            except msgspec.DecodeError:
                done.keep(record, "unreadable")
                cursor.next()
                continue
            if made_ms < cutoff_ms:
                done.count(done.pruned, record)
                cursor.delete()
            else:
                cursor.next()
        self._hands[database] = bytes(cursor.key()) or None

    def _made_ms(self, database: str, raw: bytes | memoryview) -> int:
        if database == "clearing":
            return self._cleared.decode(raw).processed_ms
        return self._idempotent.decode(raw).created_ms

    def _hand(self, writer: Writer, database: str) -> Cursor:
        """A cursor where the database's clock hand stopped (its start at first and after a
        round); on no record when the database is empty."""
        cursor = writer.maintenance_cursor(database)
        position = self._hands.get(database)
        if position is None or not cursor.set_range(position):
            cursor.first()
        return cursor
