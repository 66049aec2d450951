"""The LMDB environment and typed access to its named databases.

One `Writer` is one LMDB write transaction: the server applies a whole batch of requests in one,
so the fsync at commit is shared by the batch (group commit). LMDB serialises writers across
processes, so `processor ledger load` may run beside the daemon.
"""

from __future__ import annotations

import fcntl
import logging
import os
import struct
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, Literal, TypeVar

import lmdb
import msgspec

from processor import limits
from processor.currency import numeric_code
from processor.ledger.controls import Controls, Usage
from processor.ledger.records import (
    CARD_STATUSES_FINAL,
    SAME_AS_CARD,
    Account,
    Card,
    Cardholder,
    CardSecret,
    CardState,
    ClearedRecord,
    EntryKind,
    EventCodec,
    EventIds,
    Hold,
    HoldState,
    HoldStatus,
    LedgerEntry,
    OutboxRecord,
    RevealToken,
    StoredAnswer,
    change_event,
)
from processor.ledger.wal import (
    GENERATION,
    Change,
    CorruptLog,
    LogInUse,
    WriteAheadLog,
    decode_changes,
    encode_changes,
    first_generation,
    held,
)
from processor.ledger.wal import records as logged_records

log = logging.getLogger("processor.ledger")
T = TypeVar("T")

# Schema 2 (issue 9, the write path at realistic card spread): an approval dirtied a leaf page
# in ten B-trees, nearly all under random keys, and LMDB copies and the synced commit writes
# every dirtied page. Usage counters, history heads and the open-hold count now live in the
# account record and, for a card, in a state record right beside its account (one leaf page
# for both); histories are chains through the answers; keys that only grow (holds, outbox)
# are appended. specs/ledger.md has the layout. Schema 3: events refer to their stored answer
# for the message's facts instead of repeating them. Schema 4: a hold is kept inside the
# answer of the request that opened it, not in a database of its own (one record per approval
# instead of two, one B-tree fewer for a lone approval's commit to copy the path of). Schema 5
# adds to records only (controls' `require_sca`, cards' CVC2 key and fulfilment, cardholders),
# which this build reads in schema-4 records, but which a build of schema 4 would refuse
# (controls forbid unknown fields) or misread: the number says so before it tries. Schema 6
# writes smaller records (records.MessageEvent for a message's event, SAME_AS_CARD for an
# account's history link that is its card's); it reads schema 5's as they are. Older schemas
# are migrated on open.
SCHEMA_VERSION = b"6"
_U64 = struct.Struct(">Q")
_DATABASES = (
    "accounts",  # account id -> Account; account id, NUL, card id -> CardState (beside it)
    "cards",  # HMAC-SHA256(PAN) -> Card (descriptive; an approval only reads it)
    "account_cards",
    "hold_expiry",  # expiry ms + hold id -> answer key: open holds in the order they expire
    "answers",  # stored_answer_key(answer key) -> StoredAnswer (and the history chains)
    "rrn_index",  # RRN|acquirer|STAN -> answer key: reversal matching without field 90
    "meta",
    "clearing",  # clearing record id -> ClearedRecord: presentments applied once each
    "outbox",  # event sequence (appended) -> event (records.EventCodec), same txn as the change
    "card_ids",  # card id -> card key: the API names cards by id, the ledger keys them by HMAC
    "entries",  # account id + u64 sequence -> LedgerEntry: funding and debits via the API
    "idempotency",  # Idempotency-Key scope -> IdempotentResponse: API POSTs applied once
    "cardholders",  # cardholder id -> Cardholder (personal data sealed, processor/personal_data)
    "card_secrets",  # card id -> CardSecret: issued cards' PANs, envelope-encrypted
    "reveal_tokens",  # card id -> RevealToken: its one live card-details token (digest)
)
# Databases of schema 1 whose content schema 2 keeps in other records; dropped by the migration.
_RETIRED_DATABASES = ("usage", "card_answers", "account_answers", "account_holds")
# Schema 3's holds (hold id -> Hold), kept in their answers since schema 4.
_RETIRED_HOLDS = "holds"


class DatabaseStats(msgspec.Struct, frozen=True, kw_only=True):
    """One database of the ledger, as `processor ledger stats` and /metrics show it."""

    name: str
    entries: int
    depth: int
    pages: int  # branch, leaf and overflow pages
    bytes: int  # pages x page size: what it occupies in the file
    oldest_ms: int | None  # the oldest record's time, where records carry one in key order


class LedgerError(Exception):
    """An operating error of the ledger (unavailable, full, wrong key): answer 96, keep serving."""


class LedgerFull(LedgerError):
    """The map is full at its ceiling (ledger.map_size_max_bytes): nothing was applied."""


class _Codecs:
    __slots__ = (
        "account",
        "answer",
        "card",
        "card_secret",
        "card_state",
        "cardholder",
        "cleared",
        "controls",
        "encoder",
        "entry",
        "event_ids",
        "events",
        "hold",
        "reveal_token",
        "usage",
    )

    def __init__(self) -> None:
        self.encoder = msgspec.msgpack.Encoder()
        self.account = msgspec.msgpack.Decoder(Account)
        self.card = msgspec.msgpack.Decoder(Card)
        self.card_state = msgspec.msgpack.Decoder(CardState)
        self.hold = msgspec.msgpack.Decoder(Hold)
        self.answer = msgspec.msgpack.Decoder(StoredAnswer)
        self.cleared = msgspec.msgpack.Decoder(ClearedRecord)
        self.events = EventCodec()
        self.usage = msgspec.msgpack.Decoder(Usage)
        self.controls = msgspec.msgpack.Decoder(Controls)
        self.entry = msgspec.msgpack.Decoder(LedgerEntry)
        self.cardholder = msgspec.msgpack.Decoder(Cardholder)
        self.card_secret = msgspec.msgpack.Decoder(CardSecret)
        self.reveal_token = msgspec.msgpack.Decoder(RevealToken)
        self.event_ids = msgspec.msgpack.Decoder(EventIds)


