"""Batch clearing: apply a presentment file (JSON Lines) to the ledger; specs/clearing.md.

Clearing is the network's word on what was spent: a purchase captures the open hold of its
original authorisation for the final amount, or is posted without one; a refund credits the
account. Each record is applied once: its `record_id` is kept with the outcome, so ingesting a
file again changes nothing. Records are applied a chunk at a time, each chunk in ONE LMDB write
transaction, so a huge file never builds one giant transaction and a daemon writing to the same
ledger waits at most one chunk.

Parsing is pure (`parse_record`, `parse_lines`); `apply_clearing` is the only part that writes.
The PAN finds the card through its keyed hash and is never stored or printed; everything shown
to a person goes through `shown`, which masks anything shaped like a PAN.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime
from itertools import islice
from pathlib import Path
from typing import Annotated, BinaryIO, Final, Literal

import msgspec
from msgspec import Meta

from processor import limits
from processor.currency import UnknownCurrency, exponent, numeric_code
from processor.engine.settle import capture_verdict, repost_amount
from processor.ledger.records import (
    Account,
    Card,
    ClearedRecord,
    Hold,
    OutboxRecord,
    StoredAnswer,
)
from processor.ledger.store import Ledger, Writer
from processor.lifecycle import confirmed_original
from processor.schemas import readable, repeated_key
from processor.security import PanHasher, luhn_valid, mask_card_numbers, mask_pan
from processor.types import CURRENCY_PATTERN, PAN_PATTERN, TRANSMISSION_DATETIME_PATTERN
from processor.wire.messages import acquirer_number, rrn_key, transaction_key

CHUNK_RECORDS: Final = 500  # records applied per write transaction
LINE_BYTES_MAX: Final = 16 * 1024  # a record is a few hundred bytes; longer lines are refused
RECORD_ID_CHARS_MAX: Final = 128

Outcome = Literal["matched", "already_captured", "already_posted", "force_posted", "refund"]


class ClearingError(Exception):
    """A clearing file that cannot be read at all (missing, unreadable, a read failing midway)."""


class InvalidRecord(ValueError):
    """A line that is not a valid clearing record; the message names the field, never a PAN."""


class ClearingRecord(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    # Closed sets are patterns rather than Literals: msgspec echoes a bad enum value in its
    # message, and a PAN in the wrong field must not be echoed.
    record_id: Annotated[
        str, Meta(min_length=1, max_length=RECORD_ID_CHARS_MAX, pattern=r"^[!-~]+\Z")
    ]
    type: Annotated[str, Meta(pattern=r"^(purchase|refund)\Z")]
    pan: Annotated[str, Meta(pattern=PAN_PATTERN)]
    acquirer: Annotated[str, Meta(pattern=r"^[0-9]{1,11}\Z")]  # field 32
    stan: Annotated[str, Meta(pattern=r"^[0-9]{6}\Z")]  # field 11
    # Field 7 of the original, MMDDhhmmss: a month 13 matched nothing and was force-posted
    # while the hold it was for stayed open, the cardholder's money counted twice.
    transmission_datetime: Annotated[str, Meta(pattern=TRANSMISSION_DATETIME_PATTERN)]
    amount: Annotated[int, Meta(gt=0, le=10**15)]  # final amount, minor units of `currency`
    currency: Annotated[str, Meta(pattern=CURRENCY_PATTERN)]  # ISO 4217 alphabetic
    rrn: Annotated[str, Meta(pattern=r"^[0-9A-Za-z]{12}\Z")] | None = None  # field 37
    original_mti: Annotated[str, Meta(pattern=r"^(0100|0120|0200)\Z")] = "0100"
    # A presentment in parts (a shipment in parts: the networks' multiple clearing sequence
    # number and count): part `clearing_sequence` of `clearing_count`, both or neither.
    clearing_sequence: Annotated[int, Meta(ge=1, le=99)] | None = None
    clearing_count: Annotated[int, Meta(ge=1, le=99)] | None = None

    def __repr__(self) -> str:  # a record in a traceback or a log shows no PAN
        return f"ClearingRecord(record_id={self.record_id!r}, pan={mask_pan(self.pan)!r}, ...)"

    def original_key(self) -> bytes:
        """The authoriser's answer key of the original: class|acquirer|STAN|field 7."""
        return transaction_key(
            self.original_mti, self.acquirer, self.stan, self.transmission_datetime
        )

    def rrn_lookup(self) -> bytes | None:
        """RRN|acquirer|STAN: the authoriser's index of originals, for when the key misses."""
        return None if self.rrn is None else rrn_key(self.acquirer, self.stan, self.rrn)


