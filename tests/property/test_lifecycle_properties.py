"""The whole transaction lifecycle through Authorizer.authorize_batch against an in-memory model.

Each `batch` step is one LMDB write transaction holding a random mix of authorisations (0100, some
allowing partial approval), financials (0200), stand-in advices (0120, may overdraw), completion
advices (0220: capture of the matched open hold for its final amount, a force post without one,
nothing when the original already posted or was captured), reversals and reversal advices
(0400/0420: full or partial through field 95, matched through field 90 or through acquirer + STAN
+ RRN, duplicates, orphans, reversals of declined originals), retransmissions and repeats (0101,
0401, ...) of any earlier request, and the same identity with different content. `clock` steps
move time on by minutes to weeks, or onto the next expiry, and run the expiry sweeper.

The model predicts every answer. After every step the ledger must agree with it: held is the sum
of the open holds, posted moves only through posting messages, nothing is overdrawn past the
credit limit except by advices, no hold is resolved twice, every request was answered exactly once
and retransmissions got the first answer byte for byte.

Bugs this machine found, now fixed (each has a deterministic regression test at the end of
this file, and the machine keeps generating the operations that found them):

1. The duplicate fingerprint left out fields 90, 95 and 39, which the reversal and advice
   handlers read: the same identity with a different field 90/95/39 was answered as a
   retransmission (the stale answer) instead of as a conflict (94; 00 for an advice).
2. Field 90 was honoured whatever message class it named, although only 0100/0200/0120 answers
   are originals: a reversal pointing at an earlier partial reversal released the hold.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

import iso8583
import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from processor.authorizer import Authorizer, Outcome
from processor.engine import ProgrammeRules
from processor.ledger.load import apply_load_file, parse_load_file
from processor.ledger.store import Ledger
from processor.lifecycle import approval_code
from processor.security import PanHasher
from processor.wire.codec import Codec, response_mti
from processor.wire.messages import AuthorizationRequest
from processor.wire.spec import load_spec

HASHER = PanHasher(b"test-key")
CODEC = Codec(load_spec())
RULES = ProgrammeRules(blocked_mccs=frozenset({"7995"}))
START = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
HOLD_LIFETIME_S = 7 * 86400
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
ACQUIRERS = ("123456", "00654321")  # the second is sent zero-padded: compared as a number

LOAD_FILE = "\n".join(
    [
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


def balance_blocks(account_type: str, posted: int, available: int) -> str:
    return "".join(
        f"{account_type}{kind}978{'C' if value >= 0 else 'D'}{abs(value):012d}"
        for kind, value in (("01", posted), ("02", available))
    )


def make_ledger(directory: str | Path) -> tuple[Ledger, Authorizer]:
    ledger = Ledger(directory, durability="process", map_size_bytes=64 << 20)
    apply_load_file(ledger, parse_load_file(LOAD_FILE, "model"), HASHER, "model")
    authorizer = Authorizer(
        ledger,
        CODEC,
        HASHER,
        RULES,
        hold_lifetime_seconds=HOLD_LIFETIME_S,
        hold_lifetime_by_mcc=HOLD_LIFETIME_BY_MCC_S,
    )
    return ledger, authorizer


# --- the model ---------------------------------------------------------------------------------


@dataclass
class ModelAccount:
    posted: int
    credit_limit: int
    held: int = 0
    overdrawn_by_advice: bool = False

    @property
    def available(self) -> int:
        return self.posted + self.credit_limit - self.held


@dataclass
class ModelHold:
    hold_id: int
    account: str
    key: bytes
    amount: int
    created_ms: int
    expires_ms: int
    status: str = "open"
    resolved_ms: int = 0
    captured_amount: int = 0


@dataclass
class ModelAnswer:
    content: tuple[tuple[str, str], ...]
    code: str
    reason: str
    hold_id: int | None = None
    account: str | None = None
    posted_amount: int = 0
    reversed_amount: int = 0
    response: bytes | None = None  # the first answer's bytes, once seen
    detail: str = ""  # for the statistics: which branch the model took


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
    response: dict[str, str | None] = field(default_factory=dict)  # field -> value, None: absent
    detail: str = ""


class LifecycleMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.directory = tempfile.mkdtemp(prefix="lifecycle-properties-")
        self.ledger, self.authorizer = make_ledger(self.directory)
        self.accounts = {a.id: ModelAccount(a.posted, a.credit_limit) for a in ACCOUNTS}
        self.holds: dict[int, ModelHold] = {}
        self.answers: dict[bytes, ModelAnswer] = {}
        self.rrn_index: dict[str, bytes] = {}
        self.next_hold_id = 1
        self.sent: list[Sent] = []  # every request sent, for retransmissions and conflicts
        self.originals: list[Sent] = []  # first arrivals of 0100/0200/0120
        self.followups: list[Sent] = []  # first arrivals of 0220/0400/0420
        self.resolved: dict[int, tuple[Any, ...]] = {}  # hold id -> first resolved state seen
        self.stans = dict.fromkeys(map(number, ACQUIRERS), 0)
        self.serial = 0
        self.now = START

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

    def open_hold(self, account: str, key: bytes, amount: int, mcc: str) -> ModelHold:
        hold_id = self.next_hold_id
        self.next_hold_id += 1
        lifetime = HOLD_LIFETIME_BY_MCC_S.get(mcc, HOLD_LIFETIME_S) * 1000
        hold = ModelHold(hold_id, account, key, amount, self.now_ms, self.now_ms + lifetime)
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
    ) -> tuple[str, str, int, dict[str, str | None]]:
        """0100/0200: (code, reason, amount approved, expected response fields)."""
        if card.account is None:
            return "14", "card_not_found", 0, {}
        account = self.accounts[card.account]
        transaction_type = fields["3"][:2]
        if transaction_type == "31":
            blocks = balance_blocks(fields["3"][2:4], account.posted, account.available)
            return "00", "balance_inquiry", 0, {"54": blocks}
        amount = int(fields.get("4", "0"))
        if amount == 0:
            return "13", "invalid_amount", 0, {}
        if fields["18"] in RULES.blocked_mccs:
            return "57", "mcc_blocked", 0, {}
        if card.limit is not None and amount > card.limit:
            return "61", "per_transaction_limit", 0, {}
        available = account.available
        if amount > available:
            if available > 0 and transaction_type == "00" and fields.get("48") == PARTIAL_OK:
                return "10", "partial_approval", available, {"4": f"{available:012d}"}
            return "51", "insufficient_funds", 0, {}
        return "00", "approved", amount, {}

    def handle(
        self, fields: dict[str, str], card: CardSpec
    ) -> tuple[ModelAnswer, dict[str, str | None]]:
        """A first arrival: what the processor must answer and do (mirrors the catalogue)."""
        message_class = fields["t"][:3] + "0"
        key = answer_key(fields)
        answer = ModelAnswer(content(fields), "00", "")
        response: dict[str, str | None] = {}
        if message_class in ("0100", "0200"):
            code, reason, approved, response = self.decide(fields, card)
            answer.code, answer.reason, answer.account = code, reason, card.account
            if approved:
                assert card.account is not None
                account = self.accounts[card.account]
                before = account.available
                if message_class == "0100":
                    hold = self.open_hold(card.account, key, approved, fields["18"])
                    answer.hold_id = hold.hold_id
                    response["38"] = approval_code(hold.hold_id)
                else:
                    account.posted -= approved
                    answer.posted_amount = approved
                    response["38"] = approval_code(self.next_hold_id)
                    self.next_hold_id += 1
                # Requests the processor decides never overdraw.
                assert 0 <= account.available < before
        elif message_class == "0120":
            answer.reason = self.stand_in(fields, card, key, answer)
        elif message_class == "0220":
            answer.reason = self.completion(fields, card, int(fields["4"]), answer)
        else:
            answer.code, answer.reason = self.reversal(fields, message_class, answer)
        return answer, response

    def stand_in(
        self, fields: dict[str, str], card: CardSpec, key: bytes, answer: ModelAnswer
    ) -> str:
        if fields.get("39") not in (None, "00", "10"):
            return "advice_of_decline"
        if card.account is None:
            return "advice_unknown_card"
        answer.account = card.account
        hold = self.open_hold(card.account, key, int(fields["4"]), fields["18"])
        answer.hold_id = hold.hold_id
        account = self.accounts[card.account]
        if account.available < 0:
            account.overdrawn_by_advice = True
            return "stand_in_overdrawn"
        return "stand_in_approved"

    def completion(
        self, fields: dict[str, str], card: CardSpec, amount: int, answer: ModelAnswer
    ) -> str:
        found = self.lookup(fields)
        original = self.answers[found] if found is not None else None
        if original is not None and original.posted_amount:  # a 0200: posted when approved
            answer.account = original.account
            return "already_posted"
        if original is not None and original.hold_id is not None:
            hold = self.holds[original.hold_id]
            answer.detail = f"of a {hold.status} hold"
            if hold.status == "captured":  # a second completion: the first one posted it
                answer.hold_id, answer.account = hold.hold_id, hold.account
                return "already_captured"
            if hold.status == "open":
                self.close_hold(hold, "captured")
                hold.captured_amount = amount
                account = self.accounts[hold.account]
                account.posted -= amount
                if account.available < 0:
                    account.overdrawn_by_advice = True
                answer.hold_id, answer.account = hold.hold_id, hold.account
                answer.posted_amount = amount
                return "captured"
        if card.account is None:
            return "completion_unknown_card"
        account = self.accounts[card.account]
        account.posted -= amount
        if account.available < 0:
            account.overdrawn_by_advice = True
        answer.account, answer.posted_amount = card.account, amount
        return "force_post"

    def reversal(
        self, fields: dict[str, str], message_class: str, answer: ModelAnswer
    ) -> tuple[str, str]:
        found = self.lookup(fields)
        if found is None:
            return (
                ("00", "orphan_reversal")
                if message_class == "0420"
                else ("25", "original_not_found")
            )
        original = self.answers[found]
        answer.account = original.account
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
                self.close_hold(hold, "released")
                return "00", "reversed"
            if target < hold.amount:
                self.accounts[hold.account].held -= hold.amount - target
                hold.amount = target
                return "00", "partially_reversed"
            return "00", "reversal_no_change"
        if original.posted_amount:
            answer.detail = "of a posting" + (
                " already reversed" if original.reversed_amount else ""
            )
            credit = original.posted_amount - original.reversed_amount - target
            if credit <= 0 or original.account is None:
                return "00", "already_resolved"
            self.accounts[original.account].posted += credit
            original.reversed_amount += credit
            return "00", "reversed" if target == 0 else "partially_reversed"
        return "00", "nothing_to_reverse"

    def expect(self, fields: dict[str, str], card: CardSpec) -> Expectation:
        """Apply one request to the model, in batch order, and say what it must be answered."""
        key = answer_key(fields)
        stored = self.answers.get(key)
        self.sent.append(Sent(fields, card))
        if stored is not None:
            if stored.content == content(fields):
                return Expectation("retransmit", fields, key, stored.code, "retransmission")
            response: dict[str, str | None] = {"38": None, "54": None, "4": fields.get("4")}
            # Never applied; declined 94, or acknowledged 00 when it is an advice.
            code = "00" if fields["t"][:3] + "0" in ADVICE_CLASSES else "94"
            return Expectation(
                "conflict", fields, key, code, "duplicate_different_content", response
            )
        answer, response = self.handle(fields, card)
        self.answers[key] = answer
        message_class = fields["t"][:3] + "0"
        if message_class in ORIGINAL_CLASSES:
            self.rrn_index[f"{number(fields['32'])}|{fields['11']}|{fields['37']}"] = key
            self.originals.append(Sent(fields, card))
        else:
            self.followups.append(Sent(fields, card))
        response.setdefault("38", None)  # only approved 0100/0200 carry an approval code
        response.setdefault("54", None)  # only balance inquiries carry balances
        response.setdefault("4", fields.get("4"))  # echoed unless partially approved
        for echoed in ("90", "95", "11", "37", "32", "7"):
            response[echoed] = fields.get(echoed)
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
            _, card_index, amount, acquirer, mcc, stand_in, repeat = operation
            card = CARDS[card_index]
            mti = "0121" if repeat else "0120"
            return self.message(mti, card, amount, acquirer, **{"18": mcc, "39": stand_in}), card
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
                account.overdrawn_by_advice = False

    def check_outcome(
        self, request: AuthorizationRequest, expectation: Expectation, outcome: Outcome
    ) -> None:
        fields = response_fields(outcome.response)
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
        answer = self.answers[expectation.key]
        if expectation.kind == "retransmit":
            assert outcome.response == answer.response, "retransmission got other bytes"
            return
        for number_, value in expectation.response.items():
            assert fields.get(number_) == value, (number_, expectation.fields, fields)
        if expectation.kind == "new":
            assert answer.response is None
            answer.response = outcome.response

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
        event(f"sweep released {min(len(due), 3)}{'+' if len(due) > 3 else ''}")
        assert self.authorizer.sweep_expired(self.now, limit) == len(due)
        assert self.ledger_posted() == posted_before, "the sweeper moved posted"

    # --- after every step ---------------------------------------------------------------------

    @invariant()
    def ledger_agrees_with_the_model(self) -> None:
        with self.ledger.read() as reader:
            for spec in ACCOUNTS:
                model = self.accounts[spec.id]
                account = reader.account(spec.id)
                assert account is not None
                holds = reader.account_holds(spec.id, limit=10**6)
                assert reader.account_hold_count(spec.id) == len(holds)
                assert all(h.status == "open" and h.account_id == spec.id for h in holds)
                assert account.held == sum(h.amount for h in holds) == model.held
                open_in_model = {
                    h.hold_id: h.amount
                    for h in self.holds.values()
                    if h.account == spec.id and h.status == "open"
                }
                assert {h.hold_id: h.amount for h in holds} == open_in_model
                assert account.posted == model.posted
                assert account.credit_limit == spec.credit_limit
                # posted - held >= -credit_limit, unless an advice the model knows of overdrew.
                assert account.available == model.available
                assert account.available >= 0 or model.overdrawn_by_advice, spec.id
            for hold_id, model_hold in self.holds.items():
                hold = reader.hold(hold_id)
                assert hold is not None
                state = (hold.status, hold.resolved_ms, hold.amount, hold.captured_amount)
                assert state == (
                    model_hold.status,
                    model_hold.resolved_ms,
                    model_hold.amount,
                    model_hold.captured_amount,
                ), hold_id
                assert (hold.account_id, hold.identity) == (model_hold.account, model_hold.key)
                assert (hold.created_ms, hold.expires_ms) == (
                    model_hold.created_ms,
                    model_hold.expires_ms,
                )
                # Resolved once, then never touched again.
                if hold.status != "open":
                    assert self.resolved.setdefault(hold_id, state) == state, hold_id
            assert reader.hold(self.next_hold_id) is None
            for key, model_answer in self.answers.items():
                stored = reader.answer(key)
                assert stored is not None, key
                assert "2" not in stored.response
                assert (stored.response_code, stored.reason) == (
                    model_answer.code,
                    model_answer.reason,
                )
                assert stored.hold_id == model_answer.hold_id, key
                assert stored.account_id == model_answer.account, key
                assert (stored.posted_amount, stored.reversed_amount) == (
                    model_answer.posted_amount,
                    model_answer.reversed_amount,
                ), key


LifecycleMachine.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
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
