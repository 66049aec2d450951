"""Random batches through Authorizer.authorize_batch against an in-memory model of the ledger.

Each step is one batch (one LMDB write transaction) of new authorisations, balance inquiries,
retransmissions and 0101 repeats of earlier requests, and same-identity-different-amount
conflicts. The model predicts every response code; after every batch the ledger must agree with
it: held equals the sum of the open holds, nothing is overdrawn past the credit limit, posted never
moves, there is exactly one hold per approval, and every repeat got the first answer's bytes.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import iso8583
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from processor.authorizer import Authorizer
from processor.engine import ProgrammeRules
from processor.ledger.load import apply_load_file, parse_load_file
from processor.ledger.store import Ledger
from processor.security import PanHasher
from processor.wire.codec import Codec
from processor.wire.messages import AuthorizationRequest
from processor.wire.spec import load_spec

HASHER = PanHasher(b"test-key")
CODEC = Codec(load_spec())
START = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)


@dataclass(frozen=True)
class CardSpec:
    pan: str
    account: str | None  # None: never loaded
    limit: int | None = None


@dataclass
class AccountSpec:
    id: str
    posted: int
    credit_limit: int = 0


ACCOUNTS = (
    AccountSpec("acct-main", 1_000_000),
    AccountSpec("acct-credit", 10_000, credit_limit=50_000),
    AccountSpec("acct-low", 5_000),
)
CARDS = (
    CardSpec("5200001111222233", "acct-main", limit=300_000),
    CardSpec("5200001111222241", "acct-main"),
    CardSpec("5200001111222258", "acct-credit"),
    CardSpec("5200001111222274", "acct-low"),
    CardSpec("5200001111222266", None),
)
ACQUIRERS = ("123456", "654321")

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

AMOUNTS = st.one_of(
    st.just(0),
    st.integers(1, 3_000),
    st.integers(1, 60_000),
    st.integers(250_000, 400_000),
)
NEW = st.tuples(
    st.just("new"),
    st.integers(0, len(CARDS) - 1),
    AMOUNTS,
    st.sampled_from(ACQUIRERS),
    st.sampled_from(("purchase",) * 5 + ("inquiry",)),
)
OLD = st.tuples(st.sampled_from(("retransmit", "repeat")), st.integers(0, 10**6))
CONFLICT = st.tuples(st.just("conflict"), st.integers(0, 10**6), st.integers(1, 5_000))
OPERATIONS = st.lists(st.one_of(NEW, NEW, OLD, CONFLICT), min_size=1, max_size=8)


@dataclass
class Sent:
    fields: dict[str, str]  # the wire fields of the first request with this identity
    identity: bytes
    card: CardSpec


@dataclass
class Expectation:
    kind: str  # new | retransmit | conflict
    sent: Sent
    code: str | None = None  # predicted for "new"
    reason: str | None = None
    balances: str | None = None  # predicted field 54 of a balance inquiry
    extra: dict[str, Any] = field(default_factory=dict)


def decode_request(fields: dict[str, str]) -> AuthorizationRequest:
    request = CODEC.decode(CODEC.encode(fields))
    assert isinstance(request, AuthorizationRequest)
    return request


def response_fields(response: bytes) -> dict[str, str]:
    fields, _ = iso8583.decode(response, CODEC.spec.iso)
    return fields


class LedgerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.directory = tempfile.mkdtemp(prefix="ledger-properties-")
        self.ledger = Ledger(self.directory, durability="process", map_size_bytes=64 << 20)
        apply_load_file(self.ledger, parse_load_file(LOAD_FILE, "model"), HASHER, "model")
        self.authorizer = Authorizer(
            self.ledger, HASHER, ProgrammeRules(), hold_lifetime_seconds=7 * 86400
        )
        self.accounts = {a.id: a for a in ACCOUNTS}
        self.held = {a.id: 0 for a in ACCOUNTS}
        self.sent: list[Sent] = []
        self.first_answer: dict[bytes, bytes] = {}
        self.approved: dict[bytes, int] = {}  # identity -> amount held for it
        self.stans = dict.fromkeys(ACQUIRERS, 0)
        self.now = START

    def teardown(self) -> None:
        self.ledger.close()
        shutil.rmtree(self.directory, ignore_errors=True)

    # --- the model ------------------------------------------------------------------------

    def available(self, account_id: str) -> int:
        a = self.accounts[account_id]
        return a.posted + a.credit_limit - self.held[account_id]

    def predict(self, sent: Sent, inquiry: bool, amount: int) -> Expectation:
        card = sent.card
        if card.account is None:
            return Expectation("new", sent, "14", "card_not_found")
        if inquiry:
            posted = self.accounts[card.account].posted
            available = self.available(card.account)
            balances = f"0001978C{posted:012d}0002978C{available:012d}"
            return Expectation("new", sent, "00", "balance_inquiry", balances=balances)
        if amount == 0:  # a purchase of zero: an account verification, nothing held
            return Expectation("new", sent, "85", "account_verified")
        if card.limit is not None and amount > card.limit:
            return Expectation("new", sent, "61", "per_authorization_amount_limit")
        if amount > self.available(card.account):
            return Expectation("new", sent, "51", "insufficient_funds")
        self.held[card.account] += amount
        self.approved[sent.identity] = amount
        return Expectation("new", sent, "00", "approved")

    def new_request(
        self, card_index: int, amount: int, acquirer: str, kind: str
    ) -> tuple[AuthorizationRequest, Expectation]:
        card = CARDS[card_index]
        self.stans[acquirer] += 1
        inquiry = kind == "inquiry"
        fields = {
            "t": "0100",
            "2": card.pan,
            "3": "310000" if inquiry else "000000",
            "7": "1124120000",
            "11": f"{self.stans[acquirer]:06d}",
            "18": "5411",
            "32": acquirer,
            "37": f"{len(self.sent):012d}",
            "41": "TERM0001",
            "42": "MERCHANT0000001",
            "49": "978",
        }
        if not inquiry:
            fields["4"] = f"{amount:012d}"
        request = decode_request(fields)
        sent = Sent(fields, b"0100|" + request.identity, card)
        self.sent.append(sent)
        return request, self.predict(sent, inquiry, amount)

    # --- the step -------------------------------------------------------------------------

    @rule(operations=OPERATIONS)
    def batch(self, operations: list[tuple[Any, ...]]) -> None:
        requests: list[AuthorizationRequest] = []
        expectations: list[Expectation] = []
        for operation in operations:
            kind = operation[0]
            if kind == "new":
                request, expectation = self.new_request(*operation[1:])
            else:
                if not self.sent:
                    continue
                sent = self.sent[operation[1] % len(self.sent)]
                fields = dict(sent.fields)
                if kind == "repeat":
                    fields["t"] = "0101"
                    kind = "retransmit"
                elif kind == "conflict":
                    original = int(fields.get("4", "0"))
                    fields["4"] = f"{original + operation[2]:012d}"
                request = decode_request(fields)
                expectation = Expectation(kind, sent)
            requests.append(request)
            expectations.append(expectation)

        self.now += timedelta(seconds=1)
        outcomes = self.authorizer.authorize_batch(requests, self.now)

        assert len(outcomes) == len(requests)
        for request, expectation, outcome in zip(requests, expectations, outcomes, strict=True):
            identity = expectation.sent.identity
            fields = response_fields(CODEC.encode(outcome.fields))
            event(f"{expectation.kind} {outcome.response_code}")
            assert fields["t"] == "0110"
            assert fields["2"] == request.pan
            assert fields["39"] == outcome.response_code
            if expectation.kind == "new":
                assert (outcome.response_code, outcome.reason) == (
                    expectation.code,
                    expectation.reason,
                ), identity
                # Every approval carries its code, an inquiry's too.
                assert ("38" in fields) is (expectation.reason in ("approved", "balance_inquiry"))
                if expectation.balances is not None:
                    assert fields["54"] == expectation.balances
                else:
                    assert "54" not in fields
                self.first_answer[identity] = CODEC.encode(outcome.fields)
            elif expectation.kind == "retransmit":
                assert outcome.reason == "retransmission", identity
                assert CODEC.encode(outcome.fields) == self.first_answer[identity], identity
            else:
                assert (outcome.response_code, outcome.reason) == (
                    "94",
                    "duplicate_different_content",
                ), identity
                assert "38" not in fields and "54" not in fields
                assert fields["4"] == request.echo["4"]

    # --- after every batch ---------------------------------------------------------------

    @invariant()
    def ledger_agrees_with_the_model(self) -> None:
        holds = []
        with self.ledger.read() as reader:
            for spec in ACCOUNTS:
                account = reader.account(spec.id)
                assert account is not None
                account_holds = reader.account_holds(spec.id, limit=10**6)
                assert reader.account_hold_count(spec.id) == len(account_holds)
                assert all(h.status == "open" and h.account_id == spec.id for h in account_holds)
                assert account.held == sum(h.amount for h in account_holds)
                assert account.held == self.held[spec.id]
                # posted - held >= -credit_limit: never spent past the credit line.
                assert account.available >= 0
                assert account.posted == spec.posted
                assert account.credit_limit == spec.credit_limit
                holds.extend(account_holds)
            for identity, answer in self.first_answer.items():
                stored = reader.answer(identity)
                assert stored is not None
                assert "2" not in stored.response
                assert stored.response_code == response_fields(answer)["39"]
                assert (stored.hold_id is not None) is (identity in self.approved)
        # One hold per approval, for the amount approved, under the approval's identity.
        assert len(holds) == len(self.approved)
        assert {h.identity: h.amount for h in holds} == self.approved
        assert len({h.hold_id for h in holds}) == len(holds)
        assert len({h.approval_code for h in holds}) == len(holds)
        for hold in holds:
            assert response_fields(self.first_answer[hold.identity])["38"] == hold.approval_code


LedgerMachine.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestLedgerProperties = LedgerMachine.TestCase
