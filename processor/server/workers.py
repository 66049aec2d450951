"""Worker processes: more event loops (and GILs) serving links on the one LMDB ledger.

With `server.workers = N > 1` the primary process (which also runs the HTTP port, webhooks and
the hold sweeper) starts N - 1 workers. Each is a fresh interpreter (`python -m
processor.server.workers`), never a fork of the primary: an LMDB environment and a running event
loop must not cross a fork. Every worker accepts on listening sockets of its own on the
primary's ports, one per listener (SO_REUSEPORT; made and kept by the primary, passed as file
descriptors, so links that arrive while a worker restarts wait in its queue), decodes, decides
and encodes on its own core, and commits its batches through its own LMDB environment on the
same files; LMDB's writer lock serialises the transactions, so one worker's durable commit (held
through fsync) overlaps the others' decoding and encoding.

Each worker talks to the primary over a socket pair: one `ready` report once it accepts, then
its metrics every `worker_report_seconds`, summed into the primary's /metrics. The config goes
over stdin (never argv); secrets stay in the environment the worker inherits. A worker whose
primary goes away (the socket pair closes) drains and exits; a worker that dies is restarted,
at most `worker_restarts_per_minute_max` times a minute (each worker its own budget).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
from collections import deque
from collections.abc import Callable

import msgspec

from processor import limits
from processor.channel import (
    Child,
    ChildStartError,
    Report,
    last_report,
    report_until_stopped,
    send_report,
    stop_signals,
)
from processor.config import Config
from processor.heap import freeze_setup
from processor.metrics import Metrics

log = logging.getLogger("processor.workers")


class WorkerError(Exception):
    """A worker process could not be started: the daemon does not start either."""


class WorkerPool:
    """The primary's side: start, supervise and stop the workers."""

    def __init__(self, config: Config, listeners: list[socket.socket], metrics: Metrics) -> None:
        from processor.server.daemon import listen

        assert config.server.workers > 1, config.server.workers
        # The primary's sockets carry the ports chosen (a configured port 0 is chosen once);
        # the host is the configured one: "" read back from a dual-stack socket is "::", and
        # a socket bound to "::" is IPv6 only, which the kernel never groups with the
        # primary's dual-stack one (the workers then got no link at all).
        addresses = [
            (each.host, sock.getsockname()[1])
            for each, sock in zip(config.listeners, listeners, strict=True)
        ]
        self._sockets: list[list[socket.socket]] = []
        self._workers: list[Child] = []
        for index in range(1, config.server.workers):
            sockets = [listen(host, port, shared=True) for host, port in addresses]
            self._sockets.append(sockets)
            self._workers.append(
                Child(
                    f"worker {index}",
                    f"worker-{index}",
                    index,
                    ["processor.server.workers", str(index)],
                    config,
                    metrics,
                    # Each worker's own restart budget: one crashing over and over (a peer
                    # whose message kills it, hashed to it by address) spent the pool's, and
                    # another worker's one crash then left that one down for up to a minute,
                    # its share of new links queued unread.
                    deque(),
                    _passing(sockets),
                    _resting(sockets, addresses),
                )
            )
        self._supervisors: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Start every worker and return once all accept links; raise if one does not."""
        for worker in self._workers:
            try:
                await worker.spawn()
            except ChildStartError as error:
                await self.stop()
                raise WorkerError(f"{worker.name} process {error}") from None
        for worker in self._workers:
            why = await worker.ready(limits.worker_start_seconds_max)
            if why is not None:
                await self.stop()
                raise WorkerError(f"{worker.name} process {why}; its log says why")
        self._supervisors = [asyncio.create_task(w.supervise()) for w in self._workers]

    def signal_stop(self) -> None:
        """Ask every worker to drain (SIGTERM); they do it while the primary drains its own."""
        for worker in self._workers:
            worker.signal_stop()

    async def stop(self) -> None:
        """Stop the workers: drained within the shutdown bound, else killed."""
        for worker in self._workers:
            await worker.stop()
        for task in self._supervisors:
            await task
        for sockets in self._sockets:
            for sock in sockets:
                sock.close()


def _passing(sockets: list[socket.socket]) -> Callable[[], tuple[list[int], Callable[[], None]]]:
    """A worker's listening sockets, passed on at every start (the primary keeps them)."""
    return lambda: ([sock.fileno() for sock in sockets], lambda: None)


def _resting(
    sockets: list[socket.socket], addresses: list[tuple[str, int]]
) -> Callable[[bool], None]:
    """While a worker is left down, its sockets closed (links queued on them are reset, and
    the kernel hands new ones to the other processes); listening again before its restart."""
    from processor.server.daemon import StartupError, listen

    def rest(down: bool) -> None:
        for sock in sockets:
            sock.close()
        if down:
            return
        try:
            sockets[:] = [listen(host, port, shared=True) for host, port in addresses]
        except StartupError as error:  # its start then fails, and is tried again
            log.error("a worker cannot listen again: %s", error)

    return rest


# --- the worker's side -------------------------------------------------------------------------


async def serve_worker(
    config: Config, index: int, sockets: list[socket.socket], channel_fd: int
) -> int:
    from processor.ledger.store import Ledger
    from processor.rates import load_rates
    from processor.security import hasher_from_environment
    from processor.server.daemon import Daemon, drain, start_listeners

    hasher = hasher_from_environment(config.security.pan_key_env)
    rates = load_rates(config.programme.rates_file) if config.programme.rates_file else {}
    # The primary opened the ledger first: it migrated it, bound the PAN key and seeded it.
    ledger = Ledger(
        config.ledger.path,
        map_size_bytes=config.ledger.map_size_bytes,
        map_size_max_bytes=config.ledger.map_ceiling_bytes,
        durability=config.ledger.durability,
    )
    metrics = Metrics()
    daemon = Daemon(config, ledger, hasher, metrics, rates, sweeps_ledger=False)
    loop = asyncio.get_running_loop()
    servers = await start_listeners(daemon, sockets)
    reader, writer = await asyncio.open_unix_connection(sock=socket.socket(fileno=channel_fd))
    stop = asyncio.Event()
    for signum in stop_signals():
        loop.add_signal_handler(signum, stop.set)
    daemon.supervise()  # idle and stalled links (the hold sweeper stays in the primary)
    freeze_setup()
    await send_report(writer, Report("ready"))
    log.info("worker %d: serving links", index)

    await report_until_stopped(
        reader, writer, metrics, limits.worker_report_seconds, stop, f"worker {index}"
    )
    await drain(daemon, servers)
    ledger.close()
    await last_report(writer, metrics)
    return 0


def main(argv: list[str]) -> int:
    import uvloop

    from processor.logs import setup_logging

    index, channel_fd, *listen_fds = (int(value) for value in argv)
    config = msgspec.json.decode(sys.stdin.buffer.read(), type=Config)
    setup_logging(config.log.level, f"worker-{index}")
    if not __debug__:
        return 2  # assertions guard the ledger (the primary refuses -O too)
    if len(listen_fds) != len(config.listeners):
        return 2  # the primary passes one socket per listener: anything else is a bug
    sockets = [socket.socket(fileno=fd) for fd in listen_fds]
    os.set_inheritable(channel_fd, False)
    return uvloop.run(serve_worker(config, index, sockets, channel_fd))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
