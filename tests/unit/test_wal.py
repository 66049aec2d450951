"""The write-ahead log: records, checkpoints, and what a reopened ledger replays after a crash.

A crash is the pending checkpoint's transaction never committed: LMDB then holds the last
checkpoint, and the log every batch flushed since. The state the pending transaction saw just
before (every batch answered) must be the state the reopened ledger has, byte for byte.
"""

from __future__ import annotations

import fcntl
import logging
import os
import random
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import lmdb
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support import authorization

from processor import limits
from processor.authorizer import Authorizer, Outcome
from processor.engine import ProgrammeRules
from processor.ledger.load import load_path
from processor.ledger.store import Ledger, LedgerError
from processor.ledger.wal import (
    HEADER,
    CorruptLog,
    LogInUse,
    WriteAheadLog,
    decode_changes,
    encode_changes,
    held,
    records,
)
from processor.resources import demo_data_path
from processor.security import PanHasher
from processor.wire.messages import AuthorizationRequest

PAN_KEY = "write-ahead-log-test-key"
HASHER = PanHasher(PAN_KEY.encode())
NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
LOG_BYTES = 1 << 20
SMALL = limits.logged_batch_requests_max - 1  # the largest batch the log takes
PANS = ("4761739001010085", "4761739001010010", "4761739001010069", "4761739001010101")


# --- the log file ---------------------------------------------------------------------------


def test_records_come_back_in_order_for_their_generation_only(tmp_path: Path) -> None:
    log = WriteAheadLog(tmp_path / "wal", 64 << 10)
    try:
        assert log.size_bytes == 64 << 10  # preallocated
        assert log.append(7, b"first") and log.append(7, b"second")
        log.sync()
        assert list(records(tmp_path / "wal", 7)) == [b"first", b"second"]
        assert list(records(tmp_path / "wal", 8)) == []
        # The next generation starts over at the beginning; the older records beyond its end
        # are not its own.
        log.restart()
        assert log.append(8, b"third")
        assert list(records(tmp_path / "wal", 8)) == [b"third"]
        assert list(records(tmp_path / "wal", 7)) == []
    finally:
        log.close()


def test_a_torn_record_ends_the_log(tmp_path: Path) -> None:
    log = WriteAheadLog(tmp_path / "wal", 64 << 10)
    try:
        log.append(1, b"whole")
        log.append(1, b"torn in two")
        log.sync()
    finally:
        log.close()
    data = bytearray((tmp_path / "wal").read_bytes())
    second = HEADER.size + len(b"whole")
    data[second + HEADER.size + 3] ^= 0xFF  # one byte of the second payload
    (tmp_path / "wal").write_bytes(bytes(data))
    assert list(records(tmp_path / "wal", 1)) == [b"whole"]


def test_a_corrupt_record_with_whole_ones_after_it_is_refused_not_the_end(
    tmp_path: Path,
) -> None:
    """A crash tears at most the last record (each is flushed before the next is written):
    a failing record with a whole one of its generation after it is the device's corruption.
    Read as the log's end, every batch after it was lost in silence."""
    log = WriteAheadLog(tmp_path / "wal", 64 << 10)
    try:
        for payload in (b"first", b"second", b"third", b"fourth"):
            log.append(3, payload)
        log.sync()
    finally:
        log.close()
    whole = (tmp_path / "wal").read_bytes()
    second = HEADER.size + len(b"first")
    for damaged in (second + HEADER.size + 2, second):  # a payload byte; the length field
        data = bytearray(whole)
        data[damaged] ^= 0x40
        (tmp_path / "wal").write_bytes(bytes(data))
        with pytest.raises(CorruptLog, match=f"generation 3 at byte {second} is corrupt"):
            list(records(tmp_path / "wal", 3))
    last = len(whole.rstrip(b"\0")) - 1  # the last record's last byte: a torn write
    data = bytearray(whole)
    data[last] ^= 0x40
    (tmp_path / "wal").write_bytes(bytes(data))
    assert list(records(tmp_path / "wal", 3)) == [b"first", b"second", b"third"]


def test_a_record_longer_than_the_room_left_is_refused_whole(tmp_path: Path) -> None:
    log = WriteAheadLog(tmp_path / "wal", 64 << 10)
    try:
        assert not log.append(1, bytes(64 << 10))
        assert log.append(1, b"fits")
        assert list(records(tmp_path / "wal", 1)) == [b"fits"]
    finally:
        log.close()


@given(
    st.lists(
        st.tuples(
            st.sampled_from(("accounts", "answers", "outbox")),
            st.binary(min_size=1, max_size=40),
            st.none() | st.binary(max_size=200),
        ),
        max_size=30,
    )
)
def test_changes_encode_and_decode_as_they_were(
    changes: list[tuple[str, bytes, bytes | None]],
) -> None:
    assert decode_changes(encode_changes(changes)) == changes


# --- a ledger that logs ---------------------------------------------------------------------


def logging_ledger(directory: Path, log_bytes: int = LOG_BYTES) -> Ledger:
    return Ledger(directory, map_size_bytes=64 << 20, write_ahead_log_bytes=log_bytes)


