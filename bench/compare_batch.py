"""Per-request cost of `Authorizer.authorize_batch` on a ledger without controls, on any tree.

Runs against whichever `processor` is first on the path, so the same script measures an older
commit checked out in a worktree and the current one, alternately, in the same session:

    git worktree add /tmp/base <commit>
    PYTHONPATH=/tmp/base python bench/compare_batch.py 30 process
    PYTHONPATH=.         python bench/compare_batch.py 30 process

Prints the median and p90 microseconds per request of `rounds` batches of 256 fresh 0100s
(after two warm-up batches), each on a card drawn at random from `cards` cards on as many
accounts (default 10,000: on one card every batch touches the same few pages and hides the cost
of a write path at realistic spread). Bounded by `rounds`; no network.

    python bench/compare_batch.py ROUNDS DURABILITY [CARDS]
"""

from __future__ import annotations

import inspect
import itertools
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

from processor.authorizer import Authorizer
from processor.engine import ProgrammeRules
from processor.ledger.load import load_path
from processor.ledger.store import Ledger
from processor.security import PanHasher
from processor.wire.codec import Codec
from processor.wire.messages import AuthorizationRequest
from processor.wire.spec import load_spec

BATCH = 256
BIN = "476173"


def pan_of(index: int) -> str:
    """A Luhn-valid 16-digit PAN, one per card index."""
    from processor.security import luhn_check_digit

    body = f"{BIN}{index:09d}"
    return body + str(luhn_check_digit(body))


def rules() -> ProgrammeRules:
    try:
        from processor.catalog import default_catalog
    except ImportError:  # a tree from before spend controls
        return ProgrammeRules()
    return ProgrammeRules(catalog=default_catalog())  # type: ignore[call-arg, unused-ignore]


def fresh_requests(
    codec: Codec, stans: Iterator[int], count: int, pans: list[str], draw: random.Random
) -> list[AuthorizationRequest]:
    """`count` 0100s of 1.00 EUR at a grocery, each with a new identity (no retransmissions).

    Identities as a network mixes them: one of 500 acquirers, a STAN that looks random (a
    counter scrambled by an odd multiplier mod 10^6, so none repeats within a run) and field 7
    moving with time, one second per batch.
    """
    requests = []
    for _ in range(count):
        stan = next(stans)
        moment = datetime(2026, 11, 24, 12, tzinfo=UTC) + timedelta(seconds=stan // BATCH)
        fields = {
            "t": "0100",
            "2": draw.choice(pans),
            "3": "000000",
            "4": "000000000100",
            "7": moment.strftime("%m%d%H%M%S"),
            "11": f"{stan * 7_919 % 1_000_000:06d}",
            "18": "5411",
            "22": "051",
            "25": "00",
            "32": f"{400_000 + draw.randrange(500)}",
            "41": "TERM0001",
            "43": f"{'DEMO SHOP':<25}{'BERLIN':<13}DE",
            "49": "978",
        }
        request = codec.decode(codec.encode(fields))
        assert isinstance(request, AuthorizationRequest)
        requests.append(request)
    return requests


def load_file(pans: list[str]) -> str:
    """A ledger load file: one well-funded EUR account per PAN, each with its card."""
    return "".join(
        f'[[accounts]]\nid = "bench-{index}"\ncurrency = "EUR"\n'
        "balance = 100000000000000\n"
        f'[[cards]]\npan = "{pan}"\naccount = "bench-{index}"\nexpiry = "3012"\n'
        for index, pan in enumerate(pans)
    )


def written_bytes() -> int:
    """Bytes this process has handed to write system calls so far (Linux /proc/self/io
    `wchar`): LMDB writes each page a commit dirtied with pwrite, so this counts its pages
    (and its meta page) per request, free of the machine's noise. `write_bytes`, used before
    2026-12-06, counts what the filesystem sends to the device on the process's behalf: ext4
    charged 72-264 KiB to a one-put commit that wrote 12 KiB (strace), 4-5x LMDB's pages."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    return 0


def main() -> int:
    rounds, durability = int(sys.argv[1]), sys.argv[2]
    cards = int(sys.argv[3]) if len(sys.argv) > 3 else 10_000
    pans = [pan_of(index) for index in range(cards)]
    draw = random.Random(9)
    codec, hasher = Codec(load_spec()), PanHasher(b"bench-key")
    stans = itertools.count(1)
    now = datetime(2026, 11, 24, 12, tzinfo=UTC)
    per_request: list[float] = []
    bytes_per_request: list[float] = []
    with tempfile.TemporaryDirectory() as scratch:
        source = Path(scratch) / "ledger.toml"
        source.write_text(load_file(pans))
        ledger = Ledger(
            Path(scratch) / "ledger",
            durability=durability,  # type: ignore[arg-type]
            map_size_bytes=8 << 30,
        )
        load_path(ledger, source, hasher)
        if "codec" in inspect.signature(Authorizer).parameters:  # a tree from before listeners
            authorizer = Authorizer(ledger, codec, hasher, rules(), hold_lifetime_seconds=604800)  # type: ignore[call-arg, arg-type, unused-ignore]
            encode: Callable[[object], object] = lambda outcome: None  # noqa: E731  # done inside
        else:
            authorizer = Authorizer(ledger, hasher, rules(), hold_lifetime_seconds=604800)
            encode = lambda outcome: codec.encode(outcome.fields)  # type: ignore[attr-defined]  # noqa: E731
        for round_index in range(rounds + 2):
            requests = fresh_requests(codec, stans, BATCH, pans, draw)
            written = written_bytes()
            started = time.perf_counter()
            outcomes = authorizer.authorize_batch(
                requests, now + timedelta(seconds=2 * round_index)
            )
            for outcome in outcomes:  # the answer's encoding, wherever the tree does it
                encode(outcome)
            elapsed = time.perf_counter() - started
            assert all(o.response_code == "00" for o in outcomes), {o.reason for o in outcomes}
            if round_index >= 2:
                per_request.append(elapsed / BATCH * 1e6)
                bytes_per_request.append((written_bytes() - written) / BATCH)
        ledger.close()
    per_request.sort()
    p90 = per_request[int(len(per_request) * 0.9) - 1]
    print(
        f"{cards} cards: median {statistics.median(per_request):.2f} us/request, p90 {p90:.2f}; "
        f"written {statistics.median(bytes_per_request) / 1024:.1f} KiB/request"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