class Ledger:
    def __init__(
        self,
        path: str | Path,
        *,
        map_size_bytes: int = limits.map_size_bytes_default,
        map_size_max_bytes: int | None = None,
        durability: Literal["fsync", "process"] = "fsync",
        readonly: bool = False,
        write_ahead_log_bytes: int = 0,
    ) -> None:
        """`write_ahead_log_bytes` > 0 (with fsync, read-write): batches are made durable
        through a write-ahead log of that size and checkpointed into LMDB by `checkpoint`
        (processor/ledger/wal.py); only the one process that writes batches may use it.
        Every read-write open replays what a log holds beyond the last checkpoint."""
        self.path = Path(path)
        # The map grows by itself up to this (`grow`); None: it never grows.
        self.map_size_max_bytes = max(map_size_bytes, map_size_max_bytes or map_size_bytes)
        if not readonly:
            try:
                # The owner's alone (files 0600 too): the cards' keyed hashes, sealed PANs
                # and balances are nobody else's to read. An existing directory is left as
                # the operator made it.
                self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
            except OSError as error:
                raise LedgerError(f"ledger {self.path}: cannot create: {error.strerror}") from None
        durable = durability == "fsync"
        try:
            self.env = lmdb.open(
                str(self.path),
                map_size=map_size_bytes,
                max_dbs=limits.ledger_databases_max,
                sync=durable,
                metasync=durable,
                readonly=readonly,
                readahead=False,
                lock=True,
                mode=0o600,
            )
        except lmdb.Error as error:
            raise LedgerError(f"ledger {self.path}: cannot open: {error}") from None
        self.durability = durability
        self.migrated_from: bytes | None = None  # the schema this open migrated from, if any
        # How long the latest write transaction's commit took (its fsync, with durability
        # fsync; a logged one's: the log's flush): batches are paced by it
        # (processor/server/pacing.py).
        self.last_commit_seconds = 0.0
        self.last_checkpoint_seconds = 0.0
        self._codecs = _Codecs()
        self._names: dict[int, str] = {}  # id(database handle) -> its name, for the log
        self._wal: WriteAheadLog | None = None
        # The checkpoint's transaction: every logged batch since the last checkpoint, each
        # committed into it as a nested transaction once its log record was flushed.
        self._pending: lmdb.Transaction | None = None
        self._generation = 0  # of the log records the pending checkpoint's batches wrote
        self._log_epoch = b""  # this run of the log's (wal.py), drawn when it is opened
        self._broken: str | None = None  # why writes stopped (a checkpoint was lost)
        self._retired_wal: WriteAheadLog | None = None  # logging stopped; its lock kept
        self._daemon_lock: int | None = None  # the daemon's claim (claim_for_daemon)
        self.pending_since: float | None = None  # perf_counter when the pending one began
        # Whether the latest write went to the log (in LMDB at the next checkpoint) rather
        # than straight into LMDB (visible to other processes at once).
        self.last_write_logged = False
        self.replayed = 0  # log records this open replayed
        self.unreplayed = 0  # log records a read-only open found and cannot replay
        # When a checkpoint becomes pending (the daemon schedules it), and after one.
        self.on_pending: Callable[[], None] | None = None
        self.on_checkpoint: Callable[[], None] | None = None
        if not readonly:
            # Reader slots of processes that died (kill -9) would pin old pages forever.
            self.env.reader_check()
        try:
            if readonly:
                # A read-only environment opens each database in a transaction of its own;
                # handles opened inside a shared read transaction are unusable after it ends.
                self._dbs = {}
                # The schema first: an older ledger also lacks databases, and "migrate it" is
                # the answer to both.
                for name in ("meta", *(each for each in _DATABASES if each != "meta")):
                    try:
                        self._dbs[name] = self.env.open_db(name.encode(), create=False)
                    except lmdb.NotFoundError:
                        raise LedgerError(
                            f"ledger {self.path}: has no '{name}' database yet (made by an "
                            "older version); open it read-write once, e.g. by starting the "
                            "daemon or `processor ledger load`, to add it"
                        ) from None
                    if name == "meta":
                        self._check_schema_read_only()
                self._warn_unreplayed()
            else:
                # A migration rewrites records and may need more room than the map has: it
                # grows the map up to its ceiling, as a batch does, and runs again from the
                # start (the failed transaction changed nothing).
                while True:
                    try:
                        self._open_read_write()
                        break
                    except lmdb.MapFullError:
                        if not self.grow():
                            raise
                if write_ahead_log_bytes > 0 and durable:
                    try:
                        self._wal = WriteAheadLog(self._wal_path, write_ahead_log_bytes)
                    except LogInUse:
                        raise LedgerError(
                            f"ledger {self.path}: another process (a daemon) logs its writes "
                            "already; one daemon per ledger"
                        ) from None
                    except OSError as error:
                        raise LedgerError(
                            f"ledger {self.path}: cannot open its write-ahead log "
                            f"{self._wal_path}: {error.strerror}"
                        ) from None
                    try:
                        self._start_epoch()
                    except BaseException:
                        self._wal.close()
                        self._wal = None
                        raise
        except lmdb.MapFullError:
            mapped = self.env.info()["map_size"]
            self.env.close()
            raise LedgerError(
                f"ledger {self.path}: opening it (migrating from schema "
                f"{(self.migrated_from or b'?').decode()}) needs more room than its map of "
                f"{mapped} bytes, grown up to its ceiling; raise "
                "ledger.map_size_max_bytes (for a migration, to about twice the file) and open "
                "it again: nothing was changed"
            ) from None
        except lmdb.Error as error:
            self.env.close()
            raise LedgerError(f"ledger {self.path}: {error}") from None
        except LedgerError:
            self.env.close()
            raise

    def _check_schema_read_only(self) -> None:
        with self.env.begin(write=False) as txn:
            stored = txn.get(b"schema", db=self._dbs["meta"])
        if stored is not None and bytes(stored) != SCHEMA_VERSION:
            _refuse_newer(self.path, bytes(stored))
            raise LedgerError(
                f"ledger {self.path}: schema {bytes(stored)!r}, this build reads "
                f"{SCHEMA_VERSION!r}; open it read-write once (start the daemon or run "
                "`processor ledger migrate`) to migrate it"
            )

    def _open_read_write(self) -> None:
        """Open (creating) every database, name the ledger, and migrate an older schema, in
        one write transaction."""
        with self.env.begin(write=True) as txn:
            self._dbs = {
                name: self.env.open_db(name.encode(), txn=txn, create=True) for name in _DATABASES
            }
            self._names = {id(db): name for name, db in self._dbs.items()}
            stored = txn.get(b"schema", db=self._dbs["meta"])
            if stored is not None:
                # Before the log is replayed: a newer release's log may name what this build
                # does not have, and the error would then not say why.
                _refuse_newer(self.path, bytes(stored))
            # Before any migration: the log's records are in the schema that wrote them.
            self.replayed = self._replay(txn)
            if txn.get(b"ledger_id", db=self._dbs["meta"]) is None:
                # Prefixes event ids, so two ledgers never issue the same id.
                txn.put(b"ledger_id", os.urandom(4).hex().encode(), db=self._dbs["meta"])
            _index_card_ids(txn, self._dbs)
            if stored is not None and stored in _MIGRATIONS:
                self.migrated_from = stored
                while stored in _MIGRATIONS:
                    migrate, stored = _MIGRATIONS[stored]
                    migrate(self.env, txn, self._dbs, self._codecs)
                    txn.put(b"schema", stored, db=self._dbs["meta"])
            if stored is None:
                txn.put(b"schema", SCHEMA_VERSION, db=self._dbs["meta"])
            elif stored != SCHEMA_VERSION:
                raise LedgerError(
                    f"ledger {self.path}: schema {stored!r}, this build reads {SCHEMA_VERSION!r}"
                )
        if self.replayed:
            log.warning(
                "ledger %s: replayed %d batches from the write-ahead log (not checkpointed "
                "when it last stopped)",
                self.path,
                self.replayed,
            )
        if self.migrated_from is not None:  # committed: said once, and only when it happened
            log.warning(
                "ledger %s: migrated from schema %s to %s",
                self.path,
                self.migrated_from.decode(),
                SCHEMA_VERSION.decode(),
            )

    @property
    def logging(self) -> bool:
        """Whether batches are made durable through the write-ahead log (and reach LMDB, and
        other processes, at the next checkpoint)."""
        return self._wal is not None

    @property
    def _wal_path(self) -> Path:
        return self.path / "wal"

    def _warn_unreplayed(self) -> None:
        """A reader after a crash: batches answered and logged, not yet in LMDB, which a
        read-write open replays. While a daemon logs, its pending ones are not a crash's."""
        if held(self._wal_path):
            return
        with self.env.begin(write=False) as txn:
            generation, epoch = self._next_generation(txn), self._epoch(txn)
        try:
            self.unreplayed = sum(1 for _ in logged_records(self._wal_path, generation, epoch))
        except CorruptLog as error:
            log.error("ledger %s: %s", self.path, error)  # a read-write open refuses it
            return
        if self.unreplayed:
            log.warning(
                "ledger %s: %d batches in its write-ahead log are not in LMDB yet (it stopped "
                "before a checkpoint), and this read-only view does not show them: start the "
                "daemon or run `processor ledger migrate`, which replay them",
                self.path,
                self.unreplayed,
            )

    def _replay_a_dead_logger(self, txn: lmdb.Transaction) -> None:
        """In a write transaction of a process that does not log (a `processor ledger` tool,
        a worker): records of the generation after the last checkpoint can only be those of
        a daemon that died before its checkpoint (a live one holds LMDB's writer lock from
        its first record until the checkpoint), which this process opened the ledger before.
        They go in first: a restart's replay would otherwise write their older values over
        this transaction's. A header read per transaction (a few microseconds)."""
        generation = self._next_generation(txn)
        if first_generation(self._wal_path) != generation:
            return
        replayed = self._replay(txn)
        if not replayed:
            # Its first record torn (never flushed, so never answered): passed over for good,
            # or every write of this process would read the whole log again.
            txn.put(b"wal_generation", GENERATION.pack(generation), db=self._dbs["meta"])
            return
        log.warning(
            "ledger %s: replayed %d batches of a daemon that stopped before its checkpoint",
            self.path,
            replayed,
        )

    def _next_generation(self, txn: lmdb.Transaction) -> int:
        """The generation the log's records carry until the next checkpoint: one past the
        last checkpointed (or replayed) one, which LMDB stores."""
        raw = txn.get(b"wal_generation", db=self._dbs["meta"])
        return (0 if raw is None else GENERATION.unpack(raw)[0]) + 1

    def _epoch(self, txn: lmdb.Transaction) -> bytes:
        """The random epoch of the log's latest run (wal.py: its checksums cover it); empty
        for a ledger whose log ran before epochs."""
        raw = txn.get(b"wal_epoch", db=self._dbs["meta"])
        return b"" if raw is None else bytes(raw)

    def _start_epoch(self) -> None:
        """A new run of the log: a random epoch, durable in LMDB before any record carries
        it. Only the one process that logs sets it (it holds the log's lock), after this
        open's replay: the records of the last run are then replayed, or in LMDB."""
        epoch = os.urandom(8)
        with self.env.begin(write=True) as txn:
            txn.put(b"wal_epoch", epoch, db=self._dbs["meta"])
        self._log_epoch = epoch

    def _replay(self, txn: lmdb.Transaction) -> int:
        """Apply, in `txn`, the log records of the generation after the last checkpointed one;
        their number. In a write transaction: no other writer can log meanwhile."""
        meta = self._dbs["meta"]
        generation = self._next_generation(txn)
        count = 0
        torn: list[int] = []
        try:
            logged = list(logged_records(self._wal_path, generation, self._epoch(txn), torn))
        except CorruptLog as error:
            raise LedgerError(f"ledger {self.path}: {error}") from None
        for offset in torn:
            log.warning(
                "ledger %s: write-ahead log record %d of generation %d (byte %d) is torn or "
                "damaged and was not replayed: a write a crash cut short (its batch was never "
                "answered), or a record of another run of the log",
                self.path,
                len(logged) + 1,
                generation,
                offset,
            )
        for payload in logged:
            try:
                changes = decode_changes(payload)
            except msgspec.DecodeError as error:
                raise LedgerError(
                    f"ledger {self.path}: write-ahead log record {count + 1} of generation "
                    f"{generation} passed its checksum but does not decode: {error}"
                ) from None
            for name, key, value in changes:
                db = self._dbs.get(name)
                if db is None:
                    raise LedgerError(
                        f"ledger {self.path}: the write-ahead log names database {name!r}, "
                        "which this build does not have"
                    )
                if value is None:
                    txn.delete(key, db=db)
                else:
                    txn.put(key, value, db=db)
            count += 1
        if count:
            txn.put(b"wal_generation", GENERATION.pack(generation), db=meta)
        return count

    def checkpoint(self, *, holding_unlogged: bool = False) -> bool:
        """Commit the batches logged since the last checkpoint into LMDB, durably; False when
        there were none. Other processes (webhook delivery, readers) see them from now.
        `holding_unlogged`: the pending transaction also holds a batch the log had no room
        for; if the commit fails, the log rebuilds the others and the error is raised, so that
        batch fails as on any failed commit (nothing else has it)."""
        parent = self._pending
        if parent is None:
            return False
        self._pending = self.pending_since = None
        started = time.perf_counter()
        try:
            parent.commit()
        except lmdb.Error as error:
            self._rebuild_from_log(parent, "checkpoint", error, started)
            if holding_unlogged:
                raise
            return True
        self._checkpointed(started)
        return True

    def _rebuild_from_log(
        self, parent: lmdb.Transaction, what: str, error: lmdb.Error, started: float
    ) -> None:
        """The pending transaction `parent` could not commit (or take a batch: `what` failed):
        ended, and its batches rebuilt from the log in a transaction of their own, which is
        then the checkpoint. LedgerError (writes refused until a restart) if even that fails."""
        if isinstance(error, lmdb.MapFullError):  # _replay_alone grows the map; so may the caller
            log.warning("ledger %s: map full at the %s; replaying the log", self.path, what)
        else:
            log.error("ledger %s: %s failed (%s); replaying the log", self.path, what, error)
        with suppress(lmdb.Error):
            parent.abort()  # a failed commit has ended it already
        self._pending = self.pending_since = None
        self._replay_alone()
        self._checkpointed(started)

    def _checkpointed(self, started: float) -> None:
        """What was pending is in LMDB (committed, or replayed after a failed commit)."""
        self.last_checkpoint_seconds = time.perf_counter() - started
        if self.on_checkpoint is not None:
            self.on_checkpoint()

    def _replay_alone(self) -> None:
        """The pending generation again from the log, in a transaction of its own (after a
        checkpoint or a nested commit failed), growing the map if it must.

        Whatever stops it (LMDB; the log unreadable, OSError, say EIO on the disk whose
        commit just failed; a record that does not decode, LedgerError) breaks the ledger:
        a write after it would start the same generation's log again from its start, over
        batches answered and nowhere else."""
        while True:
            try:
                with self.env.begin(write=True) as txn:
                    self._replay(txn)
                return
            except lmdb.MapFullError:
                if self.grow():
                    continue
                self._broken = "the map is full at its ceiling (ledger.map_size_max_bytes)"
            except (lmdb.Error, LedgerError) as error:
                self._broken = str(error)
            except OSError as error:
                self._broken = f"the write-ahead log cannot be read: {error.strerror or error}"
            log.critical(
                "ledger %s: batches answered and in the write-ahead log cannot be checkpointed "
                "(%s): no more writes until a restart replays them",
                self.path,
                self._broken,
            )
            raise LedgerError(f"ledger {self.path}: checkpoint failed: {self._broken}")

    def close(self) -> None:
        self.checkpoint()
        for wal in (self._wal, self._retired_wal):
            if wal is not None:
                wal.close()
        self.env.close()
        if self._daemon_lock is not None:
            os.close(self._daemon_lock)
            self._daemon_lock = None

    def keep_daemon_lock(self, fd: int) -> None:
        """Hold `fd` (claim_for_daemon's) while the ledger is open; closed with it."""
        self._daemon_lock = fd

    def pan_key_fingerprint(self) -> str | None:
        with self.env.begin(write=False) as txn:
            stored = txn.get(b"pan_key_fingerprint", db=self._dbs["meta"])
        return None if stored is None else bytes(stored).decode()

    def bind_pan_key(self, fingerprint: str) -> None:
        """Refuse a ledger whose cards were keyed with another PAN key."""
        self.checkpoint()  # one write transaction per thread: never beside the pending one
        with self.env.begin(write=True) as txn:
            meta = self._dbs["meta"]
            stored = txn.get(b"pan_key_fingerprint", db=meta)
            if stored is None:
                txn.put(b"pan_key_fingerprint", fingerprint.encode(), db=meta)
            elif stored.decode() != fingerprint:
                raise LedgerError(
                    f"ledger {self.path}: cards were keyed with another PAN key "
                    f"(fingerprint {stored.decode()}, this key {fingerprint}); set the "
                    "environment variable the config names to the key the ledger was built with"
                )

    def _begin(self, *, write: bool) -> lmdb.Transaction:
        try:
            return self.env.begin(write=write)
        except lmdb.MapResizedError:
            # Another process (a worker) grew the map past the size this one maps: adopt it.
            self.env.set_mapsize(0)
            return self.env.begin(write=write)

    def grow(self) -> bool:
        """Double the map, up to `map_size_max_bytes`, after a MapFullError; False when it is
        at its ceiling already. Only with no transaction open in this process (LMDB's rule):
        the daemon calls it between batches. Other processes adopt the size (`_begin`)."""
        self.checkpoint()
        size = self.env.info()["map_size"]
        if size >= self.map_size_max_bytes:
            return False
        grown = min(self.map_size_max_bytes, size * 2)
        try:
            self.env.set_mapsize(grown)
        except lmdb.Error as error:
            log.error("ledger %s: could not grow the map to %d bytes: %s", self.path, grown, error)
            return False
        log.warning(
            "ledger %s: map full at %d MiB, grown to %d MiB (ceiling %d MiB, "
            "ledger.map_size_max_bytes)",
            self.path,
            size >> 20,
            grown >> 20,
            self.map_size_max_bytes >> 20,
        )
        return True

    @contextmanager
    def write(self, *, log_ahead: bool = True) -> Iterator[Writer]:
        """One write transaction: commits (durably, per `durability`) unless the block raises.
        With the write-ahead log, durable once its record is flushed (`_write_logged`), unless
        `log_ahead` is False: then committed through LMDB, with what is pending if anything is
        (`_write_with_pending`; a large batch: its LMDB commit is shared by many requests, and
        the log would add its own). None once the ledger is broken (LedgerError)."""
        self.last_write_logged = self._wal is not None and log_ahead
        if self._broken is not None:
            # Batches answered and logged are not in LMDB: a write committed over them now
            # would be overwritten by their older values when a restart replays the log.
            raise LedgerError(f"ledger {self.path}: no writes until a restart: {self._broken}")
        if self._wal is not None:
            if log_ahead:
                with self._write_logged() as logged:
                    yield logged
                return
            if self._pending is not None:
                with self._write_with_pending() as writer:
                    yield writer
                return
        txn = self._begin(write=True)
        writer = Writer(txn, self._dbs, self._codecs)
        try:
            if self._wal is None:
                self._replay_a_dead_logger(txn)
            yield writer
            writer.flush()
            started = time.perf_counter()
            txn.commit()
            self.last_commit_seconds = time.perf_counter() - started
        except BaseException:
            txn.abort()
            raise

    @contextmanager
    def _write_logged(self) -> Iterator[Writer]:
        """A nested transaction in the pending checkpoint's, its changes logged and flushed
        before it is committed into it; nothing of it applied if the block or the log fails."""
        wal = self._wal
        assert wal is not None
        parent = self._pending
        if parent is None:
            parent = self._begin(write=True)
            try:
                self._generation = self._next_generation(parent)
                parent.put(
                    b"wal_generation", GENERATION.pack(self._generation), db=self._dbs["meta"]
                )
            except BaseException:
                parent.abort()  # the map full, say: the caller grows it, with nothing open
                raise
            self._pending, self.pending_since = parent, time.perf_counter()
            # Every generation's records start at the beginning: recovery reads from there.
            wal.restart()
            if self.on_pending is not None:
                self.on_pending()
        child = self.env.begin(write=True, parent=parent)
        logged = _LoggedTxn(child, self._names)
        writer = Writer(logged, self._dbs, self._codecs)
        try:
            yield writer
            writer.flush()
        except BaseException:
            child.abort()
            raise
        started = time.perf_counter()
        fits = True
        if logged.changes:
            try:
                fits = wal.append(self._generation, encode_changes(logged.changes), self._log_epoch)
                if fits:
                    try:
                        wal.sync()
                    except OSError:
                        wal.discard_last()  # answered as failed: never to be replayed
                        raise
            except OSError as error:
                child.abort()
                self._log_failed(wal, error)
                raise LedgerError(f"ledger {self.path}: write-ahead log failed: {error}") from None
        try:
            child.commit()
        except lmdb.Error as error:
            # Not in the pending transaction: the log is the truth; rebuild from it. A batch
            # it holds is then in LMDB, durably, as logged, and its answers stand.
            logged_it = fits and bool(logged.changes)
            try:
                self._rebuild_from_log(parent, "nested commit", error, started)
            except LedgerError:
                if not logged_it:
                    raise
                # Flushed, it is durable whatever LMDB does: answered 96, the restart's replay
                # applied it all the same, and a retransmission then got its 00. Its answers
                # stand; the ledger is broken, so nothing is written until that restart.
            if not logged_it and logged.changes:
                raise  # in no log and not in LMDB: it fails as on any failed commit
        else:
            if not fits:  # more than the log has room for: durable through LMDB
                self.checkpoint(holding_unlogged=True)
        self.last_commit_seconds = time.perf_counter() - started

    @contextmanager
    def _write_with_pending(self) -> Iterator[Writer]:
        """A batch not logged while logged ones are pending: a nested transaction of the
        pending one, which then commits as the checkpoint, so that one LMDB commit (two device
        flushes) makes both durable where a checkpoint before the batch's own commit took two.
        Nothing of the batch is applied if the block, its nested commit or the checkpoint
        fails; the logged batches stand either way (a failed checkpoint replays the log)."""
        parent = self._pending
        assert parent is not None
        child = self.env.begin(write=True, parent=parent)
        writer = Writer(child, self._dbs, self._codecs)
        try:
            yield writer
            writer.flush()
        except BaseException:
            child.abort()  # the pending transaction is as it was: a map full grows and reruns
            raise
        started = time.perf_counter()
        self._pending = self.pending_since = None
        try:
            child.commit()
            parent.commit()
        except lmdb.Error as error:
            self._rebuild_from_log(parent, "checkpoint", error, started)
            raise  # this batch was not applied: it fails as on any failed commit
        self._checkpointed(started)
        self.last_commit_seconds = self.last_checkpoint_seconds

    def _log_failed(self, wal: WriteAheadLog, error: OSError) -> None:
        """After a failed write or flush the file's state is unknown (the kernel may have
        dropped its pages): checkpoint what is pending and log nothing more in it."""
        log.critical(
            "ledger %s: write-ahead log failed (%s); batches commit through LMDB from now",
            self.path,
            error,
        )
        self.checkpoint()
        self._wal = None
        # Kept open, its lock held, until close: another daemon must not start logging (and
        # leave records a restart would replay over what this one commits from now).
        self._retired_wal = wal

    def write_growing(self, work: Callable[[Writer], T], *, log_ahead: bool = True) -> T:
        """`work` in one write transaction, committed; when it does not fit, the map grows (up
        to `map_size_max_bytes`) and `work` runs again from the start, in a new transaction:
        nothing of an aborted attempt was applied, so `work` must keep its effects inside
        the transaction (or redo them harmlessly). LedgerFull at the ceiling."""
        while True:
            try:
                with self.write(log_ahead=log_ahead) as writer:
                    return work(writer)
            except lmdb.MapFullError:
                if not self.grow():
                    raise LedgerFull(
                        f"ledger {self.path}: map full at its ceiling of "
                        f"{self.map_size_max_bytes} bytes (ledger.map_size_max_bytes)"
                    ) from None

    @contextmanager
    def read(self) -> Iterator[Reader]:
        self.checkpoint()  # a reader in this process sees what it answered
        with self._begin(write=False) as txn:
            yield Reader(txn, self._dbs, self._codecs)

    def copy_to(self, directory: str | Path) -> int:
        """A consistent copy of the whole ledger into `directory` (an existing, empty one),
        compacted (free pages left out: LMDB's copy with compaction), from one read
        transaction while writers go on. Returns the last outbox sequence in the copy: every
        change up to that event is in it."""
        self.checkpoint()
        with self._begin(write=False) as txn:
            # The sequence counter, not the last key: retention may have pruned the outbox.
            raw = txn.get(b"seq:event", db=self._dbs["meta"])
            last = 0 if raw is None else _U64.unpack(raw)[0] - 1
            self.env.copy(str(directory), compact=True, txn=txn)
        return last

    def stats(self) -> list[DatabaseStats]:
        """Per database: entries, B-tree depth, pages, bytes, and for the ones kept in time
        order (answers by field 7, the outbox appended) the oldest record's time.
        One read transaction, O(databases x depth): cheap enough for every scrape."""
        found = []
        with self._begin(write=False) as txn:
            for name, db in self._dbs.items():
                stat = txn.stat(db)
                pages = stat["branch_pages"] + stat["leaf_pages"] + stat["overflow_pages"]
                found.append(
                    DatabaseStats(
                        name=name,
                        entries=stat["entries"],
                        depth=stat["depth"],
                        pages=pages,
                        bytes=pages * stat["psize"],
                        oldest_ms=self._oldest_ms(txn, name),
                    )
                )
        return found

    def _oldest_ms(self, txn: lmdb.Transaction, name: str) -> int | None:
        decoders: dict[str, Callable[[bytes], int]] = {
            "outbox": self._codecs.events.created_ms,
            "answers": lambda raw: self._codecs.answer.decode(raw).answered_ms,
        }
        decode = decoders.get(name)
        if decode is None:
            return None
        cursor = txn.cursor(db=self._dbs[name])
        if not cursor.first():
            return None
        oldest = decode(bytes(cursor.value()))
        if name == "answers":
            # Answers sort by field 7, MMDDhhmmss without a year: after New Year, last
            # December's sort after this January's. Any stamped later in the year than
            # tomorrow is last year's, and the first of those is then the oldest.
            tomorrow = time.gmtime(time.time() + 86400)
            if cursor.set_range(time.strftime("%m%d%H%M%S", tomorrow).encode()):
                oldest = min(oldest, decode(bytes(cursor.value())))
        return oldest

    def map_usage(self) -> tuple[int, int]:
        """(bytes in use, map size)."""
        info = self.env.info()
        stat = self.env.stat()
        return (info["last_pgno"] + 1) * stat["psize"], info["map_size"]


