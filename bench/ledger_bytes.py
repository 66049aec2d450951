"""Bytes the ledger grows by per approval, per database, on any tree.

Loads N cards on N accounts into a scratch ledger (durability process: the pages written are
the same, the run is faster), approves `batches` batches of 256 distinct 0100s through
`Authorizer.authorize_batch` (compare_batch.py's requests), and prints, per database that grew,
its new entries and the bytes of its pages (leaf, branch, overflow), its payload (keys and
values) and how full its pages are, and the whole file's growth (pages in use). Bounded by
`batches`; no network.

    python bench/ledger_bytes.py 3907          # 1,000,192 approvals over 10,000 cards
    PYTHONPATH=/tmp/base python bench/ledger_bytes.py 200 10000
"""

from __future__ import annotations

import itertools
import random
import sys
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

from compare_batch import BATCH, fresh_requests, load_file, pan_of, rules  # bench/ is on sys.path

from processor.authorizer import Authorizer
from processor.ledger.load import load_path
from processor.ledger.store import Ledger
from processor.security import PanHasher
from processor.wire.codec import Codec
from processor.wire.spec import load_spec

Sizes = dict[str, tuple[int, int, int]]  # database -> (entries, page bytes, payload bytes)


def sizes(ledger: Ledger) -> tuple[Sizes, int]:
    """Per database (entries, bytes of its pages, bytes of its keys and values); pages in use."""
    found: Sizes = {}
    with ledger.env.begin() as txn:
        for name, db in ledger._dbs.items():
            stat = txn.stat(db)
            pages = stat["leaf_pages"] + stat["branch_pages"] + stat["overflow_pages"]
            payload = sum(len(key) + len(value) for key, value in txn.cursor(db=db))
            found[name] = (stat["entries"], pages * stat["psize"], payload)
    info, stat = ledger.env.info(), ledger.env.stat()
    return found, (info["last_pgno"] + 1) * stat["psize"]


def main() -> int:
    batches = int(sys.argv[1])
    cards = int(sys.argv[2]) if len(sys.argv) > 2 else 10_000
    pans = [pan_of(index) for index in range(cards)]
    draw = random.Random(9)
    codec, hasher = Codec(load_spec()), PanHasher(b"bench-key")
    stans = itertools.count(1)
    now = datetime(2026, 11, 24, 12, tzinfo=UTC)
    with tempfile.TemporaryDirectory() as scratch:
        source = Path(scratch) / "ledger.toml"
        source.write_text(load_file(pans))
        ledger = Ledger(Path(scratch) / "ledger", durability="process", map_size_bytes=32 << 30)
        load_path(ledger, source, hasher)
        authorizer = Authorizer(ledger, hasher, rules(), hold_lifetime_seconds=604800)
        before, used_before = sizes(ledger)
        for round_index in range(batches):
            requests = fresh_requests(codec, stans, BATCH, pans, draw)
            outcomes = authorizer.authorize_batch(
                requests, now + timedelta(seconds=2 * round_index)
            )
            assert all(o.response_code == "00" for o in outcomes), {o.reason for o in outcomes}
        after, used_after = sizes(ledger)
        ledger.close()
    approvals = batches * BATCH
    print(
        f"{approvals} approvals over {cards} cards: the file's pages grew "
        f"{(used_after - used_before) / approvals:.0f} bytes per approval"
    )
    print("| database | new entries | page bytes per approval | payload bytes | pages full |")
    print("| --- | --- | --- | --- | --- |")
    for name, (entries, pages, payload) in after.items():
        entries_before, pages_before, payload_before = before[name]
        if pages == pages_before and payload == payload_before:
            continue
        grown_pages, grown_payload = pages - pages_before, payload - payload_before
        print(
            f"| {name} | {entries - entries_before} | {grown_pages / approvals:.0f} | "
            f"{grown_payload / approvals:.0f} | {grown_payload / max(1, grown_pages):.0%} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
