"""Webhook delivery at the authorisation rate, and what it costs the authorisations.

For each rate in --rates, alternately: the real daemon with no webhook endpoint, then with one
endpoint whose receiver (an aiohttp server in a process of its own) answers 204 at once. Each on
a fresh ledger of --cards cards on as many accounts, fsync on, driven by bench/loadgen.c in open
loop (distinct 0100s, latency from the scheduled send time; run_spread.py's machinery). Reported:
authorisation p50/p99 with and without the endpoint, the load generator's sends over 1 ms behind
its schedule and the latest (its own waits for a core, which the latencies include), and for
delivery: events received, the receiver's latency from each event's `created` to its arrival
(p50/p99/max), the backlog when the load stopped, how long the rest took to arrive, and the
delivery process's own CPU per event (from /proc, from before the load to the end of the
drain).

    python bench/run_delivery.py --rates 2000,5000 --duration 10
    python bench/run_delivery.py --pin ...   # daemon on the first CPU, the rest on the last

With --pin (both arms alike): the daemon runs on the first CPU (`server.cpus`), and this script,
the load generator, the receiver and (with an endpoint) the delivery process
(`webhooks.delivery_cpus`) on the last, so what delivery costs cannot land on the
authorisations' core.

Bounded: each load runs --duration seconds; waiting for the backlog stops after --drain-max
seconds. Everything on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from run_load import start_daemon  # bench/ is on sys.path when this file is run as a script
from run_spread import (
    Session,
    build_ledger,
    build_loadgen,
    daemon_config,
    metrics_text,
    process_cpu_seconds,
    run_one,
)

from processor.wire.codec import Codec
from processor.wire.spec import load_spec

Json = dict[str, Any]
SECRET = "whsec_" + base64.b64encode(b"bench-secret-bench-secret-000000").decode()
ENDPOINT = "bench"


# ---- the receiver (a process of its own) -----------------------------------------------------


def serve_receiver(port_file: str) -> int:
    """Answer every POST 204 at once; on SIGTERM print what arrived as JSON.

    Lean on purpose (uvloop, httptools, the `created` field found by a byte search): it shares
    the 2 cores with the daemon, the delivery process and the load generator, and what it
    costs is not the product's."""
    import asyncio

    import httptools
    import uvloop

    latencies: list[float] = []
    marker = b'"created":"'

    class Connection(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport: asyncio.Transport = transport  # type: ignore[assignment]
            self.parser = httptools.HttpRequestParser(self)
            self.body: list[bytes] = []

        def data_received(self, data: bytes) -> None:
            self.parser.feed_data(data)

        def on_body(self, body: bytes) -> None:
            self.body.append(body)

        def on_message_complete(self) -> None:
            arrived = time.time()
            body, self.body = b"".join(self.body), []
            at = body.find(marker) + len(marker)
            created = datetime.fromisoformat(body[at : body.index(b'"', at)].decode())
            latencies.append(arrived - created.timestamp())
            self.transport.write(b"HTTP/1.1 204 No Content\r\n\r\n")

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Connection, "127.0.0.1", 0)
        Path(port_file).write_text(str(server.sockets[0].getsockname()[1]))
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        server.close()

    uvloop.run(main())
    print(json.dumps({"latencies": latencies}))
    return 0


