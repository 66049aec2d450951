"""Split the daemon's CPU per authorisation into its stages, from a py-spy profile.

    python bench/run_spread.py --durability process --rates '' --requests 400000 &
    py-spy record -p "$(pgrep -f 'processor.cli serve')" -d 15 -r 200 -f raw -o /tmp/daemon.raw
    python bench/breakdown.py /tmp/daemon.raw 62      # 62 = run_spread's daemon CPU us/msg

Each sample is charged to the first stage, innermost frame first, whose function it is in; the
shares are then scaled to the measured CPU per message. py-spy is a development tool (`pip
install py-spy`), not a dependency of the daemon or of the tests.
"""

from __future__ import annotations

import sys
from collections import Counter

# (stage, function names that mark it), checked innermost frame first.
STAGES = (
    ("decode", ("Codec.decode", "FastCodec.decode", "Framer.feed")),
    ("encode", ("Codec.encode", "FastCodec.encode", "Framer.frame")),
    ("verdict", ("decide", "check_controls")),
    ("metrics", ("Metrics.answered", "Histogram.observe", "Counter.inc")),
    ("hash (card key, fingerprint)", ("PanHasher.card_key", "Authorizer._fingerprint")),
    ("commit (flush + LMDB commit)", ("Writer.flush", "Ledger.write")),
    ("ledger apply", ("Authorizer._process", "Authorizer.run_batch")),
    ("socket write and dispatch", ("Daemon._flush", "Link.write")),
    ("read and dispatch", ("Link.data_received", "Daemon.on_message")),
)


def stage_of(frames: list[str]) -> str:
    names = [frame.split(" (")[0] for frame in frames]
    for name in reversed(names):
        for stage, marks in STAGES:
            if name in marks:
                return stage
    return "event loop and other"


def main() -> int:
    path, cpu_us = sys.argv[1], float(sys.argv[2])
    shares: Counter[str] = Counter()
    total = 0
    with open(path) as raw:
        for line in raw:
            stack, _, count = line.rstrip().rpartition(" ")
            if not stack:
                continue
            total += int(count)
            shares[stage_of(stack.split(";"))] += int(count)
    print(f"{total} samples; {cpu_us:.0f} us of CPU per message in all")
    print("| stage | share | us per message |")
    print("| --- | --- | --- |")
    for stage, count in shares.most_common():
        print(f"| {stage} | {100 * count / total:.1f} % | {cpu_us * count / total:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
