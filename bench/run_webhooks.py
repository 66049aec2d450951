"""Authorisation latency with and without webhook endpoints, and delivery latency.

Three daemons in turn, each on a scratch ledger, each driven by `processor sim load` at the same
rate: (1) no endpoint; (2) one endpoint whose receiver sleeps 2 s per request; (3) one fast
endpoint, whose receiver timestamps arrivals to measure delivery latency (event `created` ->
received). Everything on 127.0.0.1; bounded by rate x duration.

    python bench/run_webhooks.py --rate 1000 --duration 8
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import signal
import sys
import tempfile
import threading
import time
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from run_load import load, start_daemon  # same folder: the one daemon launcher

SECRET = "whsec_" + base64.b64encode(b"bench-secret-bench-secret-000000").decode()


class Receiver:
    def __init__(self, sleep_seconds: float) -> None:
        self.latencies: list[float] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                arrived = time.time()
                created = datetime.fromisoformat(json.loads(body)["created"]).timestamp()
                receiver.latencies.append(arrived - created)
                if sleep_seconds:
                    time.sleep(sleep_seconds)
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def run(scratch: Path, name: str, url: str | None, rate: int, duration: float) -> dict:
    text = '[ledger]\ndurability = "fsync"\n[log]\nlevel = "warning"\n'
    if url:
        text += f'[[webhooks.endpoints]]\nname = "{name}"\nurl = "{url}"\n'
        text += 'secret_envs = ["BENCH_SECRET"]\n'
        # The authorisations' events, not the demo data's load (made before delivery started).
        text += 'event_types = ["authorization.approved", "authorization.declined"]\n'
    process, port = start_daemon(scratch / name, text, {"BENCH_SECRET": SECRET}, demo=True)
    result = load(port, rate, duration, 4, "auth")
    time.sleep(2.0)  # let a fast receiver catch up before the daemon stops
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=30)
    return result


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else 0.0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rate", type=int, default=1000)
    parser.add_argument("--duration", type=float, default=8.0)
    args = parser.parse_args()
    print(
        f"machine: {platform.platform()}, {os.cpu_count()} cores; {args.rate}/s for "
        f"{args.duration}s, fsync, 4 connections"
    )
    print("| run | answered | auth p50 us | p90 us | p99 us | p99.9 us | max us |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as directory:
        scratch = Path(directory)
        slow, fast = Receiver(2.0), Receiver(0.0)
        for name, url in (("none", None), ("slow", slow.url), ("none2", None), ("fast", fast.url)):
            r = run(scratch, name, url, args.rate, args.duration)
            lat = r["latency_us"]
            label = {
                "none": "no endpoint",
                "none2": "no endpoint (again)",
                "slow": "receiver sleeping 2 s",
                "fast": "fast receiver",
            }[name]
            print(
                f"| {label} | {r['answered']}/{r['sent']} | {lat['p50']:.0f} | {lat['p90']:.0f} "
                f"| {lat['p99']:.0f} | {lat['p99.9']:.0f} | {lat['max']:.0f} |",
                flush=True,
            )
        delivered = fast.latencies
        print(
            f"\ndelivery latency to the fast receiver (event created -> received), "
            f"{len(delivered)} events: p50 {percentile(delivered, 0.5) * 1000:.1f} ms, "
            f"p99 {percentile(delivered, 0.99) * 1000:.1f} ms, "
            f"max {max(delivered, default=0) * 1000:.1f} ms"
        )
        slow.close()
        fast.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