class Receiver:
    def __init__(self, scratch: Path) -> None:
        port_file = scratch / "receiver.port"
        port_file.unlink(missing_ok=True)
        self.process = subprocess.Popen(
            [sys.executable, __file__, "receiver", str(port_file)],
            stdout=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 10
        while not port_file.exists() or not port_file.read_text():
            if time.monotonic() > deadline:
                raise SystemExit("the receiver did not start")
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{port_file.read_text()}/"

    def stop(self) -> list[float]:
        self.process.send_signal(signal.SIGTERM)
        out, _ = self.process.communicate(timeout=30)
        latencies: list[float] = json.loads(out)["latencies"]
        return latencies


# ---- the measurement ---------------------------------------------------------------------------


def delivery_cpu_seconds(daemon_pid: int) -> float | None:
    """CPU the daemon's webhook delivery process has used so far (/proc), None without one."""
    for child in Path(f"/proc/{daemon_pid}/task/{daemon_pid}/children").read_text().split():
        try:
            command = Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:
            continue
        if b"processor.webhooks.process" in command:
            return process_cpu_seconds(int(child))
    return None


def scrape(http_port: int, name: str) -> float | None:
    for line in metrics_text(http_port).splitlines():
        key, _, value = line.rpartition(" ")
        if key == name:
            return float(value)
    return None


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else math.nan


def one_run(scratch: Path, args: argparse.Namespace, rate: float, endpoint: bool) -> Json:
    name = f"{'with' if endpoint else 'without'}-{rate:.0f}-{time.monotonic_ns()}"
    directory = scratch / name
    directory.mkdir()
    config_text = daemon_config("fsync", 4 << 30, ledger_options=tuple(args.ledger_option))
    if args.pin:
        config_text = f"[server]\ncpus = [{args.pin[0]}]\n" + config_text
    receiver = Receiver(directory) if endpoint else None
    if receiver is not None:
        if args.pin:
            config_text += f"[webhooks]\ndelivery_cpus = [{args.pin[1]}]\n"
        config_text += (
            f'[[webhooks.endpoints]]\nname = "{ENDPOINT}"\nurl = "{receiver.url}"\n'
            + (f"in_flight_max = {args.in_flight}\n" if args.in_flight else "")
            + 'secret_envs = ["BENCH_WEBHOOK_SECRET"]\n'
            # The authorisations' events: the ledger's load made one per funded account
            # before the daemon started, which are not what this measures.
            'event_types = ["authorization.approved", "authorization.declined"]\n'
        )
    ledger = directory / "ledger"
    pans, _ = build_ledger(ledger, args.cards, "fsync", config_text, "direct", 4 << 30)
    ports: dict[str, int] = {}
    process, port = start_daemon(ledger, config_text, {"BENCH_WEBHOOK_SECRET": SECRET}, ports=ports)
    result: Json = {"rate": rate, "endpoint": endpoint}
    try:
        session = Session(
            port=port,
            http_port=ports["http"],
            daemon_pid=process.pid,
            ledger=ledger,
            scratch=directory,
            codec=Codec(load_spec()),
            pans=pans,
            links=args.links,
            depth=1,
            rng=random.Random(8583),
        )
        if receiver is not None:  # past the load's events (filtered out) before measuring
            backlog_series = f'processor_outbox_backlog{{endpoint="{ENDPOINT}"}}'
            started = time.monotonic()
            while True:  # absent until the delivery process first reports (within 0.25 s)
                backlog = scrape(ports["http"], backlog_series)
                if backlog is not None and backlog == 0:
                    break
                if time.monotonic() - started > args.drain_max:
                    raise SystemExit("the load's events were not passed over in time")
                time.sleep(0.1)
        delivery_cpu_before = delivery_cpu_seconds(process.pid)
        record = run_one(
            session, "auth", "auth", "open", rate=rate, duration=args.duration, tick_us=200
        )
        result["auth"] = record["loadgen"]
        result["daemon_cpu_us_per_message"] = record["daemon_cpu_us_per_message"]
        if receiver is not None:
            backlog_series = f'processor_outbox_backlog{{endpoint="{ENDPOINT}"}}'
            result["backlog_at_end"] = scrape(ports["http"], backlog_series)
            started = time.monotonic()
            while (scrape(ports["http"], backlog_series) or 0) > 0:
                if time.monotonic() - started > args.drain_max:
                    break
                time.sleep(0.1)
            result["drain_seconds"] = time.monotonic() - started
            result["backlog_after_drain"] = scrape(ports["http"], backlog_series)
            delivery_cpu_after = delivery_cpu_seconds(process.pid)
            if delivery_cpu_before is not None and delivery_cpu_after is not None:
                result["delivery_cpu_seconds"] = delivery_cpu_after - delivery_cpu_before
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
        if receiver is not None:
            latencies = receiver.stop()
            result["delivered"] = len(latencies)
            if "delivery_cpu_seconds" in result and latencies:
                result["delivery_cpu_us_per_event"] = (
                    result["delivery_cpu_seconds"] / len(latencies) * 1e6
                )
            result["delivery_ms"] = {
                "p50": percentile(latencies, 0.5) * 1000,
                "p99": percentile(latencies, 0.99) * 1000,
                "max": max(latencies, default=math.nan) * 1000,
            }
    return result


def row(result: Json) -> str:
    auth = result["auth"]
    latency = auth["latency_us"]
    cells = [
        f"{result['rate']:.0f}/s",
        "one, 204 at once" if result["endpoint"] else "none",
        f"{auth['answered']}/{auth['sent']}",
        f"{latency['p50']:.0f}",
        f"{latency['p99']:.0f}",
        # The generator's own lateness, which its latencies (from the schedule) include: on
        # busy cores it says whether the generator or the daemon was waiting.
        f"{auth['late_sends_over_1ms']} / {auth['send_lag_max_us'] / 1000:.1f}",
        f"{result['daemon_cpu_us_per_message']:.0f}",
    ]
    if result["endpoint"]:
        delivery = result["delivery_ms"]
        cells += [
            f"{result['delivered']}",
            f"{delivery['p50']:.1f} / {delivery['p99']:.1f} / {delivery['max']:.1f}",
            f"{result['backlog_at_end']:.0f}",
            f"{result['drain_seconds']:.1f}",
            f"{result.get('delivery_cpu_us_per_event', math.nan):.0f}",
        ]
    else:
        cells += ["", "", "", "", ""]
    return "| " + " | ".join(cells) + " |"


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "receiver":
        return serve_receiver(sys.argv[2])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", default="2000,5000")
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--cards", type=int, default=10_000)
    parser.add_argument("--links", type=int, default=4)
    parser.add_argument("--pairs", type=int, default=1, help="without/with runs per rate")
    parser.add_argument("--drain-max", type=float, default=60.0)
    parser.add_argument("--json", help="also write everything as JSON to this file")
    parser.add_argument(
        "--pin", action="store_true", help="the daemon on the first CPU, the rest on the last"
    )
    parser.add_argument(
        "--ledger-option",
        action="append",
        default=[],
        help="another [ledger] line for the daemon, e.g. 'checkpoint_seconds = 0.002'",
    )
    parser.add_argument("--in-flight", type=int, help="the endpoint's in_flight_max")
    args = parser.parse_args()
    if args.pin:
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            raise SystemExit("--pin needs two CPUs")
        args.pin = (cpus[0], cpus[-1])
        os.sched_setaffinity(0, {cpus[-1]})  # the load generator and receiver inherit it
    build_loadgen()
    print(
        "| rate | endpoint | answered | auth p50 us | auth p99 us "
        "| sends over 1 ms late / latest ms | daemon CPU us/msg "
        "| events received | delivery p50 / p99 / max ms | backlog at end | drained in s "
        "| delivery process CPU us/event |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |", flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="run_delivery-") as scratch_name:
        scratch = Path(scratch_name)
        for rate in (float(each) for each in args.rates.split(",") if each):
            for _ in range(args.pairs):
                for endpoint in (False, True):
                    result = one_run(scratch, args, rate, endpoint)
                    results.append(result)
                    print(row(result), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