def dump(txn: lmdb.Transaction, ledger: Ledger) -> dict[str, list[tuple[bytes, bytes]]]:
    """Every record, but the log's epoch: each open of the log draws its own (wal.py)."""
    return {
        name: [(bytes(k), bytes(v)) for k, v in txn.cursor(db=db) if bytes(k) != b"wal_epoch"]
        for name, db in ledger._dbs.items()
    }


def lmdb_state(ledger: Ledger) -> dict[str, list[tuple[bytes, bytes]]]:
    """What LMDB itself holds (a new read transaction: checkpointed or committed)."""
    with ledger.env.begin() as txn:
        return dump(txn, ledger)


def crash(ledger: Ledger) -> dict[str, list[tuple[bytes, bytes]]]:
    """What the pending checkpoint holds, then the process "dies": it is never committed."""
    pending = ledger._pending
    assert pending is not None
    expected = dump(pending, ledger)
    pending.abort()
    ledger._pending = None
    assert ledger._wal is not None
    ledger._wal.close()
    ledger._wal = None
    ledger.env.close()
    return expected


@pytest.fixture
def loaded(tmp_path: Path) -> Iterator[Path]:
    ledger = logging_ledger(tmp_path / "ledger")
    load_path(ledger, demo_data_path(), HASHER)
    ledger.close()
    yield tmp_path / "ledger"


def requests(stans: range, amount: int = 100) -> list[AuthorizationRequest]:
    return [authorization(PANS[stan % len(PANS)], f"{stan:06d}", amount) for stan in stans]


def authorize(ledger: Ledger, batch: list[AuthorizationRequest]) -> list[Outcome]:
    """One batch, decided and applied as the daemon does. Its approval codes come from a
    generator seeded by the batch, not the OS's: a code's size in its card's record (msgpack)
    depends on its value, and where a small map fills must not be left to chance."""
    codes = random.Random(batch[0].stan if batch else "")
    authorizer = Authorizer(
        ledger, HASHER, ProgrammeRules(), hold_lifetime_seconds=3600, draw=codes.randrange
    )
    return authorizer.authorize_batch(batch, NOW)


def approve(ledger: Ledger, stans: range, amount: int = 100) -> None:
    outcomes = authorize(ledger, requests(stans, amount))
    # Approvals, and declines that are decisions too (limits, funds): never a 96.
    assert {outcome.response_code for outcome in outcomes} <= {"00", "51", "61", "65"}, {
        outcome.reason for outcome in outcomes
    }


def crashed_log(loaded: Path, batches: int) -> bytearray:
    """The log's bytes after `batches` batches of one request each, logged, then a crash."""
    ledger = logging_ledger(loaded)
    for stan in range(1, batches + 1):
        approve(ledger, range(stan, stan + 1))
    crash(ledger)
    return bytearray((loaded / "wal").read_bytes())


def test_batches_since_the_last_checkpoint_are_replayed_on_open(loaded: Path) -> None:
    ledger = logging_ledger(loaded)
    approve(ledger, range(1, 1 + SMALL))
    assert ledger.checkpoint()  # these are in LMDB
    approve(ledger, range(11, 11 + SMALL))
    approve(ledger, range(21, 21 + SMALL))
    expected = crash(ledger)

    reopened = logging_ledger(loaded)
    try:
        assert reopened.replayed == 2  # the two batches after the checkpoint
        assert lmdb_state(reopened) == expected
    finally:
        reopened.close()
    # Replayed and checkpointed once: a second open has nothing to replay.
    again = Ledger(loaded, map_size_bytes=64 << 20)  # not logging itself: still replays
    try:
        assert again.replayed == 0
    finally:
        again.close()


def test_a_log_corrupt_before_answered_batches_keeps_the_ledger_from_opening(
    loaded: Path,
) -> None:
    """Replayed up to the corrupt record, and that generation then marked done: the batches
    after it, answered, were lost for good. The open is refused, naming the record."""
    data, wal = crashed_log(loaded, 4), loaded / "wal"  # four batches, a record each
    data[HEADER.size + 5] ^= 0x40  # inside the first record's payload
    wal.write_bytes(bytes(data))
    with pytest.raises(LedgerError, match="is corrupt and a whole record of it follows"):
        logging_ledger(loaded)
    data[HEADER.size + 5] ^= 0x40  # the device repaired, say: all four come back
    wal.write_bytes(bytes(data))
    reopened = logging_ledger(loaded)
    try:
        assert reopened.replayed == 4
    finally:
        reopened.close()


def test_a_flipped_generation_in_the_first_record_keeps_the_ledger_from_opening(
    loaded: Path,
) -> None:
    """The search for whole records after a damaged one ran only past the first record: a
    bit of the first header's generation flipped passed every answered batch over, silently."""
    data, wal = crashed_log(loaded, 4), loaded / "wal"
    data[8] ^= 0x01  # the first header's generation
    wal.write_bytes(bytes(data))
    with pytest.raises(LedgerError, match=r"generation \d+ at byte 0 is corrupt and a whole"):
        logging_ledger(loaded)


def test_a_torn_last_record_is_said_when_it_is_passed_over(
    loaded: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data, wal = crashed_log(loaded, 3), loaded / "wal"
    first = HEADER.unpack_from(data, 0)[0]
    second = HEADER.unpack_from(data, HEADER.size + first)[0]
    third = 2 * HEADER.size + first + second
    data[third + HEADER.size + 3] ^= 0xFF  # the last record's payload: a write cut short
    wal.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="processor.ledger"):
        reopened = logging_ledger(loaded)
    try:
        assert reopened.replayed == 2
    finally:
        reopened.close()
    assert f"record 3 of generation 2 (byte {third}) is torn or damaged" in caplog.text


