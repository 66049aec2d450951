"""The whole transaction lifecycle through Authorizer.authorize_batch against an in-memory model.

Each `batch` step is one LMDB write transaction holding a random mix of authorisations (0100, some
allowing partial approval), financials (0200), stand-in advices (0120, may overdraw), completion
advices (0220: capture of the matched open hold for its final amount, a force post without one,
nothing when the original already posted or was captured), reversals and reversal advices
(0400/0420: full or partial through field 95, matched through field 90 or through acquirer + STAN
+ RRN, duplicates, orphans, reversals of declined originals), retransmissions and repeats (0101,
0401, ...) of any earlier request, and the same identity with different content. `clock` steps
move time on by minutes to weeks, or onto the next expiry, and run the expiry sweeper.

The model predicts every answer, every field of it on the wire, approval codes included: the
authoriser draws them from the model (`draw`), which every third time offers first a code the
card was given that day already, so the processor must draw past it. After every step the ledger
must agree with the model in every field of every record it keeps, each expected record built
with `modelled`, which names every field of its Struct (so a field added to a ledger record fails
the machine until the model knows it): accounts (balances, open-hold count, spend-control usage
per key, interval and period and the trailing window's times, history head, event sequence),
each card's state (usage, history head, the day's approval codes), holds, stored answers (the
response without the PAN, usage amount and MCC left after reversals, the links of the card's and
the account's histories), clearing records, outbox events (type, facts and balances after), the
RRN and expiry indexes, the sequences in meta, and no record the model does not know of. Keyed
digests (fingerprints) are checked as a relation: the same content has one, other contents
another. Besides: posted moves only through posting messages, nothing is overdrawn past the
credit limit except by advices, no hold is resolved twice, every request was answered exactly once
and retransmissions got the first answer byte for byte.

`clearing` steps apply a presentment file through processor.clearing (parse_lines, then
apply_clearing in chunks of 1, 2 or 500 records): 1-6 records, each a purchase pointing at an
earlier 0100/0120/0200 whose hold is open, captured, released or expired, or that posted or was
declined, by its key or by RRN only, for a final amount above, at or below the hold; a purchase
pointing at nothing (force post); a refund; an earlier record id again, with the same content
(spelt otherwise too: keys reordered, acquirer zero-padded, original_mti's default spelt out) or
with other content; the never-loaded card; a known currency that is not the account's; an
original of another card; lines that are not valid records. The model predicts each record's
outcome or rejection, the summary's counts and rejections, the ledger effect and what is
remembered under each record id; posted moves only through matched, force_posted and refund
records, and a hold captured by clearing is resolved once like any other.

Bugs this machine found, now fixed (each has a deterministic regression test at the end of
this file, and the machine keeps generating the operations that found them):

1. The duplicate fingerprint left out fields 90, 95 and 39, which the reversal and advice
   handlers read: the same identity with a different field 90/95/39 was answered as a
   retransmission (the stale answer) instead of as a conflict (94; 00 for an advice).
2. Field 90 was honoured whatever message class it named, although only 0100/0200/0120 answers
   are originals: a reversal pointing at an earlier partial reversal released the hold.

3. Clearing compared the record's card with its original's only when the original held or
   posted something: a purchase pointing at another card's declined authorisation was
   force-posted on the record's card instead of rejected card_mismatch.
"""

from __future__ import annotations

import functools
import json
import shutil
import struct
import tempfile
from bisect import bisect_right, insort
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final, TypeVar

import iso8583
import msgspec
import pytest
from hypothesis import HealthCheck, Phase, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from processor import limits
from processor.authorizer import Authorizer, Outcome
from processor.catalog import default_catalog
from processor.clearing import apply_clearing, parse_lines
from processor.engine import ProgrammeRules
from processor.ledger.controls import TRAILING_COUNT_MAX, TRAILING_WINDOW_SECONDS_MAX, Usage
from processor.ledger.load import apply_load_file, card_id_for, parse_load_file
from processor.ledger.records import (
    Account,
    Card,
    CardState,
    ClearedRecord,
    Hold,
    HoldState,
    OutboxRecord,
    StoredAnswer,
)
from processor.ledger.store import Ledger, Reader
from processor.security import PanHasher, mask_pan
from processor.wire.codec import Codec
from processor.wire.messages import AuthorizationRequest
from processor.wire.responses import response_mti
from processor.wire.spec import load_spec

HASHER = PanHasher(b"test-key")
CODEC = Codec(load_spec())
RULES = ProgrammeRules(catalog=default_catalog())
# Programme-level spend controls (loaded with the accounts): one MCC blocked by itself.
PROGRAMME_BLOCKED_MCCS: Final = ("7995",)
START = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
HOLD_LIFETIME_S = 7 * 86400
APPROVAL_CODES: Final = 1_000_000  # six digits: what the processor draws an approval code below
HOLD_LIFETIME_BY_MCC_S = {"7011": 30 * 86400, "4121": 3600}
ORIGINAL_CLASSES: Final = ("0100", "0200", "0120")
ADVICE_CLASSES: Final = ("0120", "0220", "0420")
PARTIAL_OK: Final = "R" + "61" + "03" + "100"  # field 48: TCC, subelement 61 position 1 = 1
# (message class, reason) of the only answers that may move posted.
POSTING: Final = frozenset(
    {
        ("0200", "approved"),
        ("0200", "partial_approval"),
        ("0220", "captured"),
        ("0220", "force_post"),
        *((c, r) for c in ("0400", "0420") for r in ("reversed", "partially_reversed")),
    }
)


@dataclass(frozen=True)
class CardSpec:
    pan: str
    account: str | None  # None: never loaded
    limit: int | None = None


@dataclass(frozen=True)
class AccountSpec:
    id: str
    posted: int
    credit_limit: int = 0


ACCOUNTS = (
    AccountSpec("acct-credit", 150_000, credit_limit=100_000),
    AccountSpec("acct-low", 8_000),
)
CARDS = (
    CardSpec("5200001111222233", "acct-credit", limit=40_000),
    CardSpec("5200001111222241", "acct-credit"),
    CardSpec("5200001111222258", "acct-low"),
    CardSpec("5200001111222266", None),
)
CARD_BY_PAN = {c.pan: c for c in CARDS}
ACQUIRERS = ("123456", "00654321")  # the second is sent zero-padded: compared as a number

LOAD_FILE = "\n".join(
    [
        "[programme_controls]\nblocked_mccs = ["
        + ", ".join(f'"{mcc}"' for mcc in PROGRAMME_BLOCKED_MCCS)
        + "]\n",
        *(
            f'[[accounts]]\nid = "{a.id}"\ncurrency = "EUR"\nbalance = {a.posted}\n'
            f"credit_limit = {a.credit_limit}\n"
            for a in ACCOUNTS
        ),
        *(
            f'[[cards]]\npan = "{c.pan}"\naccount = "{c.account}"\nexpiry = "3012"\n'
            + (f"per_transaction_limit = {c.limit}\n" if c.limit is not None else "")
            for c in CARDS
            if c.account is not None
        ),
    ]
).encode()


# --- strategies --------------------------------------------------------------------------------

CARD = st.sampled_from((0, 0, 1, 1, 2, 2, 2, 3))
AMOUNT = st.one_of(
    st.integers(1, 3_000),
    st.integers(1, 3_000),
    st.integers(3_000, 60_000),
    st.integers(100_000, 400_000),
    st.just(0),
    # what the account has available then, plus -1, 0 or 1: the boundary of approval
    st.tuples(st.just("available"), st.integers(-1, 1)),
)
# Which earlier message a follow-up points at: one of the last three, one that holds something,
# one that posted something, or any.
TARGET = st.tuples(st.sampled_from(("recent", "held", "posted", "any")), st.integers(0, 10**6))
ACQUIRER = st.sampled_from(ACQUIRERS)
MCC = st.sampled_from(("5411", "5411", "5411", "7011", "4121", "7995"))
PROCESSING = st.sampled_from(("000000",) * 6 + ("010000", "310000"))
REPEAT_BIT = st.sampled_from((False,) * 5 + (True,))

AUTH = st.tuples(
    st.sampled_from(("0100", "0200")),
    CARD,
    AMOUNT,
    ACQUIRER,
    MCC,
    PROCESSING,
    st.booleans(),  # field 48 allows partial approval
    REPEAT_BIT,  # first arrival already carries the repeat bit (0101, 0201)
)
ADVICE = st.tuples(
    st.just("0120"),
    CARD,
    st.integers(1, 120_000),
    ACQUIRER,
    MCC,
    st.sampled_from(("00", "00", "00", "10", "05")),  # field 39: what stand-in answered
    REPEAT_BIT,
    # field 3: a purchase mostly; a refund or an inquiry the network stood in for moves nothing
    st.sampled_from(("000000",) * 4 + ("200000", "310000")),
)
COMPLETION = st.tuples(
    st.just("0220"),
    TARGET,
    st.sampled_from(("f90", "f90", "rrn", "none")),  # "none": no original matches
    st.integers(-5_000, 8_000),  # final amount minus the original's
    CARD,  # the card of an unmatched completion
    REPEAT_BIT,
)
REVERSAL = st.tuples(
    st.sampled_from(("0400", "0420")),
    TARGET,
    st.sampled_from(("f90", "f90", "rrn")),
    # field 95, in % of the original's field 4 (0: a full reversal); None: no field 95
    st.one_of(st.none(), st.none(), st.sampled_from((0, 100)), st.integers(1, 130)),
    REPEAT_BIT,
)
ORPHAN = st.tuples(
    st.just("orphan"),
    st.sampled_from(("0400", "0420")),
    CARD,
    st.booleans(),  # with a field 90 pointing at nothing
)
RETRANSMIT = st.tuples(st.just("retransmit"), TARGET, st.booleans())
CONFLICT = st.tuples(
    st.just("conflict"),
    TARGET,
    st.sampled_from(("4", "4", "2", "18", "41")),  # the field that differs
    st.integers(1, 5_000),
)
KNOWN_BUG_OPS = st.one_of(
    # bug 1: same identity, different field 90/95/39 only
    st.tuples(st.just("conflict_unfingerprinted"), st.integers(0, 10**6)),
    # bug 2: field 90 naming a reversal or a completion
    st.tuples(
        st.just("point_at_non_original"),
        st.sampled_from(("0400", "0420", "0220")),
        st.integers(0, 10**6),
    ),
)
_OPERATION = st.one_of(AUTH, AUTH, ADVICE, COMPLETION, REVERSAL, REVERSAL, ORPHAN, RETRANSMIT)
OPERATION = st.one_of(_OPERATION, CONFLICT, KNOWN_BUG_OPS)
OPERATIONS = st.lists(OPERATION, min_size=1, max_size=10)
CLOCK_JUMP = st.sampled_from((0, 60, 3_600, 3 * 3_600, 86_400, 3 * 86_400, 8 * 86_400, 31 * 86_400))
SWEEP_LIMIT = st.sampled_from((1, 2, 512))
# Or: to the next expiry of an open hold, one second before it, on it or one second after it.
TO_EXPIRY = st.one_of(st.none(), st.integers(-1, 1))

