"""The ledger's map grows by itself up to its ceiling; at the ceiling a batch is 96 ledger_full,
nothing of it applied or stored, and a later batch with room commits as usual."""

from __future__ import annotations

import multiprocessing
import re
from datetime import UTC, datetime
from pathlib import Path

import pytest
from support import authorization

from processor.authorizer import Authorizer
from processor.engine import ProgrammeRules
from processor.ledger.load import LoadError, apply_load_file, load_path, parse_load_file
from processor.ledger.store import Ledger, LedgerFull
from processor.resources import demo_data_path
from processor.security import PanHasher, luhn_check_digit
from processor.wire.messages import AuthorizationRequest

HASHER = PanHasher(b"ledger-room-test-key")
NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
MIB = 1 << 20


def approval(stan: int) -> AuthorizationRequest:
    return authorization("4761739001010085", f"{stan:06d}", 1)


def test_the_map_doubles_up_to_its_ceiling_and_no_further(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path, map_size_bytes=MIB, map_size_max_bytes=3 * MIB)
    try:
        assert ledger.grow() and ledger.map_usage()[1] == 2 * MIB
        assert ledger.grow() and ledger.map_usage()[1] == 3 * MIB  # the ceiling, not 4 MiB
        assert not ledger.grow() and ledger.map_usage()[1] == 3 * MIB
    finally:
        ledger.close()
    fixed = Ledger(tmp_path / "fixed", map_size_bytes=MIB)  # no ceiling: never grows
    try:
        assert not fixed.grow()
    finally:
        fixed.close()


def test_a_batch_that_does_not_fit_grows_the_map_and_is_applied_once(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path, map_size_bytes=MIB, map_size_max_bytes=64 * MIB)
    try:
        load_path(ledger, demo_data_path(), HASHER)
        authorizer = Authorizer(ledger, HASHER, ProgrammeRules(), hold_lifetime_seconds=3600)
        requests = [approval(stan) for stan in range(1, 3001)]  # over 1 MiB of records
        with ledger.read() as reader:
            loaded = reader.outbox_last_sequence()  # the load's events
        outcomes = authorizer.authorize_batch(requests, NOW)
        assert {o.response_code for o in outcomes} == {"00"}
        assert ledger.map_usage()[1] > MIB
        with ledger.read() as reader:  # applied once: one hold per approval, no more
            assert reader.outbox_last_sequence() == loaded + len(requests)
    finally:
        ledger.close()


def test_at_the_ceiling_a_batch_is_96_ledger_full_and_a_later_one_with_room_commits(
    tmp_path: Path,
) -> None:
    ledger = Ledger(tmp_path, map_size_bytes=MIB, map_size_max_bytes=MIB)
    try:
        load_path(ledger, demo_data_path(), HASHER)
        authorizer = Authorizer(ledger, HASHER, ProgrammeRules(), hold_lifetime_seconds=3600)
        stans = iter(range(1, 1_000_000))
        full = None
        for _ in range(100):  # 1 MiB holds far fewer than 100 batches of 50
            outcomes, results = authorizer.run_batch(
                [approval(next(stans)) for _ in range(50)], [lambda writer, now: "done"], NOW
            )
            if outcomes[0].response_code == "96":
                full = outcomes
                break
        assert full is not None
        assert {(o.response_code, o.reason) for o in full} == {("96", "ledger_full")}
        assert isinstance(results[0], LedgerFull)  # the batch's API command: nothing applied
        # Each batch tries again, and a smaller one may still fit: fill up to the last page.
        for _ in range(1000):
            if authorizer.authorize_batch([approval(next(stans))], NOW)[0].response_code == "96":
                break
        with ledger.read() as reader:
            events = reader.outbox_last_sequence()
        retried = approval(999_999)
        assert authorizer.authorize_batch([retried], NOW)[0].reason == "ledger_full"
        with ledger.read() as reader:
            assert reader.outbox_last_sequence() == events  # nothing stored, no event

        ledger.map_size_max_bytes = 4 * MIB  # room (an operator raised the ceiling)
        [outcome] = authorizer.authorize_batch([retried], NOW)
        assert outcome.response_code == "00" and outcome.reason != "retransmission"
    finally:
        ledger.close()


def _grow_and_fill(path: str) -> None:
    ledger = Ledger(path, map_size_bytes=MIB, map_size_max_bytes=64 * MIB)
    try:
        authorizer = Authorizer(ledger, HASHER, ProgrammeRules(), hold_lifetime_seconds=3600)
        outcomes = authorizer.authorize_batch([approval(s) for s in range(1, 3001)], NOW)
        assert {o.response_code for o in outcomes} == {"00"}
    finally:
        ledger.close()


