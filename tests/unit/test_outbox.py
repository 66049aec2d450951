"""The transactional outbox: one event per committed change, in the change's transaction."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import lmdb
import msgspec
import pytest
from support import DEMO_LOAD_EVENTS, authorization

from processor.authorizer import Authorizer
from processor.engine import ProgrammeRules
from processor.events import Event, render, schema
from processor.ledger.load import load_path
from processor.ledger.store import Ledger
from processor.resources import demo_data_path
from processor.security import PanHasher
from processor.wire.messages import AuthorizationRequest

ROOT = Path(__file__).resolve().parents[2]
HASHER = PanHasher(b"outbox-test-key")
NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
LOAD = "4761739001010085"  # demo-main
LOW = "4761739001010069"  # demo-low
UNKNOWN = "4761739001010093"


def message(
    mti: str, stan: str, amount: int, pan: str = LOAD, **extra: str
) -> AuthorizationRequest:
    """A message on the demo ledger's cards (support.authorization), with an RRN."""
    return authorization(
        pan,
        stan,
        amount,
        t=mti,
        **{"37": f"63301200{stan[-4:]}", "43": "DEMO SHOP              BERLIN       DE  ", **extra},
    )


@pytest.fixture
def setup(tmp_path: Path):  # type: ignore[no-untyped-def]
    ledger = Ledger(tmp_path, durability="process", map_size_bytes=64 << 20)
    load_path(ledger, demo_data_path(), HASHER)
    with ledger.read() as reader:
        assert reader.outbox_last_sequence() == DEMO_LOAD_EVENTS
    authorizer = Authorizer(ledger, HASHER, ProgrammeRules(), hold_lifetime_seconds=3600)
    yield ledger, authorizer
    ledger.close()


def events(ledger: Ledger) -> list[Event]:
    """The events since the fixture's load of the demo data."""
    with ledger.read() as reader:
        ledger_id = reader.ledger_id()
        records = reader.outbox(DEMO_LOAD_EVENTS + 1, 10_000)
        return [render(record, ledger_id) for record in records]


def test_every_answered_change_has_exactly_one_event(setup) -> None:  # type: ignore[no-untyped-def]
    ledger, authorizer = setup
    approve = message("0100", "000001", 1000)
    decline = message("0100", "000002", 10_000, pan=LOW)
    unknown = message("0100", "000003", 100, pan=UNKNOWN)
    posted = message("0200", "000004", 500)
    original_90 = f"0100000001112412000000000123456{0:011d}"
    reversal = message("0400", "000005", 1000, **{"90": original_90})
    orphan = message("0420", "000006", 1000, **{"90": f"0100999999112412000000000123456{0:011d}"})
    advice = message("0120", "000007", 300, **{"39": "00"})
    completion = message(
        "0220", "000008", 350, **{"90": f"0120000007112412000000000123456{0:011d}"}
    )
    outcomes = authorizer.authorize_batch(
        [approve, decline, unknown, posted, reversal, orphan, advice, completion], NOW
    )
    assert [o.response_code for o in outcomes] == ["00", "51", "14", "00", "00", "00", "00", "00"]
    found = events(ledger)
    assert [e.type for e in found] == [
        "authorization.approved",
        "authorization.declined",
        "authorization.declined",
        "transaction.posted",
        "authorization.reversed",
        "reversal.orphaned",
        "authorization.advice",
        "transaction.completed",
    ]
    assert len({e.id for e in found}) == len(found)
    # Retransmissions and conflicts change nothing, so they add no event.
    authorizer.authorize_batch([approve, message("0100", "000001", 999)], NOW)
    assert len(events(ledger)) == len(found)
    # The sweeper's releases are events too.
    authorizer.authorize_batch([message("0100", "000009", 700)], NOW)
    assert authorizer.sweep_expired(NOW + timedelta(hours=2), 100) == 1
    assert events(ledger)[-1].type == "authorization.expired"
    assert events(ledger)[-1].data.hold_id is not None


