"""`processor ledger verify`: a ledger the processor wrote passes; each kind of damage is named."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import pytest
from support import DEMO_LOAD_EVENTS, authorization

from processor.authorizer import Authorizer
from processor.engine import ProgrammeRules
from processor.events import event_id
from processor.ledger.load import load_path
from processor.ledger.records import EventIds, StoredAnswer
from processor.ledger.store import Ledger, stored_answer_key
from processor.ledger.verify import verify
from processor.metrics import Metrics
from processor.resources import demo_data_path
from processor.security import PanHasher
from processor.wire.messages import AuthorizationRequest

HASHER = PanHasher(b"verify-test-key")
NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
LOAD = "4761739001010085"  # demo-main
MAIN_LOAD_EVENTS = 8  # demo-main's events of the load: its creation, six cards, its funding
LOW = "4761739001010069"  # demo-low


def message(
    mti: str, stan: str, amount: int, pan: str = LOAD, **extra: str
) -> AuthorizationRequest:
    """A message on the demo ledger's cards (support.authorization), with an RRN."""
    return authorization(pan, stan, amount, t=mti, **{"37": f"63301200{stan[-4:]}", **extra})


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    ledger = Ledger(tmp_path, durability="process", map_size_bytes=64 << 20)
    load_path(ledger, demo_data_path(), HASHER)
    with ledger.read() as reader:
        assert reader.outbox_last_sequence() == DEMO_LOAD_EVENTS
    authorizer = Authorizer(ledger, HASHER, ProgrammeRules(), hold_lifetime_seconds=3600)
    original_90 = f"0100000001112412000000000123456{0:011d}"
    requests = [
        message("0100", "000001", 1000),  # a hold, reversed below
        message("0100", "000002", 700),  # a hold left open
        message("0100", "000003", 10_000, pan=LOW),  # declined
        message("0200", "000004", 500),  # posted at once
        message("0400", "000005", 1000, **{"90": original_90}),
        message("0120", "000006", 300, **{"39": "00"}),  # an advice
    ]
    outcomes = authorizer.authorize_batch(requests, NOW)
    assert [o.response_code for o in outcomes] == ["00", "00", "51", "00", "00", "00"]
    yield ledger
    ledger.close()


def test_a_ledger_the_processor_wrote_verifies(ledger: Ledger) -> None:
    with ledger.read() as reader:
        found = verify(reader)
        cards = sum(1 for _ in reader.cards())
    assert found.problems == [] and found.problems_total == 0
    assert found.holds >= 2 and found.open_holds >= 1 and found.answers == 6
    assert found.cards == cards > 0
    assert found.events == DEMO_LOAD_EVENTS + 6


def test_a_held_amount_out_of_step_with_the_holds_is_named(ledger: Ledger) -> None:
    with ledger.write() as writer:
        account = writer.account("demo-main")
        assert account is not None
        account.held += 1
        writer.put_account(account)
    with ledger.read() as reader:
        found = verify(reader)
    assert found.problems_total == 1
    assert found.problems[0].startswith("account demo-main: held ")


