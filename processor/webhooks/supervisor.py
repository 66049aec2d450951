"""The primary's side of the webhook delivery process: start it, wake it, restart it, stop it.

The authorisation loop's whole part in delivery is `notify()` after each committed batch: one
non-blocking write of a byte to a pipe the delivery process reads (a full pipe already means
"wake up", so that write is dropped). The process reports its metrics over a socket pair; they
are summed into the primary's /metrics like a worker's. A delivery process that dies is started
again (at most `limits.worker_restarts_per_minute_max` times a minute), from the positions its
delivery state holds: at-least-once, nothing skipped.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
import time
from collections import deque

import msgspec

from processor import limits
from processor.channel import receive_report
from processor.config import Config
from processor.metrics import WorkerSamples

log = logging.getLogger("processor.webhooks")

# Its metrics are kept beside the worker processes' (numbered from 1) under this number.
SAMPLES_INDEX = 0


class DeliveryError(Exception):
    """The delivery process could not be started: the daemon does not start either."""


class DeliveryProcess:
    def __init__(self, config: Config, samples: WorkerSamples) -> None:
        self._config = config
        self._samples = samples
        self._process: asyncio.subprocess.Process | None = None
        self._channel: asyncio.StreamWriter | None = None
        self._reports: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self._wake: int | None = None  # the pipe's write end
        self._stopping = False
        self._restarts: deque[float] = deque()
        self._supervisor: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    async def start(self) -> None:
        """Start the process; return once it delivers, raise DeliveryError if it does not."""
        await self._spawn()
        assert self._process is not None
        ready = asyncio.create_task(self._ready.wait())
        exited = asyncio.create_task(self._process.wait())
        await asyncio.wait(
            (ready, exited),
            timeout=limits.worker_start_seconds_max,
            return_when=asyncio.FIRST_COMPLETED,
        )
        ready.cancel()
        exited.cancel()
        if not self._ready.is_set():
            await self.stop()
            code = self._process.returncode
            how = "did not start in time" if code is None else f"exited with code {code}"
            raise DeliveryError(f"the webhook delivery process {how}; its log says why")
        self._supervisor = asyncio.create_task(self._supervise())

    def notify(self) -> None:
        """New events were committed: wake the delivery process (never blocks)."""
        if self._wake is None:
            return
        try:
            os.write(self._wake, b"\x01")
        except BlockingIOError:
            pass  # the pipe is full of wakes the process has not read yet: it is awake
        except OSError:
            pass  # it died (a broken pipe): the supervisor starts another, which reads anyway

    async def _spawn(self) -> None:
        ours, theirs = socket.socketpair()
        wake_read, wake_write = os.pipe()
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "processor.webhooks.process",
                str(theirs.fileno()),
                str(wake_read),
                stdin=asyncio.subprocess.PIPE,
                pass_fds=(theirs.fileno(), wake_read),
            )
        except BaseException:
            os.close(wake_write)
            ours.close()
            raise
        finally:
            theirs.close()
            os.close(wake_read)
        os.set_blocking(wake_write, False)
        if self._wake is not None:
            os.close(self._wake)
        self._wake = wake_write
        assert process.stdin is not None
        process.stdin.write(msgspec.json.encode(self._config))
        await process.stdin.drain()
        process.stdin.close()
        reader, writer = await asyncio.open_unix_connection(sock=ours)
        self._process, self._channel = process, writer
        self._ready.clear()
        self._reports = asyncio.create_task(self._read_reports(reader))

    async def _read_reports(self, reader: asyncio.StreamReader) -> None:
        while (report := await receive_report(reader)) is not None:
            if report.kind == "ready":
                self._ready.set()
            elif report.kind == "metrics":
                self._samples.update(SAMPLES_INDEX, report.samples)

    async def _supervise(self) -> None:
        while True:
            assert self._process is not None
            code = await self._process.wait()
            if self._reports is not None:
                await self._reports  # its last report counts
            self._samples.retire(SAMPLES_INDEX)
            if self._channel is not None:
                self._channel.close()
            if self._stopping:
                return
            now = time.monotonic()
            while self._restarts and self._restarts[0] < now - 60:
                self._restarts.popleft()
            if len(self._restarts) >= limits.worker_restarts_per_minute_max:
                log.error(
                    "webhook delivery process exited (code %s); %d restarts in the last minute, "
                    "leaving it down: events stay in the outbox until the daemon restarts",
                    code,
                    len(self._restarts),
                )
                return
            self._restarts.append(now)
            log.error("webhook delivery process exited (code %s); restarting it", code)
            await self._spawn()

    async def stop(self) -> None:
        """Stop it: its deliveries in flight are abandoned (delivered again after a restart)."""
        self._stopping = True
        process = self._process
        if process is not None and process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), limits.shutdown_drain_seconds_max)
            except TimeoutError:
                log.error("the webhook delivery process did not stop in time; killing it")
                process.kill()
                await process.wait()
        if self._supervisor is not None:
            await self._supervisor
        elif self._reports is not None:
            await self._reports
        if self._wake is not None:
            os.close(self._wake)
            self._wake = None
