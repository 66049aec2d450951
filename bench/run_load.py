"""Start the real daemon on a scratch ledger and drive it with `processor sim load`.

Each rate is run twice in the same session: 0800 echo tests (the baseline: framing, codec and
the event loop, no ledger) and 0100 authorisations (plus decide, ledger and a durable commit),
so the ratio of the two is meaningful on a noisy shared machine. Bounded: every run has a fixed
rate and duration and talks only to 127.0.0.1.

    python bench/run_load.py --rates 500,2000,5000 --duration 10 --connections 4
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TextIO

# What a production start needs (processor/server/startup.py), for ledgers benches build.
BENCH_PAN_KEY = "bench-pan-key-of-at-least-32-bytes"
BENCH_API_TOKEN = "bench-api-token-0123456789"
BENCH_BIN = (
    '[programme.card_issuing]\nbin_prefix = "476173"\n'
    '[[security.card_verification_keys]]\nbin_prefix = "476173"\nkey_envs = ["BENCH_CVK"]\n'
)
# Where `python -m processor.cli` subprocesses run: `-m` puts the working directory first on
# sys.path, so run from a checkout it would import that checkout's processor even when
# PYTHONPATH names another tree (a worktree measured as the baseline). From here, PYTHONPATH
# or the installed package decides, as for the benchmark script itself.
PROCESS_CWD = tempfile.gettempdir()
# The keys issue 14 made a production start ask for (CVC2, cardholders' data, the PAN vault):
# benches issue no cards, but the daemon checks its settings before it knows that.
BENCH_KEYS = {
    "BENCH_CVK": "89ABCDEF0123456776543210FEDCBA98",
    "PROCESSOR_DATA_KEY": "aa" * 32,
    "PROCESSOR_PAN_VAULT_KEY": "bb" * 32,
}


def start_daemon(
    ledger: Path,
    config_text: str,
    env: dict[str, str] | None = None,
    ports: dict[str, int] | None = None,
    *,
    demo: bool = False,
) -> tuple[subprocess.Popen[str], int]:
    """The real daemon on a scratch ledger, port 0; returns it and its ISO 8583 port.

    `demo`: `serve --demo`, the demo cards in the empty ledger (which load tests send to);
    otherwise a production start on a ledger the caller built. `ports`, when given, also
    receives the HTTP port (key "http").
    """
    config = ledger.parent / f"{ledger.name}.toml"
    config.write_text(config_text if demo else config_text + BENCH_BIN)
    # The daemon's log, kept out of the pipes (nothing reads them during a run) and shown when
    # it does not start.
    log_path = ledger.parent / f"{ledger.name}.stderr"
    with log_path.open("w") as log_file:
        process = _spawn(config, ledger, log_file, env, demo)
    assert process.stdout is not None
    port = 0
    for line in process.stdout:
        if match := re.search(r"ISO 8583 listening on [\d.]+:(\d+)", line):
            port = int(match.group(1))
        if ports is not None and (match := re.search(r"HTTP listening on [\d.]+:(\d+)", line)):
            ports["http"] = int(match.group(1))
        if line.strip() == "processor: ready":
            return process, port
    process.wait(timeout=30)
    process.stdout.close()
    raise RuntimeError(f"daemon did not start: {log_path.read_text()[-2000:].strip()}")


def _spawn(
    config: Path, ledger: Path, log_file: TextIO, env: dict[str, str] | None, demo: bool
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "processor.cli",
            "serve",
            "--config",
            str(config),
            "--ledger",
            str(ledger),
            "--port",
            "0",
            "--http-port",
            "0",
            *(["--demo"] if demo else []),
        ],
        stdout=subprocess.PIPE,
        stderr=log_file,
        text=True,
        cwd=PROCESS_CWD,
        env={
            **os.environ,
            "PROCESSOR_PAN_KEY": BENCH_PAN_KEY,
            "PROCESSOR_API_TOKEN": BENCH_API_TOKEN,
            **BENCH_KEYS,
            **(env or {}),
        },
    )


def load(port: int, rate: int, duration: float, connections: int, message: str) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "processor.cli",
                "sim",
                "load",
                "--port",
                str(port),
                "--rate",
                str(rate),
                "--duration",
                str(duration),
                "--connections",
                str(connections),
                "--message",
                message,
                "--json",
                out.name,
            ],
            check=False,
            cwd=PROCESS_CWD,
            capture_output=True,
            timeout=duration + 60,
        )
        return json.loads(Path(out.name).read_text())


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rates", default="500,2000,5000")
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--durability", default="fsync", choices=("fsync", "process"))
    args = parser.parse_args()
    machine = f"{platform.platform()}, {os.cpu_count()} cores"
    print(f"machine: {machine}, Python {platform.python_version()}")
    print(f"durability {args.durability}, {args.connections} connections, {args.duration}s per run")
    columns = (
        "rate/s",
        "message",
        "answered",
        "throughput/s",
        "p50 us",
        "p90 us",
        "p99 us",
        "p99.9 us",
        "max us",
    )
    print("| " + " | ".join(columns) + " |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as scratch:
        config = f'[ledger]\ndurability = "{args.durability}"\n[log]\nlevel = "warning"\n'
        process, port = start_daemon(Path(scratch) / "ledger", config, demo=True)
        try:
            for rate in (int(r) for r in args.rates.split(",")):
                results = {}
                for message in ("echo", "auth"):
                    r = load(port, rate, args.duration, args.connections, message)
                    results[message] = r
                    lat = r["latency_us"]
                    print(
                        f"| {rate} | {message} | {r['answered']}/{r['sent']} | "
                        f"{r['throughput_per_second']:.0f} | {lat['p50']:.0f} | {lat['p90']:.0f} | "
                        f"{lat['p99']:.0f} | {lat['p99.9']:.0f} | {lat['max']:.0f} |",
                        flush=True,
                    )
                ratio = results["auth"]["latency_us"]["p50"] / max(
                    1, results["echo"]["latency_us"]["p50"]
                )
                print(f"|  | auth/echo p50 | {ratio:.2f}x |  |  |  |  |  |  |", flush=True)
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
