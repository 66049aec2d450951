"""The LMDB environment and typed access to its named databases.

One `Writer` is one LMDB write transaction: the server applies a whole batch of requests in one,
so the fsync at commit is shared by the batch (group commit). LMDB serialises writers across
processes, so `processor ledger load` may run beside the daemon.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import lmdb
import msgspec

from processor import limits
from processor.ledger.controls import Controls, Usage
from processor.ledger.records import (
    Account,
    Card,
    ClearedRecord,
    EntryKind,
    Hold,
    HoldStatus,
    LedgerEntry,
    OutboxRecord,
    StoredAnswer,
)

SCHEMA_VERSION = b"1"
_U64 = struct.Struct(">Q")
_DATABASES = (
    "accounts",
    "cards",
    "account_cards",
    "holds",
    "account_holds",  # account id + hold id -> b"": the account's open holds
    "hold_expiry",  # expiry ms + hold id -> b"": open holds in the order they expire
    "answers",  # message class + identity -> StoredAnswer
    "rrn_index",  # acquirer|STAN|RRN -> answer key: reversal matching without field 90
    "meta",
    "clearing",  # clearing record id -> ClearedRecord: presentments applied once each
    "card_answers",  # card id + answered ms + answer key -> b"": a card's recent history
    "outbox",  # event sequence -> OutboxRecord: events for the programme, same txn as changes
    "usage",  # controls.card_scope / account_scope -> Usage: spend-control counters
    "card_ids",  # card id -> card key: the API names cards by id, the ledger keys them by HMAC
    "account_answers",  # account id + answered ms + answer key -> b"": authorisations by account
    "entries",  # account id + u64 sequence -> LedgerEntry: funding and debits via the API
    "idempotency",  # Idempotency-Key scope -> IdempotentResponse: API POSTs applied once
)


class LedgerError(Exception):
    """An operating error of the ledger (unavailable, full, wrong key): answer 96, keep serving."""


class _Codecs:
    __slots__ = (
        "account",
        "answer",
        "card",
        "cleared",
        "controls",
        "encoder",
        "entry",
        "hold",
        "outbox",
        "usage",
    )

    def __init__(self) -> None:
        self.encoder = msgspec.msgpack.Encoder()
        self.account = msgspec.msgpack.Decoder(Account)
        self.card = msgspec.msgpack.Decoder(Card)
        self.hold = msgspec.msgpack.Decoder(Hold)
        self.answer = msgspec.msgpack.Decoder(StoredAnswer)
        self.cleared = msgspec.msgpack.Decoder(ClearedRecord)
        self.outbox = msgspec.msgpack.Decoder(OutboxRecord)
        self.usage = msgspec.msgpack.Decoder(Usage)
        self.controls = msgspec.msgpack.Decoder(Controls)
        self.entry = msgspec.msgpack.Decoder(LedgerEntry)


class Ledger:
    def __init__(
        self,
        path: str | Path,
        *,
        map_size_bytes: int = limits.map_size_bytes_default,
        durability: Literal["fsync", "process"] = "fsync",
        readonly: bool = False,
    ) -> None:
        self.path = Path(path)
        if not readonly:
            self.path.mkdir(parents=True, exist_ok=True)
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
            )
        except lmdb.Error as error:
            raise LedgerError(f"ledger {self.path}: cannot open: {error}") from None
        self.durability = durability
        self._codecs = _Codecs()
        if not readonly:
            # Reader slots of processes that died (kill -9) would pin old pages forever.
            self.env.reader_check()
        try:
            if readonly:
                # A read-only environment opens each database in a transaction of its own;
                # handles opened inside a shared read transaction are unusable after it ends.
                self._dbs = {}
                for name in _DATABASES:
                    try:
                        self._dbs[name] = self.env.open_db(name.encode(), create=False)
                    except lmdb.NotFoundError:
                        raise LedgerError(
                            f"ledger {self.path}: has no '{name}' database yet (made by an "
                            "older version); open it read-write once, e.g. by starting the "
                            "daemon or `processor ledger load`, to add it"
                        ) from None
            else:
                with self.env.begin(write=True) as txn:
                    self._dbs = {
                        name: self.env.open_db(name.encode(), txn=txn, create=True)
                        for name in _DATABASES
                    }
                    stored = txn.get(b"schema", db=self._dbs["meta"])
                    if txn.get(b"ledger_id", db=self._dbs["meta"]) is None:
                        # Prefixes event ids, so two ledgers never issue the same id.
                        txn.put(b"ledger_id", os.urandom(4).hex().encode(), db=self._dbs["meta"])
                    _index_card_ids(txn, self._dbs)
                    if stored is None:
                        txn.put(b"schema", SCHEMA_VERSION, db=self._dbs["meta"])
                    elif stored != SCHEMA_VERSION:
                        raise LedgerError(
                            f"ledger {self.path}: schema {stored!r}, this build reads "
                            f"{SCHEMA_VERSION!r}"
                        )
        except lmdb.Error as error:
            self.env.close()
            raise LedgerError(f"ledger {self.path}: {error}") from None
        except LedgerError:
            self.env.close()
            raise

    def close(self) -> None:
        self.env.close()

    def pan_key_fingerprint(self) -> str | None:
        with self.env.begin(write=False) as txn:
            stored = txn.get(b"pan_key_fingerprint", db=self._dbs["meta"])
        return None if stored is None else bytes(stored).decode()

    def bind_pan_key(self, fingerprint: str) -> None:
        """Refuse a ledger whose cards were keyed with another PAN key."""
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

    @contextmanager
    def write(self) -> Iterator[Writer]:
        """One write transaction: commits (durably, per `durability`) unless the block raises."""
        txn = self.env.begin(write=True)
        writer = Writer(txn, self._dbs, self._codecs)
        try:
            yield writer
            writer.flush()
            txn.commit()
        except BaseException:
            txn.abort()
            raise

    @contextmanager
    def read(self) -> Iterator[Reader]:
        with self.env.begin(write=False) as txn:
            yield Reader(txn, self._dbs, self._codecs)

    def map_usage(self) -> tuple[int, int]:
        """(bytes in use, map size)."""
        info = self.env.info()
        stat = self.env.stat()
        return (info["last_pgno"] + 1) * stat["psize"], info["map_size"]


def _prefix_key(prefix: str, suffix: bytes) -> bytes:
    return prefix.encode() + b"\x00" + suffix


def _index_card_ids(txn: lmdb.Transaction, dbs: dict[str, Any]) -> None:
    """Ledgers written before the card-id index get it built once, at the first writable open."""
    if txn.stat(dbs["card_ids"])["entries"] or not txn.stat(dbs["cards"])["entries"]:
        return
    decode = msgspec.msgpack.Decoder(Card).decode
    for key, raw in txn.cursor(db=dbs["cards"]):
        txn.put(decode(raw).card_id.encode(), bytes(key), db=dbs["card_ids"])


def _walk_prefix_backwards(
    cursor: lmdb.Cursor, prefix: bytes, before: bytes | None
) -> Iterator[bytes]:
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


class Reader:
    __slots__ = ("_codecs", "_dbs", "_txn")

    def __init__(self, txn: lmdb.Transaction, dbs: dict[str, Any], codecs: _Codecs) -> None:
        self._txn = txn
        self._dbs = dbs
        self._codecs = codecs

    def account(self, account_id: str) -> Account | None:
        raw = self._txn.get(account_id.encode(), db=self._dbs["accounts"])
        return None if raw is None else self._codecs.account.decode(raw)

    def card(self, card_key: bytes) -> Card | None:
        raw = self._txn.get(card_key, db=self._dbs["cards"])
        return None if raw is None else self._codecs.card.decode(raw)

    def answer(self, identity: bytes) -> StoredAnswer | None:
        raw = self._txn.get(identity, db=self._dbs["answers"])
        return None if raw is None else self._codecs.answer.decode(raw)

    def answer_by_rrn(self, lookup: bytes) -> bytes | None:
        raw = self._txn.get(lookup, db=self._dbs["rrn_index"])
        return None if raw is None else bytes(raw)

    def hold(self, hold_id: int) -> Hold | None:
        raw = self._txn.get(_U64.pack(hold_id), db=self._dbs["holds"])
        return None if raw is None else self._codecs.hold.decode(raw)

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

        `before` is the page key of the last item of the previous page.
        """
        prefix = _prefix_key(owner_id, b"")
        db = self._dbs["card_answers" if of == "card" else "account_answers"]
        found: list[tuple[bytes, StoredAnswer, bytes]] = []
        for key in _walk_prefix_backwards(self._txn.cursor(db=db), prefix, before):
            answer_key = key[len(prefix) + 8 :]
            answer = self.answer(answer_key)
            if answer is not None:
                found.append((answer_key, answer, key))
            if len(found) >= limit:
                break
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
        """Spend-control usage under a card_scope or account_scope key (empty when none yet)."""
        raw = self._txn.get(scope.encode(), db=self._dbs["usage"])
        return Usage() if raw is None else self._codecs.usage.decode(raw)

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

    def ledger_id(self) -> str:
        raw = self._txn.get(b"ledger_id", db=self._dbs["meta"])
        return "" if raw is None else bytes(raw).decode()

    def outbox(self, first_sequence: int, limit: int) -> list[OutboxRecord]:
        """Outbox records from `first_sequence` on, in order, at most `limit`."""
        records: list[OutboxRecord] = []
        cursor = self._txn.cursor(db=self._dbs["outbox"])
        if cursor.set_range(_U64.pack(first_sequence)):
            for value in cursor.iternext(keys=False, values=True):
                records.append(self._codecs.outbox.decode(value))
                if len(records) >= limit:
                    break
        return records

    def outbox_last_sequence(self) -> int:
        cursor = self._txn.cursor(db=self._dbs["outbox"])
        return _U64.unpack(bytes(cursor.key()))[0] if cursor.last() else 0

    def account_count(self) -> int:
        return int(self._txn.stat(self._dbs["accounts"])["entries"])

    def accounts(self) -> Iterator[Account]:
        for _, raw in self._txn.cursor(db=self._dbs["accounts"]):
            yield self._codecs.account.decode(raw)

    def account_holds(self, account_id: str, limit: int = limits.holds_listed_max) -> list[Hold]:
        """Open holds of an account, oldest first."""
        prefix = _prefix_key(account_id, b"")
        holds: list[Hold] = []
        cursor = self._txn.cursor(db=self._dbs["account_holds"])
        if cursor.set_range(prefix):
            for key in cursor.iternext(keys=True, values=False):
                if not bytes(key).startswith(prefix) or len(holds) >= limit:
                    break
                hold = self.hold(_U64.unpack(key[len(prefix) :])[0])
                if hold is not None:
                    holds.append(hold)
        return holds

    def account_hold_count(self, account_id: str) -> int:
        prefix = _prefix_key(account_id, b"")
        count = 0
        cursor = self._txn.cursor(db=self._dbs["account_holds"])
        if cursor.set_range(prefix):
            for key in cursor.iternext(keys=True, values=False):
                if not bytes(key).startswith(prefix):
                    break
                count += 1
        return count

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

    Accounts are cached for the transaction: a batch of requests on one account decodes it
    once and writes it once, at commit (`flush`), however many requests changed it. The cached
    object is the one callers mutate, so `put_account` only marks it to be written.
    """

    __slots__ = ("_accounts", "_dirty", "_dirty_usage", "_next_event", "_next_hold_id", "_usage")

    def __init__(self, txn: lmdb.Transaction, dbs: dict[str, Any], codecs: _Codecs) -> None:
        super().__init__(txn, dbs, codecs)
        self._next_hold_id: int | None = None
        self._next_event: int | None = None
        self._accounts: dict[str, Account | None] = {}
        self._dirty: set[str] = set()
        self._usage: dict[str, Usage] = {}
        self._dirty_usage: set[str] = set()

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
        if previous_account is not None and previous_account != card.account_id:
            self._txn.delete(_prefix_key(previous_account, card_key), db=self._dbs["account_cards"])
        self._txn.put(card_key, self._codecs.encoder.encode(card), db=self._dbs["cards"])
        self._txn.put(_prefix_key(card.account_id, card_key), b"", db=self._dbs["account_cards"])
        self._txn.put(card.card_id.encode(), card_key, db=self._dbs["card_ids"])

    def usage(self, scope: str) -> Usage:
        """Cached like accounts: the object returned is the one to change, then `touch_usage`."""
        usage = self._usage.get(scope)
        if usage is None:
            usage = self._usage[scope] = super().usage(scope)
        return usage

    def touch_usage(self, scope: str) -> None:
        self._dirty_usage.add(scope)

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

    def put_answer(self, identity: bytes, answer: StoredAnswer) -> None:
        self._txn.put(identity, self._codecs.encoder.encode(answer), db=self._dbs["answers"])

    def open_hold(self, account: Account, hold: Hold) -> None:
        """Record an open hold and raise the account's held amount by it (caller puts account)."""
        assert hold.status == "open" and hold.amount > 0, hold
        assert hold.account_id == account.id, (hold.account_id, account.id)
        key = _U64.pack(hold.hold_id)
        self._txn.put(key, self._codecs.encoder.encode(hold), db=self._dbs["holds"])
        self._txn.put(_prefix_key(account.id, key), b"", db=self._dbs["account_holds"])
        self._txn.put(_U64.pack(hold.expires_ms) + key, b"", db=self._dbs["hold_expiry"])
        account.held += hold.amount

    def close_hold(self, account: Account, hold: Hold, status: HoldStatus, now_ms: int) -> None:
        """Resolve an open hold (released, captured or expired) and lower held by it."""
        assert hold.status == "open", hold
        assert hold.account_id == account.id, (hold.account_id, account.id)
        key = _U64.pack(hold.hold_id)
        account.held -= hold.amount
        hold.status = status
        hold.resolved_ms = now_ms
        self._txn.put(key, self._codecs.encoder.encode(hold), db=self._dbs["holds"])
        self._txn.delete(_prefix_key(account.id, key), db=self._dbs["account_holds"])
        self._txn.delete(_U64.pack(hold.expires_ms) + key, db=self._dbs["hold_expiry"])

    def shrink_hold(self, account: Account, hold: Hold, amount: int) -> None:
        """Lower an open hold to `amount` (partial reversal)."""
        assert hold.status == "open" and 0 < amount <= hold.amount, (hold, amount)
        account.held -= hold.amount - amount
        hold.amount = amount
        self._txn.put(
            _U64.pack(hold.hold_id), self._codecs.encoder.encode(hold), db=self._dbs["holds"]
        )

    def put_hold(self, hold: Hold) -> None:
        self._txn.put(
            _U64.pack(hold.hold_id), self._codecs.encoder.encode(hold), db=self._dbs["holds"]
        )

    def expired_holds(self, now_ms: int, limit: int) -> list[Hold]:
        """Open holds whose expiry has passed, oldest expiry first, at most `limit`."""
        holds: list[Hold] = []
        cursor = self._txn.cursor(db=self._dbs["hold_expiry"])
        if cursor.first():
            for key in cursor.iternext(keys=True, values=False):
                raw = bytes(key)
                if _U64.unpack(raw[:8])[0] > now_ms or len(holds) >= limit:
                    break
                hold = self.hold(_U64.unpack(raw[8:])[0])
                if hold is not None and hold.status == "open":
                    holds.append(hold)
        return holds

    def put_clearing_record(self, record_id: str, outcome: ClearedRecord) -> None:
        self._txn.put(
            record_id.encode(), self._codecs.encoder.encode(outcome), db=self._dbs["clearing"]
        )

    def index_answer(
        self, of: Literal["card", "account"], owner_id: str, answered_ms: int, answer_key: bytes
    ) -> None:
        """List an answer in its card's or account's history (read back by `history`)."""
        key = _prefix_key(owner_id, _U64.pack(answered_ms) + answer_key)
        self._txn.put(key, b"", db=self._dbs["card_answers" if of == "card" else "account_answers"])

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

    def next_event_sequence(self) -> int:
        if self._next_event is None:
            raw = self._txn.get(b"seq:event", db=self._dbs["meta"])
            self._next_event = 1 if raw is None else _U64.unpack(raw)[0]
        sequence = self._next_event
        self._next_event += 1
        return sequence

    def append_event(self, record: OutboxRecord) -> None:
        self._txn.put(
            _U64.pack(record.sequence), self._codecs.encoder.encode(record), db=self._dbs["outbox"]
        )

    def flush(self) -> None:
        """Write what the transaction kept in memory: changed accounts, sequence counters."""
        encode = self._codecs.encoder.encode
        for account_id in self._dirty:
            account = self._accounts[account_id]
            assert account is not None and account.held >= 0, account
            self._txn.put(account_id.encode(), encode(account), db=self._dbs["accounts"])
        self._dirty.clear()
        for scope in self._dirty_usage:
            self._txn.put(scope.encode(), encode(self._usage[scope]), db=self._dbs["usage"])
        self._dirty_usage.clear()
        if self._next_hold_id is not None:
            self._txn.put(b"seq:hold", _U64.pack(self._next_hold_id), db=self._dbs["meta"])
        if self._next_event is not None:
            self._txn.put(b"seq:event", _U64.pack(self._next_event), db=self._dbs["meta"])


def ledger_exists(path: str | Path) -> bool:
    return os.path.exists(os.path.join(path, "data.mdb"))
