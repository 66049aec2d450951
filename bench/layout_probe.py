"""What a record layout costs LMDB per approval, before the ledger is rewritten for it (issue 9).

Writes the key and value pattern of an approval straight to LMDB, with no processor code, in two
layouts, and reports for each: pages (bytes handed to write system calls, /proc/self/io `wchar`)
and wall time per synced commit of one approval (a quiet hour: every batch is one request),
the same per approval in batches of 256 (a busy one), and the file's pages in use per approval.

- `schema3`: today's (processor/ledger/store.py, schema 3): the account and the card's state
  beside it, an answer under field 7 first, an RRN index entry, a hold appended by id, a
  hold-expiry entry, an outbox record appended by sequence, and the two sequence counters in
  `meta`: nine B-trees counting LMDB's own (main and free list).
- `unified`: one authorisation record appended under a sequence (answer, hold and event facts
  in one value), and one index tree holding the identity, the RRN and the hold's expiry under
  one-byte prefixes: the account and card state as before; five trees with LMDB's own.
- `single`: the unified layout with the accounts in the same tree too (one B-tree, prefixes):
  whether the count of trees or the count of places written is what a commit pays for.

Value sizes are today's payloads from `bench/ledger_bytes.py` (answers 249 B, outbox 171,
holds 125, account and card state 40 and 90); the unified record is given 360 B (the three
without what they repeat: identities, account and card ids, amounts and times). Keys are
spread as the daemon sees them: 10,000 accounts drawn at random, 200 acquirers, random STANs,
field 7 moving one second per 256 approvals, Visa-style RRNs (time prefix and a sequence).

    python bench/layout_probe.py [--history 200000] [--lone 300] [--batches 40]

Bounded by its arguments; writes only a temporary directory.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import struct
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import lmdb

U64 = struct.Struct(">Q")
ACCOUNTS = 10_000
BATCH = 256
HOLD_LIFETIME_MS = 7 * 86_400_000
START_MS = 1_795_486_000_000  # 2026-11-24

Put = Callable[[lmdb.Transaction, int], None]


def written_bytes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    return 0


class Workload:
    """The n-th approval's keys, the same for both layouts."""

    def __init__(self, seed: int) -> None:
        self.draw = random.Random(seed)

    def approval(self, n: int) -> tuple[bytes, bytes, bytes, bytes, int]:
        draw = self.draw
        account = f"acct-{draw.randrange(ACCOUNTS):06d}".encode()
        second = n // BATCH
        field7 = f"{1124120000 + second:010d}".encode()
        identity = b"|".join(
            (
                field7,
                b"0100",
                f"{400_000 + draw.randrange(200)}".encode(),
                b"%06d" % draw.randrange(10**6),
            )
        )
        rrn = f"633012{n:06d}".encode()[-12:] + b"|" + identity[-13:]
        now_ms = START_MS + second * 1000
        return account, identity, rrn, account + b"\x00card", now_ms


def schema3(env: lmdb.Environment) -> Put:
    names = ("accounts", "answers", "rrn_index", "holds", "hold_expiry", "outbox", "meta")
    dbs = {name: env.open_db(name.encode()) for name in names}
    work = Workload(8583)

    def put(txn: lmdb.Transaction, n: int) -> None:
        account, identity, rrn, card_state, now_ms = work.approval(n)
        txn.put(account, os.urandom(40), db=dbs["accounts"])
        txn.put(card_state, os.urandom(90), db=dbs["accounts"])
        txn.put(identity, os.urandom(249), db=dbs["answers"])
        txn.put(rrn, identity, db=dbs["rrn_index"])
        hold = U64.pack(n + 1)
        txn.put(hold, os.urandom(125), db=dbs["holds"], append=True)
        txn.put(U64.pack(now_ms + HOLD_LIFETIME_MS) + hold, b"", db=dbs["hold_expiry"])
        txn.put(U64.pack(n + 1), os.urandom(171), db=dbs["outbox"], append=True)
        txn.put(b"seq:hold", hold, db=dbs["meta"])
        txn.put(b"seq:event", hold, db=dbs["meta"])

    return put


