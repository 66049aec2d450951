"""Ledgers written by the schema-1, 2, 3 and 5 releases are migrated on open, never misread.

tests/fixtures/ledger_vN was written by that release (tests/fixtures/make_ledger.py), and
ledger_vN.json holds what it read back from it then. After the migration the same questions
must get the same answers, every request answered then is answered again byte for byte, and
every event renders as it did.
"""

from __future__ import annotations

import base64
import json
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest

from processor.authorizer import Authorizer
from processor.catalog import default_catalog
from processor.engine import ProgrammeRules
from processor.ledger.store import SCHEMA_VERSION, Ledger, LedgerError, stored_answer_key
from processor.ledger.verify import verify
from processor.security import PanHasher
from processor.wire.codec import Codec
from processor.wire.messages import AuthorizationRequest
from processor.wire.spec import load_spec

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
EXPECTED: dict[str, Any] = json.loads((FIXTURES / "ledger_v1.json").read_text())
EXPECTED_V2: dict[str, Any] = json.loads((FIXTURES / "ledger_v2.json").read_text())
EXPECTED_V3: dict[str, Any] = json.loads((FIXTURES / "ledger_v3.json").read_text())
EXPECTED_V5: dict[str, Any] = json.loads((FIXTURES / "ledger_v5.json").read_text())
RELEASES = {"v1": EXPECTED, "v2": EXPECTED_V2, "v3": EXPECTED_V3, "v5": EXPECTED_V5}
HASHER = PanHasher(b"fixture-pan-key")


CODEC = Codec(load_spec())


def authorizer_on(ledger: Ledger) -> Authorizer:
    rules = ProgrammeRules(catalog=default_catalog())
    return Authorizer(ledger, HASHER, rules, hold_lifetime_seconds=7 * 86400)


@pytest.fixture
def v1_copy(tmp_path: Path) -> Path:
    target = tmp_path / "ledger"
    shutil.copytree(FIXTURES / "ledger_v1", target)
    return target


