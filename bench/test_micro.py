"""Micro-benchmarks of the hot path's pieces (pytest-benchmark; not part of the test suite).

pytest bench/test_micro.py --benchmark-only --benchmark-columns=min,median,mean,max,rounds
"""

from __future__ import annotations

import itertools
from datetime import UTC, datetime
from pathlib import Path

import pytest

from processor.authorizer import Authorizer
from processor.catalog import default_catalog
from processor.engine import ProgrammeRules, Spend, decide, yymm
from processor.engine.controls import periods_at, record_usage
from processor.ledger.controls import AmountLimit, Controls, CountLimit, Usage
from processor.ledger.load import load_path
from processor.ledger.store import Ledger
from processor.resources import demo_data_path
from processor.security import PanHasher
from processor.wire.codec import Codec
from processor.wire.framing import Framer
from processor.wire.spec import load_spec

CODEC = Codec(load_spec())
HASHER = PanHasher(b"bench-key")
NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
NOW_MS = int(NOW.timestamp() * 1000)
RULES = ProgrammeRules(catalog=default_catalog())
FIELDS = {
    "t": "0100",
    "2": "4761739001010085",
    "3": "000000",
    "4": "000000000100",
    "7": "1124101010",
    "11": "000001",
    "12": "101010",
    "13": "1124",
    "18": "5411",
    "22": "051",
    "25": "00",
    "32": "123456",
    "37": "000000000001",
    "41": "TERM0001",
    "42": "MERCHANT0000001",
    "43": f"{'DEMO SHOP':<25}{'BERLIN':<13}DE",  # name 25, city 13, country 2
    "49": "978",
}
MESSAGE = CODEC.encode(FIELDS)


def test_decode_0100(benchmark) -> None:  # type: ignore[no-untyped-def]
    benchmark(CODEC.decode, MESSAGE)


def test_encode_0110(benchmark) -> None:  # type: ignore[no-untyped-def]
    response = {k: v for k, v in FIELDS.items() if k not in ("12", "13", "18", "22", "25", "43")}
    response.update({"t": "0110", "39": "00", "38": "123456"})
    benchmark(CODEC.encode, response)


def test_frame_feed_64(benchmark) -> None:  # type: ignore[no-untyped-def]
    framer = Framer("len2", max_frame_bytes=8192)
    stream = framer.frame(b"", MESSAGE) * 64
    benchmark(framer.feed, stream)


@pytest.fixture
def ledger(tmp_path: Path):  # type: ignore[no-untyped-def]
    ledger = Ledger(tmp_path, durability="fsync", map_size_bytes=1 << 30)
    load_path(ledger, demo_data_path(), HASHER)
    yield ledger
    ledger.close()


def test_decide(benchmark, ledger) -> None:  # type: ignore[no-untyped-def]
    """The demo's programme controls (a category block) and a card without controls."""
    request = CODEC.decode(MESSAGE)
    with ledger.read() as reader:
        card = reader.card(HASHER.card_key(request.pan))
        account = reader.account(card.account_id)
        spend = Spend(
            reader.programme_controls(),
            reader.usage("c:" + card.card_id),
            reader.usage("a:" + account.id),
            periods_at(NOW_MS),
        )
    benchmark(decide, request, card, account, RULES, yymm(NOW), spend)


# A card with a limit of every kind and a busy history: the slowest controls path.
BUSY_CONTROLS = Controls(
    amount_limits=(
        AmountLimit(interval="daily", amount=10**12, currency="EUR"),
        AmountLimit(interval="monthly", amount=10**12, currency="EUR", categories=("groceries",)),
    ),
    count_limits=(
        CountLimit(count=1_000, window_seconds=86_400),
        CountLimit(count=10**6, interval="weekly", categories=("groceries",)),
    ),
    blocked_categories=("gambling", "adult"),
    allowed_countries=("eea",),
)


def busy_usage() -> Usage:
    usage = Usage()
    for second in range(900):  # 900 approvals in the last 15 minutes
        record_usage(usage, 100, "groceries", periods_at(NOW_MS - 900_000 + second * 1000))
    return usage


def test_decide_busy_card_with_controls(benchmark, ledger) -> None:  # type: ignore[no-untyped-def]
    request = CODEC.decode(MESSAGE)
    with ledger.read() as reader:
        card = reader.card(HASHER.card_key(request.pan))
        account = reader.account(card.account_id)
        programme = reader.programme_controls()
    card.controls = BUSY_CONTROLS
    usage = busy_usage()
    spend = Spend(programme, usage, usage, periods_at(NOW_MS))
    assert decide(request, card, account, RULES, yymm(NOW), spend).approved
    benchmark(decide, request, card, account, RULES, yymm(NOW), spend)


def test_record_usage_busy_card(benchmark) -> None:  # type: ignore[no-untyped-def]
    usage = busy_usage()
    periods = periods_at(NOW_MS)
    benchmark(record_usage, usage, 100, "groceries", periods)


def test_hmac_card_key(benchmark) -> None:  # type: ignore[no-untyped-def]
    benchmark(HASHER.card_key, "4761739001010085")


@pytest.mark.parametrize("batch", [1, 16, 64, 256])
def test_authorize_batch_fsync(benchmark, ledger, batch: int) -> None:  # type: ignore[no-untyped-def]
    """Decide + apply + stored answer + durable commit of a batch; divide by `batch` per request."""
    authorizer = Authorizer(
        ledger,
        HASHER,
        RULES,
        hold_lifetime_seconds=7 * 86400,
    )
    stans = itertools.count(1)

    def fresh_requests():  # type: ignore[no-untyped-def]
        # Built outside the timed part: each round gets new identities (no retransmissions).
        requests = []
        for _ in range(batch):
            stan = next(stans)
            fields = dict(FIELDS, **{"11": f"{stan % 1_000_000:06d}", "32": f"{stan}"})
            requests.append(CODEC.decode(CODEC.encode(fields)))
        return (requests, NOW), {}

    benchmark.pedantic(
        authorizer.authorize_batch, setup=fresh_requests, rounds=40, iterations=1, warmup_rounds=2
    )