def unified(env: lmdb.Environment) -> Put:
    accounts = env.open_db(b"accounts")
    log = env.open_db(b"log")
    index = env.open_db(b"index")
    work = Workload(8583)

    def put(txn: lmdb.Transaction, n: int) -> None:
        account, identity, rrn, card_state, now_ms = work.approval(n)
        sequence = U64.pack(n + 1)
        txn.put(account, os.urandom(40), db=accounts)
        txn.put(card_state, os.urandom(90), db=accounts)
        txn.put(sequence, os.urandom(360), db=log, append=True)
        txn.put(b"i" + identity, sequence, db=index)
        txn.put(b"r" + rrn, sequence, db=index)
        txn.put(b"x" + U64.pack(now_ms + HOLD_LIFETIME_MS) + sequence, b"", db=index)

    return put


def single(env: lmdb.Environment) -> Put:
    tree = env.open_db(b"ledger")
    work = Workload(8583)

    def put(txn: lmdb.Transaction, n: int) -> None:
        account, identity, rrn, card_state, now_ms = work.approval(n)
        sequence = U64.pack(n + 1)
        txn.put(b"a" + account, os.urandom(40), db=tree)
        txn.put(b"a" + card_state, os.urandom(90), db=tree)
        txn.put(b"l" + sequence, os.urandom(360), db=tree)
        txn.put(b"i" + identity, sequence, db=tree)
        txn.put(b"r" + rrn, sequence, db=tree)
        txn.put(b"x" + U64.pack(now_ms + HOLD_LIFETIME_MS) + sequence, b"", db=tree)

    return put


def measure(name: str, make: Callable[[lmdb.Environment], Put], args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="layout_probe-") as scratch:
        env = lmdb.open(scratch, map_size=8 << 30, max_dbs=16, sync=True, metasync=True)
        put = make(env)
        n = 0
        # History first, in large unsynced commits: the trees' depth is what a ledger that has
        # served a while has.
        while n < args.history:
            with env.begin(write=True) as txn:
                for _ in range(min(10_000, args.history - n)):
                    put(txn, n)
                    n += 1
            env.sync(True)

        def commits(count: int, size: int) -> tuple[list[float], list[int]]:
            nonlocal n
            seconds, written = [], []
            for _ in range(count):
                before, started = written_bytes(), time.perf_counter()
                with env.begin(write=True) as txn:
                    for _ in range(size):
                        put(txn, n)
                        n += 1
                seconds.append((time.perf_counter() - started) / size)
                written.append((written_bytes() - before) // size)
            return seconds, written

        lone_seconds, lone_written = commits(args.lone, 1)
        pages_before, approvals_before = env.info()["last_pgno"], n
        batch_seconds, batch_written = commits(args.batches, BATCH)
        pages = env.info()["last_pgno"] - pages_before
        growth = pages * 4096 / (n - approvals_before)
        env.close()
    print(
        f"| {name} | {statistics.median(lone_written) / 1024:.1f} | "
        f"{statistics.median(lone_seconds) * 1e6:.0f} | "
        f"{statistics.median(batch_written) / 1024:.2f} | "
        f"{statistics.median(batch_seconds) * 1e6:.1f} | {growth:.0f} |",
        flush=True,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--history", type=int, default=200_000)
    parser.add_argument("--lone", type=int, default=300, help="synced commits of one approval")
    parser.add_argument("--batches", type=int, default=40, help="synced commits of 256")
    parser.add_argument("--rounds", type=int, default=2, help="each layout, alternated")
    args = parser.parse_args()
    print(
        "| layout | lone commit: KiB written | lone commit: us | batch of 256: KiB written per "
        "approval | batch of 256: us per approval | file bytes per approval |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for _ in range(args.rounds):
        measure("schema3", schema3, args)
        measure("unified", unified, args)
        measure("single", single, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
