"""The realistic-spread benchmark: many cards, every request distinct, a C load generator.

Builds a scratch ledger of N cards on N funded EUR accounts, starts the real daemon on it
(`start_daemon` of run_load.py), compiles bench/loadgen.c into bench/build/ and drives the
daemon with it, all in one session so the numbers compare:

    echo   closed loop   0800 echo tests: framing, codec, event loop; no ledger (the baseline)
    auth   closed loop   0100 authorisations over the N cards
    mixed  closed loop   ~85 % 0100, 5 % 0200, 5 % 0400 full reversals and 5 % 0220
                         completions of earlier approvals (same link, >= depth messages later)
    auth   open loop     at each of --rates, for --duration seconds, latency from the
                         scheduled send time

Every request is used once: each run gets a fresh requests file whose messages all differ in
acquirer (field 32) + STAN (11) + transmission date-time (7), so nothing is answered from the
stored answers of a retransmission. Checks that every request was answered (exit status 1 if
not), reports any response code other than 00 and what the ledger recorded for reversals and
completions, the ledger's growth per approval, and the generator's and the daemon's CPU per
message. Bounded: every run stops at its request count or its time limit, whichever comes
first, and talks only to 127.0.0.1.

    python bench/run_spread.py --cards 10000 --duration 3 --rates 1000 --requests 50000

A baseline tree is measured from its own directory (`python -m`, which starts the daemon, puts
the working directory first on the module path):

    git worktree add /tmp/base <commit>
    cd /tmp/base && PYTHONPATH=/tmp/base python /path/to/bench/run_spread.py ...
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import signal
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter, deque
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import lmdb
from run_load import (
    BENCH_PAN_KEY,
    PROCESS_CWD,
    start_daemon,
)  # bench/ is on sys.path when this file is run as a script

from processor.ledger.load import load_path
from processor.ledger.store import Ledger
from processor.security import PanHasher, luhn_check_digit
from processor.wire.codec import Codec
from processor.wire.messages import transaction_key
from processor.wire.spec import load_spec

Json = dict[str, Any]
BENCH = Path(__file__).resolve().parent
BUILD = BENCH / "build"
LOADGEN_SOURCE = BENCH / "loadgen.c"
LOADGEN = BUILD / "loadgen"
PAN_KEY = BENCH_PAN_KEY.encode()  # what start_daemon puts in PROCESSOR_PAN_KEY
BIN = "476173"
EXPIRY = "4912"  # YYMM, far in the future
BALANCE = 10**14  # minor units per account: nothing is declined 51 during a run
AMOUNT_MIN, AMOUNT_MAX = 100, 10_000  # minor units of one purchase
STAN_VALUES = 1_000_000
# Acquirers a request comes from, drawn at random per request as a network mixes them: keys
# made of acquirer + STAN then arrive in no particular order, as they do in production.
ACQUIRERS = tuple(str(410_000 + 37 * index) for index in range(200))
LINKS_MAX = 64  # loadgen's LINKS_MAX
DEPTH_MAX = 1024  # the daemon's in_flight_per_link_max
MERCHANT = f"{'BENCH SHOP':<25}{'BERLIN':<13}DE"
MIXED_SHARES = {"0200": 0.05, "0400": 0.05, "0220": 0.05}  # the rest is 0100
GRACE_SECONDS = 5.0
PAUSE_BETWEEN_RUNS_SECONDS = 0.5
# What a correct answer is, by response MTI: anything else is reported.
EXPECTED_CODES = {"0810": "00", "0110": "00", "0210": "00", "0410": "00", "0230": "00"}
# What the ledger should have recorded for the reversals and completions of the mixed run.
EXPECTED_REASONS = {"0400": "reversed", "0220": "captured"}


# ---- the ledger ---------------------------------------------------------------------------------


def card_pan(index: int) -> str:
    """The index-th card of the BIN: 16 digits, Luhn-valid."""
    body = f"{BIN}{index + 1:09d}"
    return body + luhn_check_digit(body)


def load_file_text(pans: list[str]) -> str:
    lines = []
    for index in range(len(pans)):
        lines.append(
            f'[[accounts]]\nid = "acct-{index:06d}"\ncurrency = "EUR"\nbalance = {BALANCE}\n'
        )
    for index, pan in enumerate(pans):
        lines.append(
            f'[[cards]]\npan = "{pan}"\naccount = "acct-{index:06d}"\nexpiry = "{EXPIRY}"\n'
        )
    return "".join(lines)


def daemon_config(
    durability: str,
    map_size_bytes: int,
    workers: int = 1,
    batch_size_max: int = 0,
    batch_seconds_max: float | None = None,
    retention: str = "default",
    ledger_options: tuple[str, ...] = (),
) -> str:
    # Keys only when asked for: an older tree, measured as the baseline, may not have them.
    # `ledger_options`: more [ledger] lines as given (`checkpoint_seconds = 0.02`).
    server = f"workers = {workers}\n" if workers > 1 else ""
    if batch_seconds_max is not None:
        server += f"batch_seconds_max = {batch_seconds_max}\n"
    batch = f"batch_size_max = {batch_size_max}\n" if batch_size_max else ""
    return (
        (f"[server]\n{server}" if server else "")
        + f'[ledger]\ndurability = "{durability}"\n'
        + f"map_size_bytes = {map_size_bytes}\n{batch}"
        + "".join(f"{option}\n" for option in ledger_options)
        + '[log]\nlevel = "warning"\n'
        + RETENTION_CONFIGS[retention]
    )


# --retention: the daemon's own defaults (no keys, for older trees too); off; or horizons of
# seconds with holds that expire in 3 s, so the sweep prunes all through the run (issue 12),
# and its baseline, the same holds with retention off.
SHORT_HOLDS = (
    "[programme]\nhold_lifetime_seconds = 3\nhold_lifetime_by_mcc = {}\n"
    "sweep_interval_seconds = 1\n"
)
RETENTION_CONFIGS = {
    "default": "",
    "off": "[retention]\nenabled = false\n",
    "short": SHORT_HOLDS + "[retention]\nanswers_seconds = 5\nevents_seconds = 2\n",
    # The same holds expiring in 3 s, retention off: the baseline for "short".
    "short-off": SHORT_HOLDS + "[retention]\nenabled = false\n",
    # Holds as by default (nothing expires in a run); events pruned 2 s after they are made,
    # the largest stream there is (baseline: "off").
    "events": "[retention]\nevents_seconds = 2\n",
}


def build_ledger(
    ledger: Path, cards: int, durability: str, config_text: str, loader: str, map_size_bytes: int
) -> tuple[list[str], dict[str, float]]:
    """N cards on N accounts; returns the PANs and how long each step took."""
    started = time.perf_counter()
    pans = [card_pan(index) for index in range(cards)]
    source = ledger.parent / "cards.toml"
    source.write_text(load_file_text(pans))
    written = time.perf_counter()
    if loader == "direct":
        hasher = PanHasher(PAN_KEY)
        store = Ledger(
            ledger,
            map_size_bytes=map_size_bytes,
            durability=durability,  # type: ignore[arg-type]
        )
        try:
            store.bind_pan_key(hasher.fingerprint)
            summary = load_path(store, source, hasher)
        finally:
            store.close()
        assert summary.cards_created == cards, summary
    else:
        config = ledger.parent / "load-config.toml"
        config.write_text(config_text)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "processor.cli",
                "ledger",
                "load",
                "--config",
                str(config),
                "--ledger",
                str(ledger),
                str(source),
            ],
            check=True,
            capture_output=True,
            env=dict(os.environ, PROCESSOR_PAN_KEY=PAN_KEY.decode()),
            timeout=600,
            cwd=PROCESS_CWD,
        )
    loaded = time.perf_counter()
    return pans, {
        "load_file_seconds": written - started,
        "load_seconds": loaded - written,
        "total_seconds": loaded - started,
    }


def ledger_size(ledger: Path) -> dict[str, int]:
    """data.mdb's size and the pages in use (the last page number times the page size)."""
    env = lmdb.open(str(ledger), readonly=True, lock=True, max_dbs=0)
    try:
        used = env.info()["last_pgno"] * env.stat()["psize"]
    finally:
        env.close()
    return {"data_mdb_bytes": (ledger / "data.mdb").stat().st_size, "pages_bytes": used}


