"""Control-API commands on a real ledger: idempotency, card numbers, transitions, funds."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from processor.api import commands
from processor.api.commands import (
    TRANSITIONS,
    Idempotency,
    Operation,
    Refused,
    Reply,
    expiry_after,
    idempotent,
    luhn_check_digit,
)
from processor.authorizer import Command
from processor.config import CardIssuingConfig
from processor.events import render
from processor.ledger.controls import AmountLimit, Controls
from processor.ledger.load import card_id_for
from processor.ledger.records import Account, Card, CardSecret
from processor.ledger.store import Ledger
from processor.security import PanHasher, luhn_valid

NOW_MS = 1_732_450_000_000  # 2024-11-24
HASHER = PanHasher(b"unit-test-key")


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    opened = Ledger(tmp_path / "ledger", map_size_bytes=1 << 24, durability="process")
    try:
        yield opened
    finally:
        opened.close()


def run(ledger: Ledger, command: Command | Operation, now_ms: int = NOW_MS) -> Any:
    """As the authorizer runs a command: a refusal is the result, and nothing is written."""
    with ledger.write() as writer:
        try:
            return command(writer, now_ms)
        except Refused as refused:
            return refused


def body(reply: Reply) -> Any:
    return json.loads(reply.body)


def open_account(ledger: Ledger, account_id: str = "a1", posted: int = 0) -> None:
    reply = run(ledger, commands.create_account(account_id, "EUR", 0, None))
    assert reply.status == 201
    if posted:
        run(ledger, commands.move_funds(account_id, "fund", posted, "seed"))


# --- idempotency -------------------------------------------------------------------------------


def key(name: str, content: bytes) -> Idempotency:
    return Idempotency(scope=name.encode(), body_digest=HASHER.digest(content))


def test_a_keyed_repeat_is_answered_from_the_record_without_a_second_effect(
    ledger: Ledger,
) -> None:
    open_account(ledger)
    fund = commands.move_funds("a1", "fund", 500, "top-up")
    first = run(ledger, idempotent(key("k1", b"body"), fund))
    again = run(ledger, idempotent(key("k1", b"body"), fund))
    assert (first.replayed, again.replayed) == (False, True)
    assert (again.status, again.body) == (first.status, first.body)
    with ledger.read() as reader:
        account = reader.account("a1")
        assert account is not None and account.posted == 500
        assert len(reader.entries("a1", 10)) == 1
    other = run(ledger, idempotent(key("k1", b"other body"), fund))
    assert isinstance(other, Refused) and other.code == "idempotency_key_reused"
    unkeyed = run(ledger, idempotent(None, fund))
    assert unkeyed.replayed is False
    with ledger.read() as reader:
        assert reader.account("a1").posted == 1_000  # type: ignore[union-attr]


def test_a_record_stored_under_the_old_scope_is_still_replayed(ledger: Ledger) -> None:
    """A key's scope was method + path + key: a retry that straddles the upgrade finds the
    record stored before it and is answered from it, not applied a second time."""
    open_account(ledger)
    fund = commands.move_funds("a1", "fund", 500, "top-up")
    before = Idempotency(scope=b"POST /fund k1", body_digest=HASHER.digest(b"body"))
    first = run(ledger, idempotent(before, fund))

    def after_upgrade(body: bytes) -> Idempotency:  # the same key, as this release makes it
        return Idempotency(
            scope=b"k1",
            body_digest=HASHER.digest(b"POST /fund " + body),
            legacy_scope=b"POST /fund k1",
            legacy_body_digest=HASHER.digest(body),
        )

    again = run(ledger, idempotent(after_upgrade(b"body"), fund))
    assert (again.replayed, again.body) == (True, first.body)
    refused = run(ledger, idempotent(after_upgrade(b"other"), fund))
    assert isinstance(refused, Refused) and refused.code == "idempotency_key_reused"
    with ledger.read() as reader:
        assert reader.account("a1").posted == 500  # type: ignore[union-attr]


def test_two_repeats_in_one_transaction_apply_once(ledger: Ledger) -> None:
    """What the daemon does with concurrent repeats: both commands in one batch."""
    open_account(ledger)
    fund = commands.move_funds("a1", "fund", 300, "race")
    with ledger.write() as writer:
        results = [idempotent(key("race", b"b"), fund)(writer, NOW_MS) for _ in range(2)]
    assert [result.replayed for result in results] == [False, True]
    with ledger.read() as reader:
        assert reader.account("a1").posted == 300  # type: ignore[union-attr]


def test_a_refusal_is_not_recorded(ledger: Ledger) -> None:
    open_account(ledger)
    debit = commands.move_funds("a1", "debit", 100, "spend")
    refused = run(ledger, idempotent(key("d", b"x"), debit))
    assert isinstance(refused, Refused) and refused.code == "insufficient_funds"
    with ledger.read() as reader:
        assert reader.idempotent(b"d") is None
    run(ledger, commands.move_funds("a1", "fund", 100, "fix"))
    applied = run(ledger, idempotent(key("d", b"x"), debit))
    assert (applied.status, applied.replayed) == (200, False)


# --- accounts ----------------------------------------------------------------------------------


def test_funds_move_through_entries(ledger: Ledger) -> None:
    open_account(ledger, "c1")
    with ledger.write() as writer:
        account = writer.account("c1")
        assert account is not None
        account.credit_limit = 1_000
        writer.put_account(account)
    debit = run(ledger, commands.move_funds("c1", "debit", 1_000, "on credit"))
    assert body(debit)["account"]["posted"] == -1_000
    assert body(debit)["entry"] == {
        "sequence": 1,
        "kind": "debit",
        "amount": 1_000,
        "reason": "on credit",
        "created": "2024-11-24T12:06:40Z",
        "posted_after": -1_000,
    }
    refused = run(ledger, commands.move_funds("c1", "debit", 1, "beyond the line"))
    assert isinstance(refused, Refused) and refused.status == 409
    missing = run(ledger, commands.move_funds("nope", "fund", 1, "x"))
    assert isinstance(missing, Refused) and (missing.status, missing.code) == (
        404,
        "account_not_found",
    )


def test_close_needs_an_empty_account(ledger: Ledger) -> None:
    open_account(ledger, posted=10)
    refused = run(ledger, commands.close_account("a1"))
    assert isinstance(refused, Refused) and refused.code == "account_not_empty"
    with ledger.write() as writer:  # a hold alone also keeps it open
        account = writer.account("a1")
        assert account is not None
        account.posted, account.held = 0, 5
        writer.put_account(account)
    assert run(ledger, commands.close_account("a1")).code == "account_not_empty"
    with ledger.write() as writer:
        account = writer.account("a1")
        assert account is not None
        account.held = 0
        writer.put_account(account)
    with ledger.read() as reader:
        before = reader.outbox_last_sequence()
    assert body(run(ledger, commands.close_account("a1")))["status"] == "closed"
    assert run(ledger, commands.close_account("a1")).code == "account_closed"
    with ledger.read() as reader:  # closed once: one event, none for the refusal after
        assert [(r.type, r.reason) for r in reader.outbox(before + 1, 10)] == [
            ("account.updated", "account_closed")
        ]


def test_closing_an_account_closes_its_cards_and_forgets_their_numbers(ledger: Ledger) -> None:
    """The account closed, its cards stayed active with their sealed PANs and reveal tokens
    kept for good, and shown on request, though no closed account is ever reopened."""
    open_account(ledger)
    issued = body(run(ledger, commands.issue_virtual_card("a1", None, HASHER, ISSUING)))
    with ledger.write() as writer:  # as a vault seals it (processor/pan_vault.py)
        secret = CardSecret(key_id="k1", wrapped_key=b"w" * 40, sealed_pan=b"s" * 44)
        writer.put_card_secret(issued["id"], secret)
    assert run(ledger, commands.create_reveal_token(issued["id"], b"d" * 32, NOW_MS + 60_000))
    assert body(run(ledger, commands.close_account("a1")))["status"] == "closed"
    with ledger.read() as reader:
        found = reader.card_by_id(issued["id"])
        assert found is not None and found[1].status == "closed"
        assert reader.card_secret(issued["id"]) is None
        assert reader.reveal_token(issued["id"]) is None
        events = [(r.type, r.reason) for r in reader.outbox(1, 100)][-2:]
    assert events == [("card.status_changed", "card_closed"), ("account.updated", "account_closed")]
    refused = run(ledger, commands.create_reveal_token(issued["id"], b"d" * 32, NOW_MS + 60_000))
    assert isinstance(refused, Refused) and refused.code == "card_not_revealable"


def test_a_card_of_a_closed_account_is_never_revealed(ledger: Ledger) -> None:
    """An account closed another way (a load) with its cards left as they were."""
    open_account(ledger)
    issued = body(run(ledger, commands.issue_virtual_card("a1", None, HASHER, ISSUING)))
    with ledger.write() as writer:
        secret = CardSecret(key_id="k1", wrapped_key=b"w" * 40, sealed_pan=b"s" * 44)
        writer.put_card_secret(issued["id"], secret)
    assert run(ledger, commands.create_reveal_token(issued["id"], b"d" * 32, NOW_MS + 60_000))
    with ledger.write() as writer:
        account = writer.account("a1")
        assert account is not None
        account.status = "closed"
        writer.put_account(account)
    assert run(ledger, commands.take_reveal_token(issued["id"], b"d" * 32)) is None
    refused = run(ledger, commands.create_reveal_token(issued["id"], b"d" * 32, NOW_MS + 60_000))
    assert isinstance(refused, Refused) and refused.code == "card_not_revealable"


def test_empty_controls_are_stored_as_none(ledger: Ledger) -> None:
    limit = Controls(amount_limits=(AmountLimit(interval="daily", amount=5, currency="EUR"),))
    run(ledger, commands.create_account("a1", "EUR", 0, limit))
    with ledger.read() as reader:
        assert reader.account("a1").controls == limit  # type: ignore[union-attr]
    run(ledger, commands.set_account_controls("a1", Controls()))
    with ledger.read() as reader:
        assert reader.account("a1").controls is None  # type: ignore[union-attr]


# --- cards -------------------------------------------------------------------------------------

# The number draws under test; the cardholder gate has its own tests (test_cardholders.py).
ISSUING = CardIssuingConfig(
    bin_prefix="476173", pan_length=16, expiry_months=36, require_cardholder=False
)


@given(st.text(alphabet="0123456789", min_size=1, max_size=18))
def test_the_check_digit_makes_any_number_luhn_valid(digits: str) -> None:
    assert luhn_valid(digits + luhn_check_digit(digits))


@pytest.mark.parametrize(
    ("now_ms", "months", "expected"),
    [
        (NOW_MS, 36, "2711"),  # November 2024 + 36
        (NOW_MS, 1, "2412"),
        (NOW_MS, 2, "2501"),  # over the year end
        (1_735_689_599_000, 12, "2512"),  # 2024-12-31 23:59:59 UTC
    ],
)
def test_expiry_months_after_issue(now_ms: int, months: int, expected: str) -> None:
    assert expiry_after(now_ms, months) == expected


def test_random_numbers_are_in_the_bin_and_luhn_valid() -> None:
    for _ in range(200):
        pan = commands.random_pan("476173", 16)
        assert len(pan) == 16 and pan.startswith("476173") and luhn_valid(pan)
    assert len(commands.random_pan("47617312345", 19)) == 19


def test_a_virtual_card_never_reuses_a_number(ledger: Ledger) -> None:
    open_account(ledger)
    taken = "4761730000000003"
    assert luhn_valid(taken)
    run(ledger, commands.register_card(taken, "3012", "a1", None, HASHER))
    draws = iter([taken, taken, "4761730000000011"])
    reply = run(
        ledger,
        commands.issue_virtual_card(
            "a1", None, HASHER, ISSUING, lambda prefix, length: next(draws)
        ),
    )
    issued = body(reply)
    assert issued["pan"] == "4761730000000011"
    assert (issued["virtual"], issued["expiry"]) == (True, "2711")
    # The copy kept for replays has no number.
    kept = json.loads(reply.kept)
    assert "pan" not in kept and kept == {k: v for k, v in issued.items() if k != "pan"}
    with ledger.read() as reader:
        card_key = reader.card_key_by_id(issued["id"])
        assert card_key == HASHER.card_key("4761730000000011")
        card = reader.card(card_key)
        assert card is not None and card.card_id == card_id_for(card_key)
        assert (card.bin, card.last4, card.created_ms) == ("476173", "0011", NOW_MS)


def test_an_exhausted_range_is_refused_and_writes_nothing(ledger: Ledger) -> None:
    open_account(ledger)
    taken = "4761730000000003"
    run(ledger, commands.register_card(taken, "3012", "a1", None, HASHER))
    refused = run(
        ledger,
        commands.issue_virtual_card("a1", None, HASHER, ISSUING, lambda prefix, length: taken),
    )
    assert isinstance(refused, Refused)
    assert (refused.status, refused.code) == (503, "card_numbers_exhausted")
    with ledger.read() as reader:
        assert len(reader.account_cards("a1")) == 1


def test_register_refuses_a_known_number_without_echoing_it(ledger: Ledger) -> None:
    open_account(ledger)
    pan = "4761730000000003"
    created = body(run(ledger, commands.register_card(pan, "3012", "a1", None, HASHER)))
    assert created["masked_pan"] == "476173******0003" and "pan" not in created
    refused = run(ledger, commands.register_card(pan, "3101", "a1", None, HASHER))
    assert isinstance(refused, Refused) and refused.code == "card_exists"
    assert pan not in refused.message and created["id"] in refused.message


ALL_STATUSES = ("active", "inactive", "frozen", "lost", "stolen", "closed")


@pytest.mark.parametrize("status", ALL_STATUSES)
@pytest.mark.parametrize("action", commands.CARD_ACTIONS)
def test_card_transitions(ledger: Ledger, status: str, action: str) -> None:
    open_account(ledger)
    card_key = HASHER.card_key("4761730000000003")
    card = Card(
        card_id=card_id_for(card_key),
        account_id="a1",
        bin="476173",
        last4="0003",
        pan_length=16,
        expiry="3012",
        status=status,  # type: ignore[arg-type]
    )
    with ledger.write() as writer:
        writer.put_card(card_key, card, None)
    starts, target = TRANSITIONS[action]
    result = run(ledger, commands.change_card_status(card.card_id, action))  # type: ignore[arg-type]
    with ledger.read() as reader:
        stored = reader.card(card_key)
    assert stored is not None
    if status in ("lost", "stolen", "closed"):
        assert status not in starts  # final states stay final
    if status in starts:
        assert body(result)["status"] == target == stored.status
    else:
        assert isinstance(result, Refused) and result.code == "invalid_card_transition"
        assert result.details == {"from": status, "to": target}
        assert stored.status == status


def test_card_controls_replace_the_set(ledger: Ledger) -> None:
    open_account(ledger)
    run(ledger, commands.register_card("4761730000000003", "3012", "a1", None, HASHER))
    card_id = card_id_for(HASHER.card_key("4761730000000003"))
    blocked = Controls(blocked_mccs=("7995",))
    assert body(run(ledger, commands.set_card_controls(card_id, blocked)))["blocked_mccs"] == [
        "7995"
    ]
    with ledger.read() as reader:
        card = reader.card(HASHER.card_key("4761730000000003"))
        assert card is not None and card.controls == blocked
    missing = run(ledger, commands.set_card_controls("card_00000000000000000000", blocked))
    assert isinstance(missing, Refused) and missing.code == "card_not_found"


def test_account_record_defaults_are_what_views_show(ledger: Ledger) -> None:
    # An account written before creation times were recorded has none: the view says null,
    # not 1970.
    with ledger.write() as writer:
        writer.put_account(Account(id="loaded", currency="EUR", posted=5))
    reply = run(ledger, commands.set_account_controls("loaded", Controls()))
    assert reply.status == 200
    from processor.api.views import account_view

    with ledger.read() as reader:
        view = account_view(reader.account("loaded"))  # type: ignore[arg-type]
    assert view.created is None and view.available == 5


def test_every_api_change_has_its_event_in_the_same_transaction(ledger: Ledger) -> None:
    open_account(ledger, "a1", posted=5_000)  # created, then funded: an event each
    run(ledger, commands.move_funds("a1", "debit", 1_200, "fee"))
    run(ledger, commands.register_card("4761730000000003", "3012", "a1", None, HASHER))
    card_id = card_id_for(HASHER.card_key("4761730000000003"))
    run(ledger, commands.change_card_status(card_id, "freeze"))
    run(ledger, commands.set_card_controls(card_id, Controls(blocked_mccs=("7995",))))
    run(ledger, commands.set_account_controls("a1", Controls(blocked_mccs=("7995",))))
    run(ledger, commands.set_programme_controls(Controls(blocked_mccs=("7995",))))
    refused = run(ledger, commands.move_funds("a1", "debit", 10**9, "too much"))
    assert isinstance(refused, Refused)  # and no event for it
    with ledger.read() as reader:
        ledger_id = reader.ledger_id()
        events = [render(record, ledger_id) for record in reader.outbox(1, 100)]
        account = reader.account("a1")
    assert [(e.type, e.data.reason) for e in events] == [
        ("account.created", "api_account"),
        ("account.funded", "api_fund"),
        ("account.debited", "api_debit"),
        ("card.created", "registered_card"),
        ("card.status_changed", "card_frozen"),
        ("controls.updated", "card_controls"),
        ("controls.updated", "account_controls"),
        ("controls.updated", "programme_controls"),
    ]
    created, registered = events[0].data, events[3].data
    assert created.account_id == "a1" and created.card_id is None
    assert (registered.card_id, registered.masked_pan) == (card_id, "476173******0003")
    funded, debited, frozen = events[1].data, events[2].data, events[4].data
    assert funded.amount is not None and (funded.amount.amount, funded.amount.currency) == (
        5_000,
        "EUR",
    )
    assert funded.entry == 1 and debited.entry == 2
    assert debited.balance_after is not None and debited.balance_after.posted.amount == 3_800
    assert frozen.card_id == card_id and frozen.masked_pan == "476173******0003"
    assert events[7].data.account_id is None  # the programme's: no account
    assert account is not None and account.event_sequence == 7  # numbered per account
    assert [e.account_sequence for e in events[:7]] == [1, 2, 3, 4, 5, 6, 7]


def test_a_funding_beyond_the_most_a_balance_may_hold_is_refused(ledger: Ledger) -> None:
    """Past 64-bit integers the account record would not encode, and the batch writing it
    would fail for every authorisation in it: the funding is refused first."""
    from processor import limits

    open_account(ledger, "c1")
    with ledger.write() as writer:
        account = writer.account("c1")
        assert account is not None
        account.posted = limits.account_posted_max - 10
        writer.put_account(account)
    refused = run(ledger, commands.move_funds("c1", "fund", 11, "one too many"))
    assert isinstance(refused, Refused)
    assert (refused.status, refused.code, refused.field) == (409, "balance_limit", "$.amount")
    funded = run(ledger, commands.move_funds("c1", "fund", 10, "to the brim"))
    assert body(funded)["account"]["posted"] == limits.account_posted_max