def test_a_missing_event_and_a_missing_hold_are_named(ledger: Ledger) -> None:
    with ledger.write() as writer:
        txn, dbs = writer._txn, writer._dbs  # damage no processor path could do
        # The second request's: demo-main's second after the load's (its creation, its cards'
        # and its funding: MAIN_LOAD_EVENTS).
        assert txn.delete(struct.pack(">Q", DEMO_LOAD_EVENTS + 2), db=dbs["outbox"])
        open_hold = next(h for h in writer.all_holds() if h.status == "open")
        assert txn.delete(stored_answer_key(open_hold.identity), db=dbs["answers"])
        # A reversal's answer naming the lost hold, as one would after it.
        writer.put_answer(
            b"0400|123456|000099|1124120000",
            StoredAnswer(
                fingerprint=b"",
                response={},
                response_code="00",
                reason="reversed",
                answered_ms=1,
                hold_id=open_hold.hold_id,
                account_id="demo-main",
            ),
        )
    with ledger.read() as reader:
        found = verify(reader)
    text = "\n".join(found.problems)
    after = DEMO_LOAD_EVENTS + 1
    assert f"outbox: sequence {after + 2} follows {after}" in text
    assert f"names hold {open_hold.hold_id}: not found" in text
    assert "account demo-main: held" in text  # the open hold's amount is not found either
    assert f"hold expiry index: hold {open_hold.hold_id} at" in text
    # The next of demo-main's events is the 0200's, the fourth request.
    number, before = MAIN_LOAD_EVENTS + 3, MAIN_LOAD_EVENTS + 1
    assert (
        f"account demo-main: event {DEMO_LOAD_EVENTS + 4} is its number {number}, after {before}"
        in text
    )


def test_an_open_hold_missing_from_the_expiry_index_is_named(ledger: Ledger) -> None:
    with ledger.write() as writer:
        open_hold = next(h for h in writer.all_holds() if h.status == "open")
        key = struct.pack(">QQ", open_hold.expires_ms, open_hold.hold_id)
        assert writer._txn.delete(key, db=writer._dbs["hold_expiry"])
    with ledger.read() as reader:
        found = verify(reader)
    assert found.problems == [f"hold {open_hold.hold_id}: open, but not in the hold expiry index"]


def test_an_rrn_entry_naming_no_answer_and_an_event_counter_behind_are_named(
    ledger: Ledger,
) -> None:
    """Both passed verify: a reversal without field 90 then found nothing, and the next
    event written failed (its sequence not above the outbox's last)."""
    with ledger.write() as writer:
        txn, dbs = writer._txn, writer._dbs  # damage no processor path could do
        writer.index_rrn(b"633012000777|123456|000777", b"0100|123456|000777|1124120000")
        assert txn.put(b"seq:event", struct.pack(">Q", 3), db=dbs["meta"])
    with ledger.read() as reader:
        found = verify(reader)
    text = "\n".join(found.problems)
    assert "RRN index: 633012000777|123456|000777 names 0100|123456|000777|1124120000" in text
    assert f"outbox: events up to {DEMO_LOAD_EVENTS + 6}, but the ledger has numbered 2" in text


def test_cards_out_of_step_with_their_indexes_and_states_are_named(ledger: Ledger) -> None:
    """A card the card-id index misses (the API cannot find it), one listed under another
    account, a card state left beside an account not its own, and a card of no account."""
    with ledger.write() as writer:
        txn, dbs = writer._txn, writer._dbs  # damage no processor path could do
        cards = sorted(writer.cards_by_key(), key=lambda each: each[1].card_id)
        (_, gone), (moved_key, moved), (orphan_key, orphan) = cards[:3]
        assert txn.delete(gone.card_id.encode(), db=dbs["card_ids"])
        assert txn.put(b"demo-low\x00" + moved_key, b"", db=dbs["account_cards"])
        assert txn.put(b"demo-low\x00" + moved.card_id.encode(), b"\x90", db=dbs["accounts"])
        orphan.account_id = "nobody"
        txn.put(orphan_key, msgspec.msgpack.encode(orphan), db=dbs["cards"])
    with ledger.read() as reader:
        found = verify(reader)
    text = "\n".join(found.problems)
    assert f"card {gone.card_id}: missing from the card id index" in text
    assert f"account demo-low: its cards list card {moved.card_id}, not one of its own" in text
    assert f"account demo-low: keeps a state of card {moved.card_id}, not one of its cards" in text
    assert f"card {orphan.card_id}: its account 'nobody' does not exist" in text
    assert f"card {orphan.card_id}: not listed among its account's cards" in text
    # ... and its own account's listing names a card of another account now.
    assert f"its cards list card {orphan.card_id}, not one of its own" in text
    assert found.problems_total == 6, found.problems


