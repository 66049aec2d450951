"""The daemon's child processes: how the primary starts and supervises them, and their reports.

Used for the worker processes (processor/server/workers.py) and the webhook delivery process
(processor/webhooks/process.py). A child reports over a socket pair: one `ready` once it
serves, then its metrics registry every so often, summed into the primary's /metrics
(metrics.WorkerSamples). Each report is a 4-byte length and a msgpack body, bounded by
`limits.worker_report_bytes_max`.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import struct
import sys
import time
from asyncio import FIRST_COMPLETED
from collections import deque
from collections.abc import Callable
from contextlib import suppress

import msgspec

from processor import limits
from processor.config import Config
from processor.metrics import Metrics, Sample

log = logging.getLogger("processor.children")


class ChildStartError(Exception):
    """A child process that could not be started (Child.spawn)."""


def stop_signals() -> tuple[signal.Signals, ...]:
    """What stops a daemon's process in order (drain, checkpoint): SIGTERM, Ctrl-C, and SIGHUP,
    which a closed terminal sends the whole process group (and unit files habitually send as a
    "reload"): it killed every process at once, answers in flight and the checkpoint lost. But
    not SIGHUP when the process was started ignoring it (`nohup`): that is what was asked."""
    hang_up = () if signal.getsignal(signal.SIGHUP) is signal.SIG_IGN else (signal.SIGHUP,)
    return (signal.SIGTERM, signal.SIGINT, *hang_up)


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


class Child:
    """One child process of the primary (a worker, the webhook delivery process): started as a
    fresh interpreter (`python -m MODULE ARGS... CHANNEL_FD FDS...`, never a fork: an LMDB
    environment and a running event loop must not cross one), given the config over stdin
    (never argv: the environment it inherits keeps the secrets), its reports read, restarted
    when it dies (sharing a budget of restarts a minute with its siblings), stopped.

    `prepare` is called before each start: the descriptors to pass on (after the channel),
    and what to do once the process has them (close the parent's copies, say). `rest` is
    called with True when it is left down for a while (its restart budget spent) and with
    False before it is started again: a worker's listening sockets are closed meanwhile, or
    the kernel would go on handing it links that nobody accepts.
    """

    def __init__(
        self,
        name: str,
        label: str,
        index: int,
        command: list[str],
        config: Config,
        metrics: Metrics,
        restarts: deque[float],
        prepare: Callable[[], tuple[list[int], Callable[[], None]]],
        rest: Callable[[bool], None] | None = None,
    ) -> None:
        self.name = name  # for the log: "worker 2", "webhook delivery process"
        self._index = index  # its metrics' place among the primary's children
        self._command = command
        self._config = config
        self._samples = metrics.workers
        self._up = metrics.child_process_up.labels(label)  # in /metrics: worker-2, ...
        self._exits = metrics.child_process_exits.labels(label)
        self._restarts = restarts
        self._prepare = prepare
        self._rest = rest
        self._stop_asked = asyncio.Event()  # wakes a supervisor resting between restarts
        self.process: asyncio.subprocess.Process | None = None
        self._channel: asyncio.StreamWriter | None = None
        self._reports: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self.stopping = False

    async def spawn(self) -> None:
        """Start the process; ChildStartError when the system or the child's pipe refuses
        (EMFILE for its socket pair, a pipe closed under the write of its configuration by a
        Ctrl-C as it started): a failed start, not a traceback out of the event loop."""
        try:
            await self._spawn()
        except (OSError, RuntimeError) as error:  # RuntimeError: uvloop's closed transport
            raise ChildStartError(f"did not start: {error!r}") from None

    async def _spawn(self) -> None:
        ours, theirs = socket.socketpair()
        try:
            fds, started = self._prepare()
        except BaseException:
            ours.close()
            theirs.close()
            raise
        process: asyncio.subprocess.Process | None = None
        try:
            try:
                process = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    *self._command,
                    str(theirs.fileno()),
                    *(str(fd) for fd in fds),
                    stdin=asyncio.subprocess.PIPE,
                    pass_fds=(theirs.fileno(), *fds),
                    # A session of its own: Ctrl-C in the daemon's terminal signals the daemon
                    # alone, which stops its children in order (they died with it mid-start).
                    # Children end when the primary does (their channel closes).
                    start_new_session=True,
                )
            finally:
                theirs.close()
                started()
            assert process.stdin is not None
            process.stdin.write(msgspec.json.encode(self._config))
            await process.stdin.drain()
            process.stdin.close()
            reader, writer = await asyncio.open_unix_connection(sock=ours)
        except BaseException:
            ours.close()
            if process is not None and process.returncode is None:
                process.kill()  # it never got its config or its channel: no use to anyone
                await process.wait()
            raise
        self.process, self._channel = process, writer
        self._ready.clear()
        self._reports = asyncio.create_task(self._read_reports(reader))
        if self.stopping:
            self.signal_stop()  # stopped while it was being started again: this one too

    async def ready(self, timeout_seconds: float) -> str | None:
        """None once it reports ready; why not, if it exits or the time runs out first."""
        assert self.process is not None
        ready = asyncio.create_task(self._ready.wait())
        exited = asyncio.create_task(self.process.wait())
        await asyncio.wait((ready, exited), timeout=timeout_seconds, return_when=FIRST_COMPLETED)
        ready.cancel()
        exited.cancel()
        if self._ready.is_set():
            return None
        code = self.process.returncode
        return "did not start in time" if code is None else f"exited with code {code}"

    async def _read_reports(self, reader: asyncio.StreamReader) -> None:
        silence = limits.child_report_silence_seconds_max
        try:
            while True:
                # One read, never cancelled: cut off between a report's length and its body,
                # the next read took the body for a length (and killed a draining child).
                reading = asyncio.ensure_future(receive_report(reader))
                # Ready, it reports every second or faster until asked to stop (then it
                # drains, silent, for up to shutdown_drain_seconds_max).
                while self._ready.is_set() and not self.stopping and not reading.done():
                    await asyncio.wait((reading,), timeout=silence)
                    if not reading.done() and not self.stopping:
                        # Hung: only its exit was watched, and a worker's share of new links
                        # went unanswered while every probe said all was well.
                        log.error(
                            "%s sent no report for %.0f s (hung); killing it", self.name, silence
                        )
                        self._kill()
                        break
                report = await reading  # its exit ends the read (None)
                if report is None:
                    return
                if report.kind == "ready":
                    self._ready.set()
                    # Up from here, not from its start: a restart takes tens of milliseconds,
                    # and a scrape never saw the 0 of a child crashing every 20 s.
                    self._up.set(1)
                elif report.kind == "metrics":
                    self._samples.update(self._index, report.samples)
        except (ValueError, msgspec.DecodeError) as error:
            # Not what a child of ours writes: stop trusting it; supervision starts another.
            log.error("%s sent an unreadable report (%s); killing it", self.name, error)
            self._kill()

    def _kill(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()  # supervise() sees it exit and starts another

    async def supervise(self) -> None:
        """Start it again whenever it exits, until stopped; past the restart budget, after a
        rest until the budget allows one more (it was left down for good: a worker then held
        its share of new links in a queue nobody read)."""
        spawn_failed = False
        while True:
            assert self.process is not None
            code = await self.process.wait()
            if not spawn_failed:  # else that exit was counted, and the start failed since
                self._up.set(0)
                if self._reports is not None:
                    await self._reports  # its last report counts
                self._samples.retire(self._index)
                if self._channel is not None:
                    self._channel.close()
            if self.stopping:
                return
            if not spawn_failed:
                self._exits.inc()
            now = time.monotonic()
            while self._restarts and self._restarts[0] < now - 60:
                self._restarts.popleft()
            rested = len(self._restarts) >= limits.worker_restarts_per_minute_max
            if rested:
                resting = self._restarts[0] + 60 - now
                log.error(
                    "%s exited (code %s); %d restarts in the last minute, leaving it down "
                    "for %.0f s",
                    self.name,
                    code,
                    len(self._restarts),
                    resting,
                )
                if not await self._rested(resting):
                    return
                now = time.monotonic()
                while self._restarts and self._restarts[0] < now - 60:
                    self._restarts.popleft()
            self._restarts.append(now)
            if rested:  # its exit was logged when it began to rest: once per exit
                log.warning("%s: rested, starting it again", self.name)
            elif spawn_failed:
                log.warning("%s: trying to start it again", self.name)
            else:
                log.error("%s exited (code %s); restarting it", self.name, code)
            try:
                await self.spawn()
                spawn_failed = False
            except Exception as error:  # EMFILE for its socket pair, say: try again later
                log.error("%s could not be started again: %r", self.name, error)
                spawn_failed = True
                await asyncio.sleep(1.0)  # then the loop counts it against the budget again

    async def _rested(self, seconds: float) -> bool:
        """Down for `seconds` (its `rest` hook told), then True; False when stopped first."""
        if self._rest is not None:
            self._rest(True)
        with suppress(TimeoutError):
            await asyncio.wait_for(self._stop_asked.wait(), max(seconds, 0.0))
        if self.stopping:
            return False
        if self._rest is not None:
            self._rest(False)
        return True

    def signal_stop(self) -> None:
        """Ask it to stop (SIGTERM); it drains what it does meanwhile."""
        self.stopping = True
        self._stop_asked.set()
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)

    async def stop(self) -> None:
        """Stop it: within the shutdown bound, else killed."""
        self.signal_stop()
        if self.process is None:
            return
        try:
            await asyncio.wait_for(self.process.wait(), limits.shutdown_drain_seconds_max)
        except TimeoutError:
            log.error("%s did not stop in time; killing it", self.name)
            self.process.kill()
            await self.process.wait()
        if self._reports is not None:
            await self._reports


# --- the child's side ---------------------------------------------------------------------------


async def report_until_stopped(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    metrics: Metrics,
    every_seconds: float,
    stop: asyncio.Event,
    name: str,
) -> None:
    """Send the child's metrics every `every_seconds` until `stop` is set (a signal) or the
    primary goes away (its end of the channel closes: it never writes, so a read returns only
    then), which sets `stop` too."""

    async def primary_gone() -> None:
        await reader.read()
        log.error("%s: the daemon went away; stopping", name)
        stop.set()

    watcher = asyncio.create_task(primary_gone())
    try:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), every_seconds)
            except TimeoutError:
                await send_report(writer, Report("metrics", metrics.snapshot()))
    except ConnectionError:
        stop.set()  # the primary is gone
    finally:
        watcher.cancel()


async def last_report(writer: asyncio.StreamWriter, metrics: Metrics) -> None:
    """The child's final metrics, so the primary's totals keep what it counted to the end."""
    try:
        await send_report(writer, Report("metrics", metrics.snapshot()))
        writer.close()
    except ConnectionError:
        pass  # the primary is gone: nobody to report to
