"""The daemon: shared server state, request dispatch, group commit and shutdown.

Group commit runs on the event-loop thread: authorisations that arrive while a batch is being
committed queue up and form the next batch, so one fsync serves many requests. (A writer thread
measured worse: handing the GIL back costs milliseconds; DESIGN.md, performance model.)
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING

from processor import limits
from processor.authorizer import Authorizer, Command, CommandRefused, Outcome
from processor.catalog import default_catalog
from processor.config import Config, ConfigError
from processor.engine import ProgrammeRules
from processor.ledger.load import load_path
from processor.ledger.store import Ledger
from processor.metrics import Metrics
from processor.rates import load_rates
from processor.resources import demo_data_path
from processor.security import PanHasher, hasher_from_environment
from processor.server.link import Link
from processor.wire.codec import Codec
from processor.wire.errors import FramingError, InvalidMessage, UndecodableMessage
from processor.wire.messages import AuthorizationRequest, NetworkManagementRequest
from processor.wire.spec import load_spec

if TYPE_CHECKING:
    from processor.webhooks.dispatcher import Dispatcher

log = logging.getLogger("processor.daemon")

EXIT_SOFTWARE = 70  # sysexits.h EX_SOFTWARE: an internal error (a failed assertion) stopped us

Pending = tuple[Link, bytes, AuthorizationRequest, int]


class Daemon:
    def __init__(
        self,
        config: Config,
        ledger: Ledger,
        hasher: PanHasher,
        metrics: Metrics,
        rates: dict[tuple[str, str], Decimal] | None = None,
    ):
        self.config = config
        self.ledger = ledger
        self.hasher = hasher
        self.metrics = metrics
        self.codec = Codec(load_spec(config.server.bitmap))
        self.authorizer = Authorizer(
            ledger,
            self.codec,
            hasher,
            ProgrammeRules(
                rates=rates or {},
                fx_markup_bps=config.programme.fx_markup_bps,
                catalog=default_catalog(),
            ),
            hold_lifetime_seconds=config.programme.hold_lifetime_seconds,
            hold_lifetime_by_mcc=config.programme.hold_lifetime_by_mcc,
            zone=config.programme.zone,
        )
        self.links: set[Link] = set()
        self.stopping = False
        self.write_buffer_high_bytes = limits.write_buffer_high_bytes
        self._pending: list[Pending] = []
        self._commands: list[tuple[Command, asyncio.Future[object]]] = []
        self._flush_scheduled = False
        self._batch_size_max = config.ledger.batch_size_max
        self._sweep_handle: asyncio.TimerHandle | None = None
        self.on_commit: Callable[[], None] | None = None  # e.g. wake the webhook dispatcher
        # Called when an assertion fails: a programmer error stops the daemon (after answering
        # the batch 96) rather than answering 96 forever with a ledger no check vouches for.
        self.on_fatal: Callable[[], None] | None = None

    # --- links -------------------------------------------------------------------------------

    def link_opened(self, link: Link) -> None:
        if len(self.links) >= limits.links_max or self.stopping:
            self.metrics.links_closed.labels(
                "over_capacity" if not self.stopping else "stopping"
            ).inc()
            link.close()
            return
        self.links.add(link)
        self.metrics.open_links.inc()
        log.info("link opened from %s", link.peer)

    def link_closed(self, link: Link) -> None:
        if link in self.links:
            self.links.discard(link)
            self.metrics.open_links.dec()
            log.info("link from %s closed", link.peer)

    def framing_error(self, link: Link, error: FramingError) -> None:
        log.warning("link %s: framing error, closing: %s", link.peer, error)
        self.metrics.bad_messages.labels("framing", "").inc()
        self.metrics.links_closed.labels("framing_error").inc()
        link.close()

    # --- dispatch ----------------------------------------------------------------------------

    def on_message(self, link: Link, header: bytes, message: bytes, received_ns: int) -> None:
        try:
            request = self.codec.decode(message)
        except UndecodableMessage as error:
            self.metrics.bad_messages.labels("undecodable", error.field or "").inc()
            log.warning("link %s: dropped undecodable message: %s", link.peer, error)
            self._bad_message(link)
            return
        except InvalidMessage as error:
            self.metrics.bad_messages.labels("format_error", error.field or "").inc()
            log.warning("link %s: format error (MTI %s): %s", link.peer, error.mti, error)
            self._send(link, header, self.authorizer.format_error(error), received_ns)
            self._bad_message(link)
            return
        if isinstance(request, AuthorizationRequest):
            self._pending.append((link, header, request, received_ns))
            link.request_started()
            if not self._flush_scheduled:
                self._flush_scheduled = True
                asyncio.get_running_loop().call_soon(self._flush)
        elif isinstance(request, NetworkManagementRequest):
            outcome = self.authorizer.network_management(request)
            if outcome.reason in ("sign_on", "sign_off"):
                link.signed_on = outcome.reason == "sign_on"
                log.info("link %s: %s", link.peer, outcome.reason.replace("_", "-"))
            self._send(link, header, outcome, received_ns)
        else:
            self._send(link, header, self.authorizer.unsupported(request), received_ns)

    def _bad_message(self, link: Link) -> None:
        link.bad_messages += 1
        if link.bad_messages >= self.config.server.bad_message_budget:
            log.warning("link %s: %d bad messages, closing", link.peer, link.bad_messages)
            self.metrics.links_closed.labels("bad_message_budget").inc()
            link.close()

    def _send(self, link: Link, header: bytes, outcome: Outcome, received_ns: int) -> None:
        link.write(link.framer.frame(header, outcome.response))
        self.metrics.answered(
            outcome.mti,
            outcome.response_code,
            outcome.reason,
            (time.perf_counter_ns() - received_ns) / 1e9,
        )

    # --- control-API changes -----------------------------------------------------------------

    async def execute(self, command: Command) -> object:
        """Apply a control-API change in the next batch's write transaction.

        Returns once it is durable, like an authorisation's answer: the change is then in
        force for every later request on any link (the ledger is read afresh per request, so
        there is no cache to go stale). Returns the command's result or its CommandRefused;
        raises the ledger's error when the batch could not be committed.
        """
        future: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        self._commands.append((command, future))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)
        return await future

    # --- group commit ------------------------------------------------------------------------

    def _flush(self) -> None:
        """Decide, apply and durably commit one bounded batch, then write its responses."""
        self._flush_scheduled = False
        if not self._pending and not self._commands:
            return
        batch = self._pending[: self._batch_size_max]
        del self._pending[: self._batch_size_max]
        commands = self._commands[: limits.commands_per_batch_max]
        del self._commands[: limits.commands_per_batch_max]
        if self._pending or self._commands:
            # Let the loop poll the sockets between batches; the rest goes in the next one.
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)
        started = time.perf_counter()
        requests = [request for _, _, request, _ in batch]
        try:
            outcomes, results = self.authorizer.run_batch(
                requests, [command for command, _ in commands], datetime.now(UTC)
            )
        except Exception as error:
            # A bug, not an operating error: the write transaction was aborted, so nothing of
            # this batch was applied. Say so loudly and answer 96 rather than leave the network
            # waiting; a retransmission will be decided afresh.
            log.exception(
                "batch of %d requests and %d commands failed; answering 96, nothing applied",
                len(batch),
                len(commands),
            )
            self.metrics.internal_errors.inc()
            outcomes = [self.authorizer.system_error(request) for request in requests]
            results = [error] * len(commands)
            if isinstance(error, AssertionError) and self.on_fatal is not None:
                log.critical("an assertion failed: stopping the daemon (exit code 70)")
                self.on_fatal()
        for (_, future), result in zip(commands, results, strict=True):
            if future.done():
                continue  # the API caller went away; the change stands regardless
            if isinstance(result, Exception) and not isinstance(result, CommandRefused):
                future.set_exception(result)
            else:
                future.set_result(result)
        self.metrics.commit_seconds.observe(time.perf_counter() - started)
        if self.on_commit is not None:
            self.on_commit()
        if batch:  # a batch of control-API commands only is not a batch of requests
            self.metrics.batch_size.observe(len(batch))
        # One transport.write per link per batch.
        by_link: dict[Link, list[bytes]] = defaultdict(list)
        for (link, header, _, _), outcome in zip(batch, outcomes, strict=True):
            by_link[link].append(link.framer.frame(header, outcome.response))
        for link, frames in by_link.items():
            link.write(b"".join(frames))
            link.requests_finished(len(frames))
        done_ns = time.perf_counter_ns()
        self.metrics.answered_batch(
            [(outcome.mti, outcome.response_code, outcome.reason) for outcome in outcomes],
            [(done_ns - received_ns) / 1e9 for _, _, _, received_ns in batch],
        )
        for outcome in outcomes:
            if outcome.response_code == "96":
                log.error("answered 96: %s", outcome.reason)

    def sweep(self) -> None:
        """Release expired holds, one bounded transaction per call; reschedules itself."""
        loop = asyncio.get_running_loop()
        if self.stopping:
            return
        delay = float(self.config.programme.sweep_interval_seconds)
        try:
            released = self.authorizer.sweep_expired(datetime.now(UTC), limits.sweep_holds_max)
        except Exception:
            log.exception("hold sweep failed; retrying at the next interval")
            released = 0
        if released:
            self.metrics.holds_expired.inc(released)
            log.info("released %d expired holds", released)
            if released == limits.sweep_holds_max:
                delay = 0.01  # more are due: continue soon, letting requests in between
        self._sweep_handle = loop.call_later(delay, self.sweep)

    def stop_sweeping(self) -> None:
        if self._sweep_handle is not None:
            self._sweep_handle.cancel()
            self._sweep_handle = None

    def flush_all(self) -> None:
        while self._pending or self._commands:
            self._flush()

    @property
    def pending(self) -> int:
        return len(self._pending)


def open_ledger(config: Config, hasher: PanHasher) -> Ledger:
    ledger = Ledger(
        config.ledger.path,
        map_size_bytes=config.ledger.map_size_bytes,
        durability=config.ledger.durability,
    )
    try:
        ledger.bind_pan_key(hasher.fingerprint)
        if config.ledger.seed_demo_data:
            with ledger.read() as reader:
                empty = not reader.has_accounts()
            if empty:
                summary = load_path(ledger, demo_data_path(), hasher)
                log.info(
                    "empty ledger: loaded demo data (%d accounts, %d cards)",
                    summary.accounts_created,
                    summary.cards_created,
                )
    except BaseException:
        ledger.close()
        raise
    return ledger


async def start_webhooks(config: Config, ledger: Ledger, metrics: Metrics) -> Dispatcher | None:
    """The dispatcher for the configured endpoints; secrets from the environment, checked now."""
    from processor.webhooks.dispatcher import Dispatcher, Endpoint
    from processor.webhooks.signing import SecretError, endpoint_secrets
    from processor.webhooks.state import DeliveryState

    if not config.webhooks.endpoints:
        return None
    endpoints = []
    for index, endpoint in enumerate(config.webhooks.endpoints):
        try:
            secrets = endpoint_secrets(endpoint, f"$.webhooks.endpoints[{index}]", os.environ)
        except SecretError as error:
            raise ConfigError(str(error)) from None
        endpoints.append(Endpoint(endpoint, secrets))
    state = DeliveryState(Path(config.ledger.path) / "webhooks")
    dispatcher = Dispatcher(ledger, state, endpoints, config.webhooks, metrics)
    await dispatcher.start()
    names = ", ".join(e.config.name for e in endpoints)
    disabled = ", ".join(sorted(dispatcher.disabled))
    announce(
        f"webhooks: {len(endpoints)} endpoint(s): {names}"
        + (f" (disabled after a 410 Gone: {disabled})" if disabled else "")
    )
    return dispatcher


class StartupError(Exception):
    """What keeps the daemon from starting (a port in use, say): one line, exit code 2."""


def listen(host: str, port: int, *, shared: bool = False) -> socket.socket:
    """An ISO 8583 listening socket; `shared` ones (SO_REUSEPORT) split links between processes.

    Each worker process gets a socket of its own on the same port: the kernel then hands each
    new link to one of them, spread by address, where processes accepting on one shared socket
    race and the first awake takes a whole burst of links.
    """
    try:
        listener = socket.create_server((host, port), backlog=limits.links_max, reuse_port=shared)
    except OSError as error:
        raise StartupError(f"cannot listen on {host}:{port}: {error.strerror}") from None
    listener.setblocking(False)
    return listener


async def drain(daemon: Daemon, server: asyncio.Server) -> None:
    """Stop accepting, answer what is in flight, then close the links."""
    loop = asyncio.get_running_loop()
    daemon.stopping = True
    daemon.stop_sweeping()
    server.close()
    for link in list(daemon.links):
        if link.transport is not None and not link.transport.is_closing():
            link.transport.pause_reading()
    daemon.flush_all()
    deadline = loop.time() + limits.shutdown_drain_seconds_max
    while loop.time() < deadline and any(
        link.transport is not None and link.transport.get_write_buffer_size()
        for link in daemon.links
    ):
        await asyncio.sleep(0.01)
    for link in list(daemon.links):
        link.close()
    await asyncio.sleep(0)


def announce(text: str) -> None:
    """Lines on stdout that people and test harnesses read (ports are chosen at run time)."""
    print(f"processor: {text}", flush=True)


async def serve(config: Config) -> int:
    # Imported here so the wire/engine/ledger layers never pull in the HTTP stack.
    from processor.api.http import start_http

    rates = load_rates(config.programme.rates_file) if config.programme.rates_file else {}
    hasher = hasher_from_environment(config.security.pan_key_env)
    if hasher.insecure:
        log.warning(
            "!!! %s is not set: using the INSECURE built-in development PAN key. Card keys in this "
            "ledger are guessable. Never run like this with real cards. !!!",
            config.security.pan_key_env,
        )
    ledger = open_ledger(config, hasher)
    metrics = Metrics()
    metrics.watch_ledger(ledger.map_usage)
    daemon = Daemon(config, ledger, hasher, metrics, rates)
    loop = asyncio.get_running_loop()
    listener = listen(config.server.host, config.server.port, shared=config.server.workers > 1)
    server = await loop.create_server(lambda: Link(daemon), sock=listener)
    host, port = listener.getsockname()[:2]
    pool = None
    if config.server.workers > 1:
        from processor.server.workers import WorkerPool

        pool = WorkerPool(config, listener, metrics.workers)
        await pool.start()
    try:
        http_runner, http_port = await start_http(config.http.host, config.http.port, daemon)
    except OSError as error:
        where = f"{config.http.host}:{config.http.port}"
        raise StartupError(f"cannot listen on {where} (HTTP): {error.strerror}") from None
    with ledger.read() as reader:
        accounts = reader.account_count()
    workers = f", {config.server.workers} worker processes" if pool is not None else ""
    announce(
        f"ISO 8583 listening on {host}:{port} (framing {config.server.framing}, "
        f"{config.server.bitmap} bitmap, header {config.server.header_bytes} bytes{workers})"
    )
    announce(f"HTTP listening on {config.http.host}:{http_port} (/metrics, /healthz, /readyz, /v1)")
    announce(
        f"ledger {config.ledger.path} (durability {config.ledger.durability}, {accounts} accounts)"
    )
    dispatcher = await start_webhooks(config, ledger, metrics)
    if dispatcher is not None:
        daemon.on_commit = dispatcher.notify
    # Signal handlers before "ready": whoever waits for ready may stop us at once.
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    exit_code = 0

    def fatal() -> None:
        nonlocal exit_code
        exit_code = EXIT_SOFTWARE
        stop.set()

    daemon.on_fatal = fatal
    announce("ready")
    daemon.sweep()
    await stop.wait()

    announce("stopping: no new links, finishing requests in flight")
    if pool is not None:
        pool.signal_stop()  # the workers drain theirs meanwhile
    await drain(daemon, server)
    if pool is not None:
        await pool.stop()
    await http_runner.cleanup()
    if dispatcher is not None:
        await dispatcher.stop()
        dispatcher.state.close()
    ledger.close()
    announce("stopped" if exit_code == 0 else f"stopped after an assertion failed ({exit_code})")
    return exit_code


def run(config: Config) -> int:
    if not __debug__:
        print(
            "processor: refusing to run under python -O (assertions guard the ledger)",
            file=sys.stderr,
        )
        return 2
    import uvloop

    return uvloop.run(serve(config))