def stored_reasons(ledger: Path, references: list[tuple[str, str, str, str]]) -> Json:
    """What the ledger recorded for these (MTI, acquirer, STAN, field 7) messages, by MTI."""
    reasons: dict[str, Counter[str]] = {}
    store = Ledger(ledger, readonly=True)
    try:
        with store.read() as reader:
            for mti, acquirer, stan, transmitted in references:
                answer = reader.answer(transaction_key(mti, acquirer, stan, transmitted))
                reason = "(no stored answer)" if answer is None else answer.reason
                reasons.setdefault(mti, Counter())[reason] += 1
    finally:
        store.close()
    return {mti: dict(counts) for mti, counts in reasons.items()}


# ---- requests files -----------------------------------------------------------------------------


@dataclass
class Original:
    position: int  # on its link
    pan: str
    amount: str
    stan: str
    transmitted: str
    acquirer: str


@dataclass
class RequestsFile:
    path: Path
    count: int
    by_mti: Counter[str] = field(default_factory=Counter)
    # (MTI, acquirer, STAN, field 7) of every reversal and completion, to look up afterwards
    references: list[tuple[str, str, str, str]] = field(default_factory=list)
    seconds: float = 0.0


def transmitted_at(base: datetime, position: int) -> str:
    """Field 7: one more second per STAN wrap, so STAN + field 7 never repeats in a run."""
    return (base + timedelta(seconds=position // STAN_VALUES)).strftime("%m%d%H%M%S")


def write_requests(
    path: Path,
    codec: Codec,
    profile: str,
    run_number: int,
    links: int,
    count: int,
    pans: list[str],
    depth: int,
    rng: random.Random,
) -> RequestsFile:
    """`count` distinct requests, round-robin over `links`, in loadgen's file format."""
    started = time.perf_counter()
    base = datetime.now(UTC)
    result = RequestsFile(path, count)
    per_link: list[list[bytes]] = []
    base += timedelta(seconds=run_number * (count // STAN_VALUES + 1))  # runs never overlap
    for link in range(links):
        terminal = f"T{link:07d}"
        originals: deque[Original] = deque()  # approvals not yet reversed or completed
        records: list[bytes] = []
        link_count = count // links + (1 if link < count % links else 0)
        for position in range(link_count):
            # Numbered across links, so STAN + field 7 is unique in the run whatever the
            # acquirer; per link a STAN repeats only after STAN_VALUES / links requests.
            number = position * links + link
            stan_number = (number + 1) % STAN_VALUES
            stan = f"{stan_number:06d}"
            transmitted = transmitted_at(base, number)
            acquirer = ACQUIRERS[rng.randrange(len(ACQUIRERS))]
            # Field 37 as Visa builds it: year digit, day of year, hour, then a sequence.
            moment = base + timedelta(seconds=number // STAN_VALUES)
            rrn = f"{moment.strftime('%y')[1]}{moment.strftime('%j%H')}{number % 1_000_000:06d}"
            if profile == "echo":
                mti = "0800"
                fields = {"t": mti, "7": transmitted, "11": stan, "70": "301"}
            else:
                mti = "0100"
                if profile == "mixed":
                    draw = rng.random()
                    if draw < MIXED_SHARES["0200"]:
                        mti = "0200"
                    elif draw < MIXED_SHARES["0200"] + MIXED_SHARES["0400"]:
                        mti = "0400"
                    elif draw < sum(MIXED_SHARES.values()):
                        mti = "0220"
                original = None
                if mti in ("0400", "0220"):
                    # Same link, at least `depth` messages earlier: in closed loop it has been
                    # answered before this is sent. None old enough yet: an 0100 instead.
                    if originals and originals[0].position <= position - depth:
                        original = originals.popleft()
                    else:
                        mti = "0100"
                if original is not None:
                    pan, amount, acquirer = original.pan, original.amount, original.acquirer
                    result.references.append((mti, acquirer, stan, transmitted))
                else:
                    pan = pans[rng.randrange(len(pans))]
                    amount = f"{rng.randint(AMOUNT_MIN, AMOUNT_MAX):012d}"
                fields = {
                    "t": mti,
                    "2": pan,
                    "3": "000000",
                    "4": amount,
                    "7": transmitted,
                    "11": stan,
                    "18": "5411",
                    "22": "051",
                    "25": "00",
                    "32": acquirer,
                    "37": rrn,
                    "41": terminal,
                    "43": MERCHANT,
                    "49": "978",
                }
                if original is not None:
                    # Field 90: original MTI, STAN, field 7, acquirer (11, zero-filled), and
                    # forwarding institution (11 zeros).
                    fields["90"] = (
                        f"0100{original.stan}{original.transmitted}{int(acquirer):011d}" + "0" * 11
                    )
                elif mti == "0100" and profile == "mixed":
                    originals.append(Original(position, pan, amount, stan, transmitted, acquirer))
            message = codec.encode(fields)
            frame = len(message).to_bytes(2, "big") + message
            records.append(struct.pack("<HHI", link, len(frame), stan_number) + frame)
            result.by_mti[mti] += 1
        per_link.append(records)
    with path.open("wb") as out:
        out.write(b"LGREQ001" + struct.pack("<II", links, count))
        for position in range(max(len(records) for records in per_link)):
            for records in per_link:
                if position < len(records):
                    out.write(records[position])
    result.seconds = time.perf_counter() - started
    return result


# ---- the load generator -------------------------------------------------------------------------


def build_loadgen() -> float:
    started = time.perf_counter()
    BUILD.mkdir(exist_ok=True)
    compiler = os.environ.get("CC", "cc")
    subprocess.run(
        [
            compiler,
            "-O2",
            "-std=gnu11",
            "-Wall",
            "-Wextra",
            "-o",
            str(LOADGEN),
            str(LOADGEN_SOURCE),
        ],
        check=True,
        timeout=120,
    )
    check_field_table()
    return time.perf_counter() - started


def check_field_table() -> None:
    """loadgen skips response fields 2..39 by its own table: it must be the spec's."""
    kinds = {0: "fixed", 2: "LLVAR", 3: "LLLVAR"}
    iso = load_spec().iso
    expected = [
        f"{number} {kinds[iso[str(number)]['len_type']]} {iso[str(number)]['max_len']}"
        for number in range(2, 40)
    ]
    printed = subprocess.run(
        [str(LOADGEN), "--field-table"], check=True, capture_output=True, text=True, timeout=10
    ).stdout.splitlines()
    if printed != expected:
        wrong = [f"{a!r} != spec {b!r}" for a, b in zip(printed, expected, strict=False) if a != b]
        raise SystemExit(f"loadgen's field table disagrees with the spec: {wrong}")


def run_loadgen(port: int, requests: Path, arguments: list[str], time_bound: float) -> Json:
    completed = subprocess.run(
        [str(LOADGEN), "--port", str(port), "--requests", str(requests), *arguments],
        capture_output=True,
        text=True,
        timeout=time_bound + 60,
        check=False,
    )
    if completed.returncode not in (0, 1) or not completed.stdout.strip():
        raise SystemExit(f"loadgen failed ({completed.returncode}): {completed.stderr.strip()}")
    result: Json = json.loads(completed.stdout)
    return result


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its live children (worker processes), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    own = (int(fields[11]) + int(fields[12])) / ticks
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return own + sum(process_cpu_seconds(int(child)) for child in children)


# ---- one run ------------------------------------------------------------------------------------


@dataclass
class Session:
    port: int
    daemon_pid: int
    http_port: int
    ledger: Path
    scratch: Path
    codec: Codec
    pans: list[str]
    links: int
    depth: int
    rng: random.Random
    run_number: int = 0
    runs: list[Json] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def run_one(session: Session, workload: str, profile: str, mode: str, **load: float) -> Json:
    links, depth = session.links, session.depth
    if mode == "closed":
        count = int(load["requests"])
        arguments = ["--mode", "closed", "--depth", str(depth)]
        arguments += ["--time-limit", str(load["time_limit"])]
        time_bound = load["time_limit"]
        shape = f"{links} x {depth}"
    else:
        count = math.ceil(load["rate"] * load["duration"])
        arguments = ["--mode", "open", "--rate", str(load["rate"])]
        arguments += ["--duration", str(load["duration"]), "--grace", str(GRACE_SECONDS)]
        arguments += ["--tick-us", str(load["tick_us"])]
        time_bound = load["duration"] + GRACE_SECONDS
        shape = f"{load['rate']:.0f}/s"
    requests = write_requests(
        session.scratch / f"requests-{session.run_number}-{workload}.bin",
        session.codec,
        profile,
        session.run_number,
        links,
        count,
        session.pans,
        depth,
        session.rng,
    )
    session.run_number += 1
    batches_before = batch_metrics(session.http_port)
    size_before = ledger_size(session.ledger)
    cpu_before = process_cpu_seconds(session.daemon_pid)
    result = run_loadgen(session.port, requests.path, arguments, time_bound)
    daemon_cpu = process_cpu_seconds(session.daemon_pid) - cpu_before
    size_after = ledger_size(session.ledger)
    requests.path.unlink()  # used once: a replay would be answered from the stored answers
    time.sleep(WORKER_REPORT_WAIT_SECONDS)  # worker processes report their metrics each second
    batches = {
        name: value - batches_before.get(name, 0.0)
        for name, value in batch_metrics(session.http_port).items()
    }
    approvals = result["codes_by_mti"].get("0110:00", 0)  # 0100s approved: each made a hold
    growth = {
        "before": size_before,
        "after": size_after,
        "approvals": approvals,
        "data_mdb_bytes_per_approval": (
            (size_after["data_mdb_bytes"] - size_before["data_mdb_bytes"]) / approvals
            if approvals
            else None
        ),
        "pages_bytes_per_approval": (
            (size_after["pages_bytes"] - size_before["pages_bytes"]) / approvals
            if approvals
            else None
        ),
    }
    record = {
        "workload": workload,
        "mode": mode,
        "shape": shape,
        "requests_generated": count,
        "requests_by_mti": dict(requests.by_mti),
        "generation_seconds": requests.seconds,
        "loadgen": result,
        "daemon_cpu_seconds": daemon_cpu,
        "daemon_cpu_us_per_message": daemon_cpu * 1e6 / max(1, result["answered"]),
        "ledger_growth": growth,
        "batches": {
            "count": batches.get("processor_commit_batch_size_count", 0.0),
            "mean_size": batches.get("processor_commit_batch_size_sum", 0.0)
            / max(1.0, batches.get("processor_commit_batch_size_count", 0.0)),
            "mean_commit_ms": 1000
            * batches.get("processor_commit_seconds_sum", 0.0)
            / max(1.0, batches.get("processor_commit_seconds_count", 0.0)),
            # Of the run's wall time, the share spent deciding, applying and committing
            # batches (summed over worker processes): near 1, the writer lock is the limit.
            "commit_share": batches.get("processor_commit_seconds_sum", 0.0)
            / max(1e-9, result["wall_s"]),
            # The write-ahead log's checkpoints (durable LMDB commits outside the batches).
            "checkpoints": batches.get("processor_ledger_checkpoint_seconds_count", 0.0),
            "checkpoint_share": batches.get("processor_ledger_checkpoint_seconds_sum", 0.0)
            / max(1e-9, result["wall_s"]),
            "mean_checkpoint_ms": 1000
            * batches.get("processor_ledger_checkpoint_seconds_sum", 0.0)
            / max(1.0, batches.get("processor_ledger_checkpoint_seconds_count", 0.0)),
        },
        "retention_pruned": batches.get("retention_pruned", 0.0),  # records, during the run
        "retention_steps": step_quantiles(batches),
    }
    if requests.references:
        record["stored_reasons"] = stored_reasons(session.ledger, requests.references)
    check(session, record, count, mode)
    session.runs.append(record)
    time.sleep(PAUSE_BETWEEN_RUNS_SECONDS)
    return record


WORKER_REPORT_WAIT_SECONDS = 1.2


def metrics_text(http_port: int) -> str:
    """The daemon's /metrics, as Prometheus scrapes it."""
    url = f"http://127.0.0.1:{http_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        return str(response.read().decode())


def batch_metrics(http_port: int) -> dict[str, float]:
    """The daemon's batch-size and commit-time histogram sums and counts, from /metrics."""
    text = metrics_text(http_port)
    wanted = (
        "processor_commit_batch_size_sum",
        "processor_commit_batch_size_count",
        "processor_commit_seconds_sum",
        "processor_commit_seconds_count",
        "processor_ledger_checkpoint_seconds_sum",  # absent in trees before the log
        "processor_ledger_checkpoint_seconds_count",
    )
    found: dict[str, float] = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in wanted:
            found[name] = float(value)
        elif name.startswith("processor_retention_pruned_total{"):  # all kinds of record
            found["retention_pruned"] = found.get("retention_pruned", 0.0) + float(value)
        elif name.startswith("processor_retention_step_seconds_bucket{"):
            found["retention_step_le_" + name.split('"')[1]] = float(value)
    return found


def step_quantiles(batches: dict[str, float]) -> dict[str, float]:
    """Retention steps during a run: how many, and the bucket bounds (seconds) their median,
    p99 and maximum fall in, from the histogram's cumulative bucket counts."""
    buckets = sorted(
        (float(name.removeprefix("retention_step_le_")), count)
        for name, count in batches.items()
        if name.startswith("retention_step_le_") and name != "retention_step_le_+Inf"
    )
    total = batches.get("retention_step_le_+Inf", 0.0)
    found = {"steps": total}
    for label, share in (("p50_le", 0.5), ("p99_le", 0.99), ("max_le", 1.0)):
        found[label] = next(
            (bound for bound, count in buckets if count >= share * total), float("inf")
        )
    return found


def check(session: Session, record: Json, count: int, mode: str) -> None:
    name = f"{record['workload']} {record['shape']}"
    result = record["loadgen"]
    # Open loop sends what is due before the end of the duration: ~rate x duration, give or
    # take a rounding at the boundary.
    expected_sent = count if mode == "closed" else count - 1
    if result["sent"] < expected_sent:
        session.problems.append(f"{name}: sent {result['sent']} of {count} requests")
    if result["answered"] < result["sent"]:
        session.problems.append(
            f"{name}: {result['sent'] - result['answered']} of {result['sent']} unanswered"
        )
    for counter in ("unmatched", "unparsed", "mti_mismatch", "stan_collisions", "framing_errors"):
        if result[counter]:
            session.problems.append(f"{name}: {result[counter]} {counter.replace('_', ' ')}")
    for key, number in sorted(result["codes_by_mti"].items()):
        mti, code = key.split(":")
        if EXPECTED_CODES.get(mti) != code:
            session.warnings.append(f"{name}: {number} x {mti} answered {code}")
    for mti, reasons in record.get("stored_reasons", {}).items():
        for reason, number in sorted(reasons.items()):
            if reason != EXPECTED_REASONS.get(mti):
                session.warnings.append(f"{name}: {number} x {mti} recorded as {reason!r}")


# ---- report -------------------------------------------------------------------------------------

COLUMNS = (
    "workload",
    "links x depth / rate",
    "sent",
    "answered",
    "codes",
    "throughput/s",
    "p50 us",
    "p90 us",
    "p99 us",
    "p99.9 us",
    "max us",
    "loadgen CPU us/msg (wakeups/msg)",
    "daemon CPU us/msg",
    "batches: mean size, commit ms, commit share",
)


def table_row(record: Json) -> str:
    result = record["loadgen"]
    latency = result["latency_us"]
    codes = " ".join(f"{key}={n}" for key, n in sorted(result["codes_by_mti"].items()))
    cells = (
        f"{record['workload']} ({record['mode']})",
        record["shape"],
        str(result["sent"]),
        str(result["answered"]),
        codes,
        f"{result['throughput_per_s']:.0f}",
        *(f"{latency[k]:.0f}" for k in ("p50", "p90", "p99", "p99.9", "max")),
        f"{result['cpu_us_per_message']:.2f} ({result['wakeups'] / max(1, result['sent']):.2f})",
        f"{record['daemon_cpu_us_per_message']:.0f}",
        f"{record['batches']['mean_size']:.0f}, {record['batches']['mean_commit_ms']:.2f}, "
        f"{record['batches']['commit_share']:.2f}",
    )
    return "| " + " | ".join(cells) + " |"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cards", type=int, default=10_000)
    parser.add_argument("--links", type=int, default=8)
    parser.add_argument("--depth", type=int, default=32, help="closed loop: in flight per link")
    parser.add_argument(
        "--requests", type=int, default=100_000, help="closed loop: requests per workload"
    )
    parser.add_argument(
        "--time-limit", type=float, default=30.0, help="closed loop: seconds per workload, at most"
    )
    parser.add_argument("--rates", default="1000,5000,10000", help="open loop, auth; '' for none")
    parser.add_argument("--duration", type=float, default=10.0, help="open loop: seconds per rate")
    parser.add_argument(
        "--tick-us",
        type=float,
        default=0.0,
        help="open loop: loadgen sends wake at most once per this many us (0: at each due time)",
    )
    parser.add_argument("--durability", default="fsync", choices=("fsync", "process"))
    parser.add_argument("--workers", type=int, default=1, help="daemon server.workers")
    parser.add_argument(
        "--retention",
        default="default",
        choices=sorted(RETENTION_CONFIGS),
        help="the daemon's [retention]: its defaults, off, or short horizons (seconds)",
    )
    parser.add_argument(
        "--batch-seconds-max",
        type=float,
        default=None,
        help="the daemon's server.batch_seconds_max (default: the daemon's own)",
    )
    parser.add_argument(
        "--loader",
        default="direct",
        choices=("direct", "cli"),
        help="build the ledger with load_path in this process, or `processor ledger load`",
    )
    parser.add_argument("--map-size-gib", type=int, default=8, help="ledger map size")
    parser.add_argument(
        "--ledger-option",
        action="append",
        default=[],
        help="another [ledger] line for the daemon, e.g. 'checkpoint_seconds = 0.02' (repeatable)",
    )
    parser.add_argument("--seed", type=int, default=8583)
    parser.add_argument("--scratch", help="directory for the scratch ledger (default: a temp dir)")
    parser.add_argument("--json", help="also write everything as JSON to this file")
    args = parser.parse_args()
    if not 1 <= args.cards <= 10_000_000:
        parser.error("--cards: 1..10000000")
    if not 1 <= args.links <= LINKS_MAX:
        parser.error(f"--links: 1..{LINKS_MAX}")
    if not 1 <= args.depth <= DEPTH_MAX:
        parser.error(f"--depth: 1..{DEPTH_MAX}")
    if not 1 <= args.requests <= 50_000_000:
        parser.error("--requests: 1..50000000")
    if not 0 < args.time_limit <= 3600 or not 0 < args.duration <= 3600:
        parser.error("--time-limit and --duration: (0, 3600] seconds")
    rates = [float(rate) for rate in args.rates.split(",") if rate.strip()]
    if any(not 0 < rate <= 1_000_000 for rate in rates):
        parser.error("--rates: each in (0, 1000000]")

    machine = f"{platform.platform()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    print(f"machine: {machine}")
    print(
        f"durability {args.durability}, workers {args.workers}, {args.cards} cards, "
        f"{args.links} links x {args.depth} "
        f"in flight (closed loop), {args.requests} requests per closed-loop run, "
        f"open loop {args.duration}s per rate",
        flush=True,
    )
    build_seconds = build_loadgen()
    report: Json = {
        "machine": machine,
        "arguments": vars(args),
        "loadgen_build_seconds": build_seconds,
    }
    config_text = daemon_config(
        args.durability,
        args.map_size_gib << 30,
        args.workers,
        batch_seconds_max=args.batch_seconds_max,
        retention=args.retention,
        ledger_options=tuple(args.ledger_option),
    )
    with tempfile.TemporaryDirectory(prefix="run_spread-", dir=args.scratch) as scratch_name:
        scratch = Path(scratch_name)
        ledger = scratch / "ledger"
        pans, ledger_timing = build_ledger(
            ledger, args.cards, args.durability, config_text, args.loader, args.map_size_gib << 30
        )
        report["ledger_build"] = dict(ledger_timing, cards=args.cards, loader=args.loader)
        print(
            f"ledger: {args.cards} cards in {ledger_timing['total_seconds']:.2f}s "
            f"(load file {ledger_timing['load_file_seconds']:.2f}s, "
            f"{args.loader} load {ledger_timing['load_seconds']:.2f}s)",
            flush=True,
        )
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
            links=args.links,
            depth=args.depth,
            rng=random.Random(args.seed),
        )
        print("| " + " | ".join(COLUMNS) + " |")
        print("|" + " --- |" * len(COLUMNS), flush=True)
        try:
            closed = {"requests": args.requests, "time_limit": args.time_limit}
            for workload in ("echo", "auth", "mixed"):
                record = run_one(session, workload, workload, "closed", **closed)
                print(table_row(record), flush=True)
            for rate in rates:
                record = run_one(
                    session,
                    "auth",
                    "auth",
                    "open",
                    rate=rate,
                    duration=args.duration,
                    tick_us=args.tick_us,
                )
                print(table_row(record), flush=True)
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
    runs = session.runs
    throughput = {r["workload"]: r["loadgen"]["throughput_per_s"] for r in runs[:2]}
    ratio = throughput["auth"] / max(1e-9, throughput["echo"])
    report["auth_echo_throughput_ratio"] = ratio
    print(f"\nauth/echo closed-loop throughput ratio: {ratio:.3f}")
    for record in runs:
        if record["mode"] == "closed":
            print(
                f"{record['workload']}: {record['requests_generated']} requests generated in "
                f"{record['generation_seconds']:.2f}s"
            )
    auth = runs[1]
    growth = auth["ledger_growth"]
    if growth["approvals"]:
        print(
            f"ledger growth over the auth run: data.mdb "
            f"{growth['data_mdb_bytes_per_approval']:.0f} B/approval, pages in use "
            f"{growth['pages_bytes_per_approval']:.0f} B/approval "
            f"({growth['approvals']} approvals; data.mdb "
            f"{growth['before']['data_mdb_bytes']} -> {growth['after']['data_mdb_bytes']} B)"
        )
    for record in runs:
        if record["mode"] == "open":
            result = record["loadgen"]
            print(
                f"open loop {record['shape']}: loadgen sent up to "
                f"{result['send_lag_max_us']:.0f} us after schedule "
                f"({result['late_sends_over_1ms']} sends over 1 ms late), "
                f"{result['cpu_us_per_wakeup']:.1f} us CPU per wakeup; retention pruned "
                f"{record['retention_pruned']:.0f} records meanwhile"
            )
            made = record["batches"]
            if made["checkpoints"]:
                print(
                    f"  checkpoints: {made['checkpoints']:.0f}, mean "
                    f"{made['mean_checkpoint_ms']:.2f} ms, {made['checkpoint_share']:.2f} of "
                    "the run"
                )
            steps = record["retention_steps"]
            if steps["steps"]:
                print(
                    f"  retention steps: {steps['steps']:.0f}, each at most (bucket bounds) "
                    f"p50 {steps['p50_le'] * 1e6:.0f} us, p99 {steps['p99_le'] * 1e6:.0f} us, "
                    f"max {steps['max_le'] * 1e6:.0f} us"
                )
    for record in runs:
        if "stored_reasons" in record:
            print(f"{record['workload']}: ledger recorded {record['stored_reasons']}")
    for warning in session.warnings:
        print(f"WARNING: {warning}")
    for problem in session.problems:
        print(f"PROBLEM: {problem}")
    report["runs"] = runs
    report["warnings"] = session.warnings
    report["problems"] = session.problems
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 1 if session.problems else 0


if __name__ == "__main__":
    sys.exit(main())
