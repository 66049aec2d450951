"""A child process's reports to the daemon's primary process, over a socket pair.

Used by the worker processes (processor/server/workers.py) and the webhook delivery process
(processor/webhooks/process.py): one `ready` report once the child serves, then its metrics
registry every so often, summed into the primary's /metrics (metrics.WorkerSamples). Each
report is a 4-byte length and a msgpack body, bounded by `limits.worker_report_bytes_max`.
"""

from __future__ import annotations

import asyncio
import struct

import msgspec

from processor import limits
from processor.metrics import Sample

_LENGTH = struct.Struct(">I")


class Report(msgspec.Struct, frozen=True):
    kind: str  # "ready" | "metrics"
    samples: list[Sample] = []


_encode_report = msgspec.msgpack.Encoder().encode
_decode_report = msgspec.msgpack.Decoder(Report).decode


async def send_report(writer: asyncio.StreamWriter, report: Report) -> None:
    body = _encode_report(report)
    writer.write(_LENGTH.pack(len(body)) + body)
    await writer.drain()


async def receive_report(reader: asyncio.StreamReader) -> Report | None:
    """The next report, or None when the child closed its end (it exited)."""
    try:
        length = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))[0]
        if length > limits.worker_report_bytes_max:
            raise ValueError(f"report of {length} bytes from a child process")
        return _decode_report(await reader.readexactly(length))
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
