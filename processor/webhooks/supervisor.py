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
import os
from collections import deque
from collections.abc import Callable

from processor import limits
from processor.channel import Child, ChildStartError
from processor.config import Config
from processor.metrics import Metrics

# Its metrics are kept beside the worker processes' (numbered from 1) under this number.
SAMPLES_INDEX = 0


class DeliveryError(Exception):
    """The delivery process could not be started: the daemon does not start either."""


class DeliveryProcess:
    def __init__(self, config: Config, metrics: Metrics) -> None:
        self._wake: int | None = None  # the write end of the current process's wake pipe
        self._child = Child(
            "webhook delivery process",
            "webhook-delivery",
            SAMPLES_INDEX,
            ["processor.webhooks.process"],
            config,
            metrics,
            deque(),
            self._new_pipe,
        )
        self._supervisor: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start the process; return once it delivers, raise DeliveryError if it does not."""
        try:
            await self._child.spawn()
        except ChildStartError as error:  # one line (a stop asked meanwhile makes it none)
            raise DeliveryError(f"the webhook delivery process {error}") from None
        why = await self._child.ready(limits.worker_start_seconds_max)
        if why is not None:
            await self.stop()
            raise DeliveryError(f"the webhook delivery process {why}; its log says why")
        self._supervisor = asyncio.create_task(self._child.supervise())

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

    def _new_pipe(self) -> tuple[list[int], Callable[[], None]]:
        """A wake pipe for each start of the process: it gets the read end, we keep the other."""
        read_end, write_end = os.pipe()
        os.set_blocking(write_end, False)
        if self._wake is not None:
            os.close(self._wake)
        self._wake = write_end
        return [read_end], lambda: os.close(read_end)

    async def stop(self) -> None:
        """Stop it: its deliveries in flight are abandoned (delivered again after a restart)."""
        await self._child.stop()
        if self._supervisor is not None:
            await self._supervisor
        if self._wake is not None:
            os.close(self._wake)
            self._wake = None
