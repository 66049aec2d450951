"""Opening ledgers: read-only opens of a ledger from an older layout say what to do."""

from pathlib import Path

import lmdb
import pytest

from processor.ledger.store import Ledger, LedgerError


def test_read_only_open_of_an_older_ledger_explains(tmp_path: Path) -> None:
    # A ledger as an older version left it: some named databases only.
    env = lmdb.open(str(tmp_path), max_dbs=16, map_size=1 << 24)
    env.open_db(b"accounts")
    env.open_db(b"meta")
    env.close()
    with pytest.raises(LedgerError, match="open it read-write once"):
        Ledger(tmp_path, readonly=True)
    Ledger(tmp_path).close()  # a read-write open adds what is missing
    Ledger(tmp_path, readonly=True).close()


def test_a_new_ledger_is_its_owners_alone(tmp_path: Path) -> None:
    """data.mdb and lock.mdb were made 0644 in a 0755 directory: the cards' keyed hashes,
    sealed PANs and balances readable by every user of the machine."""
    path = tmp_path / "new" / "ledger"
    Ledger(path, durability="process", map_size_bytes=1 << 20).close()
    assert path.stat().st_mode & 0o777 == 0o700
    for name in ("data.mdb", "lock.mdb"):
        assert (path / name).stat().st_mode & 0o077 == 0, name