# Clearing (presentment) records. Which earlier original a purchase points at, by what became of
# it: its hold open, captured, released or expired; a posted 0200; declined (nothing held or
# posted); or any.
ORIGINAL_STATE = st.sampled_from(
    ("open", "open", "open", "captured", "released", "expired", "posted", "declined", "any")
)
# How: by its key (original_mti|acquirer|STAN|field 7); by RRN only (the key misses through
# field 7 or the message class); or not at all (the key misses, no RRN or one of nobody's).
POINTER = st.sampled_from(("key", "key", "key", "rrn", "rrn", "nothing"))
CLEARING_PURCHASE = st.tuples(
    st.just("purchase"),
    ORIGINAL_STATE,
    st.integers(0, 10**6),
    POINTER,
    st.one_of(st.just(0), st.integers(-5_000, 8_000)),  # final amount minus the hold's (or 4's)
    st.booleans(),  # with the RRN; with original_mti spelt out even when it is the default
)
CLEARING_OTHER = st.one_of(
    # a purchase pointing at nothing (force post), or a refund; card 3 was never loaded
    st.tuples(st.sampled_from(("unmatched", "refund")), CARD, st.integers(1, 60_000)),
    # an earlier record id again: the same record (or spelt otherwise), or other content
    st.tuples(
        st.just("repeat"),
        st.integers(0, 10**6),
        st.sampled_from(("same", "same", "respelt", "amount", "type", "card")),
    ),
    # a known currency that is not the account's: a purchase at an original, or a refund
    st.tuples(
        st.just("currency"), st.integers(0, 10**6), st.sampled_from(("USD", "JPY")), st.booleans()
    ),
    # a purchase at an original of another card
    st.tuples(st.just("other_card"), ORIGINAL_STATE, st.integers(0, 10**6), st.integers(0, 1)),
    st.tuples(
        st.just("invalid"),
        st.sampled_from(
            ("amount_zero", "float_amount", "luhn", "unknown_key", "not_json", "pan_in_id")
        ),
    ),
)
# Half of them purchases at an original. (st.one_of flattens nested one_ofs and drops repeated
# branches, so it cannot weight them.)
CLEARING_RECORD = st.booleans().flatmap(lambda at: CLEARING_PURCHASE if at else CLEARING_OTHER)
PRESENTMENT = st.lists(CLEARING_RECORD, min_size=1, max_size=6)
CHUNK_SIZE = st.sampled_from((1, 2, 500))
NEVER_SENT = "0101000000"  # a field 7 no message carries (they count seconds from START)
CLEARING_COUNTERS: Final = (
    ("matched", "matched"),
    ("already_captured", "already_captured"),
    ("already_posted", "already_posted"),
    ("force_posted", "force_posted"),
    ("refund", "refunds"),
    ("duplicate", "duplicates"),
)


# --- helpers -----------------------------------------------------------------------------------


def decode_request(fields: dict[str, str]) -> AuthorizationRequest:
    request = CODEC.decode(CODEC.encode(fields))
    assert isinstance(request, AuthorizationRequest)
    return request


def response_fields(response: bytes) -> dict[str, str]:
    fields, _ = iso8583.decode(response, CODEC.spec.iso)
    return fields


def number(acquirer: str) -> str:
    return acquirer.lstrip("0") or "0"


def answer_key(fields: dict[str, str]) -> bytes:
    """Message class + acquirer (as a number) + STAN + field 7, computed independently."""
    mti = fields["t"]
    return f"{mti[:3]}0|{number(fields['32'])}|{fields['11']}|{fields['7']}".encode()


def original_data(fields: dict[str, str]) -> str:
    """Field 90 pointing at `fields`: MTI 4, STAN 6, field 7 10, acquirer 11, forwarder 11."""
    return f"{fields['t']}{fields['11']}{fields['7']}{int(fields['32']):011d}{0:011d}"


def replacement(amount: int) -> str:
    return f"{amount:012d}" + "0" * 30


def content(fields: dict[str, str]) -> tuple[tuple[str, str], ...]:
    """What makes two requests with one identity the same: everything but the repeat bit and 48
    (which may carry a CVC2 and is deliberately left out of the fingerprint)."""
    return tuple(sorted((k, v) for k, v in fields.items() if k not in ("t", "48")))


def clearing_content(record: dict[str, Any]) -> tuple[Any, ...]:
    """What makes two clearing records under one id the same: everything but the id, with the
    acquirer compared as a number and original_mti's default spelt out."""
    return (
        record["pan"],
        record["type"],
        number(record["acquirer"]),
        record["stan"],
        record["transmission_datetime"],
        record.get("rrn"),
        record.get("original_mti", "0100"),
        record["amount"],
        record["currency"],
    )


