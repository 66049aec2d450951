"""`processor sim load`: an open-loop load generator with HDR latency percentiles.

Open loop: request i is due at start + i / rate whatever the processor does, and its latency is
measured from that scheduled time, not from when it was actually written. A stalled processor
therefore shows up as latency instead of silently lowering the offered load (coordinated
omission). Every run is bounded in count (rate x duration) and in time (duration + grace).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import cast

import iso8583
from hdrh.histogram import HdrHistogram

from processor import limits
from processor.sim.client import transmission_datetime
from processor.types import Framing
from processor.wire.codec import Codec
from processor.wire.framing import Framer
from processor.wire.spec import load_spec

GRACE_SECONDS = 5.0
LATENCY_MICROSECONDS_MAX = 60_000_000


@dataclass(frozen=True)
class LoadSpec:
    host: str
    port: int
    rate: float
    duration: float
    connections: int
    framing: Framing = "len2"
    pan: str = "4761739001010085"
    amount: int = 100
    json_out: str | None = None
    message: str = "auth"  # auth: 0100 purchases | echo: 0800 echo tests (no ledger; a baseline)


@dataclass
class LoadReport:
    offered_rate: float
    duration_seconds: float
    connections: int
    sent: int
    answered: int
    unanswered: int
    throughput_per_second: float
    unmatched: int = 0  # responses whose STAN names no request of this run, or a repeat
    response_codes: dict[str, int] = field(default_factory=dict)
    latency_us: dict[str, float] = field(default_factory=dict)

    def lines(self) -> list[str]:
        lat = self.latency_us
        return [
            f"offered {self.offered_rate:.0f}/s for {self.duration_seconds:.1f}s on "
            f"{self.connections} connection(s)",
            f"sent {self.sent}  answered {self.answered}  unanswered {self.unanswered}  "
            f"unmatched {self.unmatched}  "
            f"throughput {self.throughput_per_second:.0f}/s",
            "response codes "
            + " ".join(f"{k}:{v}" for k, v in sorted(self.response_codes.items())),
            "latency us (from scheduled send)  "
            + "  ".join(f"{k} {v:.0f}" for k, v in lat.items()),
        ]


class _Link(asyncio.Protocol):
    def __init__(self, prefix: Framing, on_response: Callable[[bytes, float], None]) -> None:
        self.framer = Framer(prefix, max_frame_bytes=8192)
        self.on_response = on_response
        self.transport: asyncio.Transport | None = None
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        for _, message in self.framer.feed(data):
            self.on_response(message, now)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


def stan_offset(codec: Codec, fields: dict[str, str]) -> int:
    """Where field 11 sits in the encoded template: the first byte two STANs change.

    (Searching for the STAN's digits is wrong: they can also run across the end of field 7.)
    """
    first = codec.encode(dict(fields, **{"11": "000000"}))
    second = codec.encode(dict(fields, **{"11": "111111"}))
    offset = next(i for i, (a, b) in enumerate(zip(first, second, strict=True)) if a != b)
    assert first[offset : offset + 6] == b"000000" and second[offset : offset + 6] == b"111111"
    return offset


def _validate(spec: LoadSpec) -> None:
    if not 0 < spec.rate <= limits.sim_rate_per_second_max:
        raise ValueError(f"--rate {spec.rate}: must be in (0, {limits.sim_rate_per_second_max}]")
    if not 0 < spec.duration <= limits.sim_duration_seconds_max:
        raise ValueError(
            f"--duration {spec.duration}: must be in (0, {limits.sim_duration_seconds_max}]"
        )
    if not 1 <= spec.connections <= limits.sim_connections_max:
        raise ValueError(
            f"--connections {spec.connections}: must be 1..{limits.sim_connections_max}"
        )
    if spec.message not in ("auth", "echo"):
        raise ValueError(f"--message {spec.message!r}: must be auth or echo")
    if spec.rate * spec.duration > 999_999:
        raise ValueError("rate x duration exceeds the 999999 distinct STANs of one run")


async def generate(spec: LoadSpec) -> LoadReport:
    _validate(spec)
    loop = asyncio.get_running_loop()
    codec = Codec(load_spec())
    iso_spec = load_spec().iso
    total = int(spec.rate * spec.duration)
    # One template; only the STAN changes per request. A fresh acquirer id per run keeps the
    # transaction identities (acquirer + STAN + date-time) of two runs apart.
    if spec.message == "echo":
        fields = {"t": "0800", "7": transmission_datetime(), "11": "999999", "70": "301"}
    else:
        fields = {
            "t": "0100",
            "2": spec.pan,
            "3": "000000",
            "4": f"{spec.amount:012d}",
            "7": transmission_datetime(),
            "11": "999999",
            "18": "5411",
            "22": "051",
            "32": f"{random.randrange(10**10, 10**11)}",
            "41": "LOADTEST",
            "49": "978",
        }
    template = codec.encode(fields)
    stan_at = stan_offset(codec, fields)
    scheduled = [0.0] * total
    answered_at = [0.0] * total
    codes: dict[str, int] = {}
    histogram = HdrHistogram(1, LATENCY_MICROSECONDS_MAX, 3)
    answered = 0
    unmatched = 0
    all_answered = loop.create_future()

    def on_response(message: bytes, now: float) -> None:
        nonlocal answered, unmatched
        try:
            fields, _ = iso8583.decode(message, iso_spec)
            index = int(fields["11"])
        except (iso8583.DecodeError, ValueError, KeyError):
            unmatched += 1  # no STAN to match: it answers nothing this run sent
            return
        if not 0 <= index < total or answered_at[index] or not scheduled[index]:
            unmatched += 1
            return
        answered_at[index] = now
        codes[fields.get("39", "--")] = codes.get(fields.get("39", "--"), 0) + 1
        latency_us = int((now - scheduled[index]) * 1e6)
        histogram.record_value(min(max(1, latency_us), LATENCY_MICROSECONDS_MAX))
        answered += 1
        if answered == total and not all_answered.done():
            all_answered.set_result(None)

    links = []
    for _ in range(spec.connections):
        _, link = await loop.create_connection(
            lambda: _Link(spec.framing, on_response), spec.host, spec.port
        )
        links.append(link)
    framer = Framer(spec.framing, max_frame_bytes=8192)
    start = time.perf_counter() + 0.05
    interval = 1.0 / spec.rate
    index = 0
    while index < total:
        now = time.perf_counter()
        # Send everything that is due now, in one write per link.
        due_until = now
        batches: dict[int, list[bytes]] = {}
        while index < total and start + index * interval <= due_until:
            scheduled[index] = start + index * interval
            message = b"%s%06d%s" % (template[:stan_at], index, template[stan_at + 6 :])
            batches.setdefault(index % spec.connections, []).append(framer.frame(b"", message))
            index += 1
        for number, frames in batches.items():
            transport = links[number].transport
            if transport is not None and not transport.is_closing():
                transport.write(b"".join(frames))
        if index < total:
            await asyncio.sleep(max(0.0, start + index * interval - time.perf_counter()))
    end_sending = time.perf_counter()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(all_answered, GRACE_SECONDS)
    finished = max([t for t in answered_at if t] or [end_sending])
    for link in links:
        if link.transport is not None:
            link.transport.close()
    elapsed = max(1e-9, finished - start)
    latency = {
        "p50": histogram.get_value_at_percentile(50),
        "p90": histogram.get_value_at_percentile(90),
        "p99": histogram.get_value_at_percentile(99),
        "p99.9": histogram.get_value_at_percentile(99.9),
        "max": histogram.get_max_value(),
    }
    return LoadReport(
        offered_rate=spec.rate,
        duration_seconds=spec.duration,
        connections=spec.connections,
        sent=total,
        answered=answered,
        unanswered=total - answered,
        unmatched=unmatched,
        throughput_per_second=answered / elapsed,
        response_codes=codes,
        latency_us={k: float(v) for k, v in latency.items()},
    )


def run_load(spec: LoadSpec) -> int:
    import uvloop

    json_file = None
    if spec.json_out:
        try:  # before the run, not after minutes of it
            json_file = open(spec.json_out, "w")  # noqa: SIM115 (closed below, after the run)
        except OSError as error:
            print(f"processor sim load: --json {spec.json_out}: {error.strerror}")
            return 2
    try:
        try:
            report = uvloop.run(generate(spec))
        except ValueError as error:
            print(f"processor sim load: {error}")
            return 2
        except OSError as error:
            print(f"processor sim load: cannot reach {spec.host}:{spec.port}: {error}")
            return 2
        print("\n".join(report.lines()))
        if json_file is not None:
            json.dump(asdict(report), json_file, indent=2)
    finally:
        if json_file is not None:
            json_file.close()
    return exit_status(report)


def exit_status(report: LoadReport) -> int:
    """0 only when every request got exactly one answer: an unmatched answer (a duplicate, a
    STAN this run never sent, an undecodable frame) is as wrong as a missing one."""
    if report.unanswered == 0 and report.unmatched == 0:
        return 0
    if report.unmatched:
        print(f"processor sim load: {report.unmatched} answer(s) matched no request of this run")
    return 1
