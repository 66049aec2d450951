"""Delivery state: per endpoint the next outbox sequence to deliver, dead letters, replay
requests, and whether the endpoint is disabled (a 410 Gone) until an operator enables it.

A separate LMDB environment without fsync: losing its last writes only means redelivering
events (same ids: receivers deduplicate), and its commits never take the ledger's write lock.
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Final, TypeVar

import lmdb
import msgspec

from processor import limits
from processor.config import Config
from processor.ledger.store import Ledger, Reader
from processor.metrics import Sample

_U64 = struct.Struct(">Q")
_T = TypeVar("_T")


def _key(endpoint: str, sequence: int) -> bytes:
    """An endpoint's record about one event (dead letter, replay request), in sequence order."""
    return endpoint.encode() + b"\x00" + _U64.pack(sequence)


log = logging.getLogger("processor.webhooks")


class DeadLetter(msgspec.Struct, array_like=True, kw_only=True):
    sequence: int
    event_id: str
    attempts: int
    last_error: str
    dead_ms: int


class Disabled(msgspec.Struct, array_like=True, kw_only=True):
    """Why an endpoint gets nothing until `processor webhooks enable` removes this."""

    since_ms: int
    reason: str  # what the receiver answered: "http_410"
    event_id: str  # the event whose delivery it answered so

    @property
    def since(self) -> str:
        """When, in RFC 3339 UTC to the second."""
        when = datetime.fromtimestamp(self.since_ms / 1000, UTC)
        return when.isoformat(timespec="seconds").removesuffix("+00:00") + "Z"


def state_path(config: Config) -> Path:
    """Where the delivery state lives: beside the ledger's files (the delivery process and
    `processor webhooks` both open it there)."""
    return Path(config.ledger.path) / "webhooks"


# The state's map: it starts here and doubles when a write does not fit, up to the ceiling
# (dead letters are ~80 bytes each: a dead endpoint at 2,000 events/s filled a fixed 64 MiB in
# about seven minutes, and then no event of it could be buried, nor the endpoint move on).
STATE_MAP_BYTES: Final = 64 << 20
STATE_MAP_BYTES_MAX: Final = 64 << 30