class _RecordIdOnly(msgspec.Struct):
    record_id: str | None = None
    pan: str | None = None


class Entry(msgspec.Struct, frozen=True, gc=False):
    """One non-blank line of a clearing file: a record, or why it is not one."""

    line: int  # 1-based line number in the file
    record: ClearingRecord | None
    problem: str | None = None  # set when `record` is None
    record_id: str | None = None  # as shown to a person (masked), when readable


class Rejection(msgspec.Struct, frozen=True, gc=False):
    line: int
    record_id: str | None  # as shown to a person (masked), when readable
    reason: str


class ClearingSummary(msgspec.Struct, kw_only=True, gc=False):
    records: int = 0  # non-blank lines read
    transactions: int = 0  # write transactions committed
    matched: int = 0
    already_captured: int = 0
    already_posted: int = 0
    force_posted: int = 0
    refunds: int = 0
    duplicates: int = 0
    rejections: list[Rejection] = msgspec.field(default_factory=list)

    @property
    def rejected(self) -> int:
        return len(self.rejections)


# --- parsing (pure) ------------------------------------------------------------------------------

_DECODER: Final = msgspec.json.Decoder(ClearingRecord)
_ID_DECODER: Final = msgspec.json.Decoder(_RecordIdOnly)
_UNPRINTABLE: Final = re.compile(r"[^!-~]")
_NOT_DIGITS: Final = {code: None for code in range(128) if not chr(code).isdigit()}
_CONTROL: Final = re.compile(r"[^ -~]")  # a message may hold spaces, never a line break
PROBLEM_CHARS_MAX: Final = 300  # a printed problem or record id, after masking


def shown(text: str) -> str:
    """`text` fit for a person: on one line, printable, every run of 13 digits or more (grouped
    by spaces or dashes, or as card numbers are by `._:/`, or not) masked like a PAN, first 6
    and last 4, whether it is one or not; cut to PROBLEM_CHARS_MAX. An acquirer reference number
    (23 digits) shows its ends only: a PAN and its expiry make a run as long, and the line
    number says which record it is."""
    return mask_card_numbers(_CONTROL.sub("?", text), every_run=True)[:PROBLEM_CHARS_MAX]


def parse_record(line: bytes) -> ClearingRecord:
    """One JSON Lines record; InvalidRecord names what is wrong (msgspec's `$.field` path)."""
    try:
        record = _DECODER.decode(line)
        repeated = repeated_key(line)
    except (msgspec.ValidationError, msgspec.DecodeError) as error:
        # msgspec names the path ($.amount) and never echoes a string value; an unknown key is
        # named, though, and could be a PAN: mask anything shaped like one.
        raise InvalidRecord(shown(readable(error))) from None
    except RecursionError:  # arrays nested thousands deep, under a key msgspec skips
        raise InvalidRecord("nested too deeply") from None
    if repeated is not None:
        # msgspec keeps the last of the two; a network's or a reconciler's reader may take
        # the first: an amount or a card number must have one reading.
        raise InvalidRecord(f"{repeated} is given twice")
    if (record.clearing_sequence is None) != (record.clearing_count is None):
        raise InvalidRecord("$.clearing_sequence and $.clearing_count come together")
    if (record.clearing_sequence or 0) > (record.clearing_count or 0):
        raise InvalidRecord("$.clearing_sequence is above $.clearing_count")
    if not luhn_valid(record.pan):
        raise InvalidRecord("$.pan fails the Luhn check")
    if record.pan in record.record_id.translate(_NOT_DIGITS):
        # Written any way (grouped, dashed, inside other digits): record ids are kept as keys.
        raise InvalidRecord("$.record_id contains the PAN; record ids are kept and printed")
    try:
        exponent(record.currency)
    except UnknownCurrency as error:
        raise InvalidRecord(f"$.currency: {error}") from None
    return record


