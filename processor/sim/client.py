"""A minimal network-side ISO 8583 client: frames requests, matches responses by STAN."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime

import iso8583

from processor.types import Framing
from processor.wire.codec import Codec
from processor.wire.framing import Framer
from processor.wire.spec import load_spec


def transmission_datetime(now: datetime | None = None) -> str:
    return (now or datetime.now(UTC)).strftime("%m%d%H%M%S")


class WireClient:
    """One link. `request()` sends a message and waits for the response with the same STAN."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, prefix: Framing):
        self._reader = reader
        self._writer = writer
        self.framer = Framer(prefix, max_frame_bytes=8192)
        self.codec = Codec(load_spec())
        self._spec = load_spec().iso
        self._waiting: dict[str, asyncio.Future[tuple[bytes, dict[str, str]]]] = {}
        self._reader_task = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    async def connect(cls, host: str, port: int, prefix: Framing = "len2") -> WireClient:
        reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer, prefix)

    async def _read(self) -> None:
        while True:
            data = await self._reader.read(65536)
            if not data:
                for future in self._waiting.values():
                    if not future.done():
                        future.set_exception(ConnectionError("link closed by the processor"))
                return
            for _, message in self.framer.feed(data):
                fields, _ = iso8583.decode(message, self._spec)
                stan = fields.get("11", "")
                waiter = self._waiting.pop(stan) if stan in self._waiting else None
                if waiter is not None and not waiter.done():
                    waiter.set_result((message, fields))

    def send_raw(self, message: bytes) -> None:
        self._writer.write(self.framer.frame(b"", message))

    async def exchange_raw(
        self, message: bytes, stan: str, timeout: float = 5.0
    ) -> tuple[bytes, dict[str, str]]:
        future: asyncio.Future[tuple[bytes, dict[str, str]]] = (
            asyncio.get_running_loop().create_future()
        )
        self._waiting[stan] = future
        self.send_raw(message)
        return await asyncio.wait_for(future, timeout)

    async def exchange(
        self, fields: dict[str, str], timeout: float = 5.0
    ) -> tuple[bytes, dict[str, str]]:
        return await self.exchange_raw(self.codec.encode(fields), fields["11"], timeout)

    async def close(self) -> None:
        self._reader_task.cancel()
        self._writer.close()
        with contextlib.suppress(ConnectionError):
            await self._writer.wait_closed()