class DeliveryState:
    def __init__(
        self, path: str | Path, *, readonly: bool = False, map_size: int = STATE_MAP_BYTES
    ) -> None:
        Path(path).mkdir(mode=0o700, parents=True, exist_ok=True) if not readonly else None
        self.env = lmdb.open(
            str(path),
            map_size=map_size,
            max_dbs=8,
            sync=False,
            metasync=False,
            readonly=readonly,
            lock=True,
            mode=0o600,
        )
        create = not readonly
        self._positions = self.env.open_db(b"positions", create=create)
        self._dead = self.env.open_db(b"dead_letters", create=create)
        # endpoint + sequence -> b"from" (rewind to it) | b"one" (deliver that event again)
        self._replays = self.env.open_db(b"replays", create=create)
        # endpoint -> Disabled. Absent from state written before it existed: a reader sees
        # no endpoint disabled, the daemon (read-write) creates it.
        self._disabled: lmdb._Database | None = None
        try:
            self._disabled = self.env.open_db(b"disabled", create=create)
        except lmdb.NotFoundError:
            assert readonly
        self._encoder = msgspec.msgpack.Encoder()
        self._dead_decoder = msgspec.msgpack.Decoder(DeadLetter)
        self._disabled_decoder = msgspec.msgpack.Decoder(Disabled)

    def close(self) -> None:
        self.env.close()

    def position(self, endpoint: str) -> int:
        with self.env.begin() as txn:
            raw = txn.get(endpoint.encode(), db=self._positions)
        return 1 if raw is None else _U64.unpack(raw)[0]

    def advance(self, endpoint: str, next_sequence: int) -> None:
        with self.env.begin(write=True) as txn:
            txn.put(endpoint.encode(), _U64.pack(next_sequence), db=self._positions)

    def floor(self, endpoints: list[str]) -> int | None:
        """The lowest outbox sequence these endpoints still need: each one's next to deliver
        and its oldest dead letter (replayable). None without endpoints. Retention keeps every
        event from it on."""
        if not endpoints:
            return None
        needed = []
        with self.env.begin() as txn:
            for endpoint in endpoints:
                raw = txn.get(endpoint.encode(), db=self._positions)
                needed.append(1 if raw is None else _U64.unpack(raw)[0])
                prefix = endpoint.encode() + b"\x00"
                cursor = txn.cursor(db=self._dead)
                if cursor.set_range(prefix) and bytes(cursor.key()).startswith(prefix):
                    needed.append(_U64.unpack(bytes(cursor.key())[len(prefix) :])[0])
        return min(needed)

    def bury(self, endpoint: str, letter: DeadLetter) -> None:
        key = _key(endpoint, letter.sequence)
        encoded = self._encoder.encode(letter)
        while True:
            try:
                with self.env.begin(write=True) as txn:
                    txn.put(key, encoded, db=self._dead)
                return
            except lmdb.MapFullError:
                size = self.env.info()["map_size"]
                if size >= STATE_MAP_BYTES_MAX:
                    raise
                # No transaction of this process is open here (one thread, none held): the
                # map may change. Long-lived readers elsewhere adopt it (DeliveryFloor).
                self.env.set_mapsize(min(size * 2, STATE_MAP_BYTES_MAX))

    def dead_letters(self, endpoint: str) -> list[DeadLetter]:
        prefix = endpoint.encode() + b"\x00"
        letters: list[DeadLetter] = []
        with self.env.begin() as txn:
            cursor = txn.cursor(db=self._dead)
            if cursor.set_range(prefix):
                for key, value in cursor:
                    if not bytes(key).startswith(prefix):
                        break
                    letters.append(self._dead_decoder.decode(value))
        return letters

    def expire_dead_letters(self, endpoint: str, before_ms: int, limit: int) -> int:
        """Forget up to `limit` of the endpoint's oldest dead letters that died before
        `before_ms`, in sequence order, stopping at the first younger one; how many.

        A dead letter holds retention's floor (its event stays replayable), so one kept for
        ever kept every later event of the ledger for ever: a single failed delivery, or a
        dead endpoint's thousands a second, grew the ledger without bound."""
        prefix = endpoint.encode() + b"\x00"
        expired = 0
        with self.env.begin(write=True) as txn:
            cursor = txn.cursor(db=self._dead)
            found = cursor.set_range(prefix)
            while found and expired < limit and bytes(cursor.key()).startswith(prefix):
                if self._dead_decoder.decode(cursor.value()).dead_ms >= before_ms:
                    break
                found = cursor.delete()  # moves to the next record
                expired += 1
        return expired

    def is_dead_letter(self, endpoint: str, sequence: int) -> bool:
        with self.env.begin() as txn:
            return txn.get(_key(endpoint, sequence), db=self._dead) is not None

    def forget_dead_letter(self, endpoint: str, sequence: int) -> None:
        with self.env.begin(write=True) as txn:
            txn.delete(_key(endpoint, sequence), db=self._dead)

    def request_replay(self, endpoint: str, sequence: int, kind: str) -> None:
        assert kind in ("from", "one"), kind
        with self.env.begin(write=True) as txn:
            key = _key(endpoint, sequence)
            if kind == "one" and txn.get(key, db=self._replays) == b"from":
                return  # a rewind from it delivers it again anyway; overwritten, it was lost
            txn.put(key, kind.encode(), db=self._replays)

    def has_replays(self, endpoint: str) -> bool:
        """Whether replay requests wait for the endpoint (a read, no lock)."""
        prefix = endpoint.encode() + b"\x00"
        with self.env.begin() as txn:
            cursor = txn.cursor(db=self._replays)
            return bool(cursor.set_range(prefix)) and bytes(cursor.key()).startswith(prefix)

    def take_replays(self, endpoint: str) -> list[tuple[int, str]]:
        """Replay requests for the endpoint, oldest sequence first; removed as they are taken."""
        prefix = endpoint.encode() + b"\x00"
        taken: list[tuple[int, str]] = []
        if not self.has_replays(endpoint):  # a read first, no lock
            return taken
        with self.env.begin(write=True) as txn:
            cursor = txn.cursor(db=self._replays)
            if cursor.set_range(prefix):
                while bytes(cursor.key()).startswith(prefix):
                    key = bytes(cursor.key())
                    taken.append(
                        (_U64.unpack(key[len(prefix) :])[0], bytes(cursor.value()).decode())
                    )
                    if not cursor.delete():
                        break
        return taken

    def disable(self, endpoint: str, why: Disabled) -> Disabled:
        """Mark the endpoint disabled; an endpoint already disabled keeps its first reason,
        which is returned."""
        assert self._disabled is not None, "a read-only state cannot disable"
        with self.env.begin(write=True) as txn:
            raw = txn.get(endpoint.encode(), db=self._disabled)
            if raw is not None:
                return self._disabled_decoder.decode(raw)
            txn.put(endpoint.encode(), self._encoder.encode(why), db=self._disabled)
        return why

    def disabled(self, endpoint: str) -> Disabled | None:
        if self._disabled is None:
            return None
        with self.env.begin() as txn:
            raw = txn.get(endpoint.encode(), db=self._disabled)
        return None if raw is None else self._disabled_decoder.decode(raw)

    def enable(self, endpoint: str) -> Disabled | None:
        """Enable the endpoint again; what had disabled it, or None if it was not."""
        assert self._disabled is not None, "a read-only state cannot enable"
        with self.env.begin(write=True) as txn:
            raw = txn.get(endpoint.encode(), db=self._disabled)
            if raw is None:
                return None
            txn.delete(endpoint.encode(), db=self._disabled)
        return self._disabled_decoder.decode(raw)