def _readable_record_id(line: bytes) -> str | None:
    try:
        readable = _ID_DECODER.decode(line)
    except (msgspec.ValidationError, msgspec.DecodeError, RecursionError):
        return None
    record_id = readable.record_id
    if not record_id:
        return None
    pan = readable.pan
    if pan and len(pan) >= 13 and pan.isdigit() and pan in record_id.translate(_NOT_DIGITS):
        return None  # holds the record's PAN, perhaps inside a longer run: not shown at all
    # Masked whole, then cut: cut first, a card number at the cut would lose the digits that
    # made it one and come out in part.
    return shown(_UNPRINTABLE.sub("?", record_id))[:RECORD_ID_CHARS_MAX]


def parse_lines(lines: Iterable[bytes]) -> Iterator[Entry]:
    """Entries of the non-blank lines, numbered from 1 (blank lines count, yield nothing)."""
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if len(line.rstrip(b"\r\n")) > LINE_BYTES_MAX:
            yield Entry(number, None, f"line longer than {LINE_BYTES_MAX} bytes")
            continue
        try:
            record = parse_record(line)
        except InvalidRecord as error:
            yield Entry(number, None, str(error), _readable_record_id(line))
            continue
        yield Entry(number, record, None, shown(record.record_id))


def read_lines(stream: BinaryIO) -> Iterator[bytes]:
    """Lines of a binary stream, none longer than LINE_BYTES_MAX + 1 (the rest is skipped)."""
    while line := stream.readline(LINE_BYTES_MAX + 1):
        if len(line) > LINE_BYTES_MAX and not line.endswith(b"\n"):
            while (rest := stream.readline(LINE_BYTES_MAX + 1)) and not rest.endswith(b"\n"):
                pass
        yield line


# --- applying (one write transaction per chunk) --------------------------------------------------


