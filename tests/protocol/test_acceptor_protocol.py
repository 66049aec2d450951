"""The acceptor of a listener's links, driven with a scripted listening socket and a fake loop:
links refused at the open-files limit are counted, and accepting goes on once it passes."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from test_link_protocol import CODEC, ECHO_FIELDS, FRAMER, make_daemon

from processor import limits
from processor.server.acceptor import Acceptor, Reserve
from processor.server.daemon import drain, listen, start_listeners

PENDING = "pending"  # a connection waiting in the backlog


class FakeConnection:
    def __init__(self, sock: ScriptedSocket, address: str) -> None:
        self.sock = sock
        self.address = address
        self.closed = False
        self.blocking = True

    def setblocking(self, flag: bool) -> None:
        self.blocking = flag

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.sock.free += 1  # its descriptor


class ScriptedSocket:
    """A listening socket whose accept() follows a script: PENDING is a connection waiting in
    the backlog, an errno raises that error; nothing left means nothing pending (EAGAIN).

    `free` models the process's descriptors left: accepting takes one (EMFILE at none),
    closing a connection gives it back."""

    def __init__(self, script: list[Any], free: int = 1000) -> None:
        self.script = script
        self.free = free
        self.accepted: list[FakeConnection] = []
        self.closed = False

    def fileno(self) -> int:
        return 99

    def accept(self) -> tuple[FakeConnection, tuple[str, int]]:
        if not self.script:
            raise BlockingIOError(errno.EAGAIN, "nothing pending")
        head = self.script[0]
        if head != PENDING:
            self.script.pop(0)
            raise OSError(head, errno.errorcode[head])
        if not self.free:
            raise OSError(errno.EMFILE, "Too many open files")
        self.script.pop(0)
        self.free -= 1
        connection = FakeConnection(self, f"10.0.0.{len(self.accepted) + 1}")
        self.accepted.append(connection)
        return connection, (connection.address, 40000)

    def close(self) -> None:
        self.closed = True


class FakeReserve(Reserve):
    """The reserve descriptor, out of the scripted socket's descriptors."""

    def __init__(self, sock: ScriptedSocket) -> None:
        self.sock = sock
        self._fd = None
        self.releases = 0
        self.take()

    def take(self) -> bool:
        if self._fd is None and self.sock.free:
            self.sock.free -= 1
            self._fd = 1
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            self._fd = None
            self.sock.free += 1
            self.releases += 1


class FakeTimer:
    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeTask:
    """A task that is done at once (the link's transport is the loop's business)."""

    def cancelled(self) -> bool:
        return False

    def exception(self) -> BaseException | None:
        return None

    def add_done_callback(self, callback: Callable[[FakeTask], None]) -> None:
        callback(self)


class FakeLoop:
    def __init__(self) -> None:
        self.readers: dict[int, Callable[[], None]] = {}
        self.timers: list[tuple[float, Callable[[], None]]] = []
        self.connected: list[FakeConnection] = []

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        self.readers[fd] = callback

    def remove_reader(self, fd: int) -> bool:
        return self.readers.pop(fd, None) is not None

    def call_later(self, delay: float, callback: Callable[[], None]) -> FakeTimer:
        self.timers.append((delay, callback))
        return FakeTimer()

    async def connect_accepted_socket(self, factory: object, sock: FakeConnection) -> None:
        self.connected.append(sock)

    def create_task(self, coroutine: Any) -> FakeTask:
        with contextlib.suppress(StopIteration):
            coroutine.send(None)  # runs to its end at once: nothing in it awaits
        return FakeTask()


def make_acceptor(
    script: list[Any], *, free: int = 1000
) -> tuple[Acceptor, ScriptedSocket, FakeLoop, FakeReserve, list[tuple[str, int, str]]]:
    """An acceptor started on a scripted socket with `free` descriptors left beside its
    reserve (which takes one more when it can)."""
    sock, loop = ScriptedSocket(script, free + 1), FakeLoop()
    reserve = FakeReserve(sock)
    refused: list[tuple[str, int, str]] = []
    acceptor = Acceptor(
        loop,  # type: ignore[arg-type]
        sock,  # type: ignore[arg-type]
        lambda: asyncio.Protocol(),
        reserve,
        lambda reason, count, peer: refused.append((reason, count, peer)),
    )
    acceptor.start()
    return acceptor, sock, loop, reserve, refused


def test_pending_connections_are_accepted_and_handed_to_the_loop() -> None:
    acceptor, sock, loop, _, refused = make_acceptor([PENDING, PENDING])
    loop.readers[99]()
    assert loop.connected == sock.accepted and len(sock.accepted) == 2
    assert not any(c.blocking for c in sock.accepted)
    assert refused == [] and acceptor.accepting