def reply(fields: dict[str, str], code: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Every field of the response to `fields`: the echo, the response MTI, 39 and `extra`."""
    response = {k: fields[k] for k in ECHOED if k in fields}
    response.update({"t": response_mti_of(fields["t"]), "39": code}, **(extra or {}))
    return response


def balance_blocks(account_type: str, posted: int, available: int) -> str:
    return "".join(
        f"{account_type}{kind}978{'C' if value >= 0 else 'D'}{abs(value):012d}"
        for kind, value in (("01", posted), ("02", available))
    )


def make_ledger(
    directory: str | Path, draw: Callable[[int], int] | None = None
) -> tuple[Ledger, Authorizer]:
    """The loaded ledger and its authoriser; `draw` (a bound -> a number below it) gives the
    approval codes, the OS CSPRNG when None."""
    ledger = Ledger(directory, durability="process", map_size_bytes=64 << 20)
    data = parse_load_file(LOAD_FILE, "model")
    apply_load_file(ledger, data, HASHER, "model", now_ms=int(START.timestamp() * 1000))
    authorizer = Authorizer(
        ledger,
        HASHER,
        RULES,
        hold_lifetime_seconds=HOLD_LIFETIME_S,
        hold_lifetime_by_mcc=HOLD_LIFETIME_BY_MCC_S,
        draw=draw,
    )
    return ledger, authorizer


# --- every stored field ------------------------------------------------------------------------

S = TypeVar("S", bound=msgspec.Struct)


@functools.cache
def field_names(record_type: type[msgspec.Struct]) -> frozenset[str]:
    return frozenset(f.name for f in msgspec.structs.fields(record_type))


def modelled(record_type: type[S], **values: Any) -> S:
    """A record as the model expects it to be stored, every field named.

    A field added to a ledger record that the model says nothing about fails here, by name,
    until the model predicts it. (None is left out today: the keyed digests, which the model
    cannot compute, are predicted as a relation, see `digest`.) A field the record lacks fails
    as an unexpected keyword.
    """
    unknown = field_names(record_type) - values.keys()
    assert not unknown, f"{record_type.__name__}: the model predicts nothing for {sorted(unknown)}"
    return record_type(**values)


def assert_stored(stored: S | None, expected: S, what: object) -> None:
    """The stored record equals the model's, field by field; a failure names the fields."""
    assert stored is not None, f"{type(expected).__name__} {what}: not stored"
    if stored != expected:
        wrong = differences(stored, expected)
        raise AssertionError(f"{type(expected).__name__} {what}: (stored, model) {wrong}")


def differences(stored: msgspec.Struct, expected: msgspec.Struct) -> dict[str, Any]:
    """Field -> (stored, model) of the fields that differ; of a record inside, its fields."""
    found: dict[str, Any] = {}
    for name in sorted(field_names(type(expected))):
        mine, model = getattr(stored, name), getattr(expected, name)
        if mine != model:
            inside = isinstance(model, msgspec.Struct) and type(mine) is type(model)
            found[name] = differences(mine, model) if inside else (mine, model)
    return found


def as_loaded(record: S, *names: str) -> dict[str, Any]:
    """Fields the lifecycle never changes: the model expects them as the load file left them."""
    return {name: getattr(record, name) for name in names}


# The one database per kind of record and its indexes (specs/ledger.md); a new one fails the
# machine until the model says what it holds.
DATABASES: Final = frozenset(
    {
        b"accounts",
        b"cards",
        b"account_cards",
        b"hold_expiry",
        b"answers",
        b"rrn_index",
        b"meta",
        b"clearing",
        b"outbox",
        b"card_ids",
        b"entries",
        b"idempotency",
        b"cardholders",
        b"card_secrets",
        b"reveal_tokens",
    }
)
# An event's facts that only messages and clearing have; the load's events have none of them.
NO_FACTS: Final[dict[str, Any]] = {
    "created_ms": int(START.timestamp() * 1000),
    "card_id": None,
    "masked_pan": None,
    "answer_key": None,
    "mti": "",
    "processing_code": None,
    "amount": None,
    "currency": None,
    "billing_amount": None,
    "mcc": None,
    "merchant_name_location": None,
    "terminal": None,
    "merchant_id": None,
    "response_code": "",
    "stan": None,
    "rrn": None,
    "acquirer": None,
    "approval_code": None,
    "hold_id": None,
    "in_answer": False,
    "entry_sequence": None,
}
# Databases the lifecycle never writes: as the load left them.
UNCHANGED: Final = (
    *(b"cards", b"card_ids", b"account_cards", b"entries", b"idempotency", b"cardholders"),
    *(b"card_secrets", b"reveal_tokens"),
)
BIG_U64: Final = struct.Struct(">Q")  # hold ids, expiry times, event sequences in keys
LITTLE_U64: Final = struct.Struct("<Q")  # approval times in Usage.recent
# Responses to financial-class messages echo these when present (specs/messages.md).
ECHOED: Final = (
    *("2", "3", "4", "6", "7", "11", "12", "13"),
    *("32", "37", "41", "42", "49", "51", "90", "95"),
)
IDENTITY: Final = ("7", "11", "32")  # what tells requests apart; the fingerprint leaves them out


def response_mti_of(mti: str) -> str:
    """0100 -> 0110, 0401 -> 0410: the response class, the repeat bit cleared."""
    return f"{mti[:2]}{int(mti[2]) + 1}0"


def masked(pan: str) -> str:
    return f"{pan[:6]}{'*' * (len(pan) - 10)}{pan[-4:]}"


def event_type_of(message_class: str, code: str, reason: str) -> str:
    """The outbox event of an answered request (specs/events.md, Types)."""
    if reason == "balance_inquiry":
        return "authorization.balance_inquiry"
    if reason == "account_verified":  # 85: not declined, an approval of nothing
        return "authorization.approved"
    if reason in ("orphan_reversal", "original_not_found"):
        return "reversal.orphaned"
    approved = code in ("00", "10")
    return {
        "0100": "authorization.approved" if approved else "authorization.declined",
        "0200": "transaction.posted" if approved else "authorization.declined",
        "0120": "authorization.advice",
        "0220": "transaction.completed",
        "0400": "authorization.reversed",
        "0420": "authorization.reversed",
    }[message_class]


def periods_of(ms: int) -> tuple[int, int, int, int]:
    """The day, week (its Monday), month and year an instant counts in (UTC), as numbers."""
    day = datetime.fromtimestamp(ms / 1000, UTC).date()
    ordinal = day.toordinal()
    return ordinal, ordinal - day.weekday(), day.year * 12 + day.month, day.year


def usage_keys(mcc: str) -> tuple[str, ...]:
    """What an approval is counted under: all spend (""), and its MCC's category when it has one."""
    category = RULES.catalog.category(mcc)
    return ("", category) if category else ("",)


# --- the model ---------------------------------------------------------------------------------


@dataclass
class ModelUsage:
    """What a card or an account counts against its spend controls, as the model sees it.

    Not running counters that roll over, but what was counted in which period: an approval
    counts in its day, week, month and year (and all time); a reversal gives back only in the
    periods that are still the approval's, and all time. The stored counters are those of the
    periods of the newest approval or give-back (older periods read as zero).
    """

    periods: tuple[int, int, int, int] = (0, 0, 0, 0)
    # key ("" = all spend, or a category) -> interval (day, week, month, year) -> period ->
    # [amount, count]
    counted: dict[str, list[dict[int, list[int]]]] = field(default_factory=dict)
    all_time: dict[str, list[int]] = field(default_factory=dict)  # key -> [amount, count]
    recent: dict[str, list[int]] = field(default_factory=dict)  # key -> approval times, ms

    def count(self, at_ms: int, amount: int, mcc: str) -> None:
        self.periods = periods_of(at_ms)
        for key in usage_keys(mcc):
            self._add(key, self.periods, amount, 1)
            times = self.recent.setdefault(key, [])
            times.append(at_ms)
            # The trailing windows reach back a day at most: older times go when one is added.
            del times[: bisect_right(times, at_ms - TRAILING_WINDOW_SECONDS_MAX * 1000)]
            assert len(times) <= TRAILING_COUNT_MAX, "the model does not know trimming"

    def give_back(self, now_ms: int, approved_ms: int, amount: int, count: int, mcc: str) -> None:
        self.periods = now = periods_of(now_ms)
        then = periods_of(approved_ms)
        periods = tuple(p if p == t else None for p, t in zip(now, then, strict=True))
        for key in usage_keys(mcc):
            self._add(key, periods, -amount, -count)
            times = self.recent[key]
            if count and approved_ms in times:
                times.remove(approved_ms)

    def _add(self, key: str, periods: tuple[int | None, ...], amount: int, count: int) -> None:
        by_interval = self.counted.setdefault(key, [{}, {}, {}, {}])
        for counted, period in zip(by_interval, periods, strict=True):
            if period is not None:
                row = counted.setdefault(period, [0, 0])
                row[0] += amount
                row[1] += count
        total = self.all_time.setdefault(key, [0, 0])
        total[0] += amount
        total[1] += count

    def expected(self) -> Usage:
        counters = {}
        for key, by_interval in self.counted.items():
            row: list[int] = []
            for counted, period in zip(by_interval, self.periods, strict=True):
                row += counted.get(period, [0, 0])
            counters[key] = row + self.all_time[key]
        return modelled(
            Usage,
            periods=list(self.periods),
            counters=counters,
            recent={
                key: bytearray(b"".join(map(LITTLE_U64.pack, times)))
                for key, times in self.recent.items()
            },
            trimmed={},  # only past TRAILING_COUNT_MAX times, which `count` refuses
        )


@dataclass
class ModelAccount:
    posted: int
    credit_limit: int
    held: int = 0
    overdrawn_by_network: bool = False
    usage: ModelUsage = field(default_factory=ModelUsage)
    last_answer: bytes | None = None  # the newest answer about it: head of its history
    events: int = 0  # outbox events about it

    @property
    def available(self) -> int:
        return self.posted + self.credit_limit - self.held


@dataclass
class ModelCard:
    """A loaded card's state (CardState): usage, history head, the day's approval codes."""

    card_id: str
    usage: ModelUsage = field(default_factory=ModelUsage)
    last_answer: bytes | None = None
    approval_day: int = 0
    approval_codes: list[int] = field(default_factory=list)  # given on approval_day, sorted
    stored: bool = False  # written once anything about the card was answered


@dataclass
class ModelHold:
    hold_id: int
    account: str
    key: bytes
    amount: int
    created_ms: int
    expires_ms: int
    pan: str  # the card it was authorised on
    approval_code: str
    mcc: str
    rrn: str | None
    status: str = "open"
    resolved_ms: int = 0
    captured_amount: int = 0


@dataclass
class ModelAnswer:
    content: tuple[tuple[str, str], ...]
    code: str
    reason: str
    mti: str
    answered_ms: int
    hold_id: int | None = None
    account: str | None = None
    card_id: str | None = None
    posted_amount: int = 0
    reversed_amount: int = 0
    settled_ms: int = 0  # a 0200 posted again over its reversal: a reversal credits nothing
    usage_amount: int = 0  # what it still counts in its card's and account's usage
    usage_mcc: str = ""  # its MCC while it counts at all
    previous_for_card: bytes | None = None
    previous_for_account: bytes | None = None
    sent: dict[str, str] = field(default_factory=dict)  # the response's fields, as first sent
    stored: dict[str, str] = field(default_factory=dict)  # of them, what the answer keeps
    response: bytes | None = None  # the first answer's bytes, once seen
    detail: str = ""  # for the statistics: which branch the model took
    pan: str | None = None  # the card of an original (0100/0200/0120)
    marker: bool = False  # left by a force post under an original nobody answered
    # What a reversal released or credited back, or a completion posted again (its event says).
    moved: int | None = None


@dataclass
class ModelCleared:
    """A clearing record the ledger must remember under its record id."""

    content: tuple[Any, ...]  # what tells a duplicate from another record under the same id
    outcome: str
    pan: str
    account: str
    amount: int
    currency: str
    hold_id: int | None
    processed_ms: int


@dataclass
class Sent:
    fields: dict[str, str]
    card: CardSpec


@dataclass
class Expectation:
    kind: str  # new | retransmit | conflict
    fields: dict[str, str]
    key: bytes
    code: str
    reason: str
    response: dict[str, str]  # every field of the response on the wire
    detail: str = ""


class LifecycleMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.directory = tempfile.mkdtemp(prefix="lifecycle-properties-")
        # Approval codes: the model gives them (draw), so it knows each hold's and answer's.
        self.draws: deque[int] = deque()
        self.codes_given = 0
        self.ledger, self.authorizer = make_ledger(self.directory, self.draw)
        self.accounts = {a.id: ModelAccount(a.posted, a.credit_limit) for a in ACCOUNTS}
        self.holds: dict[int, ModelHold] = {}
        self.answers: dict[bytes, ModelAnswer] = {}
        self.rrn_index: dict[str, bytes] = {}
        self.next_hold_id = 1
        self.events: list[OutboxRecord] = []  # the outbox, as the model expects it
        self.events_checked = 0  # how many of them were compared with the ledger's
        self.emit_load_events()
        # Keyed digests (answer and clearing fingerprints): the model cannot compute them, but
        # knows which contents must share one and which must not.
        self.digests: dict[Any, bytes] = {}
        self.digested: dict[bytes, Any] = {}
        self.sent: list[Sent] = []  # every request sent, for retransmissions and conflicts
        self.originals: list[Sent] = []  # first arrivals of 0100/0200/0120
        self.followups: list[Sent] = []  # first arrivals of 0220/0400/0420
        self.resolved: dict[int, Hold] = {}  # hold id -> the hold as first seen resolved
        self.stans = dict.fromkeys(map(number, ACQUIRERS), 0)
        self.serial = 0
        self.now = START
        self.clock_ms = 0  # the ledger's clock (meta clock_ms): the last time a write used
        self.cleared: dict[str, ModelCleared] = {}  # record id -> what the ledger remembers
        self.never_cleared: set[str] = set()  # record ids rejected (maybe applied later)
        self.clearing_sent: list[dict[str, Any]] = []  # every parseable record, for repeats
        self.record_serial = 0
        self.card_ids: dict[str, str] = {}  # PAN -> the ledger's card id, of the loaded cards
        self.cards: dict[str, ModelCard] = {}  # PAN -> its state, of the loaded cards
        self.loaded_cards: dict[str, Card] = {}  # PAN -> the card record as loaded
        with self.ledger.read() as reader:
            for card in CARDS:
                stored = reader.card(HASHER.card_key(card.pan))
                assert (stored is None) == (card.account is None)
                if stored is not None:
                    self.card_ids[card.pan] = stored.card_id
                    self.cards[card.pan] = ModelCard(stored.card_id)
                    self.loaded_cards[card.pan] = stored
            self.loaded_accounts = {spec.id: reader.account(spec.id) for spec in ACCOUNTS}
        self.card_by_id = {card.card_id: card for card in self.cards.values()}
        env = self.ledger.env
        with env.begin() as txn:
            assert {bytes(name) for name, _ in txn.cursor()} == DATABASES
        self.databases = {name: env.open_db(name, create=False) for name in DATABASES}
        with env.begin() as txn:
            self.loaded = {
                name: {bytes(k): bytes(v) for k, v in txn.cursor(db=self.databases[name])}
                for name in (b"meta", *UNCHANGED)
            }

    def teardown(self) -> None:
        self.ledger.close()
        shutil.rmtree(self.directory, ignore_errors=True)

    @property
    def now_ms(self) -> int:
        return int(self.now.timestamp() * 1000)

    # --- building requests --------------------------------------------------------------------

    def fresh(self, acquirer: str) -> tuple[str, str, str]:
        """A new STAN for `acquirer`, a field 7 and an RRN nobody used before."""
        self.serial += 1
        self.stans[number(acquirer)] += 1
        moment = (START + timedelta(seconds=self.serial)).strftime("%m%d%H%M%S")
        return f"{self.stans[number(acquirer)]:06d}", moment, f"{self.serial:012d}"

    def message(
        self, mti: str, card: CardSpec, amount: int | None, acquirer: str, **extra: str
    ) -> dict[str, str]:
        stan, moment, rrn = self.fresh(acquirer)
        fields = {
            "t": mti,
            "2": card.pan,
            "3": "000000",
            "7": moment,
            "11": stan,
            "18": "5411",
            "32": acquirer,
            "37": rrn,
            "41": "TERM0001",
            "42": "MERCHANT0000001",
            "49": "978",
        }
        if amount is not None:
            fields["4"] = f"{amount:012d}"
        fields.update(extra)
        return fields

    # --- the model's lifecycle ----------------------------------------------------------------

    def draw(self, bound: int) -> int:
        """The processor's source of approval codes: what the model gave, in its order."""
        assert bound == APPROVAL_CODES, bound
        assert self.draws, "the processor drew an approval code the model did not give"
        return self.draws.popleft()

    def give_code(self, pan: str) -> str:
        """The next approval code of the card: its number goes to `draw`, after (every third
        time) one the card was given today already, which the processor must draw past."""
        card = self.cards[pan]
        day = self.now.date().toordinal()
        if card.approval_day != day:
            card.approval_day, card.approval_codes = day, []
        self.codes_given += 1
        given = card.approval_codes
        if given and self.codes_given % 3 == 0:
            self.draws.append(given[self.codes_given % len(given)])
            event("approval code drawn again")
        code = self.codes_given * 7_919 % APPROVAL_CODES  # leading zeros now and then
        while code in given:
            code = (code + 1) % APPROVAL_CODES
        self.draws.append(code)
        if len(given) < limits.approval_codes_remembered_max:
            insort(given, code)
        card.stored = True
        return f"{code:06d}"

    def count_usage(self, answer: ModelAnswer, pan: str, amount: int, mcc: str) -> None:
        """An approval counts in its card's and its account's spend-control usage."""
        assert answer.account is not None
        for usage in (self.cards[pan].usage, self.accounts[answer.account].usage):
            usage.count(self.now_ms, amount, mcc)
        answer.usage_amount, answer.usage_mcc = amount, mcc

    def give_back_usage(self, original: ModelAnswer, amount: int, full: bool) -> None:
        """A reversal gives back what the original counted: `amount` of it, and the approval
        itself when it is reversed in full (then the original counts nothing any more)."""
        if not original.usage_mcc or original.card_id is None or original.account is None:
            return
        amount = min(amount, original.usage_amount)
        if amount <= 0 and not full:
            return
        assert original.pan is not None
        for usage in (self.cards[original.pan].usage, self.accounts[original.account].usage):
            usage.give_back(
                self.now_ms, original.answered_ms, amount, int(full), original.usage_mcc
            )
        original.usage_amount -= amount
        if full:
            original.usage_mcc = ""

    def emit_load_events(self) -> None:
        """The load's: its programme controls, then each account's creation and balance as an
        entry, then each card's creation."""
        self.emit(None, type="controls.updated", reason="programme_controls", **NO_FACTS)
        for spec in ACCOUNTS:
            # Created empty: its balance arrives with the entry after.
            funded, self.accounts[spec.id].posted = self.accounts[spec.id].posted, 0
            self.emit(spec.id, type="account.created", reason="load_account", **NO_FACTS)
            self.accounts[spec.id].posted = funded
            if spec.posted:
                kind = "fund" if spec.posted > 0 else "debit"
                facts = {**NO_FACTS, "amount": abs(spec.posted), "entry_sequence": 1}
                self.emit(
                    spec.id,
                    type=f"account.{kind}ed",
                    reason=f"load_{kind}",
                    **facts,
                )
        for card in CARDS:
            if card.account is not None:
                facts = {
                    **NO_FACTS,
                    "card_id": card_id_for(HASHER.card_key(card.pan)),
                    "masked_pan": mask_pan(card.pan),
                }
                self.emit(card.account, type="card.created", reason="load_card", **facts)

    def emit(self, account_id: str | None, **facts: Any) -> None:
        """The next outbox record: numbered, and with its account's balances after the change."""
        account = None if account_id is None else self.accounts[account_id]
        if account is not None:
            account.events += 1
        # The model's messages carry no CVC2 (tests/unit/test_cvc2_authorization.py has them),
        # and nothing else has one: no event says what one showed.
        facts = {"cvc2": None, "cardholder_id": None, "kyc_status": None, **facts}
        self.events.append(
            modelled(
                OutboxRecord,
                sequence=len(self.events) + 1,
                account_id=account_id,
                account_sequence=0 if account is None else account.events,
                posted_after=None if account is None else account.posted,
                held_after=None if account is None else account.held,
                credit_limit=None if account is None else account.credit_limit,
                account_currency=None if account is None else "EUR",
                **facts,
            )
        )

    def open_hold(
        self, account: str, key: bytes, amount: int, fields: dict[str, str], pan: str
    ) -> ModelHold:
        hold_id = self.next_hold_id
        self.next_hold_id += 1
        mcc = fields["18"]
        lifetime = HOLD_LIFETIME_BY_MCC_S.get(mcc, HOLD_LIFETIME_S) * 1000
        hold = ModelHold(
            hold_id,
            account,
            key,
            amount,
            self.now_ms,
            self.now_ms + lifetime,
            pan,
            self.give_code(pan),
            mcc,
            fields.get("37"),
        )
        self.holds[hold_id] = hold
        self.accounts[account].held += amount
        return hold

    def close_hold(self, hold: ModelHold, status: str) -> None:
        assert hold.status == "open", f"model resolves hold {hold.hold_id} twice"
        hold.status = status
        hold.resolved_ms = self.now_ms
        self.accounts[hold.account].held -= hold.amount

    def lookup(self, fields: dict[str, str]) -> bytes | None:
        """The original a reversal or completion points at (specs/messages.md, matching)."""
        data = fields.get("90")
        if data is not None and len(data) == 42 and data.isdigit():
            message_class = data[:3] + "0"
            key = f"{message_class}|{number(data[20:31])}|{data[4:10]}|{data[10:20]}".encode()
            if message_class in ORIGINAL_CLASSES and key in self.answers:
                return key
        if "37" in fields:
            return self.rrn_index.get(f"{number(fields['32'])}|{fields['11']}|{fields['37']}")
        return None

    def decide(
        self, fields: dict[str, str], card: CardSpec
    ) -> tuple[str, str, int, dict[str, str]]:
        """0100/0200: (code, reason, amount approved, response fields beyond the echo and 39)."""
        if card.account is None:
            return "14", "card_not_found", 0, {}
        account = self.accounts[card.account]
        transaction_type = fields["3"][:2]
        if transaction_type == "31":
            blocks = balance_blocks(fields["3"][2:4], account.posted, account.available)
            # An approval carries its code, an inquiry's too (it holds nothing).
            return "00", "balance_inquiry", 0, {"54": blocks, "38": self.give_code(card.pan)}
        # Where the card may be used before the amount: an account verification too.
        if fields["18"] in PROGRAMME_BLOCKED_MCCS:
            return "57", "mcc_blocked", 0, {}
        amount = int(fields.get("4", "0"))
        if amount == 0 and "4" in fields and transaction_type == "00":
            return "85", "account_verified", 0, {}  # an account verification: nothing held
        if amount == 0:
            return "13", "invalid_amount", 0, {}
        if card.limit is not None and amount > card.limit:
            return "61", "per_authorization_amount_limit", 0, {}
        available = account.available
        if amount > available:
            if available > 0 and transaction_type == "00" and fields.get("48") == PARTIAL_OK:
                return "10", "partial_approval", available, {"4": f"{available:012d}"}
            return "51", "insufficient_funds", 0, {}
        return "00", "approved", amount, {}

    def handle(self, fields: dict[str, str], card: CardSpec) -> tuple[ModelAnswer, dict[str, str]]:
        """A first arrival: what the processor must answer and do (mirrors the catalogue)."""
        message_class = fields["t"][:3] + "0"
        key = answer_key(fields)
        answer = ModelAnswer(content(fields), "00", "", fields["t"], self.now_ms)
        if message_class in ORIGINAL_CLASSES:
            answer.pan = card.pan
        response: dict[str, str] = {}
        if message_class in ("0100", "0200"):
            code, reason, approved, response = self.decide(fields, card)
            answer.code, answer.reason, answer.account = code, reason, card.account
            answer.card_id = self.card_ids.get(card.pan)
            if approved:
                assert card.account is not None
                account = self.accounts[card.account]
                before = account.available
                self.count_usage(answer, card.pan, approved, fields["18"])
                if message_class == "0100":
                    hold = self.open_hold(card.account, key, approved, fields, card.pan)
                    answer.hold_id = hold.hold_id
                    response["38"] = hold.approval_code
                else:
                    account.posted -= approved
                    answer.posted_amount = approved
                    response["38"] = self.give_code(card.pan)
                # Requests the processor decides never overdraw.
                assert 0 <= account.available < before
        elif message_class == "0120":
            answer.reason = self.stand_in(fields, card, key, answer)
        elif message_class == "0220":
            answer.reason = self.completion(fields, card, int(fields["4"]), answer)
        else:
            answer.code, answer.reason = self.reversal(fields, message_class, answer)
            if answer.reason in ("orphan_reversal", "original_not_found") and card.account:
                # About a known card all the same: in its account's stream and history.
                answer.account, answer.card_id = card.account, self.card_ids.get(card.pan)
            if answer.reason in ("orphan_reversal", "original_not_found") and answer.card_id:
                self.mark_reversed_unseen(fields, answer)  # a known card's reversal only
        return answer, response

    def mark_reversed_unseen(self, fields: dict[str, str], orphan: ModelAnswer) -> None:
        """The original field 90 names, marked: should it come after, it holds nothing."""
        data = fields.get("90")
        if data is None or len(data) != 42 or not data.isdigit():
            return
        named = f"{data[:3]}0|{number(data[20:31])}|{data[4:10]}|{data[10:20]}".encode()
        if named[:4].decode() in ORIGINAL_CLASSES and named not in self.answers:
            self.answers[named] = ModelAnswer(
                (("marker", ""),),
                "25",
                "reversed_before_original",
                "",
                self.now_ms,
                account=orphan.account,
                card_id=orphan.card_id,
                marker=True,
            )

    def stand_in(
        self, fields: dict[str, str], card: CardSpec, key: bytes, answer: ModelAnswer
    ) -> str:
        if fields.get("39") not in (None, "00", "10"):
            answer.card_id = self.card_ids.get(card.pan)
            answer.account = card.account  # in its account's stream and history
            return "advice_of_decline"
        if card.account is None:
            return "advice_unknown_card"
        answer.account, answer.card_id = card.account, self.card_ids[card.pan]
        if fields["3"][:2] not in ("00", "01", "09"):
            return "advice_unsupported_processing_code"
        hold = self.open_hold(card.account, key, int(fields["4"]), fields, card.pan)
        answer.hold_id = hold.hold_id
        # Spent is spent: a stand-in approval counts against the controls' usage.
        self.count_usage(answer, card.pan, hold.amount, fields["18"])
        account = self.accounts[card.account]
        if account.available < 0:
            account.overdrawn_by_network = True
            return "stand_in_overdrawn"
        return "stand_in_approved"

    def completion(
        self, fields: dict[str, str], card: CardSpec, amount: int, answer: ModelAnswer
    ) -> str:
        if not amount:  # nothing to capture or post: acknowledged, nothing changes
            # About its card's account all the same: in that account's stream.
            answer.account, answer.card_id = card.account, self.card_ids.get(card.pan)
            return "completion_invalid_amount"
        found = self.lookup(fields)
        original = self.answers[found] if found is not None else None
        if original is not None and original.posted_amount:  # a 0200: posted when approved
            answer.account, answer.card_id = original.account, original.card_id
            # Reversed since, in whole or in part: posted again up to field 4, once.
            debit = amount - (original.posted_amount - original.reversed_amount)
            if not original.reversed_amount or debit <= 0:
                return "already_posted"
            self.debit(original.account, debit)
            original.posted_amount += debit
            original.settled_ms = self.now_ms
            answer.posted_amount = answer.moved = debit  # its event says it beside field 4
            return "force_post"
        if original is not None and original.hold_id is not None:
            hold = self.holds[original.hold_id]
            answer.detail = f"of a {hold.status} hold"
            answer.card_id = self.card_ids[hold.pan]
            if hold.status == "captured":  # a second completion: the first one posted it
                answer.hold_id, answer.account = hold.hold_id, hold.account
                return "already_captured"
            if hold.status == "open":
                self.close_hold(hold, "captured")
                hold.captured_amount = amount
                account = self.accounts[hold.account]
                account.posted -= amount
                if account.available < 0:
                    account.overdrawn_by_network = True
                answer.hold_id, answer.account = hold.hold_id, hold.account
                answer.posted_amount = amount
                return "captured"
        if card.account is None:
            answer.card_id = None
            return "completion_unknown_card"
        account = self.accounts[card.account]
        account.posted -= amount
        if account.available < 0:
            account.overdrawn_by_network = True
        answer.account, answer.posted_amount = card.account, amount
        answer.card_id = self.card_ids[card.pan]
        if original is not None:  # marked posted: the next completion or presentment of it
            original.posted_amount = amount  # finds it so (already_posted)
            return "force_post"
        data = fields.get("90", "")
        if len(data) == 42 and data.isdigit() and data[:3] + "0" in ORIGINAL_CLASSES:
            # Field 90 names an original nobody answered: a marker under its key says posted.
            named = f"{data[:3]}0|{number(data[20:31])}|{data[4:10]}|{data[10:20]}".encode()
            lookup = (
                f"{number(data[20:31])}|{data[4:10]}|{fields['37']}" if "37" in fields else None
            )
            self.mark_posted(named, card.account, card.pan, amount, lookup, fields.get("37"))
        elif "37" in fields:  # its own answer stands for the original its RRN names
            own = f"{number(fields['32'])}|{fields['11']}|{fields['37']}"
            self.rrn_index.setdefault(own, answer_key(fields))
        return "force_post"

    def mark_posted(
        self,
        key: bytes,
        account: str,
        pan: str,
        amount: int,
        rrn_lookup: str | None,
        rrn: str | None,
    ) -> None:
        """What a force post leaves under the key of an original it did not find."""
        original = self.answers.get(key)
        if original is None:
            original = self.answers[key] = ModelAnswer(
                (("marker", ""),),
                "00",
                "posted_without_original",
                "",
                self.now_ms,
                account=account,
                card_id=self.card_ids[pan],
                pan=pan,
                marker=True,
                stored={} if rrn is None else {"37": rrn},
            )
        original.posted_amount = amount
        if rrn_lookup is not None:
            self.rrn_index.setdefault(rrn_lookup, key)

    def reversal(
        self, fields: dict[str, str], message_class: str, answer: ModelAnswer
    ) -> tuple[str, str]:
        found = self.lookup(fields)
        if found is not None and self.answers[found].reason == "reversed_before_original":
            found = None  # an earlier reversal's mark: the original is still unseen
        if found is None:
            return (
                ("00", "orphan_reversal")
                if message_class == "0420"
                else ("25", "original_not_found")
            )
        original = self.answers[found]
        answer.account, answer.card_id = original.account, original.card_id
        if original.code not in ("00", "10"):
            return "00", "original_declined"
        target = int(fields["95"][:12]) if "95" in fields else 0
        if original.hold_id is not None:
            hold = self.holds[original.hold_id]
            answer.hold_id = hold.hold_id
            answer.detail = f"of a {hold.status} hold"
            if hold.status != "open":
                return "00", "already_resolved"
            if target == 0:
                answer.moved = hold.amount
                self.give_back_usage(original, hold.amount, full=True)
                self.close_hold(hold, "released")
                return "00", "reversed"
            if target < hold.amount:
                answer.moved = hold.amount - target
                self.give_back_usage(original, hold.amount - target, full=False)
                self.accounts[hold.account].held -= hold.amount - target
                hold.amount = target
                return "00", "partially_reversed"
            return "00", "reversal_no_change"
        if original.posted_amount and original.settled_ms:
            answer.detail = "of a settled posting"  # posted again over its reversal
            return "00", "already_resolved"
        if original.posted_amount and not original.mti.startswith("020"):
            answer.detail = "of a force post"  # posted later, by a completion or presentment
            return "00", "already_resolved"
        if original.posted_amount:
            answer.detail = "of a posting" + (
                " already reversed" if original.reversed_amount else ""
            )
            credit = original.posted_amount - original.reversed_amount - target
            if credit <= 0 or original.account is None:
                return "00", "already_resolved"
            self.accounts[original.account].posted += credit
            answer.moved = credit
            self.give_back_usage(original, credit, full=target == 0)
            original.reversed_amount += credit
            return "00", "reversed" if target == 0 else "partially_reversed"
        return "00", "nothing_to_reverse"

    def expect(self, fields: dict[str, str], card: CardSpec) -> Expectation:
        """Apply one request to the model, in batch order, and say what it must be answered."""
        key = answer_key(fields)
        stored = self.answers.get(key)
        if (
            stored is not None
            and stored.reason == "reversed_before_original"
            and stored.card_id != self.card_ids.get(card.pan)
        ):
            stored = None  # another card's reversal mark: decided as new, in its place
        self.sent.append(Sent(fields, card))
        if stored is not None:
            if stored.content == content(fields):
                # The first answer again, with this request's PAN (the same: same content).
                response = dict(stored.sent, **{"2": fields["2"]})
                return Expectation(
                    "retransmit", fields, key, stored.code, "retransmission", response
                )
            # Never applied; declined 94, or acknowledged 00 when it is an advice.
            code = "00" if fields["t"][:3] + "0" in ADVICE_CLASSES else "94"
            # A marker (a force post's or an early reversal's) makes the original late.
            reason = "late_original" if stored.marker else "duplicate_different_content"
            return Expectation("conflict", fields, key, code, reason, reply(fields, code))
        answer, extra = self.handle(fields, card)
        response = reply(fields, answer.code, extra)
        # Stored without the PAN, and without what a replay takes from the retransmission.
        answer.sent = response
        answer.stored = {k: v for k, v in response.items() if k not in ("2", "t", "39", "7", "11")}
        self.answers[key] = answer
        # At the head of its card's and its account's histories.
        if answer.card_id is not None:
            state = self.card_by_id[answer.card_id]
            answer.previous_for_card, state.last_answer = state.last_answer, key
            state.stored = True
        if answer.account is not None:
            account = self.accounts[answer.account]
            previous = account.last_answer
            # Stored as b"" (SAME_AS_CARD) when it is the card's link too (specs/ledger.md).
            same = previous is not None and previous == answer.previous_for_card
            answer.previous_for_account = b"" if same else previous
            account.last_answer = key
        message_class = fields["t"][:3] + "0"
        self.emit(
            answer.account,
            type=event_type_of(message_class, answer.code, answer.reason),
            created_ms=self.now_ms,
            card_id=answer.card_id,
            masked_pan=masked(fields["2"]),
            answer_key=key.decode(),
            mti=fields["t"],
            processing_code=fields["3"],
            amount=int(fields["4"]) if "4" in fields else None,
            currency=fields["49"],
            # Nothing is converted here (no field 6): but a partial approval's event says what
            # was approved and held (the answer's field 4) beside what was asked, and a
            # reversal's what it gave back when that is not its field 4.
            billing_amount=(
                int(response["4"])
                if "4" in response and "4" in fields and response["4"] != fields["4"]
                else answer.moved
                if answer.moved is not None and answer.moved != int(fields.get("4", "-1"))
                else None
            ),
            mcc=fields["18"],
            merchant_name_location=None,  # field 43: never sent
            terminal=fields.get("41"),
            merchant_id=fields.get("42"),
            response_code=answer.code,
            reason=answer.reason,
            stan=fields["11"],
            rrn=fields.get("37"),
            acquirer=fields["32"],
            approval_code=response.get("38"),
            hold_id=answer.hold_id,
            in_answer=True,  # stored compact; the reader fills these facts from the answer
            entry_sequence=None,  # network messages make no API ledger entry
        )
        if message_class in ORIGINAL_CLASSES:
            self.rrn_index[f"{number(fields['32'])}|{fields['11']}|{fields['37']}"] = key
            self.originals.append(Sent(fields, card))
        else:
            self.followups.append(Sent(fields, card))
        return Expectation("new", fields, key, answer.code, answer.reason, response, answer.detail)

    # --- operations ---------------------------------------------------------------------------

    def pick(self, sent: list[Sent], target: tuple[str, int]) -> Sent:
        how, which = target
        if how in ("held", "posted"):
            answers = [self.answers[answer_key(candidate.fields)] for candidate in sent]
            sent = [
                candidate
                for candidate, answer in zip(sent, answers, strict=True)
                if (answer.hold_id if how == "held" else answer.posted_amount)
            ] or sent
        elif how == "recent":
            sent = sent[-3:]
        return sent[which % len(sent)]

    def build(self, operation: tuple[Any, ...]) -> tuple[dict[str, str], CardSpec] | None:
        kind = operation[0]
        if kind in ("0100", "0200"):
            _, card_index, amount, acquirer, mcc, processing, partial, repeat = operation
            card = CARDS[card_index]
            if isinstance(amount, tuple):  # ("available", offset)
                available = self.accounts[card.account].available if card.account else 0
                amount = max(0, available + amount[1])
            mti = kind[:3] + ("1" if repeat else "0")
            extra = {"3": processing, "18": mcc}
            if partial:
                extra["48"] = PARTIAL_OK
            inquiry = processing.startswith("31")
            return self.message(mti, card, None if inquiry else amount, acquirer, **extra), card
        if kind == "0120":
            _, card_index, amount, acquirer, mcc, stand_in, repeat, processing = operation
            card = CARDS[card_index]
            mti = "0121" if repeat else "0120"
            extra = {"3": processing, "18": mcc, "39": stand_in}
            return self.message(mti, card, amount, acquirer, **extra), card
        if kind == "0220":
            _, which, mode, delta, card_index, repeat = operation
            mti = "0221" if repeat else "0220"
            if mode == "none" or not self.originals:
                card = CARDS[card_index]
                ghost = self.message("0100", card, 100, ACQUIRERS[0])
                extra = {"90": original_data(ghost)} if mode != "rrn" else {}
                return self.message(mti, card, max(1, 1_000 + delta), ACQUIRERS[1], **extra), card
            original = self.pick(self.originals, which)
            return self.follow_up(mti, original, mode, delta, None), original.card
        if kind in ("0400", "0420"):
            _, which, mode, percent, repeat = operation
            if not self.originals:
                return None
            original = self.pick(self.originals, which)
            mti = kind[:3] + ("1" if repeat else "0")
            return self.follow_up(mti, original, mode, None, percent), original.card
        if kind == "orphan":
            _, mti, card_index, with_90 = operation
            card = CARDS[card_index]
            ghost = self.message("0100", card, 2_000, ACQUIRERS[0])
            extra = {"90": original_data(ghost)} if with_90 else {}
            return self.message(mti, card, 2_000, ACQUIRERS[1], **extra), card
        if kind == "retransmit":
            _, which, repeat = operation
            if not self.sent:
                return None
            sent = self.pick(self.sent, which)
            fields = dict(sent.fields)
            if repeat:
                fields["t"] = fields["t"][:3] + "1"
            return fields, sent.card
        if kind == "conflict":
            _, which, changed, delta = operation
            if not self.sent:
                return None
            sent = self.pick(self.sent, which)
            fields, card = dict(sent.fields), sent.card
            if changed == "4":
                fields["4"] = f"{int(fields.get('4', '0')) + delta:012d}"
            elif changed == "2":  # another card
                card = CARDS[(CARDS.index(card) + 1 + delta % 3) % len(CARDS)]
                fields["2"] = card.pan
            elif changed == "18":
                fields["18"] = "5999" if fields["18"] != "5999" else "5411"
            else:
                fields["41"] = f"T{delta:07d}"
            return fields, card
        if kind == "conflict_unfingerprinted":  # known bug 1
            if not self.followups:
                return None
            sent = self.followups[operation[1] % len(self.followups)]
            fields = dict(sent.fields)
            fields["95"] = replacement(int(fields["4"]) // 3 + 1)
            return fields, sent.card
        if kind == "point_at_non_original":  # known bug 2
            _, mti, which = operation
            if not self.followups:
                return None
            target = self.followups[which % len(self.followups)]
            fields = self.message(mti, target.card, int(target.fields["4"]), target.fields["32"])
            fields["90"] = original_data(target.fields)
            return fields, target.card
        raise AssertionError(kind)

    def follow_up(
        self,
        mti: str,
        original: Sent,
        mode: str,
        delta: int | None,
        percent: int | None,
    ) -> dict[str, str]:
        """A completion or reversal of `original`, through field 90 or acquirer+STAN+RRN."""
        base = int(original.fields.get("4", "1000"))
        amount = max(1, base + delta) if delta is not None else base
        acquirer = original.fields["32"]
        fields = self.message(mti, original.card, amount, acquirer)
        fields["37"] = original.fields["37"]
        if mode == "f90":
            fields["90"] = original_data(original.fields)
        else:  # the original's own acquirer, STAN and RRN; a field 7 of its own
            fields["11"] = original.fields["11"]
        if percent is not None:
            fields["95"] = replacement(base * percent // 100)
        return fields

    # --- clearing -----------------------------------------------------------------------------

    def state_of(self, original: Sent) -> str:
        answer = self.answers[answer_key(original.fields)]
        if answer.hold_id is not None:
            return self.holds[answer.hold_id].status
        return "posted" if answer.posted_amount else "declined"

    def original_in_state(self, state: str, which: int) -> Sent | None:
        pool = [s for s in self.originals if state in ("any", self.state_of(s))]
        pool = pool or self.originals
        return pool[which % len(pool)] if pool else None

    def base_amount(self, original: Sent) -> int:
        """What is held for `original` now, or its field 4 when nothing is."""
        answer = self.answers[answer_key(original.fields)]
        if answer.hold_id is not None:
            return self.holds[answer.hold_id].amount
        return max(1, int(original.fields.get("4", "1000")))  # a declined one may ask for 0

    def pointing_at(self, original: Sent, pointer: str, which: int, spelt: bool) -> dict[str, Any]:
        """The keys of a clearing record that find `original` by key or by RRN, or miss it."""
        fields = original.fields
        message_class = fields["t"][:3] + "0"
        record: dict[str, Any] = {
            "acquirer": fields["32"],
            "stan": fields["11"],
            "transmission_datetime": fields["7"],
        }
        if message_class != "0100" or spelt:
            record["original_mti"] = message_class
        if pointer == "key":
            if spelt:
                record["rrn"] = fields["37"]
        elif pointer == "rrn":  # the key misses through field 7 or the message class
            if which % 2:
                record["transmission_datetime"] = NEVER_SENT
            else:
                index = ORIGINAL_CLASSES.index(message_class)
                record["original_mti"] = ORIGINAL_CLASSES[(index + 1 + which // 2 % 2) % 3]
            record["rrn"] = fields["37"]
        else:  # the key misses, and the RRN (when there is one) is nobody's
            record["transmission_datetime"] = NEVER_SENT
            if spelt:
                record["rrn"] = "NOBODYS0RRN0"
        return record

    def ghost(self) -> dict[str, Any]:
        """Keys of an original nobody sent."""
        stan, moment, _ = self.fresh(ACQUIRERS[1])
        return {"acquirer": ACQUIRERS[1], "stan": stan, "transmission_datetime": moment}

    def clearing_line(
        self, operation: tuple[Any, ...]
    ) -> tuple[bytes, dict[str, Any] | None, str | None]:
        """(the line, its record or None when it is not a valid one, the id a rejection shows)."""
        self.record_serial += 1
        record_id = f"clr-{self.record_serial:05d}"
        kind = operation[0]
        record: dict[str, Any] = {"record_id": record_id, "type": "purchase"}
        original: Sent | None = None
        if kind in ("purchase", "other_card"):
            original = self.original_in_state(operation[1], operation[2])
        elif kind == "currency" and not operation[3]:
            original = self.original_in_state("any", operation[1])
        if kind == "repeat" and not self.clearing_sent:
            kind, operation = "unmatched", ("unmatched", 1, 1_000)
        if kind == "purchase":
            _, _, which, pointer, delta, spelt = operation
            if original is None:  # nothing sent yet: a force post
                record.update(pan=CARDS[which % len(CARDS)].pan, **self.ghost())
                record.update(amount=max(1, 1_000 + delta), currency="EUR")
            else:
                record.update(
                    pan=original.card.pan, **self.pointing_at(original, pointer, which, spelt)
                )
                record.update(amount=max(1, self.base_amount(original) + delta), currency="EUR")
        elif kind in ("unmatched", "refund"):
            _, card_index, amount = operation
            record.update(type="purchase" if kind == "unmatched" else "refund")
            record.update(pan=CARDS[card_index].pan, **self.ghost(), amount=amount, currency="EUR")
        elif kind == "repeat":
            _, which, how = operation
            record = dict(self.clearing_sent[which % len(self.clearing_sent)])
            if how == "respelt":  # the same record: keys reordered, zeros, the default spelt
                record = dict(reversed(record.items()))
                acquirer = record["acquirer"]
                record["acquirer"] = number(acquirer) if acquirer[0] == "0" else "00" + acquirer
                if record.get("original_mti", "0100") == "0100":
                    if "original_mti" in record:
                        del record["original_mti"]
                    else:
                        record["original_mti"] = "0100"
            elif how == "amount":
                record["amount"] += 1 + which % 997
            elif how == "type":
                record["type"] = "refund" if record["type"] == "purchase" else "purchase"
            elif how == "card":
                index = CARDS.index(CARD_BY_PAN[record["pan"]])
                record["pan"] = CARDS[(index + 1 + which % 3) % len(CARDS)].pan
            record_id = record["record_id"]
        elif kind == "currency":
            _, which, currency, _ = operation
            if original is None:  # a refund
                record.update(type="refund", pan=CARDS[which % len(CARDS)].pan, **self.ghost())
                record.update(amount=1_000 + which % 1_000)
            else:
                record.update(pan=original.card.pan, **self.pointing_at(original, "key", 0, False))
                record.update(amount=self.base_amount(original))
            record["currency"] = currency
        elif kind == "other_card":
            _, _, which, other = operation
            if original is None:
                record.update(pan=CARDS[0].pan, **self.ghost(), amount=1_000)
            else:
                others = [c.pan for c in CARDS[:3] if c.pan != original.card.pan]
                record.update(pan=others[other % len(others)])
                record.update(self.pointing_at(original, "key", which, False))
                record.update(amount=self.base_amount(original))
            record["currency"] = "EUR"
        else:  # invalid: not a clearing record
            _, how = operation
            record.update(pan=CARDS[1].pan, **self.ghost(), amount=1_000, currency="EUR")
            shown_id: str | None = record_id
            if how == "amount_zero":
                record["amount"] = 0
            elif how == "float_amount":
                record["amount"] = 27.5
            elif how == "luhn":
                record["pan"] = CARDS[1].pan[:-1] + str((int(CARDS[1].pan[-1]) + 1) % 10)
            elif how == "unknown_key":
                record["RRN"] = "633012000001"  # misspelt
            elif how == "pan_in_id":
                record["record_id"] = f"clr-{record['pan']}"
                shown_id = None  # holds its own PAN: its id is not shown
            line = json.dumps(record).encode()
            if how == "not_json":
                line, shown_id = line[:-9], None
            return line, None, shown_id
        self.clearing_sent.append(record)
        return json.dumps(record).encode(), record, record_id

    def clearing_lookup(self, record: dict[str, Any]) -> bytes | None:
        """The original a clearing purchase points at (specs/clearing.md, matching)."""
        acquirer, stan = number(record["acquirer"]), record["stan"]
        mti = record.get("original_mti", "0100")
        key = f"{mti}|{acquirer}|{stan}|{record['transmission_datetime']}".encode()
        if key in self.answers:
            return key
        if "rrn" in record:
            return self.rrn_index.get(f"{acquirer}|{stan}|{record['rrn']}")
        return None

    def debit(self, account_id: str, amount: int) -> None:
        """Clearing cannot be declined: it may overdraw."""
        account = self.accounts[account_id]
        account.posted -= amount
        if account.available < 0:
            account.overdrawn_by_network = True

    def present(self, record: dict[str, Any]) -> tuple[str, str]:
        """Apply one clearing record to the model: (outcome, detail) or ("rejected", reason)."""
        record_id, pan, amount = record["record_id"], record["pan"], record["amount"]
        stored = self.cleared.get(record_id)
        if stored is not None:
            if stored.content != clearing_content(record):
                return "rejected", "record_id_reused"
            return "duplicate", ""
        card = CARD_BY_PAN[pan]
        if card.account is None:
            return "rejected", "unknown_card"
        # Every account is in EUR: a record in another currency is rejected, once it is known
        # to be this card's (the currency is that of the account it is about).
        mismatch = record["currency"] != "EUR"
        outcome, account_id, hold_id, detail = "", card.account, None, ""
        moved: int | None = None  # what was debited, when not the record's amount
        found: bytes | None = None
        if record["type"] == "refund":
            if mismatch:
                return "rejected", "currency_mismatch"
            self.accounts[card.account].posted += amount
            outcome = "refund"
        else:
            found = self.clearing_lookup(record)
            original = None if found is None else self.answers[found]
            # Declined before its card was known: no card's, so no other card's either.
            no_card = original is not None and CARD_BY_PAN[original.pan].account is None
            # A held original force-posted once its hold was gone is posted: row 1 first.
            if original is not None and original.hold_id is not None and not original.posted_amount:
                hold = self.holds[original.hold_id]
                detail = f"of a {hold.status} hold"
                if hold.pan != pan:
                    return "rejected", "card_mismatch"
                if mismatch:
                    return "rejected", "currency_mismatch"
                if hold.status == "captured":
                    outcome, account_id, hold_id = "already_captured", hold.account, hold.hold_id
                elif hold.status == "open":
                    if amount != hold.amount:
                        detail += " below" if amount < hold.amount else " above"
                    if hold.expires_ms <= self.now_ms:  # not swept yet: still open
                        detail += " past its expiry"
                    self.close_hold(hold, "captured")
                    hold.captured_amount = amount
                    self.debit(hold.account, amount)
                    outcome, account_id, hold_id = "matched", hold.account, hold.hold_id
            elif original is not None and original.posted_amount:
                if original.pan != pan and not no_card:
                    return "rejected", "card_mismatch"
                if mismatch:
                    return "rejected", "currency_mismatch"
                outcome, account_id = "already_posted", original.account or card.account
                if original.reversed_amount:
                    # The spec's table (row 1a): a 0200 reversed since is posted again up to
                    # the presented amount, once, as a reversed 0100's released hold is.
                    detail = "after a reversal"
                    debit = amount - (original.posted_amount - original.reversed_amount)
                    if debit > 0:
                        self.debit(account_id, debit)
                        original.posted_amount += debit
                        original.settled_ms = self.now_ms
                        outcome = "force_posted"
                        moved = debit if debit != amount else None  # the event says it
            elif original is not None:  # declined, a balance inquiry, an advice of decline
                if original.pan != pan and not no_card:
                    # The spec: the original must belong to the record's card. Known bug 3: the
                    # code force-posts instead; `steer` keeps the machine off this path.
                    return "rejected", "card_mismatch"
                detail = "of a declined original"
            if mismatch and not outcome:
                return "rejected", "currency_mismatch"
            if not outcome:
                self.debit(card.account, amount)
                outcome = "force_posted"
                if original is not None:  # marked posted, as a 0220's force-post marks it
                    original.posted_amount = amount
                else:  # nothing found: posted all the same, under the key the record names
                    named = (
                        f"{record.get('original_mti', '0100')}|{number(record['acquirer'])}|"
                        f"{record['stan']}|{record['transmission_datetime']}"
                    ).encode()
                    lookup = (
                        f"{number(record['acquirer'])}|{record['stan']}|{record['rrn']}"
                        if "rrn" in record
                        else None
                    )
                    self.mark_posted(named, card.account, pan, amount, lookup, record.get("rrn"))
        self.cleared[record_id] = ModelCleared(
            clearing_content(record),
            outcome,
            pan,
            account_id,
            amount,
            record["currency"],
            hold_id,
            self.now_ms,
        )
        purchase = record["type"] == "purchase"
        self.emit(
            account_id,
            type="transaction.cleared" if purchase else "transaction.refunded",
            created_ms=self.now_ms,
            card_id=self.card_ids[pan],
            masked_pan=masked(pan),
            answer_key=(
                # The authorisation found (by key or RRN), else the one the record names.
                (
                    found.decode()
                    if found is not None
                    else f"{record.get('original_mti', '0100')}|{number(record['acquirer'])}|"
                    f"{record['stan']}|{record['transmission_datetime']}"
                )
                if purchase
                else None
            ),
            mti="",
            processing_code=None,
            amount=amount,
            currency="978",  # EUR: records in other currencies are rejected
            billing_amount=moved,
            mcc=None,
            merchant_name_location=None,
            terminal=None,
            merchant_id=None,
            response_code="",
            reason=outcome,
            stan=record["stan"],
            rrn=record.get("rrn"),
            acquirer=record["acquirer"],
            approval_code=None,
            hold_id=hold_id,
            in_answer=False,  # a clearing record has no answer: the event keeps its facts
            entry_sequence=None,
        )
        return outcome, detail

    # --- rules --------------------------------------------------------------------------------

    @rule(operations=OPERATIONS)
    def batch(self, operations: list[tuple[Any, ...]]) -> None:
        requests: list[AuthorizationRequest] = []
        expectations: list[Expectation] = []
        self.now += timedelta(seconds=1)
        for operation in operations:
            built = self.build(operation)
            if built is None:
                continue
            fields, card = built
            request = decode_request(fields)
            assert answer_key(fields).endswith(b"|" + request.identity)
            expectations.append(self.expect(fields, card))
            requests.append(request)
        if not requests:
            return
        posted_before = self.ledger_posted()

        outcomes = self.authorizer.authorize_batch(requests, self.now)
        self.clock_ms = self.now_ms  # the ledger's clock: time here only moves on

        assert not self.draws, f"approval codes given but never drawn: {list(self.draws)}"
        assert len(outcomes) == len(requests)  # every request answered exactly once
        moved = False
        for request, expectation, outcome in zip(requests, expectations, outcomes, strict=True):
            self.check_outcome(request, expectation, outcome)
            moved |= expectation.kind == "new" and (request.mti[:3] + "0", outcome.reason) in (
                POSTING
            )
        if not moved:
            assert self.ledger_posted() == posted_before, "posted moved without a posting message"
        for account in self.accounts.values():
            if account.available >= 0:
                account.overdrawn_by_network = False

    def check_outcome(
        self, request: AuthorizationRequest, expectation: Expectation, outcome: Outcome
    ) -> None:
        fields = response_fields(CODEC.encode(outcome.fields))
        message_class = request.mti[:3] + "0"
        event(
            f"{message_class} {expectation.kind} {outcome.response_code} {outcome.reason} "
            f"{expectation.detail}".strip()
        )
        assert outcome.mti == request.mti
        assert fields["t"] == response_mti(request.mti)
        assert fields["2"] == request.pan
        assert fields["11"] == request.stan
        assert fields["39"] == outcome.response_code
        assert (outcome.response_code, outcome.reason) == (expectation.code, expectation.reason), (
            expectation.kind,
            expectation.fields,
        )
        if message_class in ADVICE_CLASSES and expectation.kind != "conflict":
            assert outcome.response_code == "00"  # advices are always acknowledged
        on_the_wire = {k: v for k, v in fields.items() if k not in ("p", "1")}  # not bitmaps
        if on_the_wire != expectation.response:
            wrong = {
                k: (on_the_wire.get(k), expectation.response.get(k))
                for k in on_the_wire.keys() | expectation.response.keys()
                if on_the_wire.get(k) != expectation.response.get(k)
            }
            raise AssertionError(f"response (sent, model) {wrong} to {expectation.fields}")
        answer = self.answers[expectation.key]
        if expectation.kind == "retransmit":
            assert CODEC.encode(outcome.fields) == answer.response, "retransmission got other bytes"
            return
        if expectation.kind == "new":
            assert answer.response is None
            answer.response = CODEC.encode(outcome.fields)

    def ledger_posted(self) -> dict[str, int]:
        with self.ledger.read() as reader:
            posted = {}
            for spec in ACCOUNTS:
                account = reader.account(spec.id)
                assert account is not None
                posted[spec.id] = account.posted
            return posted

    @rule(seconds=CLOCK_JUMP, limit=SWEEP_LIMIT, to_expiry=TO_EXPIRY)
    def clock(self, seconds: int, limit: int, to_expiry: int | None) -> None:
        upcoming = [
            h.expires_ms
            for h in self.holds.values()
            if h.status == "open" and h.expires_ms > self.now_ms
        ]
        if to_expiry is not None and upcoming:
            seconds = max(0, (min(upcoming) - self.now_ms) // 1000 + to_expiry)
        self.now += timedelta(seconds=seconds)
        posted_before = self.ledger_posted()
        due = sorted(
            (h for h in self.holds.values() if h.status == "open" and h.expires_ms <= self.now_ms),
            key=lambda h: (h.expires_ms, h.hold_id),
        )[:limit]
        for hold in due:
            self.close_hold(hold, "expired")
            self.emit(
                hold.account,
                type="authorization.expired",
                created_ms=self.now_ms,
                card_id=self.card_ids[hold.pan],
                masked_pan=None,
                answer_key=hold.key.decode(),
                mti="",
                processing_code=None,
                amount=hold.amount,
                currency=None,
                billing_amount=None,
                mcc=hold.mcc,
                merchant_name_location=None,
                terminal=None,
                merchant_id=None,
                response_code="",
                reason="hold_expired",
                stan=None,
                rrn=hold.rrn,
                acquirer=None,
                approval_code=hold.approval_code,
                hold_id=hold.hold_id,
                in_answer=False,
                entry_sequence=None,
            )
        event(f"sweep released {min(len(due), 3)}{'+' if len(due) > 3 else ''}")
        assert self.authorizer.sweep_expired(self.now, limit) == len(due)
        self.clock_ms = self.now_ms
        assert self.ledger_posted() == posted_before, "the sweeper moved posted"

    @precondition(lambda self: self.originals)  # something to point at
    @rule(operations=PRESENTMENT, chunk_size=CHUNK_SIZE)
    def clearing(self, operations: list[tuple[Any, ...]], chunk_size: int) -> None:
        self.now += timedelta(seconds=1)
        lines: list[bytes] = []
        rejections: list[tuple[int, str | None, str]] = []  # line, record id shown, reason
        counts = dict.fromkeys((outcome for outcome, _ in CLEARING_COUNTERS), 0)
        for line_number, operation in enumerate(operations, start=1):
            line, record, shown_id = self.clearing_line(operation)
            lines.append(line)
            outcome, detail = (
                ("rejected", "invalid_record") if record is None else (self.present(record))
            )
            event(f"clearing {outcome} {detail}".strip())
            if outcome == "rejected":
                rejections.append((line_number, shown_id, detail))
                if record is not None:
                    self.never_cleared.add(record["record_id"])
            else:
                counts[outcome] += 1
        posted_before = self.ledger_posted()

        summary = apply_clearing(
            self.ledger, parse_lines(lines), HASHER, self.now, chunk_size=chunk_size
        )
        self.clock_ms = self.now_ms

        assert summary.records == len(lines)
        assert summary.transactions == -(-len(lines) // chunk_size)
        assert {outcome: getattr(summary, counter) for outcome, counter in CLEARING_COUNTERS} == (
            counts
        )
        assert [
            (rejection.line, rejection.record_id, rejection.reason.partition(": ")[0])
            for rejection in summary.rejections
        ] == rejections
        for rejection in summary.rejections:
            for card in CARDS:
                assert card.pan not in f"{rejection.record_id} {rejection.reason}"
        if not any(counts[outcome] for outcome in ("matched", "force_posted", "refund")):
            assert self.ledger_posted() == posted_before, "posted moved without a posting record"
        for account in self.accounts.values():
            if account.available >= 0:
                account.overdrawn_by_network = False

    # --- after every step ---------------------------------------------------------------------
    #
    # Every record the ledger keeps, every field of it, against the model: accounts, cards and
    # their state, holds, answers, clearing records, outbox events, and the indexes and
    # sequences beside them. Expected records are built with `modelled`, which names every
    # field of the Struct, so a field added to a record fails here until the model knows it.

    @invariant()
    def ledger_agrees_with_the_model(self) -> None:
        with self.ledger.read() as reader:
            self.check_accounts(reader)
            self.check_cards(reader)
            self.check_holds(reader)
            self.check_answers(reader)
            self.check_clearing(reader)
            self.check_outbox(reader)
        self.check_databases()

    def check_accounts(self, reader: Reader) -> None:
        for spec in ACCOUNTS:
            model = self.accounts[spec.id]
            account = reader.account(spec.id)
            assert account is not None
            open_in_model = {
                h.hold_id: h.amount
                for h in self.holds.values()
                if h.account == spec.id and h.status == "open"
            }
            assert model.held == sum(open_in_model.values())
            expected = modelled(
                Account,
                **as_loaded(
                    self.loaded_accounts[spec.id],
                    *("id", "currency", "credit_limit", "status", "controls", "created_ms"),
                    "entry_sequence",  # API funding and debits only
                    "cardholder_id",  # as loaded (none)
                    "currency_since_ms",  # as loaded: the model changes no currency
                ),
                posted=model.posted,
                held=model.held,
                event_sequence=model.events,
                usage=model.usage.expected(),
                last_answer=model.last_answer,
                open_holds=len(open_in_model),
            )
            assert_stored(with_usage(account), expected, spec.id)
            assert account.available == model.available
            # posted - held >= -credit_limit, unless an advice or a clearing record the model
            # knows of overdrew (the network's word: neither can be declined).
            assert account.available >= 0 or model.overdrawn_by_network, spec.id
            # The open holds as the API lists them: found by walking the account's answers.
            holds = reader.account_holds(spec.id, limit=10**6)
            assert {h.hold_id: h.amount for h in holds} == open_in_model, spec.id

    def check_cards(self, reader: Reader) -> None:
        for pan, model in self.cards.items():
            card = reader.card(HASHER.card_key(pan))
            assert_stored(card, self.loaded_cards[pan], model.card_id)  # never changed
            assert card is not None
            expected = modelled(
                CardState,
                usage=model.usage.expected(),
                last_answer=model.last_answer,
                approval_day=model.approval_day,
                approval_codes=model.approval_codes,
                cvc2_failures=0,  # no CVC2 is ever sent here
                sca_exempt_count=0,  # nor does any control require SCA (tests/unit/test_sca.py)
                sca_exempt_amount=0,
                usage_since_ms=0,  # the model moves no card and changes no currency
            )
            assert_stored(with_usage(reader.card_state(card)), expected, model.card_id)
        assert reader.card(HASHER.card_key(CARDS[3].pan)) is None

    def check_holds(self, reader: Reader) -> None:
        # Each hold is kept in the answer that opened it (schema 4): found by walking them.
        stored = {hold.hold_id: hold for hold in reader.all_holds()}
        assert stored.keys() == self.holds.keys(), "holds kept"
        for hold_id, model in self.holds.items():
            hold = stored[hold_id]
            expected = modelled(
                Hold,
                hold_id=hold_id,
                account_id=model.account,
                card_id=self.card_ids[model.pan],
                amount=model.amount,
                currency="EUR",
                created_ms=model.created_ms,
                expires_ms=model.expires_ms,
                approval_code=model.approval_code,
                identity=model.key,
                mcc=model.mcc,
                rrn=model.rrn,
                status=model.status,
                resolved_ms=model.resolved_ms,
                captured_amount=model.captured_amount,
            )
            assert_stored(hold, expected, hold_id)
            # Resolved once, then never touched again.
            if expected.status != "open":
                assert self.resolved.setdefault(hold_id, expected) == expected, hold_id

    def check_answers(self, reader: Reader) -> None:
        for key, model in self.answers.items():
            stored = reader.answer(key)
            assert stored is not None, key
            identityless = tuple(kv for kv in model.content if kv[0] not in IDENTITY)
            expected = modelled(
                StoredAnswer,
                fingerprint=b""
                if model.marker
                else self.digest(("answer", identityless), stored.fingerprint),
                response=model.stored,
                response_code=model.code,
                reason=model.reason,
                answered_ms=model.answered_ms,
                card_id=model.card_id,
                hold_id=model.hold_id,
                account_id=model.account,
                posted_amount=model.posted_amount,
                reversed_amount=model.reversed_amount,
                mti=model.mti,
                usage_amount=model.usage_amount,
                usage_mcc=model.usage_mcc,
                previous_for_card=model.previous_for_card,
                previous_for_account=model.previous_for_account,
                hold=self.hold_state(key, model),
                settled_ms=model.settled_ms,
            )
            assert_stored(stored, expected, key)

    def hold_state(self, key: bytes, answer: ModelAnswer) -> HoldState | None:
        """What the answer keeps of the hold it opened: a reversal's names one it did not."""
        if answer.hold_id is None or self.holds[answer.hold_id].key != key:
            return None
        hold = self.holds[answer.hold_id]
        approval_code = answer.stored.get("38")
        return modelled(
            HoldState,
            amount=hold.amount,
            currency="EUR",
            created_ms=hold.created_ms,
            expires_ms=hold.expires_ms,
            mcc=hold.mcc,
            status=hold.status,
            resolved_ms=hold.resolved_ms,
            captured_amount=hold.captured_amount,
            approval_code="" if approval_code == hold.approval_code else hold.approval_code,
            cleared_parts=[],  # the machine presents no record in parts
        )

    def check_clearing(self, reader: Reader) -> None:
        for record_id, cleared in self.cleared.items():
            record = reader.clearing_record(record_id)
            assert record is not None, record_id
            expected = modelled(
                ClearedRecord,
                outcome=cleared.outcome,  # type: ignore[arg-type]
                fingerprint=self.digest(("clearing", cleared.content), record.fingerprint),
                processed_ms=cleared.processed_ms,
                card_id=self.card_ids[cleared.pan],
                account_id=cleared.account,
                amount=cleared.amount,
                currency=cleared.currency,
                hold_id=cleared.hold_id,
            )
            assert_stored(record, expected, record_id)
        for record_id in self.never_cleared.difference(self.cleared):
            assert reader.clearing_record(record_id) is None, record_id

    def check_outbox(self, reader: Reader) -> None:
        """The events appended since the last step (the outbox only ever grows)."""
        new = self.events[self.events_checked :]
        stored = reader.outbox(self.events_checked + 1, limit=len(new) + 1)
        assert [e.sequence for e in stored] == [e.sequence for e in new], "events (ledger, model)"
        for record, expected in zip(stored, new, strict=True):
            assert_stored(record, expected, f"event {expected.sequence}")
        self.events_checked = len(self.events)

    def check_databases(self) -> None:
        """Indexes and sequences, and that the ledger keeps no record the model does not know."""
        databases = self.databases
        with self.ledger.env.begin() as txn:
            assert {bytes(name) for name, _ in txn.cursor()} == DATABASES
            entries = {name: txn.stat(db)["entries"] for name, db in databases.items()}
            account_keys = set(txn.cursor(db=databases[b"accounts"]).iternext(values=False))
            expiry = list(txn.cursor(db=databases[b"hold_expiry"]))
            rrn_index = dict(txn.cursor(db=databases[b"rrn_index"]))
            meta = dict(txn.cursor(db=databases[b"meta"]))
            for name in UNCHANGED:
                assert dict(txn.cursor(db=databases[name])) == self.loaded[name], name
        open_holds = sorted(
            (h.expires_ms, h.hold_id, h.key) for h in self.holds.values() if h.status == "open"
        )
        assert expiry == [(BIG_U64.pack(e) + BIG_U64.pack(i), key) for e, i, key in open_holds], (
            "expiries, each naming the answer that keeps its hold"
        )
        # Beside each account, the state of each of its cards that anything was answered about.
        states = {
            f"{CARD_BY_PAN[pan].account}\0{card.card_id}".encode()
            for pan, card in self.cards.items()
            if card.stored
        }
        assert account_keys == {spec.id.encode() for spec in ACCOUNTS} | states
        assert rrn_index == {
            f"{rrn}|{acquirer}|{stan}".encode(): key
            for acquirer, stan, rrn in (k.split("|") for k in self.rrn_index)
            for key in (self.rrn_index[f"{acquirer}|{stan}|{rrn}"],)
        }, "RRN index"
        expected_meta = dict(self.loaded[b"meta"])  # schema, ledger id, programme controls
        if self.next_hold_id > 1:
            expected_meta[b"seq:hold"] = BIG_U64.pack(self.next_hold_id)
        if self.events:
            expected_meta[b"seq:event"] = BIG_U64.pack(len(self.events) + 1)
        if self.clock_ms:
            expected_meta[b"clock_ms"] = BIG_U64.pack(self.clock_ms)
        assert meta == expected_meta
        assert entries == {
            b"accounts": len(ACCOUNTS) + len(states),
            b"cards": len(self.cards),  # the loaded ones, unchanged (above)
            b"card_ids": len(self.cards),
            b"account_cards": len(self.cards),
            b"hold_expiry": len(open_holds),
            b"answers": len(self.answers),
            b"rrn_index": len(self.rrn_index),
            b"meta": len(expected_meta),
            b"clearing": len(self.cleared),
            b"outbox": len(self.events),
            b"entries": sum(1 for spec in ACCOUNTS if spec.posted),  # the load's fundings
            b"idempotency": 0,  # API POSTs only
            b"cardholders": 0,  # API only
            b"card_secrets": 0,  # issued through the API only
            b"reveal_tokens": 0,
        }

    def digest(self, content: Any, stored: bytes) -> bytes:
        """The keyed digest the model expects of `content`: the one first stored for it, which
        no other content may have."""
        known = self.digests.get(content)
        if known is not None:
            return known
        other = self.digested.setdefault(stored, content)
        assert other == content, f"one digest for two contents: {other} and {content}"
        self.digests[content] = stored
        return stored


def with_usage(record: S) -> S:
    """None and an empty Usage are the same to the controls: the ledger makes the one into the
    other when it first reads a card's or an account's usage (usage_of), whatever it decides."""
    if getattr(record, "usage", None) is None:
        return msgspec.structs.replace(record, usage=Usage())
    return record


LifecycleMachine.TestCase.settings = settings(
    max_examples=60,
    # 25 before the clearing rule: it takes a third of the steps, batch keeps about as many.
    stateful_step_count=35,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    # A failure must be reported within pytest's timeout (300 s): shrinking each distinct
    # failure a bug caused took minutes (a partial reversal releasing the whole hold fails four
    # ways), and the explain phase, a line tracer on Python < 3.12, minutes more, so the run
    # ended in Timeout and FlakyStrategyDefinition instead of the failing steps.
    report_multiple_bugs=False,
    phases=tuple(phase for phase in Phase if phase is not Phase.explain),
)
TestLifecycleProperties = LifecycleMachine.TestCase


# --- regressions of the bugs the machine found ---------------------------------------------------
#
# Each checks its setup with `_setup` (RuntimeError when the setup stops behaving as described)
# and the property itself with `assert`.

MAIN = CARDS[1]  # acct-credit, no per-transaction limit


def _fields(mti: str, stan: str, moment: str, amount: int, **extra: str) -> dict[str, str]:
    fields = {
        "t": mti,
        "2": MAIN.pan,
        "3": "000000",
        "4": f"{amount:012d}",
        "7": moment,
        "11": stan,
        "18": "5411",
        "32": "123456",
        "37": "633012000001",
        "49": "978",
    }
    fields.update(extra)
    return fields


def _send(authorizer: Authorizer, *messages: dict[str, str]) -> list[tuple[str, str]]:
    outcomes = authorizer.authorize_batch([decode_request(m) for m in messages], START)
    return [(o.response_code, o.reason) for o in outcomes]


def _held(ledger: Ledger) -> int:
    with ledger.read() as reader:
        account = reader.account("acct-credit")
        assert account is not None
        return account.held


def _setup(actual: object, expected: object) -> None:
    if actual != expected:
        raise RuntimeError(f"setup no longer as described: {actual!r} != {expected!r}")


@pytest.mark.parametrize("changed", ["95", "90", "39"])
def test_same_identity_differing_in_field_90_95_or_39_is_a_conflict(
    tmp_path: Path, changed: str
) -> None:
    ledger, authorizer = make_ledger(tmp_path)
    try:
        first = _fields("0100", "000001", "1124120000", 10_000)
        second = _fields("0100", "000002", "1124120001", 10_000, **{"37": "633012000002"})
        _setup(_send(authorizer, first, second), [("00", "approved")] * 2)
        if changed == "39":
            advice = _fields("0120", "000003", "1124120002", 5_000, **{"39": "05"})
            _setup(_send(authorizer, advice), [("00", "advice_of_decline")])
            again = dict(advice, **{"39": "00"})  # now stand-in approved: a hold would be due
        else:
            partial = {"90": original_data(first), "95": replacement(6_000)}
            reversal = _fields("0400", "000003", "1124120002", 10_000, **partial)
            _setup(_send(authorizer, reversal), [("00", "partially_reversed")])
            _setup(_held(ledger), 16_000)
            if changed == "95":  # the same reversal, now down to 20.00
                again = dict(reversal, **{"95": replacement(2_000)})
            else:  # the same reversal, now of the other authorisation
                again = dict(reversal, **{"90": original_data(second)})
        held = _held(ledger)
        code = "00" if changed == "39" else "94"  # the 0120 is an advice: acknowledged
        assert _send(authorizer, again) == [(code, "duplicate_different_content")]
        assert _held(ledger) == held
    finally:
        ledger.close()


@pytest.mark.parametrize(
    ("mti", "expected"),
    [
        ("0400", ("25", "original_not_found")),
        ("0420", ("00", "orphan_reversal")),
        ("0220", ("00", "force_post")),
    ],
)
def test_field_90_naming_a_reversal_does_not_match_an_original(
    tmp_path: Path, mti: str, expected: tuple[str, str]
) -> None:
    ledger, authorizer = make_ledger(tmp_path)
    try:
        original = _fields("0100", "000001", "1124120000", 10_000)
        partial = {"90": original_data(original), "95": replacement(6_000)}
        reversal = _fields("0400", "000002", "1124120001", 10_000, **partial)
        _setup(
            _send(authorizer, original, reversal),
            [("00", "approved"), ("00", "partially_reversed")],
        )
        # Field 90 names the partial reversal (MTI 0400), not the authorisation.
        pointing = _fields(mti, "000003", "1124120002", 6_000, **{"90": original_data(reversal)})
        assert _send(authorizer, pointing) == [expected]
        assert _held(ledger) == 6_000  # the authorisation's hold, as the partial reversal left it
    finally:
        ledger.close()


def test_clearing_purchase_at_another_cards_declined_original_is_card_mismatch(
    tmp_path: Path,
) -> None:
    ledger, authorizer = make_ledger(tmp_path)
    try:
        declined = _fields("0100", "000001", "1124120000", 10_000, **{"18": "7995"})
        _setup(_send(authorizer, declined), [("57", "mcc_blocked")])
        record = {
            "record_id": "clr-1",
            "type": "purchase",
            "pan": CARDS[0].pan,  # the same account, another card
            "acquirer": "123456",
            "stan": "000001",
            "transmission_datetime": "1124120000",
            "amount": 10_000,
            "currency": "EUR",
        }
        summary = apply_clearing(ledger, parse_lines([json.dumps(record).encode()]), HASHER, START)
        assert [r.reason for r in summary.rejections] == ["card_mismatch"], summary
    finally:
        ledger.close()