@pytest.fixture(params=sorted(RELEASES))
def old_copy(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    """A copy of each older release's ledger, with what that release read from it."""
    target = tmp_path / "ledger"
    shutil.copytree(FIXTURES / f"ledger_{request.param}", target)
    return target, RELEASES[request.param]


def test_the_fixture_is_schema_1(v1_copy: Path) -> None:
    import lmdb

    env = lmdb.open(str(v1_copy), max_dbs=32, readonly=True, lock=False)
    try:
        with env.begin() as txn:
            meta = env.open_db(b"meta", txn=txn, create=False)
            assert txn.get(b"schema", db=meta) == b"1"
    finally:
        env.close()


def test_read_only_open_refuses_an_unmigrated_ledger(v1_copy: Path) -> None:
    with pytest.raises(LedgerError, match="migrate"):
        Ledger(v1_copy, readonly=True)


def test_a_ledger_of_a_newer_release_is_refused_saying_so(tmp_path: Path) -> None:
    """A read-only open told to migrate it (this build cannot), and a read-write open
    replayed the newer release's log first and failed on what it named."""
    import lmdb

    ledger = Ledger(tmp_path / "ledger", durability="process", map_size_bytes=16 << 20)
    ledger.close()
    env = lmdb.open(str(tmp_path / "ledger"), max_dbs=64)
    with env.begin(write=True) as txn:
        txn.put(b"schema", b"99", db=env.open_db(b"meta", txn=txn))
    env.close()
    for readonly in (True, False):
        with pytest.raises(LedgerError, match="written by a newer release"):
            Ledger(tmp_path / "ledger", map_size_bytes=16 << 20, readonly=readonly)


def test_migration_keeps_balances_holds_histories_and_usage(
    old_copy: tuple[Path, dict[str, Any]],
) -> None:
    path, expected = old_copy
    ledger = Ledger(path, durability="process", map_size_bytes=16 << 20)
    try:
        with ledger.read() as reader:
            for account_id, was in expected["accounts"].items():
                account = reader.account(account_id)
                assert account is not None
                assert (account.posted, account.held) == (was["posted"], was["held"])
                holds = reader.account_holds(account_id)
                assert [hold.hold_id for hold in holds] == was["open_holds"]
                assert account.open_holds == len(was["open_holds"])
                assert account.held == sum(hold.amount for hold in holds)
                history = reader.history("account", account_id, 100)
                assert [key.decode() for key, _, _ in history] == was["history"]
                usage = reader.usage("a:" + account_id)
                assert msgspec.to_builtins(usage) == was["usage"]
            for card_id, was in expected["cards"].items():
                history = reader.history("card", card_id, 100)
                assert [key.decode() for key, _, _ in history] == was["history"]
                assert msgspec.to_builtins(reader.usage("c:" + card_id)) == was["usage"]
                # Paging through the chain gives the same answers, one at a time.
                paged: list[str] = []
                before = None
                while page := reader.history("card", card_id, 1, before):
                    paged.append(page[0][0].decode())
                    before = page[0][2]
                assert paged == was["history"]
            assert {bytes(name) for name, _ in reader._txn.cursor()} >= {b"answers", b"cards"}
            retired = {b"usage", b"card_answers", b"account_answers", b"account_holds", b"holds"}
            assert not retired & {bytes(name) for name, _ in reader._txn.cursor()}
            if "holds" in expected:
                # Schema 4 keeps each hold in the answer that opened it: every hold, open or
                # resolved, reads as the schema-3 release kept it in a record of its own.
                holds = sorted(reader.all_holds(), key=lambda hold: hold.hold_id)
                assert [msgspec.to_builtins(hold) for hold in holds] == expected["holds"]
                expiring = [hold_id for _, hold_id, _ in reader.hold_expiry_index()]
                assert sorted(expiring) == sorted(
                    hold.hold_id for hold in holds if hold.status == "open"
                )
            if "events" in expected:
                # Every event renders as the release that wrote it rendered it.
                from processor.events import render

                rendered = [
                    msgspec.json.decode(msgspec.json.encode(render(r, reader.ledger_id())))
                    for r in reader.outbox(1, 1000)
                ]
                assert rendered == expected["events"]
        with ledger.read() as reader:
            assert verify(reader).problems == []
    finally:
        ledger.close()
    reopened = Ledger(path, readonly=True)  # migrated: a reader opens it now
    reopened.close()


def test_every_request_answered_before_the_migration_gets_the_same_bytes(
    old_copy: tuple[Path, dict[str, Any]],
) -> None:
    path, expected = old_copy
    ledger = Ledger(path, durability="process", map_size_bytes=16 << 20)
    codec, authorizer = CODEC, authorizer_on(ledger)
    try:
        requests = []
        for exchange in expected["exchanges"]:
            request = codec.decode(codec.encode(exchange["request"]))
            assert isinstance(request, AuthorizationRequest)
            requests.append(request)
        outcomes = authorizer.authorize_batch(requests, datetime(2026, 11, 25, tzinfo=UTC))
        for exchange, outcome in zip(expected["exchanges"], outcomes, strict=True):
            assert outcome.reason == "retransmission", exchange["request"]["11"]
            assert CODEC.encode(outcome.fields).hex() == exchange["response"]
    finally:
        ledger.close()


def test_the_migration_is_recorded_and_runs_once(v1_copy: Path) -> None:
    Ledger(v1_copy, durability="process", map_size_bytes=16 << 20).close()
    ledger = Ledger(v1_copy, durability="process", map_size_bytes=16 << 20)
    try:
        with ledger.read() as reader:
            assert reader._txn.get(b"schema", db=reader._dbs["meta"]) == SCHEMA_VERSION
            account = reader.account("demo-main")
            assert account is not None
            assert account.open_holds == len(EXPECTED["accounts"]["demo-main"]["open_holds"])
    finally:
        ledger.close()


def test_ledger_migrate_command(v1_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from processor.cli import main

    assert main(["ledger", "migrate", "--ledger", str(v1_copy)]) == 0
    assert "migrated from schema 1 to 6" in capsys.readouterr().out
    assert main(["ledger", "migrate", "--ledger", str(v1_copy)]) == 0
    assert "nothing to migrate" in capsys.readouterr().out
    Ledger(v1_copy, readonly=True).close()


def test_a_migration_grows_a_map_too_small_for_it_up_to_the_ceiling(
    v1_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The fixture's migrations fit in its file's free pages; a large ledger's would not. The
    # last step here also writes (and drops) 2 MiB, as rewriting a large ledger's answers does.
    from processor.ledger import store

    step, to = store._MIGRATIONS[b"3"]

    def larger(env: Any, txn: Any, dbs: Any, codecs: Any) -> None:
        step(env, txn, dbs, codecs)
        for n in range(512):
            txn.put(b"scratch:%d" % n, bytes(4000), db=dbs["meta"])
        for n in range(512):
            txn.delete(b"scratch:%d" % n, db=dbs["meta"])

    monkeypatch.setitem(store._MIGRATIONS, b"3", (larger, to))
    size = (v1_copy / "data.mdb").stat().st_size  # a map no larger than the file: no room
    with pytest.raises(LedgerError, match=r"needs more room .* nothing was changed"):
        Ledger(v1_copy, durability="process", map_size_bytes=size, map_size_max_bytes=size)
    test_the_fixture_is_schema_1(v1_copy)  # the failed attempt changed nothing

    ledger = Ledger(v1_copy, durability="process", map_size_bytes=size, map_size_max_bytes=16 << 20)
    try:
        assert ledger.migrated_from == b"1" and ledger.env.info()["map_size"] > size
        with ledger.read() as reader:
            assert verify(reader).problems == []
    finally:
        ledger.close()


def test_a_reversal_without_field_90_still_finds_its_original_by_rrn(v1_copy: Path) -> None:
    ledger = Ledger(v1_copy, durability="process", map_size_bytes=16 << 20)
    codec, authorizer = CODEC, authorizer_on(ledger)
    try:
        # STAN 11 was an approved 0100 whose hold is still open; its RRN index entry was
        # written by the old release under the old key layout.
        [original] = [e["request"] for e in EXPECTED["exchanges"] if e["request"]["11"] == "000011"]
        fields = dict(original, t="0400", **{"7": "1125090000"})
        request = codec.decode(codec.encode(fields))
        assert isinstance(request, AuthorizationRequest)
        assert request.original_data is None
        [outcome] = authorizer.authorize_batch([request], datetime(2026, 11, 25, tzinfo=UTC))
        assert (outcome.response_code, outcome.reason) == ("00", "reversed")
        with ledger.read() as reader:
            account = reader.account("demo-main")
            assert account is not None
            was = EXPECTED["accounts"]["demo-main"]
            assert account.held == was["held"] - int(original["4"])
    finally:
        ledger.close()


def open_migrated(tmp_path: Path, release: str) -> Ledger:
    """A copy of `release`'s fixture ledger, opened for writing: migrated from its schema."""
    path = tmp_path / "ledger"
    shutil.copytree(FIXTURES / f"ledger_{release}", path)
    ledger = Ledger(path, durability="process", map_size_bytes=16 << 20)
    assert ledger.migrated_from == release[1:].encode()
    return ledger


def send_again_as_new(ledger: Ledger, exchanges: list[dict[str, Any]]) -> None:
    """The recorded requests again under new identities (field 7 a day later, and in the
    original data element of reversals and completions), decided in one batch."""
    requests = []
    for exchange in exchanges:
        fields = dict(exchange["request"], **{"7": "1125101010"})
        if "90" in fields:
            fields["90"] = fields["90"][:10] + "1125101010" + fields["90"][20:]
        request = CODEC.decode(CODEC.encode(fields))
        assert isinstance(request, AuthorizationRequest)
        requests.append(request)
    authorizer_on(ledger).authorize_batch(requests, datetime(2026, 11, 25, 10, 10, tzinfo=UTC))


def facts(event: dict[str, Any]) -> dict[str, Any]:
    """A rendered event without what differs by construction between two requests of the same
    content: ids, times, balances, approval codes."""
    data = dict(event["data"])
    for moving in ("authorization_id", "balance_after", "hold_id"):
        data.pop(moving, None)
    network = dict(data.pop("network", {}))
    network.pop("approval_code", None)
    return {"type": event["type"], "data": data, "network": network}


def given_back(was: list[dict[str, Any]], exchanges: list[dict[str, Any]]) -> None:
    """The facts of older events (`facts`) as an event says them now: a reversal in part
    says what it gave back (`billing_amount`), which no event said before 2026-12-07."""
    sent = {exchange["request"]["11"]: exchange["request"] for exchange in exchanges}
    for event in was:
        if event["data"]["reason"] == "partially_reversed":
            request = sent[event["network"]["stan"]]
            back = int(request["4"]) - int(request["95"][:12])
            event["data"]["billing_amount"] = {"amount": back, "currency": "EUR", "exponent": 2}


def test_events_of_schema_2_render_as_before_and_new_ones_in_full(tmp_path: Path) -> None:
    from processor.events import render

    ledger = open_migrated(tmp_path, "v2")
    try:
        with ledger.read() as reader:
            old = reader.outbox(1, 1000)
            assert not any(record.in_answer for record in old)
            rendered = [msgspec.to_builtins(render(r, reader.ledger_id())) for r in old]
        assert rendered == EXPECTED_V2["events"]
        # The same requests again under new identities: schema 3 stores their events compact
        # (the facts stay in the answers) and they render with the same facts as before.
        send_again_as_new(ledger, EXPECTED_V2["exchanges"])
        with ledger.read() as reader:
            new = reader.outbox(len(old) + 1, 1000)
            assert new and all(record.in_answer for record in new)
            fresh = [msgspec.to_builtins(render(r, reader.ledger_id())) for r in new]
    finally:
        ledger.close()

    # The schema-2 event of the same request, but for what differs by construction.
    was = [facts(e) for e in EXPECTED_V2["events"] if e["type"] != "authorization.expired"]
    given_back(was, EXPECTED_V2["exchanges"])
    assert [facts(e) for e in fresh] == was


def test_a_schema_3_hold_without_its_answer_stops_the_migration(tmp_path: Path) -> None:
    """Its amount is part of the account's held balance: dropping it would misread the ledger."""
    import lmdb

    path = tmp_path / "ledger"
    shutil.copytree(FIXTURES / "ledger_v3", path)
    open_hold = next(hold for hold in EXPECTED_V3["holds"] if hold[11] == "open")
    identity = base64.b64decode(open_hold[8])
    env = lmdb.open(str(path), max_dbs=32)
    try:
        with env.begin(write=True) as txn:
            answers = env.open_db(b"answers", txn=txn, create=False)
            assert txn.delete(stored_answer_key(identity), db=answers)
    finally:
        env.close()
    with pytest.raises(LedgerError, match=f"hold {open_hold[0]} .*missing"):
        Ledger(path, durability="process", map_size_bytes=16 << 20)
    # Nothing was changed: the open that failed left schema 3 as it was.
    env = lmdb.open(str(path), max_dbs=32, readonly=True, lock=False)
    try:
        with env.begin() as txn:
            assert txn.get(b"schema", db=env.open_db(b"meta", txn=txn, create=False)) == b"3"
    finally:
        env.close()


def test_schema_6_writes_a_messages_event_and_an_accounts_link_smaller(tmp_path: Path) -> None:
    """After the migration from schema 5, the same requests under new identities store their
    events compact (records.MessageEvent) and, on accounts of one card, the account's history
    link as SAME_AS_CARD; both read as schema 5 wrote them: the same event facts and the same
    histories."""
    from processor.events import render
    from processor.ledger.records import COMPACT_EVENT_MARK, MESSAGE_EVENT_TYPES, SAME_AS_CARD

    ledger = open_migrated(tmp_path, "v5")
    try:
        with ledger.read() as reader:
            first_new = reader.outbox_last_sequence() + 1
            old_raw = [bytes(v) for _, v in reader._txn.cursor(db=reader._dbs["outbox"])]
        assert not any(raw.startswith(COMPACT_EVENT_MARK) for raw in old_raw)
        send_again_as_new(ledger, EXPECTED_V5["exchanges"])
        with ledger.read() as reader:
            cursor = reader._txn.cursor(db=reader._dbs["outbox"])
            assert cursor.set_range(first_new.to_bytes(8, "big"))
            new_raw = [bytes(value) for value in cursor.iternext(keys=False, values=True)]
            new = reader.outbox(first_new, 1000)
            fresh = [msgspec.to_builtins(render(r, reader.ledger_id())) for r in new]
            histories = {}
            for card_id in EXPECTED_V5["cards"]:
                found = reader.card_by_id(card_id)
                assert found is not None
                account_id = found[1].account_id
                histories[account_id] = (
                    reader.history("account", account_id, 100),
                    reader.history("card", card_id, 100),
                )
    finally:
        ledger.close()
    assert new and all(raw.startswith(COMPACT_EVENT_MARK) for raw in new_raw)
    was = [facts(e) for e in EXPECTED_V5["events"] if e["type"] in MESSAGE_EVENT_TYPES]
    given_back(was, EXPECTED_V5["exchanges"])
    assert [facts(e) for e in fresh] == was
    for account_id, (of_account, of_card) in histories.items():
        # Each demo account has one card: its history is the card's, old links and new.
        assert [key for key, _, _ in of_account] == [key for key, _, _ in of_card], account_id
        newest = [answer for _, answer, _ in of_account[: len(of_account) // 2]]
        assert newest and all(a.previous_for_account == SAME_AS_CARD for a in newest[:-1])