class _Rejected(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _fingerprint(hasher: PanHasher, card_key: bytes, record: ClearingRecord) -> bytes:
    content: tuple[object, ...] = (
        card_key,
        record.type,
        acquirer_number(record.acquirer),
        record.stan,
        record.transmission_datetime,
        record.rrn,
        record.original_mti,
        record.amount,
        record.currency,
    )
    if record.clearing_count is not None:  # only then: records ingested before keep theirs
        content += (record.clearing_sequence, record.clearing_count)
    return hasher.digest(msgspec.msgpack.encode(content))


def _original(writer: Writer, record: ClearingRecord) -> tuple[bytes, StoredAnswer | None]:
    """(answer key, stored answer) of the authoriser's answer to the original: by its key,
    else by acquirer|STAN|RRN; the answer None when there is none."""
    key = record.original_key()
    found = confirmed_original(writer, key, writer.answer(key))
    if found is not None:
        return found
    lookup = record.rrn_lookup()
    indexed = None if lookup is None else writer.answer_by_rrn(lookup)
    if indexed is None:
        return key, None
    found = confirmed_original(writer, indexed, writer.answer(indexed))
    return (indexed, None) if found is None else found


def _purchase(
    writer: Writer, record: ClearingRecord, card: Card, now_ms: int
) -> tuple[Outcome, str, int | None, bytes | None, int | None]:
    """(outcome, account posted to or found, hold id, the original's answer key when one was
    found, what was debited when that is not the record's amount) of a purchase on `card`."""
    original_key, original = _original(writer, record)
    if original is not None and original.card_id not in (None, card.card_id):
        # The original is another card's, whatever became of it (held, posted or declined):
        # not this record's to capture or to post against. One declined before any card was
        # known (14) is no card's: a declined original, posted as the network says, unless
        # a completion posted it already (it is marked so).
        raise _Rejected("card_mismatch")
    found = None if original is None else original_key
    hold = writer.hold_of(original_key, original)
    if hold is not None and record.clearing_count is not None and record.clearing_count > 1:
        return _part(writer, record, hold, original, found, now_ms)
    verdict = capture_verdict(original, hold)
    # Each outcome checks the currency against the account it is about: the one the original
    # held or posted on, which need not be the card's account now (a load or the API may have
    # moved the card since), else the card's. Checked against the card's account, a moved
    # card's hold could never be captured.
    if verdict == "already_posted":
        assert original is not None
        # Nothing moves. The posting is on the original's account, or on the card's when a
        # force post came after the card moved (the answer keeps the account it was decided
        # on, which its history chain needs): the record may be in either one's currency.
        for posted_on in (original.account_id or card.account_id, card.account_id):
            account = writer.account(posted_on)
            if account is not None and account.currency == record.currency:
                return "already_posted", posted_on, None, found, None
        raise _Rejected("currency_mismatch")
    if verdict == "repost":
        # A purchase posted at once (0200) and reversed since: the hold-less version of a
        # presentment after a reversal released its hold. Posted on the original's account,
        # in its currency, as it was.
        assert original is not None and original.account_id is not None
        account = writer.account(original.account_id)
        if (
            account is None
            or account.currency != record.currency
            or not account.counts_in_its_currency(original.answered_ms)
        ):
            raise _Rejected("currency_mismatch")
        debit = repost_amount(original, record.amount)
        if not debit:
            return "already_posted", account.id, None, found, None
        _debit_allowed(account, debit)
        writer.post_again(account, debit, original_key, original, now_ms)
        # What still stood of it was not debited again: the event says what was.
        return "force_posted", account.id, None, found, debit
    if verdict in ("already_captured", "capture"):
        assert hold is not None
        if hold.currency != record.currency:
            raise _Rejected("currency_mismatch")
    if verdict == "already_captured":
        assert hold is not None
        return "already_captured", hold.account_id, hold.hold_id, found, None
    if verdict == "capture":
        assert hold is not None
        account = writer.account(hold.account_id)
        assert account is not None, hold.account_id
        _debit_allowed(account, record.amount)
        writer.capture_hold(account, hold, record.amount, now_ms)
        writer.put_account(account)
        return "matched", account.id, hold.hold_id, found, None
    # No original, or its hold was released (reversed) or expired: the hold is gone but the
    # network says the money was spent. Its word stands: post it like an unmatched purchase.
    account = _same_currency(writer, card.account_id, record)
    _debit_allowed(account, record.amount)
    writer.force_post(
        account,
        record.amount,
        original_key,
        original,
        card_id=card.card_id,
        now_ms=now_ms,
        rrn=record.rrn,
        rrn_lookup=record.rrn_lookup(),
    )
    return "force_posted", account.id, None, found, None


def _part(
    writer: Writer,
    record: ClearingRecord,
    hold: Hold,
    original: StoredAnswer | None,
    found: bytes | None,
    now_ms: int,
) -> tuple[Outcome, str, int | None, bytes | None, int | None]:
    """One part of a presentment in parts against the hold of its authorisation: each part
    is posted once, the hold lowered by it until the last part (a single presentment closed
    it at the first, and the parts after it were already_captured: never debited)."""
    assert record.clearing_sequence is not None and record.clearing_count is not None
    if hold.currency != record.currency:
        raise _Rejected("currency_mismatch")
    parts = [] if original is None or original.hold is None else original.hold.cleared_parts
    captured_whole = hold.status == "captured" and (not parts or 0 in parts)
    if record.clearing_sequence in parts or captured_whole:
        # This part came before under another record id; or a completion or a single
        # presentment captured the hold (before the parts, or after some: a 0 among them).
        return "already_captured", hold.account_id, hold.hold_id, found, None
    account = writer.account(hold.account_id)
    assert account is not None, hold.account_id
    _debit_allowed(account, record.amount)
    outcome: Outcome = "matched" if hold.status in ("open", "captured") else "force_posted"
    last = record.clearing_sequence == record.clearing_count
    writer.clear_part(account, hold, record.amount, record.clearing_sequence, last, now_ms)
    writer.put_account(account)
    return outcome, account.id, hold.hold_id, found, None


def _same_currency(writer: Writer, account_id: str, record: ClearingRecord) -> Account:
    """The account, when the record is in its currency (else currency_mismatch)."""
    account = writer.account(account_id)
    if account is None:
        raise _Rejected("account_missing")
    if account.currency != record.currency:
        raise _Rejected("currency_mismatch")
    return account


def _debit_allowed(account: Account, amount: int) -> None:
    """A debit may not take posted below -account_posted_max: past the ledger's 64-bit
    integers the record could never be stored (every run of the file would fail on it)."""
    if account.posted - amount < -limits.account_posted_max:
        raise _Rejected("balance_limit")


def _apply_record(
    writer: Writer, record: ClearingRecord, hasher: PanHasher, now_ms: int
) -> Outcome | Literal["duplicate"]:
    card_key = hasher.card_key(record.pan)
    fingerprint = _fingerprint(hasher, card_key, record)
    stored = writer.clearing_record(record.record_id)
    if stored is not None:
        if stored.fingerprint != fingerprint:
            raise _Rejected("record_id_reused")  # another record was ingested under this id
        return "duplicate"
    card = writer.card(card_key)
    if card is None:
        raise _Rejected("unknown_card")
    account = writer.account(card.account_id)
    if account is None:
        raise _Rejected("account_missing")
    hold_id: int | None = None
    original_key: bytes | None = None
    debited: int | None = None
    outcome: Outcome
    if record.type == "refund":
        if record.currency != account.currency:
            raise _Rejected("currency_mismatch")
        if account.posted + record.amount > limits.account_posted_max:
            raise _Rejected("balance_limit")
        account.posted += record.amount
        writer.put_account(account)
        outcome, account_id = "refund", account.id
    else:
        outcome, account_id, hold_id, original_key, debited = _purchase(
            writer, record, card, now_ms
        )
    writer.emit(
        OutboxRecord(
            sequence=0,
            type="transaction.refunded" if outcome == "refund" else "transaction.cleared",
            created_ms=now_ms,
            account_id=account_id,
            card_id=card.card_id,
            masked_pan=card.masked_pan,
            # The authorisation it settled as found (by its key or through its RRN), else the
            # one it names.
            answer_key=(original_key or record.original_key()).decode("ascii")
            if record.type == "purchase"
            else None,
            amount=record.amount,
            currency=numeric_code(record.currency),
            billing_amount=debited if debited != record.amount else None,
            reason=outcome,
            stan=record.stan,
            rrn=record.rrn,
            acquirer=record.acquirer,
            hold_id=hold_id,
        ),
    )
    writer.put_clearing_record(
        record.record_id,
        ClearedRecord(
            outcome=outcome,
            fingerprint=fingerprint,
            processed_ms=now_ms,
            card_id=card.card_id,
            account_id=account_id,
            amount=record.amount,
            currency=record.currency,
            hold_id=hold_id,
        ),
    )
    return outcome


_COUNTERS: Final = {
    "matched": "matched",
    "already_captured": "already_captured",
    "already_posted": "already_posted",
    "force_posted": "force_posted",
    "refund": "refunds",
    "duplicate": "duplicates",
}


def apply_clearing(
    ledger: Ledger,
    entries: Iterable[Entry],
    hasher: PanHasher,
    now: datetime | Callable[[], datetime],
    *,
    chunk_size: int = CHUNK_RECORDS,
) -> ClearingSummary:
    """Apply `entries` in order, `chunk_size` per write transaction; counts only what committed.

    `now`: the time of every chunk, or a clock read for each (a file may take longer to
    ingest than the ledger's clock waits for a time behind it: read once, the chunks of its
    second hour were stamped an hour behind the authorisations answered meanwhile).
    A failure (ledger full, file unreadable midway) aborts the current chunk only: the chunks
    before it stay applied, and ingesting the file again skips them as duplicates.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size {chunk_size}: must be at least 1")
    summary = ClearingSummary()
    iterator = iter(entries)
    while chunk := list(islice(iterator, chunk_size)):
        wall_ms = int((now if isinstance(now, datetime) else now()).timestamp() * 1000)

        def apply(
            writer: Writer, wall_ms: int = wall_ms
        ) -> tuple[list[tuple[Entry, str]], list[str]]:
            rejected: list[tuple[Entry, str]] = []  # entry, reason
            outcomes: list[str] = []
            at_ms = writer.ledger_time(wall_ms)  # not behind the answers and events before
            for entry in chunk:
                if entry.record is None:
                    rejected.append((entry, f"invalid_record: {entry.problem}"))
                    continue
                try:
                    outcomes.append(_apply_record(writer, entry.record, hasher, at_ms))
                except _Rejected as error:
                    rejected.append((entry, error.reason))
            return rejected, outcomes

        # A chunk that does not fit grows the map (to its ceiling) and runs again; LedgerFull
        # there, the chunks before this one applied.
        rejected, outcomes = ledger.write_growing(apply)
        summary.transactions += 1
        summary.records += len(chunk)
        summary.rejections.extend(
            Rejection(entry.line, entry.record_id, reason) for entry, reason in rejected
        )
        for outcome in outcomes:
            counter = _COUNTERS[outcome]
            setattr(summary, counter, getattr(summary, counter) + 1)
    return summary


def ingest_path(
    ledger: Ledger,
    path: str | Path,
    hasher: PanHasher,
    now: datetime | Callable[[], datetime],
    *,
    chunk_size: int = CHUNK_RECORDS,
) -> ClearingSummary:
    """Parse and apply the clearing file at `path`; ClearingError when it cannot be read."""
    try:
        stream = Path(path).open("rb")  # noqa: SIM115 - closed below; errors need their own message
    except OSError as error:
        raise ClearingError(f"{path}: cannot read: {error.strerror}") from None
    with stream:
        try:
            return apply_clearing(
                ledger, parse_lines(read_lines(stream)), hasher, now, chunk_size=chunk_size
            )
        except OSError as error:
            raise ClearingError(
                f"{path}: read failed midway: {error.strerror}; the chunks before it are "
                "applied, ingesting the file again skips them"
            ) from None


def describe_summary(source: str, summary: ClearingSummary) -> list[str]:
    """What `processor clearing ingest` prints: the counts, then one line per rejected record."""
    lines = [
        f"clearing {source}: {summary.records} records in {summary.transactions} "
        f"transaction{'' if summary.transactions == 1 else 's'}",
        f"  matched           {summary.matched}",
        f"  already_captured  {summary.already_captured}",
        f"  already_posted    {summary.already_posted}",
        f"  force_posted      {summary.force_posted}",
        f"  refunds           {summary.refunds}",
        f"  duplicates        {summary.duplicates}",
        f"  rejected          {summary.rejected}",
    ]
    for rejection in summary.rejections:
        record = "" if rejection.record_id is None else f" record_id {rejection.record_id}"
        lines.append(f"  rejected line {rejection.line}{record}: {rejection.reason}")
    return lines
