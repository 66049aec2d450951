"""What the retention sweep costs per record: a visit, and a record pruned.

In-process, no network: approves `batches` batches of 256 over 10,000 cards with holds that
expire in a second, releases them, then times steps of the sweep over records that are all
young (visits only) and over records all past their horizons (pruned, commits included).

    python bench/retention_cost.py 200
"""

from __future__ import annotations

import itertools
import random
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from compare_batch import BATCH, fresh_requests, load_file, pan_of, rules  # bench/ is on sys.path

from processor.authorizer import Authorizer
from processor.config import RetentionConfig
from processor.ledger.load import load_path
from processor.ledger.retention import Retention
from processor.ledger.store import Ledger
from processor.security import PanHasher
from processor.wire.codec import Codec
from processor.wire.messages import rrn_key
from processor.wire.spec import load_spec

STEP_BUDGET = 256


def main() -> int:
    batches = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    pans = [pan_of(index) for index in range(10_000)]
    draw, codec, hasher = random.Random(1), Codec(load_spec()), PanHasher(b"bench-key")
    stans = itertools.count(1)
    now = datetime(2026, 11, 24, 12, tzinfo=UTC)
    config = RetentionConfig(answers_seconds=5, events_seconds=2)
    with tempfile.TemporaryDirectory() as scratch:
        source = Path(scratch) / "ledger.toml"
        source.write_text(load_file(pans))
        ledger = Ledger(Path(scratch) / "ledger", durability="process", map_size_bytes=8 << 30)
        # On the simulated clock: the load's events come first in the outbox, which is cut
        # from its start.
        load_path(ledger, source, hasher, now_ms=int(now.timestamp() * 1000))
        authorizer = Authorizer(ledger, hasher, rules(), hold_lifetime_seconds=1)
        for _ in range(batches):
            authorizer.authorize_batch(fresh_requests(codec, stans, BATCH, pans, draw), now)
        later = now + timedelta(seconds=10)
        while authorizer.sweep_expired(later, 512):
            pass
        young = Retention(config, rrn_key)
        visits, started = 0, time.perf_counter()
        with ledger.write() as writer:
            for _ in range(50):
                done = young.step(writer, int(now.timestamp() * 1000), STEP_BUDGET)
                visits += sum(done.visited.values())
        visiting = time.perf_counter() - started
        sweep, pruned, steps = Retention(config, rrn_key), 0, 0
        past = int((later + timedelta(seconds=10)).timestamp() * 1000)
        started = time.perf_counter()
        while True:
            with ledger.write() as writer:
                done = sweep.step(writer, past, STEP_BUDGET)
            steps += 1
            pruned += sum(done.pruned.values())
            if done.wrapped and not done.busy:
                break
        pruning = time.perf_counter() - started
        ledger.close()
    print(
        f"{batches * BATCH} approvals, holds released; steps of {STEP_BUDGET} visits per database"
    )
    print(f"visits of young records: {visiting / visits * 1e6:.2f} us each ({visits})")
    print(
        f"records past their horizons: {pruning / pruned * 1e6:.2f} us per record pruned, "
        f"commits included ({pruned} in {steps} steps, {pruning / steps * 1e3:.2f} ms a step)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