def test_another_process_growing_the_map_is_adopted(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path, map_size_bytes=MIB, map_size_max_bytes=64 * MIB)
    try:
        load_path(ledger, demo_data_path(), HASHER)
        with ledger.read() as reader:
            loaded = reader.outbox_last_sequence()  # the load's events
        # A worker process (spawned: an LMDB environment must not cross a fork) grows it.
        worker = multiprocessing.get_context("spawn").Process(
            target=_grow_and_fill, args=(str(tmp_path),)
        )
        worker.start()
        worker.join(timeout=120)
        assert worker.exitcode == 0
        with ledger.read() as reader:  # past this process's map: adopted, not an error
            assert reader.outbox_last_sequence() == loaded + 3000
        assert ledger.map_usage()[1] > MIB
        outcomes = Authorizer(
            ledger, HASHER, ProgrammeRules(), hold_lifetime_seconds=3600
        ).authorize_batch([approval(4000)], NOW)
        assert outcomes[0].response_code == "00"
    finally:
        ledger.close()


@pytest.mark.parametrize("start", [MIB, 2 * MIB])
def test_a_ceiling_below_the_start_is_the_start(tmp_path: Path, start: int) -> None:
    ledger = Ledger(tmp_path, map_size_bytes=start, map_size_max_bytes=MIB // 2)
    try:
        assert ledger.map_size_max_bytes == start and not ledger.grow()
    finally:
        ledger.close()


def load_file(accounts: int) -> str:
    return "".join(
        f'[[accounts]]\nid = "acct-{index}"\ncurrency = "EUR"\nbalance = 100000\n'
        for index in range(accounts)
    )


def test_a_load_larger_than_the_map_grows_it_or_names_the_ceiling(tmp_path: Path) -> None:
    source = tmp_path / "big.toml"
    source.write_text(load_file(20_000))  # a few MiB of accounts
    roomy = Ledger(tmp_path / "roomy", map_size_bytes=MIB, map_size_max_bytes=64 * MIB)
    try:
        assert load_path(roomy, source, HASHER).accounts_created == 20_000
        assert roomy.map_usage()[1] > MIB
    finally:
        roomy.close()
    tight = Ledger(tmp_path / "tight", map_size_bytes=MIB, map_size_max_bytes=MIB)
    try:
        # Loads are written in chunks: those that fitted stay, and the error says how many.
        with pytest.raises(
            LedgerFull, match=r"map_size_max_bytes\): the first (\d+) records"
        ) as full:
            load_path(tight, source, HASHER)
        loaded = int(re.search(r"the first (\d+) records", str(full.value)).group(1))  # type: ignore[union-attr]
        assert 0 < loaded < 20_000 and loaded % 1000 == 0
        with tight.read() as reader:
            assert reader.account_count() == loaded
    finally:
        tight.close()


def test_a_load_is_checked_whole_then_written_in_chunks(tmp_path: Path) -> None:
    pans = [f"476173{index:09d}" for index in range(2_100)]
    pans = [pan + str(luhn_check_digit(pan)) for pan in pans]
    cards = "".join(
        f'[[cards]]\npan = "{pan}"\naccount = "acct-{index}"\nexpiry = "3012"\n'
        for index, pan in enumerate(pans)
    )
    ledger = Ledger(tmp_path / "l", map_size_bytes=64 * MIB)
    try:
        data = parse_load_file((load_file(3_500) + cards).encode(), "big.toml")
        before = ledger.env.info()["last_txnid"]
        summary = apply_load_file(ledger, data, HASHER, "big.toml", chunk_records=1000)
        assert (summary.accounts_created, summary.cards_created) == (3_500, 2_100)
        assert ledger.env.info()["last_txnid"] - before == 4 + 3  # accounts, then cards

        # A mistake anywhere in a file changes nothing: it is found before the first chunk.
        wrong = cards + '[[cards]]\npan = "4761739001010085"\naccount = "nobody"\nexpiry = "3012"\n'
        bad = parse_load_file((load_file(3_500) + wrong).encode(), "bad.toml")
        before = ledger.env.info()["last_txnid"]
        with pytest.raises(LoadError, match=r"\$\.cards\[2100\]\.account: no account 'nobody'"):
            apply_load_file(ledger, bad, HASHER, "bad.toml", chunk_records=1000)
        assert ledger.env.info()["last_txnid"] == before
    finally:
        ledger.close()
