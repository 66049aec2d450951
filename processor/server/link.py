"""One network link: an asyncio Protocol that frames bytes and hands messages to the daemon.

Fair to the other links: a link frames and decodes at most `limits.frames_per_turn_max` frames
per turn of the event loop (the rest waits in the framer, reading paused, for the next turn),
and its undecided requests wait in a queue of its own, from which the daemon fills batches
round-robin. Flow control: reading pauses while the peer is not reading our responses
(transport write buffer over its high-water mark), and while an advice waits beyond the link's
queue limit. The answers a turn
produces at once (echoes, format errors, 91s) leave in one write.
Each link belongs to a Listener, whose dialect (framing, header, bitmap) it speaks.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from typing import TYPE_CHECKING, cast

from processor import limits
from processor.config import ListenerConfig
from processor.log_budget import LogBudget
from processor.wire.codec import Codec
from processor.wire.errors import FramingError
from processor.wire.framing import Framer
from processor.wire.spec import load_spec

if TYPE_CHECKING:
    from processor.server.daemon import Daemon
    from processor.wire.messages import AuthorizationRequest

# A request waiting to be decided: its header, the request, when it was read (perf_counter ns).
Queued = tuple[bytes, "AuthorizationRequest", int]

log = logging.getLogger("processor.link")

_TURN_NS = int(limits.turn_seconds_max * 1e9)
_LIGHT_TURN_NS = int(limits.light_turn_seconds_max * 1e9)


class Listener:
    """What the links of one configured listener share: its settings and its codec."""

    __slots__ = ("codec", "config", "name")

    def __init__(self, config: ListenerConfig) -> None:
        self.config = config
        self.name = config.name
        self.codec = Codec(load_spec(config.bitmap))


class Link(asyncio.Protocol):
    __slots__ = (
        "_bad_times",
        "_closing",
        "_daemon",
        "_output",
        "_paused_for_backlog",
        "_paused_for_in_flight",
        "_paused_for_writes",
        "decoded_any",
        "framer",
        "in_flight",
        "last_received",
        "listener",
        "log_budget",
        "partial_since",
        "peer",
        "peer_address",
        "queue",
        "ready",
        "requested_at",
        "signed_on",
        "transport",
    )

    def __init__(self, daemon: Daemon, listener: Listener) -> None:
        self._daemon = daemon
        self.listener = listener
        config = listener.config
        self.framer = Framer(
            config.framing, header_bytes=config.header_bytes, max_frame_bytes=config.max_frame_bytes
        )
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.peer_address = "?"  # the peer's IP address: links per address are limited
        self.in_flight = 0
        # When the latest bad messages arrived (monotonic seconds), at most bad_messages_max.
        self._bad_times: deque[float] = deque(maxlen=config.bad_messages_max)
        self.decoded_any = False  # whether any message of this link has decoded
        self.log_budget = LogBudget()  # replaced by its peer address's at connection_made
        self.last_received = time.monotonic()  # for the idle timeout
        self.partial_since: float | None = None  # when the frame still buffered began
        self.signed_on = False
        # When it last queued a request to decide (monotonic seconds; -inf: never): a link
        # that did lately with few in flight is a light one, which short batches protect.
        self.requested_at = -math.inf
        self.queue: deque[Queued] = deque()  # requests waiting to be decided, oldest first
        self.ready = False  # in the daemon's round-robin of links with queued requests
        self._output: list[bytes] | None = None  # answers collected during a turn, else None
        self._paused_for_backlog = False
        self._paused_for_in_flight = False
        self._paused_for_writes = False
        self._closing = False  # to be closed once its requests are answered

    # --- asyncio callbacks -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        self.peer_address = str(peer[0]) if peer else "?"
        self.peer += f" ({self.listener.name})"
        self.log_budget = self._daemon.log_budget_for(self.peer_address)
        self.transport.set_write_buffer_limits(high=self._daemon.write_buffer_high_bytes)
        self._daemon.link_opened(self)

    def data_received(self, data: bytes) -> None:
        self._turn(data, time.perf_counter_ns())

    def _continue(self, received_ns: int) -> None:
        if not self._daemon.stopping:
            self._turn(b"", received_ns)

    def _turn(self, data: bytes, received_ns: int) -> None:
        """Frame and hand on at most a turn's share of what the link sent; when more may be
        buffered, pause reading and take the next share in the next turn of the loop.

        A share is bounded in count (`limits.frames_per_turn_max`) and in time
        (`limits.turn_seconds_max`, or `limits.light_turn_seconds_max` while the daemon
        protects a light link; checked every `limits.frames_per_chunk` frames): what the
        frames cost varies (an echo, a 91, a request queued, a bad message logged), and what
        another link waits for is the time. The share bounds the framing work too, not only
        decoding: a read of 64 KiB of zero-length frames is 32,768 frames, which framing all at
        once held the loop for hundreds of milliseconds. `received_ns` stays the time of the
        read that brought them.
        """
        now = self.last_received = time.monotonic()
        started_ns = time.perf_counter_ns()
        chunk = limits.frames_per_chunk
        share = limits.frames_per_turn_max
        daemon = self._daemon
        on_message = daemon.on_message
        framer = self.framer
        taken = 0
        more = False
        self._output = []
        try:
            while True:
                if self._closing:
                    return  # its stream broke: nothing more is read from it
                try:
                    frames = framer.feed(data, chunk)
                except FramingError as error:
                    daemon.framing_error(self, error)
                    return
                data = b""
                taken += len(frames)
                transport = self.transport
                for header, message in frames:
                    if self._closing or transport is None or transport.is_closing():
                        break  # closing (bad-message budget): nothing more is read from it
                    on_message(self, header, message, received_ns)
                if framer.error is not None:  # behind the frames just handled
                    if not self._closing:
                        daemon.framing_error(self, framer.error)
                    return
                if len(frames) < chunk or not self.open or daemon.stopping:
                    break
                turn_ns = _LIGHT_TURN_NS if daemon.protecting_light_link else _TURN_NS
                if taken >= share or time.perf_counter_ns() - started_ns > turn_ns:
                    # Stopping: what is still framed was never decoded, so nothing of it was
                    # applied; the network repeats it elsewhere. Drain answers what was queued.
                    more = True
                    break
        finally:
            if not framer.buffered_bytes:
                self.partial_since = None
            elif self.partial_since is None or taken:
                self.partial_since = now  # the frame still buffered began in this read
            self._write_output()
            if more:
                asyncio.get_running_loop().call_soon(self._continue, received_ns)
            if more != self._paused_for_backlog:
                self._paused_for_backlog = more
                self._daemon.backlogged_links += 1 if more else -1
                self._update_reading()

    def _write_output(self) -> None:
        output, self._output = self._output, None
        if output and self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(output))

    def eof_received(self) -> bool:
        return False  # close our side too; in-flight answers are stored for a retransmission

    def connection_lost(self, exc: Exception | None) -> None:
        if self._paused_for_backlog:
            self._paused_for_backlog = False
            self._daemon.backlogged_links -= 1
        self._daemon.link_closed(self)

    def pause_writing(self) -> None:
        self._paused_for_writes = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._paused_for_writes = False
        self._update_reading()

    # --- used by the daemon ------------------------------------------------------------------

    @property
    def open(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()

    def write(self, data: bytes) -> None:
        if self._output is not None:
            self._output.append(data)  # within a turn: leaves with the turn's other answers
        elif self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def stalled(self, now: float) -> str | None:
        """Why this link should be closed at `now` (idle, or a frame left half-sent), if so."""
        config = self.listener.config
        partial = config.partial_frame_timeout_seconds
        if partial and self.partial_since is not None and now - self.partial_since >= partial:
            return "partial_frame_timeout"
        idle = config.idle_timeout_seconds
        if idle and now - self.last_received >= idle:
            return "idle_timeout"
        return None

    def bad_message(self, now: float) -> bool:
        """Count a bad message at `now`; True when the link is past its listener's rate."""
        times = self._bad_times
        times.append(now)
        config = self.listener.config
        return len(times) == config.bad_messages_max and (
            now - times[0] < config.bad_message_window_seconds
        )

    @property
    def queue_full(self) -> bool:
        return self.in_flight >= self.listener.config.in_flight_per_link_max

    def request_started(self) -> None:
        self.in_flight += 1
        if self.in_flight > self.listener.config.in_flight_per_link_max:
            # Only an advice is queued past the limit (it is never refused): read no more
            # until the queue has room.
            self._paused_for_in_flight = True
            self._update_reading()

    def requests_finished(self, count: int) -> None:
        self.in_flight -= count
        assert self.in_flight >= 0, self.in_flight
        if self._closing and not self.in_flight:
            self.close()
            return
        if self._paused_for_in_flight and self.in_flight < (
            self.listener.config.in_flight_per_link_max // 2 or 1
        ):
            self._paused_for_in_flight = False
            self._update_reading()

    def close(self) -> None:
        if self.transport is not None:
            self._write_output()  # answers of this turn so far leave before the link closes
            self.transport.close()

    def close_when_answered(self) -> None:
        """Read no more and close once the requests it sent are answered: what a peer sent
        whole before its stream broke is decided and answered, as on any link, not applied
        and left unanswered by a link closed under it."""
        if not self.in_flight:
            self.close()
            return
        self._closing = True
        self._update_reading()

    def _update_reading(self) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        if (
            self._paused_for_in_flight
            or self._paused_for_writes
            or self._paused_for_backlog
            or self._closing
        ):
            self.transport.pause_reading()
        elif not self._daemon.stopping:
            self.transport.resume_reading()
