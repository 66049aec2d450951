"""A good link's latency beside a bad or greedy peer, and the daemon under more than it can do.

Starts the real daemon on a scratch ledger of N cards (run_spread.py's machinery, fsync on) and,
for each kind of peer, measures a good link: bench/loadgen.c in open loop on one link at
--good-rate requests/s for --duration seconds, every request a distinct 0100, latency from the
scheduled send time. Beside it, in a process of its own, one peer:

    none       nothing (the unloaded baseline every other row is compared with)
    pipeline   one link that sends valid, distinct 0100s as fast as the socket takes them and
               never reads an answer
    greedy     one link in closed loop with --greedy-depth requests in flight, reading answers
               (a legitimate peer that wants all the capacity there is)
    garbage    links that send well-framed garbage as fast as they can, reconnecting whenever
               the daemon closes them for it
    hostile    links that mix garbage, zero-length frames, frames over the size limit, format
               errors and half-sent frames

and, with --overload RATE, an open loop of RATE requests/s over --links links against the same
daemon (point 1 of the overload issue: every request answered, none later than the decision
deadline plus a margin).

Bounded: every peer stops at its time limit (and a pipeline peer at its request count); it
talks only to 127.0.0.1 (the bad peer from 127.0.0.2).

    python bench/run_hostile.py --cards 10000 --duration 10 --good-rate 100
    python bench/run_hostile.py --peers none --overload 30000 --duration 5
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from run_load import start_daemon  # bench/ is on sys.path when this file is run as a script
from run_spread import (
    LOADGEN,
    Session,
    build_ledger,
    build_loadgen,
    card_pan,
    daemon_config,
    metrics_text,
    run_one,
    write_requests,
)

from processor.wire.codec import Codec
from processor.wire.spec import load_spec

Json = dict[str, Any]
PEERS = ("none", "pipeline", "greedy", "garbage", "hostile")
PEER_START_SECONDS = 1.0  # the bad peer runs this long before the good link starts
PIPELINE_REQUESTS = 200_000  # a pipelining peer's bound besides time
# The bad peer connects to 127.0.0.1 from an address of its own (Linux routes all of 127/8 to
# the loopback), as a network and an attacker would: the daemon refuses an address whose links
# it keeps closing for bad messages (listener bad_links_per_address_max), not the good link's.
PEER_SOURCE_HOST = "127.0.0.2"


# ---- the bad peers (each run as `run_hostile.py peer KIND PORT SECONDS CARDS`) ------------------


def peer_frames(kind: str, cards: int, rng: random.Random, count: int) -> list[bytes]:
    """What a peer of `kind` sends, framed (2-byte length), `count` frames."""
    codec = Codec(load_spec())
    frames: list[bytes] = []
    for number in range(count):
        if kind == "pipeline" or (kind == "hostile" and number % 5 == 3):
            fields = {
                "t": "0100",
                "2": card_pan(rng.randrange(cards)),
                "3": "000000",
                "4": f"{rng.randint(100, 10_000):012d}",
                "7": f"12{(number // 1_000_000) % 28 + 1:02d}000000",
                "11": f"{number % 1_000_000:06d}",
                "18": "5411",
                "22": "051",
                "25": "00",
                "32": "499999",
                "41": "PEERTERM",
                "49": "978",
            }
            message = codec.encode(fields)
            if kind == "hostile":  # a format error: answered 30 (which this peer never reads)
                message = message.replace(fields["4"].encode(), b"00000000012A", 1)
        elif kind == "hostile" and number % 5 == 1:
            frames.append(b"\x00\x00")  # a zero-length frame
            continue
        else:
            message = bytes(rng.randrange(256) for _ in range(rng.randint(20, 300)))
        frames.append(len(message).to_bytes(2, "big") + message)
    return frames


def run_peer(kind: str, port: int, seconds: float, cards: int) -> int:
    rng = random.Random(kind)
    deadline = time.monotonic() + seconds
    count = PIPELINE_REQUESTS if kind == "pipeline" else 2_000
    frames = peer_frames(kind, cards, rng, count)
    sent = connections = refused = 0
    position = 0
    while time.monotonic() < deadline and (kind != "pipeline" or position < len(frames)):
        try:
            link = socket.create_connection(
                ("127.0.0.1", port), timeout=1.0, source_address=(PEER_SOURCE_HOST, 0)
            )
        except OSError:
            refused += 1
            time.sleep(0.01)
            continue
        connections += 1
        link.settimeout(0.2)
        try:
            while time.monotonic() < deadline:
                if kind == "pipeline":
                    if position >= len(frames):
                        break
                    chunk = b"".join(frames[position : position + 64])
                    link.sendall(chunk)
                    position += 64
                    sent += 64
                    continue
                chunk = b"".join(rng.choice(frames) for _ in range(32))
                if kind == "hostile" and rng.random() < 0.02:
                    link.sendall(b"\xff\xff" + chunk[:100])  # over the size limit
                    sent += 1
                    break
                if kind == "hostile" and rng.random() < 0.02:
                    link.sendall(b"\x01\x00" + chunk[:50])  # half a frame, then gone
                    sent += 1
                    break
                link.sendall(chunk)
                sent += 32
        except TimeoutError:
            if kind == "pipeline":
                time.sleep(0.05)  # the daemon stopped reading us, as it should
                # Keep the link (and its unread answers) open until the time is up.
                while time.monotonic() < deadline:
                    time.sleep(0.1)
        except OSError:
            pass  # closed by the daemon (bad messages): connect again
        finally:
            link.close()
    print(json.dumps({"kind": kind, "sent": sent, "connections": connections, "refused": refused}))
    return 0


# ---- the measurement ----------------------------------------------------------------------------


def start_peer(kind: str, port: int, seconds: float, cards: int) -> subprocess.Popen[str] | None:
    if kind == "none":
        return None
    return subprocess.Popen(
        [sys.executable, __file__, "peer", kind, str(port), str(seconds), str(cards)],
        stdout=subprocess.PIPE,
        text=True,
    )


def measure(args: argparse.Namespace) -> int:
    build_loadgen()
    config_text = daemon_config(
        "fsync",
        4 << 30,
        batch_size_max=args.batch_size_max,
        batch_seconds_max=args.batch_seconds_max,
    )
    report: Json = {"arguments": vars(args), "rows": []}
    with tempfile.TemporaryDirectory(prefix="run_hostile-") as scratch_name:
        scratch = Path(scratch_name)
        ledger = scratch / "ledger"
        pans, _ = build_ledger(ledger, args.cards, "fsync", config_text, "direct", 4 << 30)
        ports: dict[str, int] = {}
        process, port = start_daemon(ledger, config_text, ports=ports)
        session = Session(
            port=port,
            http_port=ports["http"],
            daemon_pid=process.pid,
            ledger=ledger,
            scratch=scratch,
            codec=Codec(load_spec()),
            pans=pans,
            links=1,
            depth=1,
            rng=random.Random(8583),
        )
        print("| peer | good link p50 us | p99 us | max us | answered | p99 / unloaded | peer |")
        print("| --- | --- | --- | --- | --- | --- | --- |", flush=True)
        baseline: float | None = None
        try:
            for kind in args.peers.split(","):
                peer_seconds = args.duration + PEER_START_SECONDS + 1.0
                peer: subprocess.Popen[str] | None = None
                greedy: subprocess.Popen[str] | None = None
                if kind == "greedy":
                    greedy_file = write_requests(
                        scratch / "greedy.bin",
                        session.codec,
                        "auth",
                        session.run_number + 1000,
                        1,
                        args.greedy_requests,
                        pans,
                        args.greedy_depth,
                        session.rng,
                    )
                    greedy = subprocess.Popen(
                        [
                            str(LOADGEN),
                            "--port",
                            str(port),
                            "--requests",
                            str(greedy_file.path),
                            "--mode",
                            "closed",
                            "--depth",
                            str(args.greedy_depth),
                            "--time-limit",
                            str(peer_seconds),
                        ],
                        stdout=subprocess.PIPE,
                        text=True,
                    )
                else:
                    peer = start_peer(kind, port, peer_seconds, args.cards)
                if kind != "none":
                    time.sleep(PEER_START_SECONDS)
                session.warnings.clear()
                record = run_one(
                    session,
                    f"good beside {kind}",
                    "auth",
                    "open",
                    rate=args.good_rate,
                    duration=args.duration,
                    tick_us=0,
                )
                peer_report = ""
                for child in (peer, greedy):
                    if child is not None:
                        out, _ = child.communicate(timeout=peer_seconds + 60)
                        text = out.strip().splitlines()[-1] if out.strip() else "{}"
                        parsed = json.loads(text)
                        peer_report = (
                            f"sent {parsed.get('sent')}, answered {parsed.get('answered', '-')}, "
                            f"connections {parsed.get('connections', 1)}"
                        )
                latency = record["loadgen"]["latency_us"]
                if kind == "none":
                    baseline = latency["p99"]
                ratio = f"{latency['p99'] / baseline:.2f}" if baseline else "-"
                print(
                    f"| {kind} | {latency['p50']:.0f} | {latency['p99']:.0f} | "
                    f"{latency['max']:.0f} | {record['loadgen']['answered']}/"
                    f"{record['loadgen']['sent']} | {ratio} | {peer_report} |",
                    flush=True,
                )
                report["rows"].append({"peer": kind, "good": record, "peer_report": peer_report})
                time.sleep(1.0)
            if args.overload:
                session.links = args.links
                session.depth = 32
                refusals_before = refusals(session.http_port)
                record = run_one(
                    session,
                    "overload",
                    "auth",
                    "open",
                    rate=args.overload,
                    duration=args.duration,
                    tick_us=200,
                )
                result = record["loadgen"]
                codes = " ".join(f"{k}={n}" for k, n in sorted(result["codes_by_mti"].items()))
                refused = {
                    reason: count - refusals_before.get(reason, 0)
                    for reason, count in refusals(session.http_port).items()
                }
                record["refusals"] = refused
                codes += "; 91 " + ", ".join(f"{r} {n:.0f}" for r, n in sorted(refused.items()))
                latency = result["latency_us"]
                print(
                    f"\noverload {args.overload}/s for {args.duration}s over {args.links} links: "
                    f"sent {result['sent']}, answered {result['answered']} ({codes}), "
                    f"p50 {latency['p50']:.0f} us, p99 {latency['p99']:.0f} us, "
                    f"max {latency['max']:.0f} us, daemon CPU "
                    f"{record['daemon_cpu_us_per_message']:.0f} us/answer",
                    flush=True,
                )
                report["overload"] = record
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
    for problem in session.problems:
        print(f"problem: {problem}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))
    return 1 if session.problems else 0


def refusals(http_port: int) -> dict[str, float]:
    """The daemon's 91s so far by reason (/metrics): at arrival (issuer_overloaded) or after
    waiting out the deadline in the queue (issuer_deadline)."""
    counts: dict[str, float] = {}
    for line in metrics_text(http_port).splitlines():
        if line.startswith("processor_requests_total{") and 'response_code="91"' in line:
            reason = line.split('reason="', 1)[1].split('"', 1)[0]
            counts[reason] = counts.get(reason, 0.0) + float(line.rpartition(" ")[2])
    return counts


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "peer":
        kind, port, seconds, cards = sys.argv[2:6]
        return run_peer(kind, int(port), float(seconds), int(cards))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cards", type=int, default=10_000)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--good-rate", type=float, default=100.0)
    parser.add_argument("--peers", default=",".join(PEERS))
    parser.add_argument("--greedy-depth", type=int, default=512)
    parser.add_argument("--greedy-requests", type=int, default=400_000)
    parser.add_argument("--overload", type=float, default=0.0, help="open-loop rate; 0: none")
    parser.add_argument("--links", type=int, default=8, help="links of the overload run")
    parser.add_argument("--json", help="also write everything as JSON to this file")
    parser.add_argument(
        "--batch-size-max", type=int, default=0, help="the daemon's ledger.batch_size_max"
    )
    parser.add_argument(
        "--batch-seconds-max",
        type=float,
        default=None,
        help="the daemon's server.batch_seconds_max (default: the daemon's own)",
    )
    return measure(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
