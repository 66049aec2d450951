"""The write-ahead log: a batch is durable once its changes are here, before LMDB has them.

Why: LMDB makes a commit durable with two device flushes, an fdatasync of every page the
commit copied (17 scattered pages for one approval) and then a synchronous write of its meta
page. Measured on this VM (bench/RESULTS.md, 2026-12-07 eighth session): about 300 us and
140 us, 510 us per lone commit with the writes, against about 140 us for one contiguous write
and one fdatasync. So a batch's changes (the keys and values its transaction put and deleted,
never a PAN or a CVC2: the ledger holds neither) are written here in one record and flushed
once; the answers leave; LMDB's durable commit (a checkpoint) follows within
`ledger.checkpoint_seconds`, for every batch since the last one together.

The file is preallocated and rewritten from its start after every checkpoint. A record:

    payload length (u32) | CRC-32 of epoch, generation and payload (u32) | generation (u64)
    | payload

Each checkpoint's LMDB transaction stores the generation its records carry (`wal_generation`
in the meta database). Recovery replays, in order, the records of the generation after the
one LMDB has, from the start of the file up to the first record that is not of that
generation or whose checksum fails (a torn write, or an older generation's record beyond the
newest one's end). Replaying is idempotent: the records hold the values written, not deltas.

Generations count checkpoints, so they repeat: a backup restored over a ledger whose log is
still there, or another ledger's log copied beside one, holds records numbered as the ones
the ledger goes on to write. Those were replayed (batches of a discarded past applied over
the restored state) or, beside the new ones, taken for a corrupt device. So the daemon draws
a random epoch (`wal_epoch` in meta) each time it opens the log, and the checksum covers it:
a record of another run of the log never passes for one of this run. A ledger from before
epochs has none (the checksum then covers generation and payload, as it did).
"""

from __future__ import annotations

import fcntl
import os
import struct
import time
import zlib
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path
from typing import Final

import msgspec

HEADER: Final = struct.Struct("<IIQ")
GENERATION: Final = struct.Struct("<Q")
FILL_CHUNK_BYTES: Final = 1 << 20
# A second logger is refused after this many tries this far apart (a reader's look holds a
# shared lock for a moment).
LOCK_ATTEMPTS: Final = 20
LOCK_RETRY_SECONDS: Final = 0.005

# One change: (database name, key, value), value None for a delete. Names rather than
# positions, so that a record written by one build replays into the same database in another.
Change = tuple[str, bytes, bytes | None]

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(list[Change])


def _checksum(epoch: bytes, generation: int, payload: bytes) -> int:
    """CRC-32 of the log's epoch and the record's generation and payload: a record of another
    run of the log or of another generation, or a torn one, does not pass."""
    return zlib.crc32(payload, zlib.crc32(epoch + GENERATION.pack(generation)))


def encode_changes(changes: list[Change]) -> bytes:
    return _encoder.encode(changes)


def decode_changes(payload: bytes) -> list[Change]:
    return _decoder.decode(payload)


class LogInUse(Exception):
    """Another live process logs this ledger's writes (holds the log's lock)."""


class WriteAheadLog:
    """The log file of one ledger, appended to by the one process that owns its writes: it
    holds an exclusive lock on the file while open (LogInUse for a second one), which also
    tells readers that records beyond the last checkpoint are not a crash's."""

    __slots__ = ("_fd", "_last_start", "_offset", "path", "size_bytes")

    def __init__(self, path: Path, size_bytes: int) -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            self._lock(path)
            if os.fstat(self._fd).st_size < size_bytes:
                # Real zeros, not a sparse or fallocated range: a flush of a write into a block
                # the file system has yet to allocate (or mark written) commits its journal too.
                self._fill(os.fstat(self._fd).st_size, size_bytes)
            # The file's name too, at every open (once per start): an opener that died after
            # creating it, before this, left an entry that may not be on disk yet.
            directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)
        except (OSError, LogInUse):
            os.close(self._fd)
            raise
        self.size_bytes = os.fstat(self._fd).st_size
        self._offset = self._last_start = 0

    def _lock(self, path: Path) -> None:
        """The exclusive lock, or LogInUse. A reader's look (`held`) takes a shared lock for
        a moment: waited out, a few times, rather than taken for a second logger."""
        for attempt in range(LOCK_ATTEMPTS):
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if attempt + 1 < LOCK_ATTEMPTS:
                    time.sleep(LOCK_RETRY_SECONDS)
        raise LogInUse(f"{path} is locked by another process")

    def _fill(self, start: int, end: int) -> None:
        zeros = bytes(FILL_CHUNK_BYTES)
        offset = start
        try:
            while offset < end:
                offset += os.pwrite(self._fd, zeros[: min(FILL_CHUNK_BYTES, end - offset)], offset)
            os.fsync(self._fd)
        except OSError:
            # A full disk or a file size limit: leave the file as it was (what it held before
            # is all below `start`), not hundreds of megabytes of zeros on the ledger's disk.
            os.ftruncate(self._fd, start)
            raise

    def append(self, generation: int, payload: bytes, epoch: bytes = b"") -> bool:
        """Write one record (not yet flushed: `sync`); False, writing nothing, when it does
        not fit in what is left of the file before the next checkpoint."""
        end = self._offset + HEADER.size + len(payload)
        if end > self.size_bytes:
            return False
        header = HEADER.pack(len(payload), _checksum(epoch, generation, payload), generation)
        written = os.pwritev(self._fd, [header, payload], self._offset)
        if written != end - self._offset:
            raise OSError(f"write-ahead log {self.path}: short write ({written} bytes)")
        self._last_start, self._offset = self._offset, end
        return True

    def discard_last(self) -> None:
        """After the last record's flush failed (its batch answered as failed): its header
        zeroed, so that no replay applies it: this process's own after a failed checkpoint,
        or a restart's if the zeros reach the disk. Best effort: the device failed once."""
        with suppress(OSError):
            os.pwrite(self._fd, bytes(HEADER.size), self._last_start)
        self._offset = self._last_start

    def sync(self) -> None:
        os.fdatasync(self._fd)

    def restart(self) -> None:
        """A new generation: its records start at the beginning."""
        self._offset = 0

    def close(self) -> None:
        os.close(self._fd)


