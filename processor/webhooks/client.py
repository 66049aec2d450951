"""The webhook POST client: HTTP/1.1 keep-alive connections, responses read by httptools.

Why not aiohttp's client, which the dispatcher used: profiled in the delivery process at 3,000
events/s (py-spy), a POST through aiohttp's ClientSession cost about 200 us of CPU, three
quarters of the process's time per event; delivery then fell behind at a few thousand events
a second on this 2-core machine. A webhook POST needs a small part of a general client: one
request shape, no redirects (Standard Webhooks: never followed), no cookies, no proxies, no
compression, a status and two headers (Location, Retry-After) read from the answer, the body
read and dropped. This client writes each request in one write on a kept-alive connection
and hands the answer bytes to httptools (the C parser uvicorn uses, by uvloop's authors).

Connections are pooled per origin, one request at a time on each (no pipelining); the
dispatcher's `in_flight_max` bounds how many a busy endpoint opens. A request on a reused
connection that the server had closed meanwhile (it answers nothing) is sent once more on a
new connection at once, rather than waiting out a retry back-off: webhook receivers
deduplicate by `webhook-id`, and the dispatcher delivers at least once anyway.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from typing import Final
from urllib.parse import quote, urlsplit

import httptools
import msgspec

# Idle connections older than this are closed rather than reused (servers close theirs too).
KEEPALIVE_SECONDS: Final = 30.0
IDLE_CONNECTIONS_PER_ORIGIN_MAX: Final = 64
HEADER_VALUE_KEPT_BYTES_MAX: Final = 2048  # of Location and Retry-After; the rest is dropped
ANSWER_HEADERS_BYTES_MAX: Final = 64 * 1024  # an answer whose headers run longer is refused
# Of an answer after its headers (its body and chunked trailers): nothing of it is read, and
# trailers were gathered without bound (httptools joins a header value by repeated
# concatenation: quadratic, a hostile receiver pinned a core and 200 MiB in 10 s on one
# connection). Beyond it the answer is its status, and the connection is closed.
ANSWER_BYTES_MAX: Final = 1024 * 1024


class Reply(msgspec.Struct, frozen=True, kw_only=True):
    status: int
    location: str | None = None
    retry_after: str | None = None


class HttpError(Exception):
    """No usable answer: the connection failed, closed early, or the answer was not HTTP.

    `kind` is the metric label and dead-letter reason (`connect_failed`, `disconnected`,
    `bad_answer`, `bad_url`); a time-out is TimeoutError (the dispatcher's `timeout`)."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind


class _Target(msgspec.Struct, frozen=True):
    origin: tuple[str, str, int]  # scheme, host, port
    head: bytes  # request line and the headers every request to it carries


class _Connection(asyncio.Protocol):
    __slots__ = (
        "_answer",
        "_answer_bytes",
        "_delimited",
        "_header_bytes",
        "_headers_done",
        "_location",
        "_parser",
        "_retry_after",
        "closed",
        "idle_since",
        "received_any",
        "transport",
    )

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self.received_any = False
        self._answer: asyncio.Future[Reply] | None = None
        self._parser: httptools.HttpResponseParser | None = None
        self._location: str | None = None
        self._retry_after: str | None = None
        self._header_bytes = 0
        self._answer_bytes = 0  # after the headers: body and trailers
        self._headers_done = False
        self._delimited = False

    # asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.received_any = True
        if self._parser is None:
            self._fail(HttpError("bad_answer", "bytes from the server with no request out"))
            return
        if not self._headers_done:
            # httptools gathers a header line before it calls back, unbounded: it is fed no
            # more than the headers may still take. Only that counts against their bound: a
            # 200 whose body came in the same read was failed as "headers over 64 KiB", and
            # the event it delivered sent again until it was a dead letter.
            room = ANSWER_HEADERS_BYTES_MAX - self._header_bytes
            head, data = data[:room], data[room:]
            self._header_bytes += len(head)
            if not self._feed(head) or not data:
                return
            if self._parser is None:  # a whole answer, and more bytes after it
                self._fail(HttpError("bad_answer", "bytes from the server with no request out"))
                return
            if not self._headers_done:
                self._fail(HttpError("bad_answer", "headers over 64 KiB"))
                return
        self._answer_bytes += len(data)
        if self._answer_bytes > ANSWER_BYTES_MAX:
            # Nothing of the body is read, and its status is known: that is the answer. The
            # connection goes, with what is left of the body unread.
            parser, answer = self._parser, self._answer
            if parser is not None and answer is not None and not answer.done():
                answer.set_result(self._reply(parser))
            self._parser = None
            self.close()
            return
        self._feed(data)

    def _feed(self, data: bytes) -> bool:
        """Feed the parser; False when the answer is not HTTP (the connection is closed)."""
        assert self._parser is not None
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as error:
            self._fail(HttpError("bad_answer", f"{type(error).__name__}: {error}"))
            return False
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        answer = self._answer
        if answer is not None and not answer.done():
            parser = self._parser
            if parser is not None and self._headers_done and not self._delimited:
                # Headers arrived and the body runs until the server closes: that was it.
                answer.set_result(self._reply(parser))
            else:
                answer.set_exception(HttpError("disconnected", "closed before it answered"))

    # httptools callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        lowered = name.lower()
        if lowered in (b"content-length", b"transfer-encoding"):
            self._delimited = True  # the body's end is known: a close before it is a failure
        if lowered == b"location":
            self._location = value[:HEADER_VALUE_KEPT_BYTES_MAX].decode("latin-1")
        elif lowered == b"retry-after":
            self._retry_after = value[:HEADER_VALUE_KEPT_BYTES_MAX].decode("latin-1")

    def on_headers_complete(self) -> None:
        self._headers_done = True

    def on_message_complete(self) -> None:
        parser, answer = self._parser, self._answer
        assert parser is not None
        if 100 <= parser.get_status_code() < 200:
            # An interim answer (100 Continue, 103 Early Hints): the final one follows, read
            # by the same parser.
            # Its bytes stay counted: the final answer's headers may have come in the same
            # read, counted with it, and forgetting them let those run to twice the bound.
            self._location = self._retry_after = None
            self._headers_done = self._delimited = False
            return
        keep = parser.should_keep_alive()
        self._parser = None
        if answer is not None and not answer.done():
            answer.set_result(self._reply(parser))
        if not keep:
            self.close()

    # used by the client

    def send(self, data: bytes) -> asyncio.Future[Reply]:
        assert self.transport is not None and self._parser is None
        self._answer = asyncio.get_running_loop().create_future()
        self._parser = httptools.HttpResponseParser(self)
        self._location = self._retry_after = None
        self._header_bytes = self._answer_bytes = 0
        self._headers_done = self._delimited = False
        self.received_any = False
        self.transport.write(data)
        return self._answer

    @property
    def reusable(self) -> bool:
        return not self.closed and self._parser is None

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def _reply(self, parser: httptools.HttpResponseParser) -> Reply:
        return Reply(
            status=parser.get_status_code(),
            location=self._location,
            retry_after=self._retry_after,
        )

    def _fail(self, error: HttpError) -> None:
        if self._answer is not None and not self._answer.done():
            self._answer.set_exception(error)
        self.close()


class HttpClient:
    """POSTs to webhook URLs over pooled keep-alive connections."""

    def __init__(self) -> None:
        self._idle: dict[tuple[str, str, int], deque[_Connection]] = {}
        self._sweep: asyncio.TimerHandle | None = None  # closes connections idle too long
        self._targets: dict[str, _Target] = {}
        self._tls: ssl.SSLContext | None = None

    async def post(
        self, url: str, body: bytes, headers: dict[str, str], timeout_seconds: float
    ) -> Reply:
        """One POST and its answer; HttpError when there is no usable answer, TimeoutError
        when it took longer than `timeout_seconds` in all."""
        target = self._target(url)
        lines = [target.head]
        for name, value in headers.items():
            lines.append(f"{name}: {value}\r\n".encode("latin-1"))
        lines.append(f"Content-Length: {len(body)}\r\n\r\n".encode("ascii"))
        lines.append(body)
        request = b"".join(lines)
        async with asyncio.timeout(timeout_seconds):
            connection = self._take_idle(target.origin)
            if connection is not None:
                try:
                    return await self._exchange(target.origin, connection, request)
                except HttpError as error:
                    if error.kind != "disconnected" or connection.received_any:
                        raise
                    # Closed by the server while idle, before this request: once more, anew.
            connection = await self._connect(target.origin)
            return await self._exchange(target.origin, connection, request)

    async def close(self) -> None:
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for connections in self._idle.values():
            for connection in connections:
                connection.close()
        self._idle.clear()

    async def _exchange(
        self, origin: tuple[str, str, int], connection: _Connection, request: bytes
    ) -> Reply:
        try:
            reply = await connection.send(request)
        except BaseException:
            connection.close()  # cancelled (timeout) or failed: its state is unknown
            raise
        if connection.reusable:
            idle = self._idle.setdefault(origin, deque())
            self._close_stale(idle)
            if len(idle) < IDLE_CONNECTIONS_PER_ORIGIN_MAX:
                connection.idle_since = time.monotonic()
                idle.append(connection)
                if self._sweep is None:
                    self._schedule_sweep()
            else:
                connection.close()
        return reply

    @staticmethod
    def _close_stale(idle: deque[_Connection]) -> None:
        """Close the connections idle for KEEPALIVE_SECONDS or more (the oldest are first)."""
        now = time.monotonic()
        while idle and now - idle[0].idle_since >= KEEPALIVE_SECONDS:
            idle.popleft().close()

    def _sweep_idle(self) -> None:
        """Idle connections were closed only when the next request looked for one: an
        endpoint that went quiet kept up to IDLE_CONNECTIONS_PER_ORIGIN_MAX sockets open for
        good. Swept while any are idle, when the oldest of them has been for KEEPALIVE_SECONDS."""
        self._sweep = None
        for idle in self._idle.values():
            self._close_stale(idle)
        self._schedule_sweep()

    def _schedule_sweep(self) -> None:
        oldest = min((idle[0].idle_since for idle in self._idle.values() if idle), default=None)
        if oldest is not None:
            delay = max(0.0, oldest + KEEPALIVE_SECONDS - time.monotonic())
            self._sweep = asyncio.get_running_loop().call_later(delay, self._sweep_idle)

    def _take_idle(self, origin: tuple[str, str, int]) -> _Connection | None:
        idle = self._idle.get(origin)
        now = time.monotonic()
        while idle:
            connection = idle.pop()  # the most recently used: the least likely to be closed
            if connection.reusable and now - connection.idle_since < KEEPALIVE_SECONDS:
                return connection
            connection.close()
        return None

    async def _connect(self, origin: tuple[str, str, int]) -> _Connection:
        scheme, host, port = origin
        tls = None
        if scheme == "https":
            if self._tls is None:
                self._tls = ssl.create_default_context()
            tls = self._tls
        try:
            _, protocol = await asyncio.get_running_loop().create_connection(
                _Connection, host, port, ssl=tls, server_hostname=host if tls else None
            )
        except OSError as error:
            raise HttpError("connect_failed", f"{type(error).__name__}: {error}") from None
        return protocol

    def _target(self, url: str) -> _Target:
        target = self._targets.get(url)
        if target is None:
            try:
                target = self._targets[url] = parse_target(url)
            except ValueError as error:  # UnicodeError too
                raise HttpError("bad_url", str(error)) from None
        return target


def parse_target(url: str) -> _Target:
    """Where a webhook URL sends its POSTs, and the request head; ValueError (UnicodeError
    among them) when it cannot be one. Config loading calls it too, so a bad URL stops the
    start naming its key rather than failing every delivery."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise ValueError(f"scheme {scheme!r}: http or https")
    if not parts.hostname:
        raise ValueError("no host")
    # An internationalised name as DNS and the Host header carry it (IDNA, ASCII).
    host = parts.hostname.encode("idna").decode("ascii")
    port = parts.port or (443 if scheme == "https" else 80)  # ValueError when out of range
    # Percent-encoded where the configured URL is not ASCII; what is already is kept.
    path = quote(parts.path or "/", safe="/%:@!$&'()*+,;=~-._") + (
        f"?{quote(parts.query, safe='/%:@!$&()*+,;=?~-._')}" if parts.query else ""
    )
    default = (scheme == "https" and port == 443) or (scheme == "http" and port == 80)
    named = f"[{host}]" if ":" in host else host  # an IPv6 literal
    host_header = named if default else f"{named}:{port}"
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host_header}\r\nUser-Agent: processor-webhooks\r\n"
    ).encode("ascii")
    return _Target((scheme, host, port), head)
