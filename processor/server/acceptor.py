"""Accepting links on a listener's socket, so that links refused for want of descriptors are
counted and logged, and accepting goes on once descriptors are free again.

`loop.create_server` hides what happens at EMFILE (the process's open-files limit) and ENFILE
(the system's): on uvloop, libuv's `uv__server_io` meets the error in `accept()` and runs
`uv__emfile_trick`: it closes a reserve descriptor, accepts and at once closes every pending
connection, opens the reserve again and returns, never calling back into Python: the peers see
their link closed and nothing is counted or logged. asyncio's `_accept_connection` calls the
loop's exception handler ('socket.accept() out of system resource', an ERROR with a traceback),
stops reading the listening socket for a second and leaves the connections waiting in the
backlog, to be served or refused later, again without a count.

So each listening socket is watched with `add_reader` and accepted here, in bounded rounds. At
EMFILE or ENFILE the acceptor does what libuv does, counting: it closes this process's reserve
descriptor, accepts and closes what is pending (each a refused link, in
`processor_links_closed_total{reason="open_files_limit"|"system_open_files_limit"}` and a
log line within a budget), and takes the reserve again. Without a reserve (it could not be
taken again) it stops reading the socket for a moment, as asyncio does, instead of spinning.
Accepted sockets become links through `loop.connect_accepted_socket`, on uvloop and asyncio
alike.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
from collections.abc import Callable
from typing import Final, Protocol

from processor import limits

log = logging.getLogger("processor.daemon")

# Why a link was refused for want of descriptors, by the accept() error.
REFUSAL_REASONS: Final = {
    errno.EMFILE: "open_files_limit",  # this process's RLIMIT_NOFILE
    errno.ENFILE: "system_open_files_limit",  # the system's (fs.file-max)
}


class Reserve:
    """One descriptor held back, so a connection can be accepted (and closed) at EMFILE."""

    __slots__ = ("_fd",)

    def __init__(self) -> None:
        self._fd: int | None = None
        self.take()

    @property
    def held(self) -> bool:
        return self._fd is not None

    def take(self) -> bool:
        """Hold a descriptor again, if there is none held; whether one is held now."""
        if self._fd is None:
            try:
                self._fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                return False
        return True

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def close(self) -> None:
        self.release()


class ListeningSocket(Protocol):
    """What the acceptor uses of a listening socket (a fake in tests)."""

    def fileno(self) -> int: ...

    def accept(self) -> tuple[socket.socket, object]: ...

    def close(self) -> None: ...


# (reason, links refused, the last refused peer's address) -> counted and logged by the daemon.
OnRefused = Callable[[str, int, str], None]


class Acceptor:
    """Accepts one listener's links; `close()` stops it and closes the listening socket."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: ListeningSocket,
        protocol_factory: Callable[[], asyncio.Protocol],
        reserve: Reserve,
        on_refused: OnRefused,
    ) -> None:
        self._loop = loop
        self._sock = sock
        self._fd = sock.fileno()
        self._protocol_factory = protocol_factory
        self._reserve = reserve
        self._on_refused = on_refused
        self._reading = False
        self._closed = False
        self._retry: asyncio.TimerHandle | None = None
        self._connecting: set[asyncio.Task[object]] = set()

    def start(self) -> None:
        if not self._closed and not self._reading:
            self._loop.add_reader(self._fd, self._on_readable)
            self._reading = True

    def close(self) -> None:
        """Stop accepting and close the listening socket (new connections are then refused
        by the kernel)."""
        if self._closed:
            return
        self._closed = True
        self._stop_reading()
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        self._sock.close()
        self._reserve.close()  # shared: another acceptor still open takes it again at need

    @property
    def accepting(self) -> bool:
        return self._reading

    def _stop_reading(self) -> None:
        if self._reading:
            self._loop.remove_reader(self._fd)
            self._reading = False

    def _on_readable(self) -> None:
        for _ in range(limits.accepts_per_wakeup_max):  # then the loop serves the links
            try:
                connection, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return  # none pending
            except ConnectionAbortedError:
                continue  # gone before it was accepted
            except OSError as error:
                reason = REFUSAL_REASONS.get(error.errno or 0)
                if reason is None:
                    # ENOBUFS, ENOMEM and the like: nothing to shed; try again shortly.
                    log.error("accepting links failed: %s; retrying shortly", error)
                    self._pause()
                    return
                self._shed(reason)
                return
            self._connect(connection)

    def _connect(self, connection: socket.socket) -> None:
        try:
            connection.setblocking(False)
        except OSError:
            connection.close()  # reset before it was ours
            return
        task: asyncio.Task[object] = self._loop.create_task(
            self._loop.connect_accepted_socket(self._protocol_factory, connection)
        )
        self._connecting.add(task)
        task.add_done_callback(self._connected)

    def _connected(self, task: asyncio.Task[object]) -> None:
        self._connecting.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # The peer went away between accept() and the transport: nothing to serve.
            log.debug("an accepted link failed before it opened: %s", task.exception())

    def _shed(self, reason: str) -> None:
        """Refuse what is pending while descriptors are out: accept each with the reserve
        descriptor's slot and close it at once, so peers are told now rather than left in the
        backlog; count them. Without a reserve, pause (and retry) rather than spin."""
        if not self._reserve.held and not self._reserve.take():
            self._pause()
            return
        self._reserve.release()
        refused = 0
        peer = "?"
        still_out = False
        try:
            for _ in range(limits.accepts_per_wakeup_max):
                try:
                    connection, address = self._sock.accept()
                except (BlockingIOError, InterruptedError):
                    break  # none pending any more
                except ConnectionAbortedError:
                    continue
                except OSError:
                    # Out even with the reserve's slot free (another process took it, or
                    # something else is wrong): no way to refuse them now.
                    still_out = True
                    break
                connection.close()
                refused += 1
                peer = _host(address)
        finally:
            held = self._reserve.take()
        if refused:
            self._on_refused(reason, refused, peer)
        if still_out or not held:
            # Wait rather than spin on a socket that stays readable; the pending connections
            # stay in the backlog until then.
            self._pause()

    def _pause(self) -> None:
        self._stop_reading()
        if self._retry is None and not self._closed:
            self._retry = self._loop.call_later(limits.accept_retry_seconds, self._resume)

    def _resume(self) -> None:
        self._retry = None
        self._reserve.take()
        self.start()


def _host(address: object) -> str:
    if isinstance(address, tuple) and address:
        return str(address[0])
    return "?"