def test_at_emfile_pending_connections_are_refused_counted_and_accepting_goes_on() -> None:
    # At the open-files limit: no descriptor left but the reserve.
    acceptor, sock, loop, reserve, refused = make_acceptor([PENDING] * 3, free=0)
    loop.readers[99]()
    # The reserve's slot accepted each pending connection, which was closed at once.
    assert refused == [("open_files_limit", 3, "10.0.0.3")]
    assert [c.closed for c in sock.accepted] == [True, True, True]
    assert loop.connected == []
    assert reserve.releases == 1 and reserve.held and sock.free == 0  # taken again
    assert acceptor.accepting and loop.timers == []  # no pause: the reserve is back
    # Later, still out: each new connection is refused and counted too.
    sock.script += [PENDING]
    loop.readers[99]()
    assert refused[-1] == ("open_files_limit", 1, "10.0.0.4")
    # Links closed, descriptors free: the next one is a link.
    sock.free += 2
    sock.script += [PENDING]
    loop.readers[99]()
    assert loop.connected == [sock.accepted[-1]] and not sock.accepted[-1].closed
    assert len(refused) == 2


def test_enfile_is_counted_as_the_system_limit() -> None:
    _, sock, loop, _, refused = make_acceptor([errno.ENFILE, PENDING])
    loop.readers[99]()
    assert refused == [("system_open_files_limit", 1, "10.0.0.1")]
    assert sock.accepted[0].closed


def test_without_a_reserve_accepting_pauses_instead_of_spinning() -> None:
    acceptor, sock, loop, reserve, refused = make_acceptor([PENDING], free=-1)
    assert not reserve.held  # no descriptor for it at start
    loop.readers[99]()
    assert refused == []  # it could not be accepted: it waits in the backlog
    assert not acceptor.accepting and 99 not in loop.readers
    ((delay, resume),) = loop.timers
    assert delay == limits.accept_retry_seconds
    sock.free += 2  # links closed: descriptors free again
    resume()
    assert acceptor.accepting and reserve.held
    loop.readers[99]()
    assert loop.connected == sock.accepted and len(sock.accepted) == 1
    assert refused == []


def test_a_reserve_not_taken_back_pauses_accepting() -> None:
    acceptor, _, loop, reserve, refused = make_acceptor([PENDING], free=0)
    real_take = reserve.take
    reserve.take = lambda: False  # type: ignore[method-assign]  # another process took it
    loop.readers[99]()
    assert refused == [("open_files_limit", 1, "10.0.0.1")]  # refused with its slot
    assert not acceptor.accepting and len(loop.timers) == 1  # then a pause, not a spin
    reserve.take = real_take  # type: ignore[method-assign]
    loop.timers[0][1]()
    assert acceptor.accepting and reserve.held


def test_accepting_is_bounded_per_wakeup() -> None:
    _, _, loop, _, _ = make_acceptor([PENDING] * (limits.accepts_per_wakeup_max + 5))
    loop.readers[99]()
    assert len(loop.connected) == limits.accepts_per_wakeup_max
    loop.readers[99]()  # the socket is still readable: the rest in the next round
    assert len(loop.connected) == limits.accepts_per_wakeup_max + 5


def test_other_accept_errors_pause_and_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    acceptor, _, loop, _, refused = make_acceptor([errno.ENOBUFS, PENDING])
    with caplog.at_level("ERROR", logger="processor.daemon"):
        loop.readers[99]()
    assert refused == [] and not acceptor.accepting
    assert len(loop.timers) == 1
    assert "accepting links failed" in caplog.text


def test_close_stops_accepting_and_closes_the_socket() -> None:
    acceptor, sock, loop, _, _ = make_acceptor([])
    acceptor.close()
    assert sock.closed and loop.readers == {} and not acceptor.accepting
    acceptor.start()  # closed for good
    assert loop.readers == {}


def test_refusals_are_counted_by_listener_and_logged_within_a_budget(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    daemon = make_daemon(tmp_path)
    listener = daemon.listeners[0]
    with caplog.at_level("WARNING", logger="processor.daemon"):
        for _ in range(limits.log_lines_per_kind_burst + 10):
            daemon.links_refused(listener, "open_files_limit", 3, "10.0.0.9")
    counted = daemon.metrics.links_closed.labels("network", "open_files_limit")._value.get()
    assert counted == 3 * (limits.log_lines_per_kind_burst + 10)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == limits.log_lines_per_kind_burst
    assert "3 link(s) refused on listener network" in lines[0]
    assert "open files limit" in lines[0]
    suppressed = daemon.metrics.log_lines_suppressed.labels("open_files_limit")._value.get()
    assert suppressed == 10
    daemon.ledger.close()


def test_links_are_served_through_the_acceptor_on_the_asyncio_loop(tmp_path: Path) -> None:
    """The real thing on the default loop (the daemon runs uvloop; e2e tests cover that)."""
    daemon = make_daemon(tmp_path)
    sock = listen("127.0.0.1", 0)
    port = sock.getsockname()[1]
    answers: list[bytes] = []

    async def main() -> None:
        acceptors = await start_listeners(daemon, [sock])
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
        writer.write(FRAMER.frame(b"", CODEC.encode(ECHO_FIELDS)))
        length = await asyncio.wait_for(reader.readexactly(2), 5)
        answers.append(await asyncio.wait_for(reader.readexactly(int.from_bytes(length)), 5))
        assert daemon.link_count == 1
        writer.close()
        await drain(daemon, acceptors)

    asyncio.run(main())
    assert answers and answers[0][:4] == b"0810"
    assert sock.fileno() == -1  # closed by the drain
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    daemon.ledger.close()
