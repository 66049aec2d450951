"""CPU the webhook dispatcher spends per delivered event, in isolation (issue 13).

Builds a ledger holding --events real approvals (each with its event; 10,000 cards on as many
accounts), then starts the real Dispatcher against run_delivery.py's lean receiver (a process of
its own) and measures this process's CPU (time.process_time) until every event is delivered:
the dispatcher's own work per event (reading the outbox, rendering, signing, the HTTP exchange
and the asyncio machinery around it), without the daemon, the load generator or the wake-ups
of a trickle. Steadier than the end-to-end benchmark's difference of two runs, so it can
compare dispatcher changes: run it on two trees alternately.

    python bench/delivery_cpu.py [--events 20000] [--rounds 3]

Bounded by --events and a deadline per round; everything on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import random
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec
import uvloop
from compare_batch import fresh_requests, load_file, pan_of, rules  # bench/ is on sys.path
from run_delivery import Receiver

from processor.authorizer import Authorizer
from processor.config import WebhookEndpoint, WebhooksConfig
from processor.ledger.load import load_path
from processor.ledger.store import Ledger
from processor.metrics import Metrics
from processor.security import PanHasher
from processor.webhooks.dispatcher import Dispatcher, Endpoint
from processor.webhooks.state import DeliveryState
from processor.wire.codec import Codec
from processor.wire.spec import load_spec

CARDS = 10_000
DEADLINE_SECONDS = 300.0


def build(directory: Path, events: int) -> None:
    pans = [pan_of(index) for index in range(CARDS)]
    source = directory / "ledger.toml"
    source.write_text(load_file(pans))
    ledger = Ledger(directory / "ledger", durability="process", map_size_bytes=4 << 30)
    hasher = PanHasher(b"bench-key")
    load_path(ledger, source, hasher)  # an event per funded account, passed over below
    authorizer = Authorizer(ledger, hasher, rules(), hold_lifetime_seconds=604800)
    codec, draw, stans = Codec(load_spec()), random.Random(9), itertools.count(1)
    now = datetime(2026, 11, 24, 12, tzinfo=UTC)
    for round_index in range(events // 256):
        requests = fresh_requests(codec, stans, 256, pans, draw)
        authorizer.authorize_batch(requests, now + timedelta(seconds=2 * round_index))
    ledger.close()


async def deliver_all(directory: Path, url: str) -> tuple[int, float]:
    ledger = Ledger(directory / "ledger", durability="process", map_size_bytes=4 << 30)
    with ledger.read() as reader:
        last = reader.outbox_last_sequence()
        # The load's events (one per account) come first: the approvals' begin after them.
        loaded = next(r.sequence for r in reader.outbox(1, CARDS + 2) if r.answer_key) - 1
    state = DeliveryState(directory / f"state-{time.monotonic_ns()}")
    state.advance("bench", loaded + 1)
    endpoint = msgspec.convert(
        {"name": "bench", "url": url, "secret_envs": ["UNUSED"]}, WebhookEndpoint
    )
    dispatcher = Dispatcher(
        ledger,
        state,
        [Endpoint(endpoint, (b"bench-secret-bench-secret-000000",))],
        WebhooksConfig(),
        Metrics(),
    )
    started = time.process_time()
    deadline = time.monotonic() + DEADLINE_SECONDS
    await dispatcher.start()
    try:
        while dispatcher.backlog("bench")[0] > 0:
            if time.monotonic() > deadline:
                raise SystemExit("delivery did not finish in time")
            await asyncio.sleep(0.01)
    finally:
        used = time.process_time() - started
        await dispatcher.stop()
        state.close()
        ledger.close()
    return last - loaded, used


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    per_event: list[float] = []
    with tempfile.TemporaryDirectory(prefix="delivery_cpu-") as scratch:
        directory = Path(scratch)
        build(directory, args.events)
        receiver = Receiver(directory)
        try:
            for _ in range(args.rounds):
                events, used = uvloop.run(deliver_all(directory, receiver.url))
                per_event.append(used / events * 1e6)
                print(f"{events} events: {per_event[-1]:.1f} us of CPU each", flush=True)
        finally:
            receiver.stop()
    print(f"median {statistics.median(per_event):.1f} us per event")
    return 0


if __name__ == "__main__":
    sys.exit(main())
