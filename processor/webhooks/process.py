"""The webhook delivery process: the dispatcher in an interpreter and event loop of its own.

Delivery shared the daemon's event loop with the authorisations: each batch held the loop for
milliseconds, so events waited seconds to be sent (mean 4.6 s at 2,000/s) and each delivery's
rendering, signing and HTTP work lengthened the batches (authorisation p99 up 1.3-2x). Here it
reads the outbox through read transactions of its own (LMDB readers never block the writer)
and keeps its positions in the delivery state as before; nothing of it runs on the
authorisation loop but one write to a pipe per committed batch, which wakes it.

Started and supervised by the primary (processor/webhooks/supervisor.py) as `python -m
processor.webhooks.process CHANNEL_FD WAKE_FD`, never forked (an LMDB environment and a running
event loop must not cross a fork); the config comes over stdin, the signing secrets from the
environment it inherits. It reports `ready` once delivering, then its metrics every
`limits.delivery_report_seconds` over the channel (summed into the primary's /metrics), and
stops when told (SIGTERM) or when the primary goes away (the channel closes).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys

import msgspec

from processor import limits
from processor.channel import (
    Report,
    last_report,
    report_until_stopped,
    send_report,
    stop_signals,
)
from processor.config import Config
from processor.cpus import pin
from processor.heap import freeze_setup
from processor.ledger.store import Ledger
from processor.metrics import Metrics
from processor.webhooks.dispatcher import Dispatcher, configured_endpoints
from processor.webhooks.state import DeliveryState, state_path

log = logging.getLogger("processor.webhooks")

EXIT_CONFIG = 2  # what the primary checked at start no longer holds (a secret went away)
EXIT_FAILED = 1  # an endpoint's delivery stopped on an error (logged); the primary restarts it


async def serve_delivery(config: Config, channel_fd: int, wake_fd: int) -> int:
    try:
        endpoints = configured_endpoints(config.webhooks, os.environ)
    except ValueError as error:
        log.error("webhook delivery cannot start: %s", error)
        return EXIT_CONFIG
    # The primary opened the ledger first (created, migrated): only read here.
    ledger = Ledger(config.ledger.path, map_size_bytes=config.ledger.map_size_bytes, readonly=True)
    state = DeliveryState(state_path(config))  # where `processor webhooks` finds it
    metrics = Metrics()
    retention = config.retention
    dispatcher = Dispatcher(
        ledger,
        state,
        endpoints,
        config.webhooks,
        metrics,
        dead_letter_seconds=retention.events_seconds if retention.enabled else None,
    )
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in stop_signals():
        loop.add_signal_handler(signum, stop.set)
    dispatcher.on_failure = stop.set  # an endpoint's delivery stopped: exit, to be restarted

    def woken() -> None:
        try:
            read = os.read(wake_fd, limits.delivery_wake_bytes_max)  # every wake since the last
        except BlockingIOError:
            return
        if not read:  # the daemon's end closed: it is going; the channel says so too
            loop.remove_reader(wake_fd)
            return
        dispatcher.notify()

    os.set_blocking(wake_fd, False)
    await dispatcher.start()
    loop.add_reader(wake_fd, woken)
    reader, writer = await asyncio.open_unix_connection(sock=socket.socket(fileno=channel_fd))
    names = ", ".join(endpoint.config.name for endpoint in endpoints)
    disabled = ", ".join(sorted(dispatcher.disabled))
    print(
        f"processor: webhooks: {len(endpoints)} endpoint(s): {names}"
        + (f" (disabled after a 410 Gone: {disabled})" if disabled else "")
        + f" (delivery process {os.getpid()})",
        flush=True,
    )
    freeze_setup()
    await send_report(writer, Report("ready"))

    try:
        await report_until_stopped(
            reader, writer, metrics, limits.delivery_report_seconds, stop, "webhook delivery"
        )
    finally:
        loop.remove_reader(wake_fd)  # (again, if the pipe closed first: harmless)
        await dispatcher.stop()
        await last_report(writer, metrics)
        state.close()
        ledger.close()
    return 0 if dispatcher.failed is None else EXIT_FAILED


def main(argv: list[str]) -> int:
    import uvloop

    from processor.logs import setup_logging

    channel_fd, wake_fd = (int(value) for value in argv)
    config = msgspec.json.decode(sys.stdin.buffer.read(), type=Config)
    setup_logging(config.log.level, "delivery")
    if not __debug__:
        return EXIT_CONFIG  # the primary refuses -O too
    os.set_inheritable(channel_fd, False)
    os.set_inheritable(wake_fd, False)
    # When the cores are busy, the authorisations come first: delivery lag may grow (it is
    # measured and shown), an authorisation's answer may not wait for a webhook. Cores of its
    # own (webhooks.delivery_cpus) keep it off the authorisation core altogether.
    pin(config.webhooks.delivery_cpus)
    os.nice(limits.delivery_nice)
    return uvloop.run(serve_delivery(config, channel_fd, wake_fd))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