def held(path: Path) -> bool:
    """Whether a live process logs into `path` now (holds its lock)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # and with it the shared lock, if it was taken
    return False


def first_generation(path: Path) -> int | None:
    """The generation of the record at the start of `path` (None: no file, or too short):
    what a process that does not log looks at before each write (Ledger.write)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        header = os.pread(fd, HEADER.size, 0)
    finally:
        os.close(fd)
    return HEADER.unpack(header)[2] if len(header) == HEADER.size else None


class CorruptLog(Exception):
    """A record of the generation fails its checksum and a whole one of it follows: the
    device changed what was flushed, not a crash's torn write."""

    def __init__(self, path: Path, generation: int, offset: int, follower: int) -> None:
        super().__init__(
            f"write-ahead log {path}: the record of generation {generation} at byte {offset} "
            f"is corrupt and a whole record of it follows at byte {follower}: the device "
            "changed batches that were flushed and answered. Replaying up to it would lose "
            f"the rest. Keep a copy of {path}; moving it aside opens the ledger without them"
        )


def records(
    path: Path, generation: int, epoch: bytes = b"", torn: list[int] | None = None
) -> Iterator[bytes]:
    """The payloads of `generation`'s records of the log's run `epoch` in `path`, in order
    (none when it is absent).

    They end at the first record that is not of `generation` or fails its checksum: a crash
    tears at most the last one (each is flushed before the next is written); where a record
    that says it is of `generation` ends them, its offset goes into `torn`. A record that
    passes its checksum after a failing one can only mean the device corrupted flushed data:
    CorruptLog, rather than a silent loss of every batch after it."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return
    offset = 0
    while offset + HEADER.size <= len(data):
        length, checksum, found = HEADER.unpack_from(data, offset)
        start = offset + HEADER.size
        if found != generation or start + length > len(data):
            break
        payload = data[start : start + length]
        if _checksum(epoch, found, payload) != checksum:
            break
        yield payload
        offset = start + length
    else:
        return  # the file ends with a whole record
    if found == generation and torn is not None:
        torn.append(offset)
    # A generation's records start at the beginning of the file, so one of them further on
    # means the record here was damaged, the first one too (a bit of its generation flipped
    # passed it over, and every batch after it with it). Without an epoch (a ledger from
    # before them) a record of another run may carry the same generation: only within the
    # generation's own records then.
    searched = bool(epoch) or offset > 0 or found == generation
    follower = _whole_record_after(data, offset, generation, epoch) if searched else None
    if follower is not None:
        raise CorruptLog(path, generation, offset, follower)


def _whole_record_after(data: bytes, offset: int, generation: int, epoch: bytes) -> int | None:
    """Where a record of `generation` that passes its checksum starts after `offset`, if one
    does: found by its generation's bytes (a C search), each candidate checked whole."""
    tag = GENERATION.pack(generation)
    at = data.find(tag, offset + 1 + 8)
    while at != -1:
        start = at - 8
        length, checksum = HEADER.unpack_from(data, start)[:2]
        end = start + HEADER.size + length
        payload = data[start + HEADER.size : end]
        if end <= len(data) and _checksum(epoch, generation, payload) == checksum:
            return start
        at = data.find(tag, at + 1)
    return None