def test_a_backup_restored_beside_the_log_replays_nothing_of_the_discarded_past(
    loaded: Path, tmp_path: Path
) -> None:
    """Generations count checkpoints, so a restored copy numbers its next records as the
    log's discarded ones are numbered: those were replayed over the restored state, or,
    mixed with new ones, refused as a corrupt device (moving the log aside then lost an
    answered batch)."""
    ledger = logging_ledger(loaded)
    approve(ledger, range(1, 2))
    assert ledger.checkpoint()
    backup = tmp_path / "backup"
    # `processor ledger backup` beside the serving daemon (this process): its own process.
    command = [sys.executable, "-m", "processor", "ledger", "backup", "--ledger", str(loaded)]
    subprocess.run(
        [*command, str(backup)],
        env={**os.environ, "PROCESSOR_PAN_KEY": PAN_KEY},
        check=True,
        capture_output=True,
        timeout=120,
    )
    for stan in range(2, 6):  # the past the restore discards: four records of one generation
        approve(ledger, range(stan, stan + 1))
    assert ledger.checkpoint()
    ledger.close()
    shutil.copy(backup / "data.mdb", loaded / "data.mdb")  # restored, its log left there

    restored = logging_ledger(loaded)
    try:
        assert restored.replayed == 0
        with restored.read() as reader:
            assert reader.answer(b"0100|123456|000002|1124120000") is None
        approve(restored, range(10, 11))  # its first batch: in the log, at its start
        expected = crash(restored)
    finally:
        if restored._wal is not None:
            restored.close()
    reopened = logging_ledger(loaded)
    try:
        assert reopened.replayed == 1  # its own batch, none of the discarded ones after it
        assert lmdb_state(reopened) == expected
    finally:
        reopened.close()


def test_another_ledgers_log_is_not_replayed(loaded: Path, tmp_path: Path) -> None:
    ledger = logging_ledger(loaded)
    before = lmdb_state(ledger)
    ledger.close()
    # Another ledger from the same start (a copy of it): its records' generations are this
    # one's next.
    other_path = tmp_path / "other"
    shutil.copytree(loaded, other_path)
    other = logging_ledger(other_path)
    approve(other, range(1, 4))
    crash(other)
    shutil.copy(other_path / "wal", loaded / "wal")
    opened = logging_ledger(loaded)
    try:
        assert opened.replayed == 0
        assert lmdb_state(opened) == before
    finally:
        opened.close()


def test_any_read_write_open_replays_not_only_a_logging_one(loaded: Path) -> None:
    ledger = logging_ledger(loaded)
    approve(ledger, range(1, 1 + SMALL))
    expected = crash(ledger)
    tool = Ledger(loaded, map_size_bytes=64 << 20)  # `processor ledger ...`, say
    try:
        assert tool.replayed == 1
        assert lmdb_state(tool) == expected
    finally:
        tool.close()


def test_a_reader_in_the_logging_process_sees_what_it_answered(loaded: Path) -> None:
    ledger = logging_ledger(loaded)
    try:
        with ledger.read() as reader:
            before = reader.outbox_last_sequence()
        approve(ledger, range(1, 1 + SMALL))
        assert ledger.pending_since is not None  # logged, not yet in LMDB
        with ledger.read() as reader:  # checkpoints first
            assert reader.outbox_last_sequence() == before + SMALL
        assert ledger.pending_since is None
    finally:
        ledger.close()


def test_a_batch_the_log_has_no_room_for_commits_through_lmdb(loaded: Path) -> None:
    (loaded / "wal").unlink()  # checkpointed at close; a log file keeps the size it has
    ledger = logging_ledger(loaded, log_bytes=64 << 10)
    checkpoints: list[float] = []
    ledger.on_checkpoint = lambda: checkpoints.append(ledger.last_checkpoint_seconds)
    try:
        # About 565 bytes of record per approval: small batches fill 64 KiB in about 40.
        stan, batches = 1, 0
        while not checkpoints and batches < 200:
            approve(ledger, range(stan, stan + SMALL))
            stan, batches = stan + SMALL, batches + 1
        assert 20 < batches < 200  # the log held the first ones, then had no room
        assert len(checkpoints) == 1 and ledger.pending_since is None
    finally:
        ledger.close()
    reopened = logging_ledger(loaded)
    try:
        assert reopened.replayed == 0
    finally:
        reopened.close()