def _clock_went_back(by_ms: int) -> None:
    """Said at most once an hour, not per batch: each batch after the step would say it."""
    global _clock_back_said_at
    now = time.monotonic()
    if now - _clock_back_said_at >= 3600:
        _clock_back_said_at = now
        log.warning(
            "the wall clock is %d s behind the latest time the ledger used, more than the "
            "%d s it waits for: that time was wrong (a clock set ahead), and the ledger "
            "follows the wall clock from here; histories of answers stamped since may end there",
            by_ms // 1000,
            limits.ledger_clock_held_max_ms // 1000,
        )


_clock_back_said_at = -float("inf")


def stored_answer_key(answer_key: bytes) -> bytes:
    """Where an answer is kept: its answer key (class|acquirer|STAN|field 7) with field 7 first.

    Field 7, the transmission date-time, is close to now for everything arriving now, so new
    answers land next to each other at one place in the tree and share their leaf pages,
    instead of each dirtying a page at a random place (the key as the network names it is
    random in acquirer and STAN). Lookups are exact, so any order of the same parts works; the
    authorisation id the API and the events show stays the answer key.
    """
    parts = answer_key.split(b"|")
    if len(parts) != 4:
        return b"?" + answer_key  # not an answer key (an id made up by an API caller): no match
    message_class, acquirer, stan, transmitted = parts
    return b"|".join((transmitted, message_class, acquirer, stan))


def answer_key_of(stored_key: bytes) -> bytes:
    """The answer key a stored answer's key (stored_answer_key) was made from."""
    if stored_key.startswith(b"?"):
        return stored_key[1:]
    transmitted, message_class, acquirer, stan = stored_key.split(b"|")
    return b"|".join((message_class, acquirer, stan, transmitted))


