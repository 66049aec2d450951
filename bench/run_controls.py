"""Authorisation cost with a realistic set of spend controls against none, in the same run.

Two ledgers that differ only in their controls: `none` (no controls at any level) and `ten`
(ten controls across programme, account and card that the load passes, so every request is
approved and every control is evaluated). Two measurements, each alternating the two ledgers so
drift on a shared machine hits both alike:

1. in process: `Authorizer.authorize_batch` of 256 fresh 0100s (decide + usage + hold + answer +
   outbox + commit), `--durability` process by default to see the CPU cost without fsync noise;
2. over the wire: the real daemon driven by `processor sim load` (open loop, HDR percentiles).

    python bench/run_controls.py --rounds 30 --rate 500 --duration 8

Bounded: fixed rounds, rate and duration; only 127.0.0.1.
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from compare_batch import PAN, fresh_requests
from run_load import BENCH_PAN_KEY, load, start_daemon

from processor.authorizer import Authorizer
from processor.engine import ProgrammeRules
from processor.ledger.load import load_path
from processor.ledger.store import Ledger
from processor.security import PanHasher
from processor.wire.codec import Codec
from processor.wire.spec import load_spec

BASE = """
[[accounts]]
id = "bench"
currency = "EUR"
balance = 100000000000000
"""
CARD = f"""
[[cards]]
pan = "{PAN}"
account = "bench"
expiry = "3012"
"""
# Ten controls, three levels; all pass for a 1.00 EUR grocery purchase by chip (field 22 = 05)
# at up to 1000 approvals a second (the trailing-window limit: 1000 in any second).
TEN = """
[programme_controls]
blocked_categories = ["gambling", "adult"]            # 1
channels = { ecommerce = true, magstripe = false }     # 2 (the load enters by chip: 051)
amount_limits = [                                      # 3
  { interval = "daily", amount = 100000000000, currency = "EUR" },
]
"""
TEN_ACCOUNT = """
controls.blocked_countries = ["KP", "IR"]                                         # 4
controls.amount_limits = [
  { interval = "monthly", amount = 1000000000000, currency = "EUR" },             # 5
]
controls.count_limits = [ { count = 100000000, interval = "daily" } ]             # 6
"""
TEN_CARD = """
controls.allowed_categories = ["groceries", "restaurants", "fuel", "transport"]   # 7
controls.amount_limits = [
  { interval = "per_authorization", amount = 10000000, currency = "EUR" },        # 8
  { interval = "weekly", amount = 1000000000000, currency = "EUR" },              # 9
]
controls.count_limits = [ { count = 1000, window_seconds = 1 } ]                  # 10
"""


def load_file(variant: str) -> str:
    if variant == "none":
        return BASE + CARD
    return TEN + BASE + TEN_ACCOUNT + CARD + TEN_CARD


def write_ledger(directory: Path, variant: str, hasher: PanHasher, durability: str) -> Ledger:
    source = directory / f"{variant}.toml"
    source.write_text(load_file(variant))
    ledger = Ledger(directory / variant, durability=durability)  # type: ignore[arg-type]
    load_path(ledger, source, hasher)
    return ledger


def in_process(rounds: int, batch: int, durability: str) -> dict[str, list[float]]:
    codec = Codec(load_spec())
    hasher = PanHasher(BENCH_PAN_KEY.encode())
    stans = itertools.count(1)
    now = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
    per_request: dict[str, list[float]] = {"none": [], "ten": []}
    codes: dict[str, dict[str, int]] = {"none": {}, "ten": {}}
    with tempfile.TemporaryDirectory() as scratch:
        ledgers = {v: write_ledger(Path(scratch), v, hasher, durability) for v in per_request}
        authorizers = {
            variant: Authorizer(
                ledger,
                hasher,
                ProgrammeRules(catalog=_catalog()),
                hold_lifetime_seconds=7 * 86400,
            )
            for variant, ledger in ledgers.items()
        }
        for round_index in range(rounds + 2):
            # 2 s between rounds: the card's 1000-per-second trailing window never trips.
            at = now + timedelta(seconds=2 * round_index)
            for variant in ("none", "ten") if round_index % 2 else ("ten", "none"):
                requests = fresh_requests(codec, stans, batch)
                started = time.perf_counter()
                outcomes = authorizers[variant].authorize_batch(requests, at)
                elapsed = time.perf_counter() - started
                for outcome in outcomes:
                    key = f"{outcome.response_code} {outcome.reason}"
                    codes[variant][key] = codes[variant].get(key, 0) + 1
                if round_index >= 2:  # warm-up rounds are not counted
                    per_request[variant].append(elapsed / batch * 1e6)
        for ledger in ledgers.values():
            ledger.close()
    for variant, seen in codes.items():
        print(f"  {variant}: answers {seen}")
        assert list(seen) == ["00 approved"], f"{variant}: not every request was approved: {seen}"
    return per_request


def _catalog():  # type: ignore[no-untyped-def]
    from processor.catalog import default_catalog

    return default_catalog()


def over_the_wire(rate: int, duration: float, connections: int, durability: str) -> None:
    print(f"\nover the wire: {rate}/s, {duration}s, {connections} connections, {durability}")
    print("| run | answered | p50 us | p90 us | p99 us | p99.9 us | max us | codes |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as scratch:
        daemons = {}
        hasher = PanHasher(BENCH_PAN_KEY.encode())
        for variant in ("none", "ten"):
            write_ledger(Path(scratch), variant, hasher, durability).close()
            config = f'[ledger]\ndurability = "{durability}"\n[log]\nlevel = "warning"\n'
            daemons[variant] = start_daemon(Path(scratch) / variant, config)
        try:
            for variant in ("none", "ten", "none", "ten"):
                _, port = daemons[variant]
                r = load(port, rate, duration, connections, "auth")
                lat = r["latency_us"]
                print(
                    f"| {variant} | {r['answered']}/{r['sent']} | {lat['p50']:.0f} | "
                    f"{lat['p90']:.0f} | {lat['p99']:.0f} | {lat['p99.9']:.0f} | "
                    f"{lat['max']:.0f} | {r.get('response_codes', '')} |",
                    flush=True,
                )
        finally:
            for process, _ in daemons.values():
                process.send_signal(signal.SIGTERM)
                process.wait(timeout=30)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--durability", default="process", choices=("fsync", "process"))
    parser.add_argument("--rate", type=int, default=500)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--wire-durability", default="fsync", choices=("fsync", "process"))
    parser.add_argument("--skip-wire", action="store_true")
    args = parser.parse_args()
    machine = f"{platform.platform()}, {os.cpu_count()} cores"
    print(f"machine: {machine}, Python {platform.python_version()}")
    print(
        f"in process: authorize_batch of {args.batch}, {args.rounds} rounds per ledger, "
        f"durability {args.durability}"
    )
    per_request = in_process(args.rounds, args.batch, args.durability)
    print("| controls | median us/request | p90 | min |")
    print("| --- | --- | --- | --- |")
    for variant, values in per_request.items():
        values.sort()
        p90 = values[int(len(values) * 0.9) - 1]
        print(f"| {variant} | {statistics.median(values):.2f} | {p90:.2f} | {values[0]:.2f} |")
    ratio = statistics.median(per_request["ten"]) / statistics.median(per_request["none"])
    print(f"ten/none median: {ratio:.3f}x")
    if not args.skip_wire:
        over_the_wire(args.rate, args.duration, args.connections, args.wire_durability)
    return 0


if __name__ == "__main__":
    sys.exit(main())