def test_a_failed_flush_applies_nothing_and_later_batches_commit_through_lmdb(
    loaded: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ledger = logging_ledger(loaded)
    try:
        approve(ledger, range(1, 1 + SMALL))  # pending, logged
        with ledger.read() as reader:
            before = reader.outbox_last_sequence()

        monkeypatch.setattr(WriteAheadLog, "sync", failing_sync)
        with (
            pytest.raises(LedgerError, match="write-ahead log failed"),
            ledger.write() as writer,
        ):
            writer.put_idempotent(b"scope", b"value")
        assert not ledger.logging
        with ledger.read() as reader:
            assert reader.idempotent(b"scope") is None  # not applied
        monkeypatch.undo()
        with ledger.read() as reader:
            assert reader.outbox_last_sequence() == before
        approve(ledger, range(11, 11 + SMALL))  # through LMDB now
        with ledger.read() as reader:
            assert reader.outbox_last_sequence() == before + SMALL
    finally:
        ledger.close()


@settings(max_examples=15, deadline=None)
@given(
    st.lists(
        st.one_of(st.integers(1, 40), st.integers(1, SMALL), st.just("checkpoint")),
        min_size=1,
        max_size=12,
    )
)
def test_whatever_was_logged_when_it_crashed_is_what_it_reopens_with(
    steps: list[int | str],
) -> None:
    directory = Path(os.environ.get("TMPDIR", "/tmp")) / f"wal-property-{os.getpid()}"
    shutil.rmtree(directory, ignore_errors=True)
    try:
        ledger = logging_ledger(directory)
        load_path(ledger, demo_data_path(), HASHER)
        ledger.checkpoint()
        stan, logged = 1, 0
        for step in steps:
            if step == "checkpoint":
                logged = 0 if ledger.checkpoint() or logged == 0 else logged
                continue
            assert isinstance(step, int)
            approve(ledger, range(stan, stan + step), amount=step * 7)
            stan += step
            # A small batch is logged; a large one commits with what is pending, in one commit.
            logged = logged + 1 if step <= SMALL else 0
        if ledger._pending is None:
            approve(ledger, range(stan, stan + 1))
            logged = 1
        assert ledger.pending_since is not None
        expected = crash(ledger)
        reopened = logging_ledger(directory)
        try:
            assert reopened.replayed == logged
            assert lmdb_state(reopened) == expected
        finally:
            reopened.close()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_one_process_logs_a_ledger_at_a_time(tmp_path: Path) -> None:
    log = WriteAheadLog(tmp_path / "wal", 64 << 10)
    try:
        assert held(tmp_path / "wal")  # what a reader looks at: a live logger
        with pytest.raises(LogInUse):
            WriteAheadLog(tmp_path / "wal", 64 << 10)  # a second daemon on the same ledger
    finally:
        log.close()
    assert not held(tmp_path / "wal")


def test_a_reader_is_told_of_a_crash_s_batches_it_cannot_show(
    loaded: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ledger = logging_ledger(loaded)
    approve(ledger, range(1, 1 + SMALL))
    crash(ledger)
    after = Ledger(loaded, readonly=True)
    try:
        assert after.unreplayed == 1
        assert "1 batches in its write-ahead log are not in LMDB yet" in caplog.text
    finally:
        after.close()


def test_a_lost_checkpoint_transaction_is_rebuilt_from_the_log(loaded: Path) -> None:
    # What Ledger.checkpoint does when LMDB refuses the commit (it aborts the transaction):
    # every batch of it is in the log, replayed into a transaction of its own.
    ledger = logging_ledger(loaded)
    try:
        approve(ledger, range(1, 1 + SMALL))
        approve(ledger, range(11, 11 + SMALL))
        pending = ledger._pending
        assert pending is not None
        expected = dump(pending, ledger)
        pending.abort()
        ledger._pending = ledger.pending_since = None
        ledger._replay_alone()
        assert lmdb_state(ledger) == expected
    finally:
        ledger.close()


def test_a_large_batch_commits_with_what_is_pending_in_one_lmdb_commit(loaded: Path) -> None:
    ledger = logging_ledger(loaded)
    try:
        approve(ledger, range(1, 1 + SMALL))
        assert ledger.pending_since is not None  # logged
        committed = ledger.env.info()["last_txnid"]
        approve(ledger, range(11, 11 + limits.logged_batch_requests_max))
        assert ledger.pending_since is None  # both in LMDB
        # One commit for both: checkpointing first and then committing the batch took two.
        assert ledger.env.info()["last_txnid"] == committed + 1
        expected = lmdb_state(ledger)
    finally:
        ledger.close()
    reopened = logging_ledger(loaded)
    try:
        assert reopened.replayed == 0
        assert lmdb_state(reopened) == expected
        with reopened.read() as reader:
            assert reader.outbox_last_sequence() == expected_events(expected)
    finally:
        reopened.close()


def expected_events(state: dict[str, list[tuple[bytes, bytes]]]) -> int:
    """The newest event sequence LMDB holds (its outbox keys are big-endian sequences)."""
    return int.from_bytes(state["outbox"][-1][0], "big")


def pending_after_a_logged_batch(
    ledger: Ledger,
) -> tuple[lmdb.Transaction, dict[str, list[tuple[bytes, bytes]]]]:
    """A small batch approved (logged, pending), the pending transaction, and what it holds."""
    approve(ledger, range(1, 1 + SMALL))
    pending = ledger._pending
    assert pending is not None
    return pending, dump(pending, ledger)


def test_a_large_batch_that_fails_leaves_what_is_pending_as_it_was(loaded: Path) -> None:
    ledger = logging_ledger(loaded)
    try:
        pending, expected = pending_after_a_logged_batch(ledger)
        with pytest.raises(RuntimeError), ledger.write(log_ahead=False) as writer:
            writer.put_idempotent(b"scope", b"value")
            raise RuntimeError("a bug in the batch")
        assert ledger._pending is pending  # still pending, still to be checkpointed
        assert ledger.checkpoint()
        assert lmdb_state(ledger) == expected  # the logged batch, nothing of the failed one
    finally:
        ledger.close()


class _RefusedCommit:
    """A pending transaction whose commit LMDB refuses (py-lmdb's types take no patches)."""

    def __init__(self, txn: lmdb.Transaction) -> None:
        self.txn = txn

    def commit(self) -> None:
        self.txn.abort()  # as LMDB leaves a transaction whose commit failed: ended
        raise lmdb.DiskError("No space left on device")

    def abort(self) -> None:
        self.txn.abort()

    def __getattr__(self, name: str) -> object:
        return getattr(self.txn, name)


class _Environment:
    """The ledger's environment, beginning nested transactions in the real pending one;
    `refusing` write transactions of its own (as when the disk is gone)."""

    def __init__(self, env: lmdb.Environment, *, refusing: bool = False) -> None:
        self.env = env
        self.refusing = refusing

    def begin(self, *, parent: object = None, **options: object) -> lmdb.Transaction:
        if isinstance(parent, _RefusedCommit):
            parent = parent.txn
        elif parent is None and options.get("write") and self.refusing:
            raise lmdb.DiskError("Input/output error")
        return self.env.begin(parent=parent, **options)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> object:
        return getattr(self.env, name)


def refuse_the_checkpoint(
    ledger: Ledger,
    pending: lmdb.Transaction,
    monkeypatch: pytest.MonkeyPatch,
    *,
    refusing: bool = False,
) -> None:
    """LMDB will refuse to commit `pending` (and, `refusing`, any write transaction of the
    ledger's own, as a rebuild from the log begins); `monkeypatch.undo()` ends it."""
    monkeypatch.setattr(ledger, "env", _Environment(ledger.env, refusing=refusing))
    ledger._pending = _RefusedCommit(pending)  # type: ignore[assignment]


def failing_sync(self: WriteAheadLog) -> None:
    """WriteAheadLog.sync when the device fails the flush."""
    raise OSError(5, "Input/output error")


def test_a_refused_checkpoint_with_a_large_batch_replays_the_log_and_fails_the_batch(
    loaded: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ledger = logging_ledger(loaded)
    try:
        pending, expected = pending_after_a_logged_batch(ledger)
        refuse_the_checkpoint(ledger, pending, monkeypatch)
        large = requests(range(11, 11 + limits.logged_batch_requests_max))
        outcomes = authorize(ledger, large)
        assert {(o.response_code, o.reason) for o in outcomes} == {("96", "ledger_error:DiskError")}
        monkeypatch.undo()
        assert ledger._pending is None
        assert lmdb_state(ledger) == expected  # the logged batch stands; the large one is not
    finally:
        ledger.close()


def test_a_checkpoint_that_cannot_be_replayed_stops_every_write(
    loaded: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The log's batches are then not in LMDB: a batch committed over them would be overwritten
    # by their older values when a restart replays the log. So nothing commits, logged or not.
    ledger = logging_ledger(loaded)
    try:
        ledger.checkpoint()
        before = lmdb_state(ledger)
        pending, _ = pending_after_a_logged_batch(ledger)
        refuse_the_checkpoint(ledger, pending, monkeypatch, refusing=True)
        large = requests(range(11, 11 + limits.logged_batch_requests_max))
        outcomes = authorize(ledger, large)
        assert {(o.response_code, o.reason) for o in outcomes} == {
            ("96", "ledger_error:LedgerError")
        }
        monkeypatch.undo()  # the disk is back: still nothing until a restart replays the log
        for batch in (requests(range(21, 22)), large):
            outcomes = authorize(ledger, batch)
            assert {o.reason for o in outcomes} == {"ledger_error:LedgerError"}
        assert lmdb_state(ledger) == before
    finally:
        assert ledger._wal is not None
        ledger._wal.close()  # nothing to checkpoint at close: the restart replays the log
        ledger._wal = None
        ledger.env.close()
    reopened = logging_ledger(loaded)
    try:
        assert reopened.replayed == 1  # the logged batch, answered before the checkpoint failed
    finally:
        reopened.close()


def test_a_rebuild_that_cannot_read_the_log_stops_every_write(
    loaded: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only LMDB's errors broke the ledger: an OSError reading the log (EIO, on the disk
    whose commit had just failed) escaped, writes went on, and the next logged batch began
    the same generation's log again from its start, over the batches answered."""
    ledger = logging_ledger(loaded)
    try:
        ledger.checkpoint()
        pending, _ = pending_after_a_logged_batch(ledger)
        refuse_the_checkpoint(ledger, pending, monkeypatch)

        def unreadable(path: Path, generation: int, *epoch_and_torn: object) -> object:
            raise OSError(5, "Input/output error")

        monkeypatch.setattr("processor.ledger.store.logged_records", unreadable)
        with pytest.raises(LedgerError, match="write-ahead log cannot be read"):
            ledger.checkpoint()
        monkeypatch.undo()
        outcomes = authorize(ledger, requests(range(101, 102)))
        assert {o.reason for o in outcomes} == {"ledger_error:LedgerError"}
    finally:
        assert ledger._wal is not None
        ledger._wal.close()
        ledger._wal = None
        ledger.env.close()
    reopened = logging_ledger(loaded)
    try:
        assert reopened.replayed == 1  # the batch answered before the checkpoint failed
        with reopened.read() as reader:
            assert all(
                reader.answer(r.answer_key) is not None for r in requests(range(1, 1 + SMALL))
            )
    finally:
        reopened.close()


def test_batches_that_fill_the_map_grow_it_and_apply_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A map too small for what comes: logged batches and large ones (committed with what is
    # pending) hit MapFullError, the map grows (checkpointing first) and the batch reruns.
    # Every request must then be answered once and evented once, and a crash after it all
    # must reopen to what the last pending transaction held.
    directory = tmp_path / "ledger"
    ledger = Ledger(
        directory,
        map_size_bytes=1 << 20,
        map_size_max_bytes=64 << 20,
        write_ahead_log_bytes=LOG_BYTES,
    )
    load_path(ledger, demo_data_path(), HASHER)
    ledger.checkpoint()
    with ledger.read() as reader:
        events_before = reader.outbox_last_sequence()
    grown_in: list[bool] = []  # whether the batch that filled the map was a logged one
    grow = Ledger.grow

    def growing(self: Ledger) -> bool:
        grown_in.append(self.last_write_logged)
        return grow(self)

    monkeypatch.setattr(Ledger, "grow", growing)
    stan, sizes = 1, [1, 3, limits.logged_batch_requests_max, 2, 12, 1, 1, 7]
    for round_index in range(2000):
        size = sizes[round_index % len(sizes)]
        approve(ledger, range(stan, stan + size))
        stan += size
        if len(grown_in) >= 2 and False in grown_in and ledger._pending is not None:
            break
    # Grown twice at least, by large batches committing with what was pending (LMDB may find
    # the map full only at that commit, saving its free list: the log is replayed first).
    assert len(grown_in) >= 2 and False in grown_in
    with ledger.read() as reader:
        assert reader.outbox_last_sequence() == events_before + stan - 1  # one event each
        assert all(
            reader.answer(request.answer_key) is not None for request in requests(range(1, stan))
        )
    ledger.checkpoint()
    approve(ledger, range(stan, stan + 1))  # logged, pending
    expected = crash(ledger)
    reopened = logging_ledger(directory)
    try:
        assert reopened.replayed == 1
        assert lmdb_state(reopened) == expected
    finally:
        reopened.close()


def test_a_batch_the_log_had_no_room_for_fails_with_its_checkpoint(
    loaded: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # It went into the pending transaction unlogged: when that commit fails, the log rebuilds
    # the logged batches only, so this one must be answered as failed, not as approved.
    ledger = logging_ledger(loaded)
    try:
        pending, expected = pending_after_a_logged_batch(ledger)
        monkeypatch.setattr(WriteAheadLog, "append", lambda *args: False)  # no room left
        refuse_the_checkpoint(ledger, pending, monkeypatch)
        outcomes = authorize(ledger, requests(range(11, 12)))
        assert [(o.response_code, o.reason) for o in outcomes] == [("96", "ledger_error:DiskError")]
        monkeypatch.undo()
        assert lmdb_state(ledger) == expected  # the logged batch; nothing of this one
    finally:
        ledger.close()


def test_after_a_failed_flush_the_log_stays_locked_until_close(
    loaded: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Batches commit through LMDB from then on; a second daemon must not start logging beside
    # them (its records, replayed after it died, would overwrite what this one committed).
    ledger = logging_ledger(loaded)
    try:
        approve(ledger, range(1, 1 + SMALL))

        monkeypatch.setattr(WriteAheadLog, "sync", failing_sync)
        with pytest.raises(LedgerError), ledger.write() as writer:
            writer.put_idempotent(b"scope", b"value")
        monkeypatch.undo()
        assert not ledger.logging
        assert held(loaded / "wal")
        with pytest.raises(LogInUse):
            WriteAheadLog(loaded / "wal", LOG_BYTES)
    finally:
        ledger.close()
    assert not held(loaded / "wal")


def test_a_reader_looking_at_the_lock_does_not_keep_a_daemon_from_starting(
    tmp_path: Path,
) -> None:
    path = tmp_path / "wal"
    WriteAheadLog(path, 64 << 10).close()
    reader = os.open(path, os.O_RDONLY)
    fcntl.flock(reader, fcntl.LOCK_SH)  # what `held` takes, for a moment, in a reader
    threading.Timer(0.02, os.close, (reader,)).start()
    log = WriteAheadLog(path, 64 << 10)  # waited the look out
    log.close()


DEAD_LOGGER = """
import os, sys
from datetime import UTC, datetime
sys.path.insert(0, sys.argv[2])
from support import authorization
from processor.authorizer import Authorizer
from processor.engine import ProgrammeRules
from processor.ledger.store import Ledger
from processor.security import PanHasher
ledger = Ledger(sys.argv[1], map_size_bytes=64 << 20, write_ahead_log_bytes=1 << 20)
hasher = PanHasher(b"write-ahead-log-test-key")
outcome = Authorizer(ledger, hasher, ProgrammeRules(), hold_lifetime_seconds=3600).authorize_batch(
    [authorization("4761739001010085", "000901", 100)], datetime(2026, 11, 24, 12, tzinfo=UTC)
)[0]
assert outcome.response_code == "00" and ledger.pending_since is not None, outcome
os._exit(0)  # as kill -9: the answer is out, the batch is in the log only
"""


def test_a_tool_writing_after_the_daemon_died_replays_its_log_first(loaded: Path) -> None:
    # A `processor ledger ...` tool opened the ledger while the daemon ran; the daemon then
    # logged a batch and died before its checkpoint. The tool's next write puts that batch in
    # first, or the daemon's restart would replay its older values over the tool's write.
    tool = Ledger(loaded, map_size_bytes=64 << 20)  # does not log
    try:
        subprocess.run(
            [sys.executable, "-c", DEAD_LOGGER, str(loaded), str(Path(__file__).parent)],
            check=True,
            timeout=60,
        )
        with tool.write() as writer:
            writer.put_idempotent(b"scope", b"value")
        with tool.read() as reader:
            assert reader.answer(requests(range(901, 902))[0].answer_key) is not None
            assert reader.idempotent(b"scope") is not None
    finally:
        tool.close()
    reopened = logging_ledger(loaded)
    try:
        assert reopened.replayed == 0  # the tool did it
        with reopened.read() as reader:
            assert reader.idempotent(b"scope") is not None
    finally:
        reopened.close()


def test_a_record_whose_flush_failed_is_never_replayed(
    loaded: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Its batch is answered 96. The record may still be whole in the page cache: when the
    # checkpoint that follows is refused too, the rebuild from the log must not apply it.
    ledger = logging_ledger(loaded)
    try:
        pending, expected = pending_after_a_logged_batch(ledger)
        monkeypatch.setattr(WriteAheadLog, "sync", failing_sync)
        refuse_the_checkpoint(ledger, pending, monkeypatch)
        with pytest.raises(LedgerError, match="write-ahead log failed"), ledger.write() as writer:
            writer.put_idempotent(b"scope", b"value")
        monkeypatch.undo()
        assert lmdb_state(ledger) == expected  # the logged batch, rebuilt; not the failed one
    finally:
        ledger.close()


def test_a_torn_first_record_of_a_dead_daemon_is_passed_over_once(
    loaded: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Its header names the next generation, its payload never reached the disk whole (so its
    # batch was never answered): a tool's write passes it over for good, not at every write.
    tool = Ledger(loaded, map_size_bytes=64 << 20)
    try:
        with tool.read() as reader:
            assert reader.idempotent(b"scope") is None
        with tool.env.begin() as txn:
            generation = tool._next_generation(txn)
        torn = HEADER.pack(100, 0, generation) + bytes(10)  # a checksum its payload fails
        fd = os.open(loaded / "wal", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            os.pwrite(fd, torn, 0)
        finally:
            os.close(fd)
        read: list[object] = []

        def reading(path: Path, generation: int, epoch: bytes, torn: list[int]) -> Iterator[bytes]:
            read.append(generation)
            return records(path, generation, epoch, torn)  # the real one: the torn record ends it

        monkeypatch.setattr("processor.ledger.store.logged_records", reading)
        for _ in range(3):
            with tool.write() as writer:
                writer.put_idempotent(b"scope", b"value")
        assert len(read) == 1  # looked into once
        with tool.env.begin() as txn:
            assert tool._next_generation(txn) == generation + 1
    finally:
        tool.close()


def test_a_backup_of_a_ledger_with_batches_left_in_its_log_is_refused(
    loaded: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The copy is LMDB's: batches answered and logged by a daemon that died before its
    checkpoint were left out, and the backup said every change up to its last event was in
    it. A restore would have forgotten answers given."""
    from processor.cli import main

    ledger = logging_ledger(loaded)
    approve(ledger, range(1, 1 + SMALL))
    crash(ledger)
    target = tmp_path / "backup"
    assert main(["ledger", "backup", "--ledger", str(loaded), str(target)]) == 1
    assert "in its write-ahead log and not in LMDB" in capsys.readouterr().err
    assert not target.exists()
    logging_ledger(loaded).close()  # a read-write open replays them
    assert main(["ledger", "backup", "--ledger", str(loaded), str(target)]) == 0
    copy = Ledger(target, map_size_bytes=64 << 20, readonly=True)
    try:
        with copy.read() as reader:
            stans = range(1, 1 + SMALL)
            assert all(reader.answer(r.answer_key) is not None for r in requests(stans))
    finally:
        copy.close()


def test_a_ledger_with_batches_left_in_its_log_is_not_said_verified(
    loaded: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Verify read LMDB alone: a dead daemon's logged batches were left out, and it said
    "verified" of a ledger missing answers already given."""
    from processor.cli import main

    ledger = logging_ledger(loaded)
    approve(ledger, range(1, 1 + SMALL))
    crash(ledger)
    assert main(["ledger", "verify", "--ledger", str(loaded)]) == 1
    assert "in its write-ahead log and not in LMDB, so not verified" in capsys.readouterr().err
    logging_ledger(loaded).close()  # a read-write open replays them
    assert main(["ledger", "verify", "--ledger", str(loaded)]) == 0
    assert "verified" in capsys.readouterr().out


def test_a_backup_of_a_ledger_larger_than_the_configured_map_start(tmp_path: Path) -> None:
    """The compacted copy was reopened with the map's starting size and no ceiling: past it,
    naming the copy's events failed (a traceback), leaving a copy without its event ids."""
    from processor.cli import main
    from processor.ledger.records import Account

    ledger = Ledger(tmp_path / "ledger", durability="process", map_size_bytes=64 << 20)
    with ledger.write() as writer:
        for number in range(6_000):
            writer.put_account(
                Account(id=f"acct-{number:05d}-{'x' * 200}", currency="EUR", posted=number)
            )
    ledger.close()
    config = tmp_path / "small.toml"
    config.write_text(f"[ledger]\npath = '{tmp_path / 'ledger'}'\nmap_size_bytes = 1048576\n")
    target = tmp_path / "backup"
    assert (tmp_path / "ledger" / "data.mdb").stat().st_size > 1 << 20
    assert main(["ledger", "backup", "--config", str(config), str(target)]) == 0
    copy = Ledger(target, map_size_bytes=64 << 20, readonly=True)
    try:
        with copy.read() as reader:
            assert len(reader.event_ids().ranges) == 2  # the copy's own id from here on
    finally:
        copy.close()


def test_a_log_that_cannot_be_filled_is_left_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk (or a file size limit) while the log is filled with zeros left the part
    written on the ledger's disk: 200 MB of zeros under `ulimit -f 204800`."""
    path = tmp_path / "wal"
    WriteAheadLog(path, 1 << 20).close()  # an earlier, smaller log
    written = []
    real_pwrite = os.pwrite

    def fails_after_two(fd: int, data: bytes, offset: int) -> int:
        if len(written) == 2:
            raise OSError(27, "File too large")
        written.append(offset)
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", fails_after_two)
    with pytest.raises(OSError, match="File too large"):
        WriteAheadLog(path, 8 << 20)
    assert len(written) == 2 and path.stat().st_size == 1 << 20


class _NestedCommitFails:
    """The ledger's environment, whose nested transactions (a batch's, in the pending
    checkpoint's) fail to commit, as on a disk error."""

    class _Txn:
        def __init__(self, txn: lmdb.Transaction) -> None:
            self.txn = txn

        def commit(self) -> None:
            self.txn.abort()
            raise lmdb.DiskError("Input/output error")

        def __getattr__(self, name: str) -> object:
            return getattr(self.txn, name)

    def __init__(self, env: lmdb.Environment) -> None:
        self.env = env

    def begin(self, *, parent: object = None, **options: object) -> object:
        txn = self.env.begin(parent=parent, **options)  # type: ignore[arg-type]
        return txn if parent is None else self._Txn(txn)

    def __getattr__(self, name: str) -> object:
        return getattr(self.env, name)


def test_a_logged_batch_whose_rebuild_fails_is_answered_as_logged(
    loaded: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Flushed to the log, then its nested commit and the rebuild from the log both failed:
    it was answered 96 and the restart's replay applied it anyway, so a retransmission got a
    00 the network was never sent. Its answers stand; nothing is written until the restart."""
    ledger = logging_ledger(loaded)
    real_env = ledger.env
    try:
        ledger.checkpoint()
        monkeypatch.setattr(ledger, "env", _NestedCommitFails(real_env))

        def unreadable(path: Path, generation: int, *epoch_and_torn: object) -> object:
            raise OSError(5, "Input/output error")

        monkeypatch.setattr("processor.ledger.store.logged_records", unreadable)
        outcomes = authorize(ledger, requests(range(1, 2)))
        assert [(o.response_code, o.reason) for o in outcomes] == [("00", "approved")]
        monkeypatch.undo()
        outcomes = authorize(ledger, requests(range(2, 3)))
        assert [o.reason for o in outcomes] == ["ledger_error:LedgerError"]
    finally:
        assert ledger._wal is not None
        ledger._wal.close()  # nothing to checkpoint at close: the restart replays the log
        ledger._wal = None
        real_env.close()
    reopened = logging_ledger(loaded)
    try:
        assert reopened.replayed == 1
        with reopened.read() as reader:
            stored = reader.answer(requests(range(1, 2))[0].answer_key)
        assert stored is not None and stored.response_code == "00"
    finally:
        reopened.close()


def test_a_batch_the_log_had_no_room_for_fails_when_its_nested_commit_does(
    loaded: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Too large for the log, then its nested commit failed: the rebuild from the log (which
    does not hold it) succeeded and the batch was answered 00, in no log and not in LMDB."""
    ledger = logging_ledger(loaded)
    real_env = ledger.env
    try:
        approve(ledger, range(1, 2))  # pending, logged
        monkeypatch.setattr(ledger, "env", _NestedCommitFails(real_env))
        monkeypatch.setattr(WriteAheadLog, "append", lambda self, generation, payload, epoch: False)
        outcomes = authorize(ledger, requests(range(2, 3)))
        assert [(o.response_code, o.reason) for o in outcomes] == [("96", "ledger_error:DiskError")]
        monkeypatch.undo()
        with ledger.read() as reader:
            assert reader.answer(requests(range(1, 2))[0].answer_key) is not None
            assert reader.answer(requests(range(2, 3))[0].answer_key) is None
    finally:
        ledger.close()