def test_ledger_entries_out_of_step_with_their_account_are_named(ledger: Ledger) -> None:
    with ledger.write() as writer:
        txn, dbs = writer._txn, writer._dbs  # damage no processor path could do
        account = writer.account("demo-main")
        assert account is not None and account.entry_sequence == 1  # the load's funding
        assert txn.delete(b"demo-main\x00" + struct.pack(">Q", 1), db=dbs["entries"])
        low = writer.account("demo-low")
        assert low is not None
        low.entry_sequence += 1
        writer.put_account(low)
    with ledger.read() as reader:
        found = verify(reader)
    text = "\n".join(found.problems)
    assert "account demo-main: its ledger entries go up to 0, the account says 1" in text
    assert "account demo-low: its ledger entries go up to 1, the account says 2" in text
    assert found.problems_total == 2, found.problems


def test_a_gap_in_an_accounts_ledger_entries_is_named(ledger: Ledger) -> None:
    with ledger.write() as writer:
        account = writer.account("demo-main")
        assert account is not None
        for amount in (100, -50, 25):
            writer.append_entry(account, "fund" if amount > 0 else "debit", amount, "test", 1)
        writer.put_account(account)
        assert writer._txn.delete(
            b"demo-main\x00" + struct.pack(">Q", 2), db=writer._dbs["entries"]
        )
    with ledger.read() as reader:
        found = verify(reader)
    assert found.problems == ["account demo-main: ledger entry 3 (kept as 3) follows 1"]


def test_stats_count_each_database_and_date_the_ones_in_time_order(ledger: Ledger) -> None:
    stats = {each.name: each for each in ledger.stats()}
    with ledger.read() as reader:
        found = verify(reader)
    assert stats["hold_expiry"].entries == found.open_holds
    assert stats["outbox"].entries == found.events
    assert stats["answers"].entries == found.answers
    assert stats["accounts"].oldest_ms is None  # not kept in time order
    for name in ("outbox", "answers"):
        assert stats[name].oldest_ms is not None and stats[name].oldest_ms > 0
    for each in stats.values():
        assert each.bytes == each.pages * 4096 and (each.pages > 0) == (each.entries > 0)

    metrics = Metrics()
    metrics.watch_ledger(
        ledger.map_usage,
        ledger.map_size_max_bytes,
        lambda: [(s.name, s.entries, s.bytes, s.oldest_ms) for s in ledger.stats()],
    )
    text = metrics.exposition().decode()
    assert f'processor_ledger_database_entries{{database="outbox"}} {found.events}.0' in text
    assert (
        f'processor_ledger_database_bytes{{database="answers"}} {stats["answers"].bytes}.0' in text
    )
    assert 'processor_ledger_oldest_record_age_seconds{database="answers"}' in text
    assert 'processor_ledger_oldest_record_age_seconds{database="accounts"}' not in text


def test_events_of_a_restored_copy_are_named_apart_from_what_the_original_went_on_with(
    ledger: Ledger,
) -> None:
    with ledger.read() as reader:
        before = reader.event_ids()
        own = reader.ledger_id()
    assert before == EventIds([(1, own)]) and before.prefix(6) == own
    with ledger.write() as writer:
        fresh = writer.name_events_from(7)  # what `ledger backup` does to its copy
    with ledger.read() as reader:
        ids = reader.event_ids()
    assert fresh != own and ids.prefix(6) == own and ids.prefix(7) == fresh
    assert ids.sequence(event_id(own, 6)) == 6 and ids.sequence(event_id(fresh, 7)) == 7
    # An id of the old name past the restore point, or of the new one before it, is not ours.
    assert ids.sequence(event_id(own, 7)) is None and ids.sequence(event_id(fresh, 6)) is None
    for bad in ("evt_", f"evt_{own}", f"evt_{own}00000000_006", f"evt_{own} 0000000006", "x"):
        assert ids.sequence(bad) is None