class DeliveryFloor:
    """`DeliveryState.floor` for the configured endpoints, read at most once per
    `limits.delivery_floor_refresh_seconds` (retention asks in every batch). Until the
    delivery process has made its state, nothing is delivered: the floor is 1."""

    def __init__(self, config: Config, clock: Callable[[], float] = time.monotonic) -> None:
        self._path = state_path(config)
        self._endpoints = [endpoint.name for endpoint in config.webhooks.endpoints]
        self._clock = clock
        self._state: DeliveryState | None = None
        self._read_at: float | None = None
        self._floor: int | None = None if not self._endpoints else 1
        self._warned_at: float | None = None

    def __call__(self) -> int | None:
        if not self._endpoints:
            return None
        now = self._clock()
        if (
            self._read_at is not None
            and now - self._read_at < limits.delivery_floor_refresh_seconds
        ):
            return self._floor
        self._read_at = now
        try:
            floor = self._read(lambda state: state.floor(self._endpoints))
            if floor is not None:
                self._floor = floor
        except lmdb.Error as error:
            # Unreadable now (being created, damaged): as if nothing were delivered, so no
            # event is pruned meanwhile. Never an error for the batch asking.
            self._floor = 1
            if self._warned_at is None or now - self._warned_at >= 60:
                self._warned_at = now
                log.warning(
                    "webhook delivery state %s unreadable (%s): events kept", self._path, error
                )
        return self._floor

    def _read(self, read: Callable[[DeliveryState], _T]) -> _T | None:
        """`read` of the delivery process's state; None before that process has made it."""
        if self._state is None and (self._path / "data.mdb").exists():
            # The smallest map: LMDB takes the file's own size when it is larger, and this
            # reader then follows the delivery process's growth (MapResizedError below).
            self._state = DeliveryState(self._path, readonly=True, map_size=1 << 20)
        if self._state is None:
            return None
        try:
            return read(self._state)
        except lmdb.MapResizedError:
            # The delivery process grew the map: adopt its size, read again.
            self._state.env.set_mapsize(0)
            return read(self._state)

    def stored_samples(self, ledger: Ledger) -> list[Sample]:
        """Each endpoint's backlog gauges as the delivery process reports them, computed here
        from the positions it stored: /metrics shows these while that process is down (an
        outage of delivery is when an SRE looks at its backlog). Its stored position trails
        its own by at most a state write, so the backlog may read a few events high."""

        def read(state: DeliveryState) -> list[tuple[str, int, bool]]:
            return [
                (name, state.position(name), state.disabled(name) is not None)
                for name in self._endpoints
            ]

        try:
            stored = self._read(read)
            if stored is None:
                stored = [(name, 1, False) for name in self._endpoints]  # nothing delivered yet
            now = time.time()
            with ledger.read() as reader:
                backlogs = [backlog_at(reader, position, now) for _, position, _ in stored]
        except lmdb.Error:
            return []  # unreadable now: no backlog shown rather than a wrong one
        samples: list[Sample] = []
        for (name, _, disabled), (waiting, age) in zip(stored, backlogs, strict=True):
            labels = (("endpoint", name),)
            for family, value in (
                ("processor_outbox_backlog", waiting),
                ("processor_outbox_oldest_undelivered_seconds", age),
                ("processor_webhook_endpoint_disabled", 1.0 if disabled else 0.0),
            ):
                samples.append((family, family, labels, value))  # a gauge's sample: its family
        return samples

    def close(self) -> None:
        if self._state is not None:
            self._state.close()


def backlog_at(reader: Reader, position: int, now: float) -> tuple[float, float]:
    """(events from `position` on, age in seconds of the one at `position`): an endpoint's
    backlog when `position` is the next event it is to get, at wall time `now`."""
    last = reader.outbox_last_sequence()
    waiting = reader.outbox(position, 1) if last >= position else []
    age = now - waiting[0].created_ms / 1000 if waiting else 0.0
    return float(max(0, last - position + 1)), max(0.0, age)
