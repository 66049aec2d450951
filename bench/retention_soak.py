"""Soak: millions of mixed authorisations with retention horizons of simulated seconds, to
show that the ledger stops growing once the horizons are reached and that throughput holds.

In-process (no network, so the loop is the ledger's own): N cards on N accounts, batches of 256
through `Authorizer.run_batch` with the daemon's upkeep in each batch (holds released as they
expire, a retention step), as the daemon's primary runs them. About 85 % 0100, 5 % 0200, 5 %
0400 full reversals and 5 % 0220 completions of recent approvals (by field 90), every identity
new. Time is simulated: the clock moves 1 s per `--rate` requests, so horizons of simulated
seconds are reached after a predictable number of requests whatever this machine's speed.

Every `--report-every` requests it prints: requests so far, simulated time, data.mdb's size,
the pages in use, the answers and events kept, and the wall-clock throughput of the interval.
Bounded by --requests and --time-limit.

    python bench/retention_soak.py --requests 20000000
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
import sys
import tempfile
import time
from collections import deque
from datetime import UTC, datetime, timedelta
from pathlib import Path

from compare_batch import BATCH, load_file, pan_of, rules  # bench/ is on sys.path

from processor.authorizer import Authorizer
from processor.config import RetentionConfig
from processor.ledger.load import load_path
from processor.ledger.retention import Retention
from processor.ledger.store import Ledger
from processor.security import PanHasher
from processor.wire.codec import Codec
from processor.wire.messages import AuthorizationRequest, rrn_key
from processor.wire.spec import load_spec

START = datetime(2026, 11, 24, 0, 0, tzinfo=UTC)


class Traffic:
    """Mixed requests, each with an identity of its own; reversals and completions refer to
    recent approvals by field 90."""

    def __init__(self, pans: list[str], codec: Codec, seed: int) -> None:
        self.pans, self.codec, self.draw = pans, codec, random.Random(seed)
        self.counter = itertools.count(1)
        self.recent: deque[dict[str, str]] = deque(maxlen=20_000)  # approved 0100s

    def batch(self, now: datetime, count: int) -> list[AuthorizationRequest]:
        stamp = now.strftime("%m%d%H%M%S")
        requests = []
        for _ in range(count):
            roll = self.draw.random()
            if roll < 0.05 and self.recent:
                fields = self.follow_up("0400", self.recent.popleft(), stamp)
            elif roll < 0.10 and self.recent:
                fields = self.follow_up("0220", self.recent.popleft(), stamp)
            else:
                fields = self.new("0200" if roll < 0.15 else "0100", stamp)
            request = self.codec.decode(self.codec.encode(fields))
            assert isinstance(request, AuthorizationRequest)
            requests.append(request)
        return requests

    def identity(self, stamp: str) -> dict[str, str]:
        number = next(self.counter)
        return {
            "7": stamp,
            "11": f"{number * 7_919 % 1_000_000:06d}",
            "32": f"{400_000 + number % 997}",
            "37": f"{number % 10**12:012d}",
        }

    def new(self, mti: str, stamp: str) -> dict[str, str]:
        return {
            "t": mti,
            "2": self.draw.choice(self.pans),
            "3": "000000",
            "4": "000000000100",
            "18": "5411",
            "22": "051",
            "25": "00",
            "41": "TERM0001",
            "43": f"{'SOAK SHOP':<25}{'BERLIN':<13}DE",
            "49": "978",
            **self.identity(stamp),
        }

    def follow_up(self, mti: str, original: dict[str, str], stamp: str) -> dict[str, str]:
        fields = dict(original, t=mti, **self.identity(stamp))
        fields["90"] = f"0100{original['11']}{original['7']}{original['32']:0>11}{'0' * 11}"
        return fields


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20_000_000)
    parser.add_argument("--cards", type=int, default=10_000)
    parser.add_argument("--rate", type=int, default=10_000, help="requests per simulated second")
    parser.add_argument("--hold-seconds", type=int, default=30)
    parser.add_argument("--answers-seconds", type=int, default=60)
    parser.add_argument("--events-seconds", type=int, default=30)
    parser.add_argument("--report-every", type=int, default=1_000_000)
    parser.add_argument("--time-limit", type=float, default=3600.0, help="wall seconds, at most")
    parser.add_argument("--durability", default="process", choices=("fsync", "process"))
    parser.add_argument("--scratch", default=os.environ.get("BENCH_TMP"))
    args = parser.parse_args()
    pans = [pan_of(index) for index in range(args.cards)]
    codec, hasher = Codec(load_spec()), PanHasher(b"bench-key")
    traffic = Traffic(pans, codec, seed=12)
    config = RetentionConfig(
        answers_seconds=args.answers_seconds,
        events_seconds=args.events_seconds,
        clearing_seconds=args.answers_seconds,
    )
    print(
        f"{args.requests} requests over {args.cards} cards, {args.rate} per simulated second, "
        f"durability {args.durability}; holds {args.hold_seconds} s, answers "
        f"{args.answers_seconds} s, events {args.events_seconds} s"
    )
    print(
        "| requests | simulated s | data.mdb MiB | pages in use MiB | of them free MiB | "
        "MiB of answers, outbox, accounts (card states) | answers | events | approved | "
        "wall s | requests/s (interval) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |", flush=True)
    with tempfile.TemporaryDirectory(dir=args.scratch) as scratch:
        source = Path(scratch) / "ledger.toml"
        source.write_text(load_file(pans))
        path = Path(scratch) / "ledger"
        ledger = Ledger(
            path,
            durability=args.durability,
            map_size_bytes=1 << 30,
            map_size_max_bytes=64 << 30,
        )
        # At the simulated start: the load's events (a funding per account) are the outbox's
        # first, and the outbox is cut from its start, so they must age on the same clock.
        load_path(ledger, source, hasher, now_ms=int(START.timestamp() * 1000))
        authorizer = Authorizer(
            ledger,
            hasher,
            rules(),
            hold_lifetime_seconds=args.hold_seconds,
            hold_lifetime_by_mcc={},
            retention=Retention(config, rrn_key),
            expire_in_batches=True,
        )
        started = interval_started = time.perf_counter()
        sent = approved = since_report = 0
        while sent < args.requests and time.perf_counter() - started < args.time_limit:
            now = START + timedelta(seconds=sent / args.rate)
            requests = traffic.batch(now, min(BATCH, args.requests - sent))
            outcomes, _ = authorizer.run_batch(requests, (), now)
            for request, outcome in zip(requests, outcomes, strict=True):
                if request.mti == "0100" and outcome.response_code == "00":
                    approved += 1
                    traffic.recent.append(request_fields(request))
                elif outcome.response_code not in ("00", "25"):
                    raise SystemExit(f"{request.mti}: {outcome.response_code} {outcome.reason}")
            sent += len(requests)
            since_report += len(requests)
            if since_report >= args.report_every or sent >= args.requests:
                elapsed = time.perf_counter() - interval_started
                report(ledger, sent, sent / args.rate, approved, started, since_report / elapsed)
                interval_started, since_report = time.perf_counter(), 0
        ledger.close()
    return 0


def request_fields(request: AuthorizationRequest) -> dict[str, str]:
    """What a follow-up copies of its original (and field 90 names)."""
    return {
        "2": request.pan,
        "3": request.processing_code,
        "4": f"{request.amount or 0:012d}",
        "7": request.transmission_datetime,
        "11": request.stan,
        "18": request.mcc,
        "22": "051",
        "25": "00",
        "32": request.acquirer,
        "41": "TERM0001",
        "49": "978",
    }


def report(
    ledger: Ledger, sent: int, simulated: float, approved: int, started: float, rate: float
) -> None:
    used, _ = ledger.map_usage()
    file_bytes = (ledger.path / "data.mdb").stat().st_size
    stats = ledger.stats()
    entries = {each.name: each.entries for each in stats}
    sizes = {each.name: each.bytes / 2**20 for each in stats}
    # Pages below the high-water mark that no database holds: LMDB's free list (reused by
    # later transactions) and its two meta pages.
    free = used - sum(each.bytes for each in stats)
    print(
        f"| {sent:,} | {simulated:,.0f} | {file_bytes / 2**20:,.0f} | {used / 2**20:,.0f} | "
        f"{free / 2**20:,.0f} | {sizes['answers']:,.0f}, {sizes['outbox']:,.0f}, "
        f"{sizes['accounts']:,.0f} | "
        f"{entries['answers']:,} | {entries['outbox']:,} | {approved:,} | "
        f"{time.perf_counter() - started:,.0f} | {rate:,.0f} |",
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
