"""A ledger written by the schema-1 release is migrated on open, never misread.

tests/fixtures/ledger_v1 was written by that release (tests/fixtures/make_ledger_v1.py), and
ledger_v1.json holds what it read back from it then. After the migration the same questions
must get the same answers, and every request answered then is answered again byte for byte.
"""

from __future__ import annotations

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
from processor.ledger.store import SCHEMA_VERSION, Ledger, LedgerError
from processor.security import PanHasher
from processor.wire.codec import Codec
from processor.wire.messages import AuthorizationRequest
from processor.wire.spec import load_spec

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
EXPECTED: dict[str, Any] = json.loads((FIXTURES / "ledger_v1.json").read_text())
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


def test_migration_keeps_balances_holds_histories_and_usage(v1_copy: Path) -> None:
    ledger = Ledger(v1_copy, durability="process", map_size_bytes=16 << 20)
    try:
        with ledger.read() as reader:
            for account_id, was in EXPECTED["accounts"].items():
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
            for card_id, was in EXPECTED["cards"].items():
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
            assert not {b"usage", b"card_answers", b"account_answers", b"account_holds"} & {
                bytes(name) for name, _ in reader._txn.cursor()
            }
    finally:
        ledger.close()
    reopened = Ledger(v1_copy, readonly=True)  # migrated: a reader opens it now
    reopened.close()


def test_every_request_answered_before_the_migration_gets_the_same_bytes(v1_copy: Path) -> None:
    ledger = Ledger(v1_copy, durability="process", map_size_bytes=16 << 20)
    codec, authorizer = CODEC, authorizer_on(ledger)
    try:
        requests = []
        for exchange in EXPECTED["exchanges"]:
            request = codec.decode(codec.encode(exchange["request"]))
            assert isinstance(request, AuthorizationRequest)
            requests.append(request)
        outcomes = authorizer.authorize_batch(requests, datetime(2026, 11, 25, tzinfo=UTC))
        for exchange, outcome in zip(EXPECTED["exchanges"], outcomes, strict=True):
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
    assert "migrated from schema 1 to 2" in capsys.readouterr().out
    assert main(["ledger", "migrate", "--ledger", str(v1_copy)]) == 0
    assert "nothing to migrate" in capsys.readouterr().out
    Ledger(v1_copy, readonly=True).close()


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