# The reason of the answer force_post leaves under an original's key that nothing answered.
POSTED_WITHOUT_ORIGINAL = "posted_without_original"
# The reason of the answer a reversal leaves under the key of an original not seen yet.
REVERSED_BEFORE_ORIGINAL = "reversed_before_original"


def answer_time(now_ms: int, state: CardState | None, account: Account | None) -> int:
    """When an answer is stamped: `now_ms`, moved past a load's currency change or a card's
    usage reset that committed before it (the batch read its clock before it waited for the
    writer lock, and an answer stamped before the change would read as one of the old
    currency: its reversal refused, nothing given back). What the answer counts in usage is
    counted at the same time, so its reversal gives it back to the same periods."""
    if state is not None and now_ms <= state.usage_since_ms:
        now_ms = state.usage_since_ms + 1
    if account is not None and now_ms <= account.currency_since_ms:
        now_ms = account.currency_since_ms + 1
    return now_ms


def claim_for_daemon(path: str | Path) -> int:
    """Take the ledger's daemon lock (`<ledger>/daemon.lock`), before the ledger is opened
    (an open may migrate it and replay its log), or raise LedgerError: one daemon per
    ledger, whatever its workers or durability. The log's own lock said so only while the
    daemon logged (one worker, fsync): two daemons then ran two hold sweepers, two
    retentions and two webhook deliveries on one outbox. Returns the descriptor to hold."""
    directory = Path(path)
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(directory / "daemon.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as error:
        raise LedgerError(f"ledger {directory}: cannot create: {error.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise LedgerError(
            f"ledger {directory}: another daemon serves it already; one daemon per ledger"
        ) from None
    return fd


def _refuse_newer(path: Path, stored: bytes) -> None:
    """LedgerError when the ledger's schema is one this build does not know (a newer
    release's): it cannot be migrated back, and must not be read as if it were this one's."""
    if stored == SCHEMA_VERSION or stored in _MIGRATIONS:
        return
    raise LedgerError(
        f"ledger {path}: schema {stored.decode(errors='replace')!r} was written by a newer "
        f"release (this build reads {SCHEMA_VERSION.decode()!r} and migrates older ones); "
        "run that release, or restore a backup taken before it"
    )


def _links_back(
    answer: StoredAnswer, owner: str | None, owner_id: str, newer_ms: int | None
) -> bool:
    """Whether `answer`, reached through a history chain, is still that chain's: its owner's,
    and older than the step before it. An answer key is class|acquirer|STAN|field 7, and
    field 7 has no year: once retention prunes an answer, its key may be used again a year
    on, by another card (the walk would list that card's history) or by the same one (a loop
    that paginated for ever). Not strictly older: one batch's answers share their time, and a
    clock read before LMDB's writer lock (a worker's) may be a little behind the one before;
    a key used again is a year newer."""
    return owner == owner_id and (
        newer_ms is None or answer.answered_ms <= newer_ms + limits.event_order_skew_ms
    )


def hold_view(identity: bytes, answer: StoredAnswer) -> Hold | None:
    """The hold the answer to `identity` opened, whole (HoldState holds only what the answer
    does not); None if that request opened none."""
    state = answer.hold
    if state is None or answer.hold_id is None:
        return None
    response = answer.response
    return Hold(
        hold_id=answer.hold_id,
        account_id=answer.account_id or "",
        card_id=answer.card_id or "",
        amount=state.amount,
        currency=state.currency,
        created_ms=state.created_ms,
        expires_ms=state.expires_ms,
        approval_code=state.approval_code or response.get("38", ""),
        identity=identity,
        mcc=state.mcc,
        rrn=response.get("37"),
        status=state.status,
        resolved_ms=state.resolved_ms,
        captured_amount=state.captured_amount,
    )


def hold_state(hold: Hold, approval_in_answer: str | None) -> HoldState:
    """What an answer keeps of `hold` (HoldState): the approval code only when the answer's
    field 38 (`approval_in_answer`) is not it."""
    return HoldState(
        amount=hold.amount,
        currency=hold.currency,
        created_ms=hold.created_ms,
        expires_ms=hold.expires_ms,
        mcc=hold.mcc,
        status=hold.status,
        resolved_ms=hold.resolved_ms,
        captured_amount=hold.captured_amount,
        approval_code="" if approval_in_answer == hold.approval_code else hold.approval_code,
    )


def card_state_key(card: Card) -> bytes:
    """Where a card's CardState is kept: right after its account in the accounts database."""
    return _prefix_key(card.account_id, card.card_id.encode())


def _stan_of(answer_key: str) -> str | None:
    """Field 11 as the answer key (class|acquirer|STAN|field 7) holds it."""
    parts = answer_key.split("|")
    return parts[2] if len(parts) == 4 else None


def _digits(value: str | None) -> int | None:
    return int(value) if value is not None and value.isdigit() else None


def _prefix_key(prefix: str, suffix: bytes) -> bytes:
    return prefix.encode() + b"\x00" + suffix


def _index_card_ids(txn: lmdb.Transaction, dbs: dict[str, Any]) -> None:
    """Ledgers written before the card-id index get it built once, at the first writable open."""
    if txn.stat(dbs["card_ids"])["entries"] or not txn.stat(dbs["cards"])["entries"]:
        return
    decode = msgspec.msgpack.Decoder(Card).decode
    for key, raw in txn.cursor(db=dbs["cards"]):
        txn.put(decode(raw).card_id.encode(), bytes(key), db=dbs["card_ids"])


def _forget_card_secrets(txn: Txn, dbs: dict[str, Any], card_id: str) -> None:
    """A stopped card's sealed PAN and live card-details token go with the change that stops
    it: nothing may show its number again, and PCI DSS keeps cardholder data no longer than
    it is needed. Its keyed hash stays (late presentments and histories find it by that)."""
    txn.delete(card_id.encode(), db=dbs["card_secrets"])
    txn.delete(card_id.encode(), db=dbs["reveal_tokens"])


def _walk_prefix_backwards(cursor: Cursor, prefix: bytes, before: bytes | None) -> Iterator[bytes]:
    """Keys starting with `prefix`, newest (largest) first, those below `before` when given."""
    start = before if before is not None else prefix + b"\xff" * 32
    if not cursor.set_range(start):
        if not cursor.last():
            return
    elif not cursor.prev():
        return
    while True:
        key = bytes(cursor.key())
        if not key.startswith(prefix):
            return
        yield key
        if not cursor.prev():
            return


class _LoggedTxn:
    """A nested write transaction whose puts and deletes are also kept, for the log record.
    Only what the Reader and Writer call; anything else is an AttributeError, so a new kind of
    change cannot go unlogged."""

    __slots__ = ("_names", "_txn", "changes", "get")

    def __init__(self, txn: lmdb.Transaction, names: dict[int, str]) -> None:
        self._txn = txn
        self._names = names
        self.changes: list[Change] = []
        self.get = txn.get

    def put(
        self, key: bytes, value: bytes, *, db: Any, overwrite: bool = True, append: bool = False
    ) -> bool:
        done: bool = self._txn.put(key, value, db=db, overwrite=overwrite, append=append)
        if done:
            self.changes.append((self._names[id(db)], bytes(key), bytes(value)))
        return done

    def delete(self, key: bytes, *, db: Any) -> bool:
        done: bool = self._txn.delete(key, db=db)
        if done:
            self.changes.append((self._names[id(db)], bytes(key), None))
        return done

    def cursor(self, *, db: Any) -> _LoggedCursor:
        return _LoggedCursor(self._txn.cursor(db=db), self._names[id(db)], self.changes)


class _LoggedCursor:
    """A cursor of a _LoggedTxn: reads pass through, a delete is logged; other changes
    through a cursor are refused (none is used)."""

    __slots__ = ("_changes", "_cursor", "_name")

    def __init__(self, cursor: lmdb.Cursor, name: str, changes: list[Change]) -> None:
        self._cursor = cursor
        self._name = name
        self._changes = changes

    def __getattr__(self, attribute: str) -> Any:
        if attribute in ("put", "putmulti", "replace", "pop"):
            raise AttributeError(f"cursor.{attribute} is not logged: use the transaction's")
        return getattr(self._cursor, attribute)

    def __iter__(self) -> Iterator[tuple[bytes | memoryview, bytes | memoryview]]:
        return iter(self._cursor)

    def delete(self) -> bool:
        key = bytes(self._cursor.key())
        done: bool = self._cursor.delete()
        if done:
            self._changes.append((self._name, key, None))
        return done


# What a Reader or Writer works through: LMDB's own, or the logged ones of the write-ahead log.
Txn = lmdb.Transaction | _LoggedTxn
Cursor = lmdb.Cursor | _LoggedCursor


class Reader:
    __slots__ = ("_codecs", "_dbs", "_txn")

    def __init__(self, txn: Txn, dbs: dict[str, Any], codecs: _Codecs) -> None:
        self._txn = txn
        self._dbs = dbs
        self._codecs = codecs

    def account(self, account_id: str) -> Account | None:
        raw = self._txn.get(account_id.encode(), db=self._dbs["accounts"])
        return None if raw is None else self._codecs.account.decode(raw)

    def card(self, card_key: bytes) -> Card | None:
        raw = self._txn.get(card_key, db=self._dbs["cards"])
        return None if raw is None else self._codecs.card.decode(raw)

    def card_state(self, card: Card) -> CardState:
        raw = self._txn.get(card_state_key(card), db=self._dbs["accounts"])
        return CardState() if raw is None else self._codecs.card_state.decode(raw)

    def answer(self, identity: bytes) -> StoredAnswer | None:
        raw = self._txn.get(stored_answer_key(identity), db=self._dbs["answers"])
        return None if raw is None else self._codecs.answer.decode(raw)

    def answer_by_rrn(self, lookup: bytes) -> bytes | None:
        raw = self._txn.get(lookup, db=self._dbs["rrn_index"])
        return None if raw is None else bytes(raw)

    def hold_of(self, identity: bytes, answer: StoredAnswer | None) -> Hold | None:
        """The hold the answer to `identity` opened, if it opened one."""
        return None if answer is None else hold_view(identity, answer)

    def card_secret(self, card_id: str) -> CardSecret | None:
        raw = self._txn.get(card_id.encode(), db=self._dbs["card_secrets"])
        return None if raw is None else self._codecs.card_secret.decode(raw)

    def reveal_token(self, card_id: str) -> RevealToken | None:
        raw = self._txn.get(card_id.encode(), db=self._dbs["reveal_tokens"])
        return None if raw is None else self._codecs.reveal_token.decode(raw)

    def cardholder(self, cardholder_id: str) -> Cardholder | None:
        raw = self._txn.get(cardholder_id.encode(), db=self._dbs["cardholders"])
        return None if raw is None else self._codecs.cardholder.decode(raw)

    def clearing_record(self, record_id: str) -> ClearedRecord | None:
        """What the clearing record with this id did when it was applied; None if it never was."""
        raw = self._txn.get(record_id.encode(), db=self._dbs["clearing"])
        return None if raw is None else self._codecs.cleared.decode(raw)

    def card_history(self, card_id: str, limit: int) -> list[tuple[bytes, StoredAnswer]]:
        """The card's most recent answers, newest first: (answer key, answer)."""
        return [(key, answer) for key, answer, _ in self.history("card", card_id, limit)]

    def history(
        self, of: Literal["card", "account"], owner_id: str, limit: int, before: bytes | None = None
    ) -> list[tuple[bytes, StoredAnswer, bytes]]:
        """Answers of a card or an account, newest first: (answer key, answer, page key).

        Walks the chain of answers from the owner's `last_answer` back through each answer's
        previous one. `before` is the page key of the last item of the previous page: one whose
        answer retention removed ends the listing; one naming another's answer (or no answer
        key at all) raises ValueError, since it is not one this listing gave out.
        """
        prefix = _prefix_key(owner_id, b"")
        newer_ms: int | None = None  # the time of the step before: a chain only goes back
        came_from: bytes | None = None
        if before is None:
            if of == "card":
                found_card = self.card_by_id(owner_id)
                key = None if found_card is None else self.card_state(found_card[1]).last_answer
            else:
                account = self.account(owner_id)
                key = None if account is None else account.last_answer
        else:
            if not before.startswith(prefix) or before[len(prefix) :].count(b"|") != 3:
                raise ValueError("not a page key of this listing")
            last = self.answer(before[len(prefix) :])
            if last is None:
                return []  # retention removed it since: the listing ends there
            if (last.card_id if of == "card" else last.account_id) != owner_id:
                raise ValueError("a page key of another listing")
            key = last.previous_for_card if of == "card" else last.previous_in_account
            newer_ms, came_from = last.answered_ms, before[len(prefix) :]
        found: list[tuple[bytes, StoredAnswer, bytes]] = []
        while key is not None and key != came_from and len(found) < limit:
            answer = self.answer(key)
            if answer is None:
                break  # the chain reaches past what the ledger still keeps
            owner = answer.card_id if of == "card" else answer.account_id
            if not _links_back(answer, owner, owner_id, newer_ms):
                break  # the key was pruned and used again: what it holds is not this chain's
            found.append((key, answer, prefix + key))
            newer_ms, came_from = answer.answered_ms, key
            key = answer.previous_for_card if of == "card" else answer.previous_in_account
        return found

    def card_key_by_id(self, card_id: str) -> bytes | None:
        raw = self._txn.get(card_id.encode(), db=self._dbs["card_ids"])
        return None if raw is None else bytes(raw)

    def card_by_id(self, card_id: str) -> tuple[bytes, Card] | None:
        """(card key, card) of the card the API names by id."""
        card_key = self.card_key_by_id(card_id)
        card = None if card_key is None else self.card(card_key)
        return None if card_key is None or card is None else (card_key, card)

    def programme_controls(self) -> Controls | None:
        raw = self._txn.get(b"controls", db=self._dbs["meta"])
        return None if raw is None else self._codecs.controls.decode(raw)

    def usage(self, scope: str) -> Usage:
        """Spend-control usage of the card or account a card_scope or account_scope names.

        Empty when none was counted yet, or when the card or account does not exist.
        """
        kind, _, owner_id = scope.partition(":")
        record: CardState | Account | None
        if kind == "c":
            found = self.card_by_id(owner_id)
            record = None if found is None else self.card_state(found[1])
        else:
            record = self.account(owner_id)
        return Usage() if record is None or record.usage is None else record.usage

    def entries(self, account_id: str, limit: int, before: int | None = None) -> list[LedgerEntry]:
        """The account's ledger entries (funding, debits), newest first."""
        prefix = _prefix_key(account_id, b"")
        start = None if before is None else prefix + _U64.pack(before)
        cursor = self._txn.cursor(db=self._dbs["entries"])
        found: list[LedgerEntry] = []
        for key in _walk_prefix_backwards(cursor, prefix, start):
            raw = self._txn.get(key, db=self._dbs["entries"])
            assert raw is not None, key
            found.append(self._codecs.entry.decode(raw))
            if len(found) >= limit:
                break
        return found

    def idempotent(self, scope: bytes) -> bytes | None:
        raw = self._txn.get(scope, db=self._dbs["idempotency"])
        return None if raw is None else bytes(raw)

    def events_pruned_through(self) -> int:
        """The last outbox sequence retention pruned (0: none): the outbox starts after it."""
        raw = self._txn.get(b"retention:events_pruned_through", db=self._dbs["meta"])
        return 0 if raw is None else _U64.unpack(raw)[0]

    def pruned_hold_max(self) -> int:
        """The highest hold id whose answer retention has pruned (0: none): an answer may name
        a hold up to it that is no longer kept."""
        raw = self._txn.get(b"retention:hold_pruned_max", db=self._dbs["meta"])
        return 0 if raw is None else _U64.unpack(raw)[0]

    def ledger_id(self) -> str:
        raw = self._txn.get(b"ledger_id", db=self._dbs["meta"])
        return "" if raw is None else bytes(raw).decode()

    def event_ids(self) -> EventIds:
        """The ledger ids that name its events, by sequence range (EventIds)."""
        raw = self._txn.get(b"event_ids", db=self._dbs["meta"])
        if raw is None:
            return EventIds([(1, self.ledger_id())])
        return self._codecs.event_ids.decode(raw)

    def outbox(self, first_sequence: int, limit: int) -> list[OutboxRecord]:
        """Outbox records from `first_sequence` on, in order, at most `limit`."""
        records: list[OutboxRecord] = []
        cursor = self._txn.cursor(db=self._dbs["outbox"])
        if cursor.set_range(_U64.pack(first_sequence)):
            for key, value in cursor.iternext(keys=True, values=True):
                record = self._codecs.events.decode(_U64.unpack(key)[0], value)
                if record.in_answer:
                    self._fill_from_answer(record)
                records.append(record)
                if len(records) >= limit:
                    break
        return records

    def _fill_from_answer(self, record: OutboxRecord) -> None:
        """Complete a schema 3 event with the facts its stored answer holds (see OutboxRecord).

        What the answer and the event share never changes after both are written (a reversal
        changes the answer's amounts reversed, not its response), so the event reads the same
        whenever it is rendered.
        """
        assert record.answer_key is not None, record.sequence
        answer = self.answer(record.answer_key.encode("ascii"))
        if answer is None:
            return  # not kept any more: the event says what it holds itself
        response = answer.response
        record.mti = answer.mti
        record.card_id = answer.card_id
        record.hold_id = answer.hold_id
        record.response_code = answer.response_code
        record.reason = answer.reason
        record.processing_code = response.get("3")
        asked_other = record.amount is not None  # a partial approval: field 4 is what was asked
        if record.amount is None:
            record.amount = _digits(response.get("4"))
        record.currency = response.get("49")
        # Field 6 is the account's money only when field 51 says so: a network's billing
        # amount in another currency, echoed, is not what the account was charged.
        billing_currency = response.get("51")
        account_currency = record.account_currency
        if record.billing_amount is None:  # else what a reversal or completion moved, kept
            record.billing_amount = (
                _digits(response.get("6"))
                if account_currency is not None
                and billing_currency is not None
                and billing_currency == numeric_code(account_currency)
                else None
            )
        if (
            asked_other
            and record.billing_amount is None
            and account_currency is not None
            and record.currency == numeric_code(account_currency)
        ):
            # In the account's currency, not converted: the answer's field 4 is what was
            # approved and held (the event's amount is what was asked), as specs/events.md
            # says; nothing carried it, and the approved amount was lost from the event.
            record.billing_amount = _digits(response.get("4"))
        record.terminal = response.get("41")
        record.merchant_id = response.get("42")
        record.stan = response.get("11") or _stan_of(record.answer_key)
        record.rrn = response.get("37")
        record.acquirer = response.get("32")
        record.approval_code = response.get("38")
        if record.masked_pan is None and answer.card_id is not None:
            found = self.card_by_id(answer.card_id)
            record.masked_pan = None if found is None else found[1].masked_pan

    def outbox_last_sequence(self) -> int:
        cursor = self._txn.cursor(db=self._dbs["outbox"])
        if cursor.last():
            return int(_U64.unpack(bytes(cursor.key()))[0])
        return self.events_pruned_through()  # empty: all pruned (or none yet)

    def has_accounts(self) -> bool:
        return bool(self._txn.cursor(db=self._dbs["accounts"]).first())

    def account_count(self) -> int:
        """Accounts (not their cards' states beside them); walks the keys: not for hot paths."""
        cursor = self._txn.cursor(db=self._dbs["accounts"])
        return sum(1 for key in cursor.iternext(keys=True, values=False) if b"\x00" not in key)

    def accounts(self) -> Iterator[Account]:
        for key, raw in self._txn.cursor(db=self._dbs["accounts"]):
            if b"\x00" not in key:
                yield self._codecs.account.decode(raw)

    def card_state_owners(self) -> Iterator[tuple[str, str]]:
        """(account id, card id) of every card state kept beside an account: for checks."""
        for key in self._txn.cursor(db=self._dbs["accounts"]).iternext(keys=True, values=False):
            account_id, nul, card_id = bytes(key).partition(b"\x00")
            if nul:
                yield account_id.decode(errors="replace"), card_id.decode(errors="replace")

    def cards_by_key(self) -> Iterator[tuple[bytes, Card]]:
        """(card key, card) of every card: for checks."""
        for key, raw in self._txn.cursor(db=self._dbs["cards"]):
            yield bytes(key), self._codecs.card.decode(raw)

    def card_id_index(self) -> Iterator[tuple[str, bytes]]:
        """(card id, card key) of every entry of the card-id index: for checks."""
        for card_id, key in self._txn.cursor(db=self._dbs["card_ids"]):
            yield bytes(card_id).decode(errors="replace"), bytes(key)

    def account_card_index(self) -> Iterator[tuple[str, bytes]]:
        """(account id, card key) of every entry of the account-cards index: for checks."""
        for key in self._txn.cursor(db=self._dbs["account_cards"]).iternext(values=False):
            account_id, _, card_key = bytes(key).partition(b"\x00")
            yield account_id.decode(errors="replace"), card_key

    def all_entries(self) -> Iterator[tuple[str, int, LedgerEntry]]:
        """(account id, sequence in its key, entry) of every ledger entry, in key order (an
        account's in sequence order): for checks."""
        for key, raw in self._txn.cursor(db=self._dbs["entries"]):
            account_id, _, sequence = bytes(key).partition(b"\x00")
            number = _U64.unpack(sequence)[0] if len(sequence) == _U64.size else -1
            yield account_id.decode(errors="replace"), number, self._codecs.entry.decode(raw)

    def all_holds(self) -> Iterator[Hold]:
        """Every hold, in the order of its answer's key; walks the answers: for checks."""
        for stored_key, raw in self._txn.cursor(db=self._dbs["answers"]):
            answer = self._codecs.answer.decode(raw)
            if answer.hold is not None:
                hold = hold_view(answer_key_of(bytes(stored_key)), answer)
                if hold is not None:
                    yield hold

    def hold_expiry_index(self) -> Iterator[tuple[int, int, bytes]]:
        """(expiry ms, hold id, answer key) of every open hold the expiry index lists."""
        for key, value in self._txn.cursor(db=self._dbs["hold_expiry"]):
            raw = bytes(key)
            yield _U64.unpack(raw[:8])[0], _U64.unpack(raw[8:])[0], bytes(value)

    def rrn_entries(self) -> Iterator[tuple[bytes, bytes]]:
        """(RRN lookup, answer key) of every RRN index entry: for checks."""
        for key, value in self._txn.cursor(db=self._dbs["rrn_index"]):
            yield bytes(key), bytes(value)

    def events_numbered(self) -> int:
        """How many events the ledger has numbered (the next one's sequence less one)."""
        raw = self._txn.get(b"seq:event", db=self._dbs["meta"])
        return 0 if raw is None else int(_U64.unpack(raw)[0]) - 1

    def all_answers(self) -> Iterator[StoredAnswer]:
        """Every stored answer; walks the database: for checks, not for hot paths."""
        for raw in self._txn.cursor(db=self._dbs["answers"]).iternext(keys=False, values=True):
            yield self._codecs.answer.decode(raw)

    def outbox_entries(self) -> Iterator[tuple[int, str | None, int]]:
        """(sequence, account id, per-account sequence) of every event, in order, without
        completing them from their answers: for checks, not for delivery."""
        for key, raw in self._txn.cursor(db=self._dbs["outbox"]):
            sequence = _U64.unpack(bytes(key))[0]
            record = self._codecs.events.decode(sequence, raw)
            yield sequence, record.account_id, record.account_sequence

    def account_holds(self, account_id: str, limit: int = limits.holds_listed_max) -> list[Hold]:
        """Open holds of an account, oldest first, at most `limit`.

        Found by walking the account's answers back from the newest until all `open_holds`
        are seen; holds expire, so the walk ends at the oldest open hold's age.
        """
        account = self.account(account_id)
        if account is None or not account.open_holds:
            return []
        holds: list[Hold] = []
        key = account.last_answer
        walked = 0
        newer_ms: int | None = None
        came_from: bytes | None = None
        while key is not None and key != came_from and len(holds) < account.open_holds:
            walked += 1
            if walked > limits.history_walk_max:
                break  # a listing, not a decision: show what a bounded walk found
            answer = self.answer(key)
            if answer is None or not _links_back(answer, answer.account_id, account_id, newer_ms):
                break
            newer_ms, came_from = answer.answered_ms, key
            # Only the answer that opened the hold carries it: a reversal's answer names it too.
            hold = hold_view(key, answer)
            if hold is not None and hold.status == "open":
                holds.append(hold)
            key = answer.previous_in_account
        holds.reverse()
        return holds[:limit]

    def account_hold_count(self, account_id: str) -> int:
        account = self.account(account_id)
        return 0 if account is None else account.open_holds

    def cards(self) -> Iterator[Card]:
        """Every card, in key order (a scan: for rare upkeep, never the hot path)."""
        decode = self._codecs.card.decode
        for _, raw in self._txn.cursor(db=self._dbs["cards"]):
            yield decode(raw)

    def cvc2_attempts_max(self) -> int | None:
        """security.cvc2_attempts_max as the daemon last applied it (None: never recorded)."""
        raw = self._txn.get(b"cvc2_attempts_max", db=self._dbs["meta"])
        return None if raw is None else _U64.unpack(raw)[0]

    def account_cards(self, account_id: str) -> list[Card]:
        prefix = _prefix_key(account_id, b"")
        cards: list[Card] = []
        cursor = self._txn.cursor(db=self._dbs["account_cards"])
        if cursor.set_range(prefix):
            for key in cursor.iternext(keys=True, values=False):
                if not bytes(key).startswith(prefix):
                    break
                card = self.card(bytes(key[len(prefix) :]))
                if card is not None:
                    cards.append(card)
        return cards


class Writer(Reader):
    """One write transaction.

    Accounts and card states are cached for the transaction: a batch of requests on one
    account decodes it once and writes it once, at commit (`flush`), however many requests
    changed it. The cached object is the one callers mutate, so `put_account` and
    `changed_card_state` only mark it to be written. Cards are cached for reading. Answers too,
    because a hold lives in its answer: the lifecycle and the hold methods below must change
    one copy of it.
    """

    __slots__ = (
        "_accounts",
        "_answers",
        "_answers_read",
        "_card_states",
        "_cards",
        "_dirty",
        "_dirty_card_states",
        "_next_event",
        "_next_hold_id",
        "_opened",
    )

    def __init__(self, txn: Txn, dbs: dict[str, Any], codecs: _Codecs) -> None:
        super().__init__(txn, dbs, codecs)
        self._next_hold_id: int | None = None
        self._next_event: int | None = None
        self._accounts: dict[str, Account | None] = {}
        self._dirty: set[str] = set()
        self._cards: dict[bytes, Card | None] = {}
        self._card_states: dict[bytes, CardState] = {}
        self._dirty_card_states: set[bytes] = set()
        self._answers: dict[bytes, StoredAnswer] = {}  # stored key -> answer, written at flush
        self._answers_read: dict[bytes, StoredAnswer] = {}  # stored key -> answer, unchanged yet
        # Holds opened in this transaction, by the identity whose answer will carry them.
        self._opened: dict[bytes, Hold] = {}

    def card(self, card_key: bytes) -> Card | None:
        if card_key in self._cards:
            return self._cards[card_key]
        card = super().card(card_key)
        self._cards[card_key] = card
        return card

    def card_state(self, card: Card) -> CardState:
        """Cached like accounts; to change it, take it from `changed_card_state` instead."""
        return self._cached_card_state(card_state_key(card), card)

    def changed_card_state(self, card: Card) -> CardState:
        """The card's cached state, marked to be written at commit: the caller changes it."""
        key = card_state_key(card)
        self._dirty_card_states.add(key)
        return self._cached_card_state(key, card)

    def _cached_card_state(self, key: bytes, card: Card) -> CardState:
        state = self._card_states.get(key)
        if state is None:
            state = self._card_states[key] = super().card_state(card)
        return state

    def account(self, account_id: str) -> Account | None:
        if account_id in self._accounts:
            return self._accounts[account_id]
        account = super().account(account_id)
        self._accounts[account_id] = account
        return account

    def put_account(self, account: Account) -> None:
        assert account.held >= 0, f"account {account.id}: held {account.held} below zero"
        cached = self._accounts.get(account.id)
        assert cached is None or cached is account, f"account {account.id}: two live copies"
        self._accounts[account.id] = account
        self._dirty.add(account.id)

    def put_card(self, card_key: bytes, card: Card, previous_account: str | None) -> None:
        """Store a card's descriptive fields (status, expiry, controls, account).

        Its state (usage, history head) is the ledger's and stays as it is; when the card
        moves to another account, the state moves with it, next to the new account.
        """
        if previous_account is not None and previous_account != card.account_id:
            self._txn.delete(_prefix_key(previous_account, card_key), db=self._dbs["account_cards"])
            moved_from = _prefix_key(previous_account, card.card_id.encode())
            state = self._card_states.pop(moved_from, None)
            if state is None:
                raw = self._txn.get(moved_from, db=self._dbs["accounts"])
                state = None if raw is None else self._codecs.card_state.decode(raw)
            self._dirty_card_states.discard(moved_from)
            self._txn.delete(moved_from, db=self._dbs["accounts"])
            if state is not None:
                self._card_states[card_state_key(card)] = state
                self._dirty_card_states.add(card_state_key(card))
        self._cards[card_key] = card
        self._txn.put(card_key, self._codecs.encoder.encode(card), db=self._dbs["cards"])
        self._txn.put(_prefix_key(card.account_id, card_key), b"", db=self._dbs["account_cards"])
        self._txn.put(card.card_id.encode(), card_key, db=self._dbs["card_ids"])
        if card.status in CARD_STATUSES_FINAL:
            _forget_card_secrets(self._txn, self._dbs, card.card_id)

    def card_of(self, card_id: str, card_key_hint: bytes) -> Card | None:
        """The card `card_id`, looked up through `card_key_hint` when that is its key."""
        card = self.card(card_key_hint)
        if card is not None and card.card_id == card_id:
            return card
        found = self.card_by_id(card_id)
        return None if found is None else found[1]

    def record_answer(self, identity: bytes, answer: StoredAnswer, card_key_hint: bytes) -> None:
        """Store a new answer at the head of its card's and its account's history chains.

        Its time is moved past a load's currency change (or a card's usage reset) that
        committed before it (answer_time). Nothing moves but on the first batches after such
        a load."""
        if answer.card_id is not None:
            card = self.card_of(answer.card_id, card_key_hint)
            if card is not None:
                state = self.changed_card_state(card)
                answer.answered_ms = answer_time(answer.answered_ms, state, None)
                # Never itself: a key pruned and then used again (field 7 has no year) would
                # make the chain a loop.
                answer.previous_for_card = (
                    state.last_answer if state.last_answer != identity else None
                )
                state.last_answer = identity
        if answer.account_id is not None:
            account = self.account(answer.account_id)
            if account is not None:
                answer.answered_ms = answer_time(answer.answered_ms, None, account)
                previous = account.last_answer
                if previous == identity:
                    previous = None
                elif previous is not None and previous == answer.previous_for_card:
                    previous = SAME_AS_CARD  # the account's one card: two bytes, not 30
                answer.previous_for_account = previous
                account.last_answer = identity
                self.put_account(account)
        self.put_answer(identity, answer)

    def name_events_from(self, first_sequence: int) -> str:
        """Events from `first_sequence` on are named with a new ledger id (a restored backup);
        the earlier ones keep theirs. Returns the new id."""
        ids = self.event_ids()
        fresh = os.urandom(4).hex()
        ranges = [each for each in ids.ranges if each[0] < first_sequence] or ids.ranges[:1]
        ranges.append((first_sequence, fresh))
        self._txn.put(
            b"event_ids", self._codecs.encoder.encode(EventIds(ranges)), db=self._dbs["meta"]
        )
        return fresh

    def part_from_the_log(self) -> None:
        """A copy (a backup) starts a history of its own: a new epoch for the log (wal.py),
        so that, restored where the ledger it was copied from logged on, none of that
        ledger's later records passes for one of its own and is replayed over it."""
        self._txn.put(b"wal_epoch", os.urandom(8), db=self._dbs["meta"])

    def put_cvc2_attempts_max(self, limit: int) -> None:
        self._txn.put(b"cvc2_attempts_max", _U64.pack(limit), db=self._dbs["meta"])

    def put_programme_controls(self, controls: Controls) -> None:
        self._txn.put(b"controls", self._codecs.encoder.encode(controls), db=self._dbs["meta"])

    def append_entry(
        self, account: Account, kind: EntryKind, amount: int, reason: str, now_ms: int
    ) -> LedgerEntry:
        """Move posted by `amount` (negative for a debit) and record why (caller puts account)."""
        account.posted += amount
        account.entry_sequence += 1
        entry = LedgerEntry(
            sequence=account.entry_sequence,
            kind=kind,
            amount=abs(amount),
            reason=reason,
            created_ms=now_ms,
            posted_after=account.posted,
        )
        key = _prefix_key(account.id, _U64.pack(entry.sequence))
        self._txn.put(key, self._codecs.encoder.encode(entry), db=self._dbs["entries"])
        return entry

    def put_idempotent(self, scope: bytes, value: bytes) -> None:
        self._txn.put(scope, value, db=self._dbs["idempotency"])

    def maintenance_cursor(self, database: str) -> Cursor:
        """A cursor over one database, for the ledger's own sweeps (retention.py): they walk
        and delete records this transaction has not cached (answers are written at flush)."""
        return self._txn.cursor(db=self._dbs[database])

    def maintenance_delete(self, database: str, key: bytes) -> bool:
        return bool(self._txn.delete(key, db=self._dbs[database]))

    def events_made(self) -> int:
        """How many events the ledger has numbered, this transaction's included."""
        if self._next_event is not None:
            return self._next_event - 1
        raw = self._txn.get(b"seq:event", db=self._dbs["meta"])
        return 0 if raw is None else int(_U64.unpack(raw)[0]) - 1

    def answer_pending(self, stored_key: bytes) -> bool:
        """This transaction will write the answer under `stored_key` at commit (`flush`)."""
        return stored_key in self._answers

    def note_pruned_events(self, through: int) -> None:
        """Retention pruned the outbox up to this sequence (see `events_pruned_through`)."""
        self._txn.put(b"retention:events_pruned_through", _U64.pack(through), db=self._dbs["meta"])

    def note_pruned_hold(self, hold_id: int) -> None:
        """Retention pruned the answer keeping this hold (see `pruned_hold_max`)."""
        if hold_id > self.pruned_hold_max():
            self._txn.put(b"retention:hold_pruned_max", _U64.pack(hold_id), db=self._dbs["meta"])

    def answer(self, identity: bytes) -> StoredAnswer | None:
        key = stored_answer_key(identity)
        found = self._answers.get(key)
        if found is None:
            found = self._answers_read.get(key)
            if found is None:
                raw = self._txn.get(key, db=self._dbs["answers"])
                if raw is None:
                    return None
                found = self._answers_read[key] = self._codecs.answer.decode(raw)
        return found

    def replacing_answer(self, identity: bytes) -> None:
        """The answer read under `identity` is to be replaced by a new one (put_answer next),
        not changed: another card's reversal mark (Authorizer._process)."""
        self._answers_read.pop(stored_answer_key(identity), None)

    def put_answer(self, identity: bytes, answer: StoredAnswer) -> None:
        """Kept until `flush`, which writes the batch's answers in key order (see there).

        A hold this transaction opened for `identity` goes into the answer."""
        key = stored_answer_key(identity)
        read = self._answers_read.pop(key, None)
        assert read is None or read is answer, f"answer {identity!r}: two live copies"
        opened = self._opened.pop(identity, None)
        if opened is not None:
            answer.hold = hold_state(opened, answer.response.get("38"))
        self._answers[key] = answer

    def open_hold(self, account: Account, hold: Hold) -> None:
        """Open a hold and raise the account's held amount by it (caller puts account).

        The hold is kept in the answer to `hold.identity`, which the caller stores next
        (put_answer); until then only the expiry index and the account know it.
        """
        assert hold.status == "open" and hold.amount > 0, hold
        assert hold.account_id == account.id, (hold.account_id, account.id)
        assert hold.identity not in self._opened, f"{hold.identity!r}: two holds"
        self._opened[hold.identity] = hold
        self._txn.put(
            _U64.pack(hold.expires_ms) + _U64.pack(hold.hold_id),
            hold.identity,
            db=self._dbs["hold_expiry"],
        )
        account.held += hold.amount
        account.open_holds += 1

    def _changed_hold(self, hold: Hold) -> HoldState:
        """The stored state of `hold` (in its answer), marked to be written; the caller
        changes it and the view alike."""
        answer = self.answer(hold.identity)
        assert answer is not None and answer.hold is not None, f"hold {hold.hold_id}: no answer"
        self.put_answer(hold.identity, answer)
        return answer.hold

    def close_hold(self, account: Account, hold: Hold, status: HoldStatus, now_ms: int) -> None:
        """Resolve an open hold (released, captured or expired) and lower held by it."""
        assert hold.status == "open", hold
        assert hold.account_id == account.id, (hold.account_id, account.id)
        account.held -= hold.amount
        account.open_holds -= 1
        assert account.open_holds >= 0, f"account {account.id}: open holds below zero"
        state = self._changed_hold(hold)
        hold.status = state.status = status
        hold.resolved_ms = state.resolved_ms = now_ms
        state.captured_amount = hold.captured_amount
        self._txn.delete(
            _U64.pack(hold.expires_ms) + _U64.pack(hold.hold_id), db=self._dbs["hold_expiry"]
        )

    def capture_hold(self, account: Account, hold: Hold, amount: int, now_ms: int) -> None:
        """Post `amount` for an open hold and close it as captured (the final amount may differ).

        The one way a completion and a clearing presentment post against a hold.
        """
        state = self._changed_hold(hold)
        if state.cleared_parts:
            # Parts of a presentment posted some of it already (clear_part): the final amount
            # counts them (it posted the whole again before), and a part after this posts
            # nothing (the 0 among the parts says a whole capture came).
            posted = max(0, amount - state.captured_amount)
            hold.captured_amount = max(amount, state.captured_amount)
            state.cleared_parts.append(0)
        else:
            posted = hold.captured_amount = amount
        self.close_hold(account, hold, "captured", now_ms)
        account.posted -= posted

    def clear_part(
        self, account: Account, hold: Hold, amount: int, sequence: int, last: bool, now_ms: int
    ) -> None:
        """Post one part of a presentment in parts (multi-clearing) against `hold`: the hold
        shrinks by it and stays open for the parts to come, closed as captured by the last
        part or when nothing is held any more; a part after that (or of a hold released or
        expired) is posted as the network says. The part is remembered on the hold."""
        state = self._changed_hold(hold)
        state.cleared_parts.append(sequence)
        account.posted -= amount
        if hold.status == "open" and (last or amount >= hold.amount):
            hold.captured_amount = state.captured_amount + amount
            self.close_hold(account, hold, "captured", now_ms)
        elif hold.status == "open":
            self.shrink_hold(account, hold, hold.amount - amount)
            hold.captured_amount = state.captured_amount = state.captured_amount + amount
        elif hold.status == "captured":
            hold.captured_amount = state.captured_amount = state.captured_amount + amount

    def force_post(
        self,
        account: Account,
        amount: int,
        original_key: bytes,
        original: StoredAnswer | None,
        *,
        card_id: str,
        now_ms: int,
        rrn: str | None = None,
        rrn_lookup: bytes | None = None,
    ) -> None:
        """Post `amount` with no open hold to capture (capture_verdict's `post`), and mark
        the original posted: its next completion or presentment is then `already_posted`,
        not a second debit of the one purchase.

        The one way a completion and a clearing presentment post without a hold. With no
        original found but its key known (`original_key`: field 90, a clearing record's
        identity), a marker answer under that key says so, and the RRN index names it under
        `rrn_lookup` (the key's acquirer and STAN, and `rrn`): a 0220 and a presentment of
        one purchase with no authorisation otherwise debited it twice, whichever came first.
        The marker keeps the RRN (field 37 of its response): retention unindexes it with it.
        """
        account.posted -= amount
        self.put_account(account)
        if original is None and original_key:
            original = self.answer(original_key)  # declined on no card: that answer is it
            if original is None:
                original = StoredAnswer(
                    fingerprint=b"",  # no request's: a late original is refused (94), not applied
                    response={} if rrn is None else {"37": rrn},
                    response_code="00",
                    reason=POSTED_WITHOUT_ORIGINAL,
                    answered_ms=now_ms,
                    card_id=card_id,
                    account_id=account.id,
                )
            if rrn_lookup is not None and self.answer_by_rrn(rrn_lookup) is None:
                self.index_rrn(rrn_lookup, original_key)
        if original is not None:
            original.posted_amount = amount
            self.put_answer(original_key, original)

    def post_again(
        self,
        account: Account,
        amount: int,
        original_key: bytes,
        original: StoredAnswer,
        now_ms: int,
    ) -> None:
        """Post `amount` more of a purchase posted at once and reversed since (settle's
        `repost`): what the network settles, above what still stands of it. The original's
        posting grows by it, so what stands of it is the final amount: another completion or
        presentment posts nothing more; and it is settled: a later reversal credits nothing
        (it credited the settled purchase back)."""
        account.posted -= amount
        self.put_account(account)
        original.posted_amount += amount
        original.settled_ms = now_ms
        self.put_answer(original_key, original)

    def mark_reversed_unseen(
        self, original_key: bytes, *, card_id: str, account_id: str, now_ms: int
    ) -> None:
        """A reversal named `original_key` before its original came (a network sends its
        0420 when the original timed out, and the two may cross): a marker answer under that
        key, so the original, arriving late, is refused as a conflict (94; an advice
        acknowledged) instead of holding the cardholder's money until the hold expired.
        Nothing when an answer is there already. Only the card's own original is refused
        (Authorizer._process): another card's request of the same identity is decided."""
        if self.answer(original_key) is not None:
            return
        self.put_answer(
            original_key,
            StoredAnswer(
                fingerprint=b"",  # no request's: the late original is refused, not applied
                response={},
                response_code="25",  # nothing approved under it
                reason=REVERSED_BEFORE_ORIGINAL,
                answered_ms=now_ms,
                card_id=card_id,
                account_id=account_id,
            ),
        )

    def shrink_hold(self, account: Account, hold: Hold, amount: int) -> None:
        """Lower an open hold to `amount` (partial reversal)."""
        assert hold.status == "open" and 0 < amount <= hold.amount, (hold, amount)
        account.held -= hold.amount - amount
        hold.amount = self._changed_hold(hold).amount = amount

    def expired_holds(self, now_ms: int, limit: int) -> list[Hold]:
        """Open holds whose expiry has passed, oldest expiry first, at most `limit`."""
        holds: list[Hold] = []
        cursor = self._txn.cursor(db=self._dbs["hold_expiry"])
        if cursor.first():
            for key, identity in cursor.iternext(keys=True, values=True):
                if _U64.unpack(bytes(key[:8]))[0] > now_ms or len(holds) >= limit:
                    break
                answer_key = bytes(identity)
                hold = self.hold_of(answer_key, self.answer(answer_key))
                if hold is not None and hold.status == "open":
                    holds.append(hold)
        return holds

    def put_card_secret(self, card_id: str, secret: CardSecret) -> None:
        encoded = self._codecs.encoder.encode(secret)
        self._txn.put(card_id.encode(), encoded, db=self._dbs["card_secrets"])

    def put_reveal_token(self, card_id: str, token: RevealToken) -> None:
        encoded = self._codecs.encoder.encode(token)
        self._txn.put(card_id.encode(), encoded, db=self._dbs["reveal_tokens"])

    def delete_reveal_token(self, card_id: str) -> None:
        self._txn.delete(card_id.encode(), db=self._dbs["reveal_tokens"])

    def put_cardholder(self, cardholder: Cardholder) -> None:
        self._txn.put(
            cardholder.id.encode(),
            self._codecs.encoder.encode(cardholder),
            db=self._dbs["cardholders"],
        )

    def put_clearing_record(self, record_id: str, outcome: ClearedRecord) -> None:
        self._txn.put(
            record_id.encode(), self._codecs.encoder.encode(outcome), db=self._dbs["clearing"]
        )

    def index_rrn(self, lookup: bytes, answer_key: bytes) -> None:
        self._txn.put(lookup, answer_key, db=self._dbs["rrn_index"])

    def next_hold_id(self) -> int:
        """Sequence read once per transaction; LMDB's single writer keeps it unique."""
        if self._next_hold_id is None:
            raw = self._txn.get(b"seq:hold", db=self._dbs["meta"])
            self._next_hold_id = 1 if raw is None else _U64.unpack(raw)[0]
        hold_id = self._next_hold_id
        self._next_hold_id += 1
        return hold_id

    def ledger_time(self, wall_ms: int) -> int:
        """The time this transaction stamps its answers and events with: `wall_ms`, but
        never behind a time an earlier transaction used (meta `clock_ms`). A system clock
        stepped back (NTP, a VM restored) made an answer older than the one before it on its
        card, which ended every history walk there for good (a reused key looks so), and an
        event older than the events before it, whose answer retention then pruned while the
        event waited for delivery. The ledger's time waits for the wall clock instead, up to
        limits.ledger_clock_held_max_ms: further behind, it is the ledger's clock that was
        wrong (set ahead once), and the wall clock is followed again (logged)."""
        raw = self._txn.get(b"clock_ms", db=self._dbs["meta"])
        last = 0 if raw is None else _U64.unpack(raw)[0]
        if wall_ms == last or 0 < last - wall_ms <= limits.ledger_clock_held_max_ms:
            return last
        if wall_ms < last:
            _clock_went_back(last - wall_ms)
        self._txn.put(b"clock_ms", _U64.pack(wall_ms), db=self._dbs["meta"])
        return wall_ms

    def next_event_sequence(self) -> int:
        if self._next_event is None:
            raw = self._txn.get(b"seq:event", db=self._dbs["meta"])
            self._next_event = 1 if raw is None else _U64.unpack(raw)[0]
        sequence = self._next_event
        self._next_event += 1
        return sequence

    def emit_change(
        self,
        now_ms: int,
        type: str,
        reason: str,
        *,
        account_id: str | None = None,
        card: Card | None = None,
        amount: int | None = None,
        entry_sequence: int | None = None,
        cardholder: Cardholder | None = None,
    ) -> None:
        """The event of a change that is no message's (the API, a load, a lock-out), in this
        transaction: every change has one (records.change_event)."""
        self.emit(
            change_event(
                type,
                reason,
                now_ms,
                account_id=account_id,
                card=card,
                amount=amount,
                entry_sequence=entry_sequence,
                cardholder=cardholder,
            )
        )

    def emit(self, record: OutboxRecord) -> None:
        """Number the event (globally and per account), stamp its account's balances after
        this change, and append it: in this transaction, so a change and its event commit
        together or not at all (specs/events.md)."""
        record.sequence = self.next_event_sequence()
        if record.account_id is not None:
            account = self.account(record.account_id)
            if account is not None:
                account.event_sequence += 1
                self.put_account(account)
                record.account_sequence = account.event_sequence
                record.posted_after = account.posted
                record.held_after = account.held
                record.credit_limit = account.credit_limit
                record.account_currency = account.currency
        self.append_event(record)

    def append_event(self, record: OutboxRecord) -> None:
        appended = self._txn.put(
            _U64.pack(record.sequence),
            self._codecs.events.encode(record),
            db=self._dbs["outbox"],
            append=True,
        )
        assert appended, f"event {record.sequence}: not above every stored sequence"

    def flush(self) -> None:
        """Write what the transaction kept in memory: changed accounts and card states.

        In key order, accounts and the states of their cards together: an account and its
        card share a leaf page, and neighbouring keys share their page's copy.
        """
        encode = self._codecs.encoder.encode
        changed: list[tuple[bytes, Account | CardState]] = []
        for account_id in self._dirty:
            account = self._accounts[account_id]
            assert account is not None and account.held >= 0 <= account.open_holds, account
            changed.append((account_id.encode(), account))
        self._dirty.clear()
        changed.extend((key, self._card_states[key]) for key in self._dirty_card_states)
        self._dirty_card_states.clear()
        changed.sort(key=lambda item: item[0])
        put = self._txn.put
        accounts_db = self._dbs["accounts"]
        for key, record in changed:
            put(key, encode(record), db=accounts_db)
        # Answers in key order, appended where they sort after every stored one: new answers
        # share field 7 (about now), so most of a batch goes to the right edge of the tree, and
        # an appended key leaves the page before it full where a put splits it in half (the
        # answers' pages were 61 % full).
        answers_db = self._dbs["answers"]
        for key in sorted(self._answers):
            value = encode(self._answers[key])
            if not put(key, value, db=answers_db, append=True):
                put(key, value, db=answers_db)  # below the last stored key, or already stored
        self._answers.clear()
        self._answers_read.clear()
        assert not self._opened, f"holds opened without their answer: {list(self._opened)}"
        if self._next_hold_id is not None:
            self._txn.put(b"seq:hold", _U64.pack(self._next_hold_id), db=self._dbs["meta"])
        if self._next_event is not None:
            self._txn.put(b"seq:event", _U64.pack(self._next_event), db=self._dbs["meta"])


def _migrate_1_to_2(
    env: lmdb.Environment, txn: lmdb.Transaction, dbs: dict[str, Any], codecs: _Codecs
) -> None:
    """Schema 1 -> 2, in the opening write transaction (all or nothing).

    Usage records move into the account and the card's state beside it; the open-hold index
    becomes a count on the account; the card and account history indexes become chains
    through the answers, linked oldest to newest in the order the indexes kept. Then the old
    databases go.
    """
    retired = {
        name: env.open_db(name.encode(), txn=txn, create=True) for name in _RETIRED_DATABASES
    }
    encode = codecs.encoder.encode
    reader = Reader(txn, dbs, codecs)
    for raw_scope, raw in txn.cursor(db=retired["usage"]):
        scope, usage = bytes(raw_scope).decode(), codecs.usage.decode(raw)
        kind, _, owner_id = scope.partition(":")
        if kind == "c":
            found = reader.card_by_id(owner_id)
            if found is not None:
                _put_card_state(txn, dbs, codecs, found[1], usage=usage)
        elif (raw_account := txn.get(owner_id.encode(), db=dbs["accounts"])) is not None:
            account = codecs.account.decode(raw_account)
            account.usage = usage
            txn.put(owner_id.encode(), encode(account), db=dbs["accounts"])
    open_holds: dict[str, int] = {}
    for key in txn.cursor(db=retired["account_holds"]).iternext(keys=True, values=False):
        account_id = bytes(key)[:-9].decode()  # account id, NUL, u64 hold id
        open_holds[account_id] = open_holds.get(account_id, 0) + 1
    for account_id, count in open_holds.items():
        raw_account = txn.get(account_id.encode(), db=dbs["accounts"])
        if raw_account is not None:
            account = codecs.account.decode(raw_account)
            account.open_holds = count
            txn.put(account_id.encode(), encode(account), db=dbs["accounts"])
    # The RRN index is keyed RRN first now (wire.messages.rrn_key): acquirer|STAN|RRN before.
    indexed = [(bytes(key), bytes(value)) for key, value in txn.cursor(db=dbs["rrn_index"])]
    for key, _ in indexed:
        txn.delete(key, db=dbs["rrn_index"])
    for key, value in indexed:
        acquirer, stan, rrn = key.split(b"|", 2)
        txn.put(b"|".join((rrn, acquirer, stan)), value, db=dbs["rrn_index"])
    # Answers move to their stored key (field 7 first); the chains below then link them there.
    moved = [(bytes(key), bytes(value)) for key, value in txn.cursor(db=dbs["answers"])]
    for key, _ in moved:
        txn.delete(key, db=dbs["answers"])
    for key, value in moved:
        txn.put(stored_answer_key(key), value, db=dbs["answers"])
    for of in ("card", "account"):
        heads: dict[str, bytes] = {}
        for index_key in txn.cursor(db=retired[f"{of}_answers"]).iternext(values=False):
            owner, _, rest = bytes(index_key).partition(b"\x00")
            answer_key = rest[8:]
            raw_answer = txn.get(stored_answer_key(answer_key), db=dbs["answers"])
            if raw_answer is None:
                continue
            answer = codecs.answer.decode(raw_answer)
            previous = heads.get(owner.decode())
            if of == "card":
                answer.previous_for_card = previous
            else:
                answer.previous_for_account = previous
            txn.put(stored_answer_key(answer_key), encode(answer), db=dbs["answers"])
            heads[owner.decode()] = answer_key
        for owner_id, head in heads.items():
            if of == "account":
                raw_account = txn.get(owner_id.encode(), db=dbs["accounts"])
                if raw_account is not None:
                    account = codecs.account.decode(raw_account)
                    account.last_answer = head
                    txn.put(owner_id.encode(), encode(account), db=dbs["accounts"])
                continue
            found = reader.card_by_id(owner_id)
            if found is not None:
                _put_card_state(txn, dbs, codecs, found[1], last_answer=head)
    for db in retired.values():
        txn.drop(db, delete=True)


def _migrate_2_to_3(
    env: lmdb.Environment, txn: lmdb.Transaction, dbs: dict[str, Any], codecs: _Codecs
) -> None:
    """Schema 2 -> 3: nothing to rewrite. Schema 3 writes events that take the message's facts
    from their stored answer (OutboxRecord.in_answer); schema 2's full events still read as
    they are. The version changes so that a schema-2 build refuses a ledger whose events it
    would render without those facts."""


def _migrate_3_to_4(
    env: lmdb.Environment, txn: lmdb.Transaction, dbs: dict[str, Any], codecs: _Codecs
) -> None:
    """Schema 3 -> 4: each hold moves into the answer of the request that opened it (what the
    answer holds already is left out: HoldState), the expiry index names that answer, and the
    holds database goes. A hold whose answer is missing stops the migration: its amount is
    part of the account's held balance and must not be dropped silently."""
    holds_db = env.open_db(_RETIRED_HOLDS.encode(), txn=txn, create=True)
    encode = codecs.encoder.encode
    identities: dict[int, bytes] = {}
    for raw in txn.cursor(db=holds_db).iternext(keys=False, values=True):
        hold = codecs.hold.decode(raw)
        key = stored_answer_key(hold.identity)
        raw_answer = txn.get(key, db=dbs["answers"])
        if raw_answer is None:
            raise LedgerError(
                f"migrating to schema 4: hold {hold.hold_id} ({hold.status}, account "
                f"{hold.account_id}): the answer {hold.identity!r} that opened it is missing"
            )
        answer = codecs.answer.decode(raw_answer)
        answer.hold = hold_state(hold, answer.response.get("38"))
        txn.put(key, encode(answer), db=dbs["answers"])
        if hold.status == "open":  # only open holds are in the expiry index
            identities[hold.hold_id] = hold.identity
    for raw_key in list(txn.cursor(db=dbs["hold_expiry"]).iternext(keys=True, values=False)):
        hold_id = _U64.unpack(bytes(raw_key[8:]))[0]
        identity = identities.get(hold_id)
        if identity is None:
            txn.delete(raw_key, db=dbs["hold_expiry"])  # a hold that no longer exists
        else:
            txn.put(raw_key, identity, db=dbs["hold_expiry"])
    txn.drop(holds_db, delete=True)


def _migrate_4_to_5(
    env: lmdb.Environment, txn: lmdb.Transaction, dbs: dict[str, Any], codecs: _Codecs
) -> None:
    """Schema 4 -> 5: nothing to rewrite. Every field schema 5 added has a default that reads
    a schema-4 record as it was meant, and the `cardholders` database is created on open."""


def _migrate_5_to_6(
    env: lmdb.Environment, txn: lmdb.Transaction, dbs: dict[str, Any], codecs: _Codecs
) -> None:
    """Schema 5 -> 6: schema 6 reads schema 5's full events and history links as they are;
    the version changes so that a schema-5 build refuses a ledger whose compact events
    (records.COMPACT_EVENT_MARK) and empty account links it would misread. Cards schema 5
    stopped keep their sealed PAN and card-details token: both go now, as schema 6 drops them
    when a card stops (_forget_card_secrets)."""
    for _, raw in txn.cursor(db=dbs["cards"]):
        card = codecs.card.decode(raw)
        if card.status in CARD_STATUSES_FINAL:
            _forget_card_secrets(txn, dbs, card.card_id)


_Migration = Callable[[lmdb.Environment, lmdb.Transaction, dict[str, Any], _Codecs], None]
# Each schema that can be migrated: the step and the schema it leaves. The steps run in one
# write transaction, in order, so a ledger two releases old migrates in one all-or-nothing open.
_MIGRATIONS: dict[bytes, tuple[_Migration, bytes]] = {
    b"1": (_migrate_1_to_2, b"2"),
    b"2": (_migrate_2_to_3, b"3"),
    b"3": (_migrate_3_to_4, b"4"),
    b"4": (_migrate_4_to_5, b"5"),
    b"5": (_migrate_5_to_6, b"6"),
}


def _put_card_state(
    txn: lmdb.Transaction,
    dbs: dict[str, Any],
    codecs: _Codecs,
    card: Card,
    *,
    usage: Usage | None = None,
    last_answer: bytes | None = None,
) -> None:
    """Set the usage or the history head of a card's state (the other part is kept)."""
    state = Reader(txn, dbs, codecs).card_state(card)
    if usage is not None:
        state.usage = usage
    if last_answer is not None:
        state.last_answer = last_answer
    txn.put(card_state_key(card), codecs.encoder.encode(state), db=dbs["accounts"])


def ledger_exists(path: str | Path) -> bool:
    return os.path.exists(os.path.join(path, "data.mdb"))
