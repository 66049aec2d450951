"""What one approval costs when it is alone in its batch: the quiet-hour case (issue 9, point 3).

At low rates every batch holds one request, so each approval pays a whole synced commit: LMDB
copies the path from the root to every leaf it touches, in every B-tree it writes, and writes
them all before the fdatasync. This loads N cards on N accounts, writes `history` approvals in
batches of 256 (durability process, so the trees have a realistic depth), then reopens the
ledger with fsync and approves `lone` distinct 0100s one per batch, on cards drawn at random.

Printed: wall time per lone approval (median, p90, p99), CPU per lone approval, and, with
--strace (strace attached to this process for a second pass of `lone` approvals), the bytes and
write system calls LMDB issues per commit and the fdatasyncs. Bounded by its arguments; no
network.

    python bench/lone_commit.py --history 200000 --lone 2000 --strace
    PYTHONPATH=/tmp/base python /tmp/base/bench/lone_commit.py ...   # another tree
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from compare_batch import BATCH, fresh_requests, load_file, pan_of, rules  # bench/ is on sys.path

from processor.authorizer import Authorizer
from processor.ledger.load import load_path
from processor.ledger.store import Ledger
from processor.security import PanHasher
from processor.wire.codec import Codec
from processor.wire.spec import load_spec

WRITE_CALL = re.compile(r"^\d+\s+(pwrite64|pwritev|pwritev2|writev|write)\(.*\)\s+=\s+(\d+)$")
SYNC_CALL = re.compile(r"^\d+\s+(fdatasync|fsync|msync)\(")


def lone_approvals(
    authorizer: Authorizer,
    codec: Codec,
    count: int,
    stans: itertools.count[int],
    pans: list[str],
    draw: random.Random,
    now: datetime,
) -> list[float]:
    """Seconds per approval, each in a batch of its own."""
    spent = []
    for index in range(count):
        [request] = fresh_requests(codec, stans, 1, pans, draw)
        started = time.perf_counter()
        [outcome] = authorizer.authorize_batch([request], now + timedelta(milliseconds=index))
        spent.append(time.perf_counter() - started)
        assert outcome.response_code == "00", outcome.reason
    return spent


def traced(run: Callable[[], object], trace_file: Path) -> tuple[int, int, int]:
    """(bytes written, write calls, syncs) while `run` runs, counted by strace."""
    tracer = subprocess.Popen(
        [
            "strace",
            "-f",
            "-q",
            "-p",
            str(os.getpid()),
            "-o",
            str(trace_file),
            "-e",
            "trace=pwrite64,pwritev,pwritev2,writev,write,fdatasync,fsync,msync",
        ],
        stderr=subprocess.DEVNULL,
    )
    time.sleep(1.0)  # attach
    run()
    time.sleep(0.2)
    tracer.terminate()
    tracer.wait(timeout=10)
    written = calls = syncs = 0
    for line in trace_file.read_text().splitlines():
        if (match := WRITE_CALL.match(line)) is not None:
            written += int(match.group(2))
            calls += 1
        elif SYNC_CALL.match(line):
            syncs += 1
    return written, calls, syncs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cards", type=int, default=10_000)
    parser.add_argument("--history", type=int, default=200_000, help="approvals before")
    parser.add_argument("--lone", type=int, default=2_000, help="lone approvals measured")
    parser.add_argument("--strace", action="store_true", help="count LMDB's writes per commit")
    options = parser.parse_args()
    pans = [pan_of(index) for index in range(options.cards)]
    draw = random.Random(11)
    codec, hasher = Codec(load_spec()), PanHasher(b"bench-key")
    stans = itertools.count(1)
    now = datetime(2026, 11, 24, 12, tzinfo=UTC)
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as scratch:
        source = Path(scratch) / "ledger.toml"
        source.write_text(load_file(pans))
        path = Path(scratch) / "ledger"
        ledger = Ledger(path, durability="process", map_size_bytes=8 << 30)
        load_path(ledger, source, hasher)
        authorizer = Authorizer(ledger, hasher, rules(), hold_lifetime_seconds=604800)
        for round_index in range(-(-options.history // BATCH)):
            requests = fresh_requests(codec, stans, BATCH, pans, draw)
            authorizer.authorize_batch(requests, now + timedelta(seconds=2 * round_index))
        ledger.close()
        now += timedelta(days=1)
        ledger = Ledger(path, durability="fsync", map_size_bytes=8 << 30)
        authorizer = Authorizer(ledger, hasher, rules(), hold_lifetime_seconds=604800)
        cpu = time.process_time()
        spent = lone_approvals(authorizer, codec, options.lone, stans, pans, draw, now)
        cpu = time.process_time() - cpu
        quantiles = statistics.quantiles(spent, n=100)
        print(
            f"{options.lone} lone approvals after {options.history} over {options.cards} cards, "
            f"fsync: wall us median {statistics.median(spent) * 1e6:.0f} p90 "
            f"{quantiles[89] * 1e6:.0f} p99 {quantiles[98] * 1e6:.0f}; CPU us per approval "
            f"{cpu / options.lone * 1e6:.0f}"
        )
        if options.strace:
            later = now + timedelta(hours=1)
            written, calls, syncs = traced(
                lambda: lone_approvals(authorizer, codec, options.lone, stans, pans, draw, later),
                Path(scratch) / "trace.txt",
            )
            print(
                f"per lone commit: {written / options.lone / 1024:.1f} KiB written in "
                f"{calls / options.lone:.1f} write calls ({written / options.lone / 4096:.1f} "
                f"pages), {syncs / options.lone:.2f} syncs"
            )
        ledger.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