def test_event_content_masks_the_pan_and_carries_balances(setup) -> None:  # type: ignore[no-untyped-def]
    ledger, authorizer = setup
    authorizer.authorize_batch([message("0100", "000001", 1234)], NOW)
    [event] = events(ledger)
    data = event.data
    assert data.masked_pan == "476173******0085"
    assert data.amount is not None and (data.amount.amount, data.amount.currency) == (1234, "EUR")
    assert data.amount.exponent == 2
    assert data.response_code == "00" and data.reason == "approved"
    assert data.network is not None and data.network.approval_code is not None
    assert data.merchant is not None and data.merchant.mcc == "5411"
    assert data.balance_after is not None and data.balance_after.held.amount == 1234
    encoded = msgspec.json.encode(event)
    assert LOAD.encode() not in encoded
    assert LOAD.encode() not in (Path(ledger.path) / "data.mdb").read_bytes()


def test_per_account_sequence_orders_each_accounts_events(setup) -> None:  # type: ignore[no-untyped-def]
    ledger, authorizer = setup
    with ledger.read() as reader:  # the load's events: each account's creation, cards, funding
        loaded = {name: reader.account(name).event_sequence for name in ("demo-main", "demo-low")}  # type: ignore[union-attr]
    assert loaded == {"demo-main": 8, "demo-low": 3}
    batch = [message("0100", f"{n:06d}", 10, pan=LOAD if n % 2 else LOW) for n in range(1, 9)]
    authorizer.authorize_batch(batch[:4], NOW)
    authorizer.authorize_batch(batch[4:], NOW)
    by_account: dict[str, list[int]] = {}
    for event in events(ledger):
        assert event.data.account_id is not None
        by_account.setdefault(event.data.account_id, []).append(event.account_sequence)
    assert by_account == {"demo-main": [9, 10, 11, 12], "demo-low": [4, 5, 6, 7]}


def test_a_failed_batch_leaves_no_event(setup) -> None:  # type: ignore[no-untyped-def]
    ledger, authorizer = setup
    ledger.env.close()  # the ledger becomes unavailable: the batch is answered 96
    outcomes = authorizer.authorize_batch([message("0100", "000001", 10)], NOW)
    assert [o.response_code for o in outcomes] == ["96"]
    reopened = Ledger(ledger.path, durability="process", map_size_bytes=64 << 20)
    try:
        assert events(reopened) == []
    finally:
        reopened.close()
    ledger.env = reopened.env  # let the fixture's close() succeed


def test_schema_in_specs_is_current() -> None:
    shipped = json.loads((ROOT / "specs" / "events.schema.json").read_text())
    assert shipped == json.loads(msgspec.json.encode(schema())), (
        "specs/events.schema.json drifted: python -m processor.events > specs/events.schema.json"
    )


@pytest.mark.parametrize(
    "bug",
    [KeyError("a bug"), lmdb.BadValsizeError("a key the command made too long")],
    ids=["python", "lmdb"],
)
def test_a_command_that_fails_with_a_bug_costs_the_batch_nothing_else(setup, bug) -> None:  # type: ignore[no-untyped-def]
    """A control-API command raising what no command should (a bug) failed the whole batch:
    every authorisation in it was answered 96. It is left out, half-written changes and all,
    and the batch runs again without it; its caller gets the error. An LMDB error a command
    caused itself (not the map filling up) was raised through and still cost the batch."""
    from processor.api import commands

    ledger, authorizer = setup
    fund = commands.move_funds("demo-main", "fund", 5, "kept")

    def buggy(writer, now_ms):  # type: ignore[no-untyped-def]
        commands.move_funds("demo-main", "fund", 7, "half-written")(writer, now_ms)
        raise bug

    with ledger.read() as reader:
        posted = reader.account("demo-main").posted
    outcomes, results = authorizer.run_batch([message("0100", "000901", 100)], [buggy, fund], NOW)
    assert [o.response_code for o in outcomes] == ["00"]
    assert results[0] is bug and not isinstance(results[1], Exception)
    with ledger.read() as reader:
        assert reader.account("demo-main").posted == posted + 5  # the bug's 7 is not there
    assert [e.type for e in events(ledger)] == ["account.funded", "authorization.approved"]
