"""The composition root: builds the daemon, its listeners, the HTTP side, webhooks and workers,
wires them together and runs them until a signal.

The server and the HTTP side are siblings that never import each other (DESIGN.md, layers): this
module is the one place that knows both, hands the HTTP app the daemon through its narrow
`Processor` interface, and connects the webhook dispatcher to the group commit.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
from datetime import UTC, datetime
from typing import NamedTuple

from processor.api.http import start_http
from processor.channel import stop_signals
from processor.config import Config, ConfigError
from processor.cpus import pin
from processor.heap import freeze_setup
from processor.ledger.load import load_path
from processor.ledger.store import Ledger, claim_for_daemon
from processor.metrics import Metrics
from processor.rates import load_rates
from processor.resources import demo_data_path
from processor.security import PanHasher
from processor.server.daemon import (
    EXIT_SOFTWARE,
    Daemon,
    StartupError,
    accept_http,
    drain,
    listen,
    start_listeners,
)
from processor.server.startup import (
    StartSettings,
    Unready,
    raise_open_files_limit,
    start_settings,
)
from processor.webhooks.state import DeliveryFloor
from processor.webhooks.supervisor import SAMPLES_INDEX as DELIVERY_SAMPLES
from processor.webhooks.supervisor import DeliveryError, DeliveryProcess

log = logging.getLogger("processor.daemon")


class Reach(NamedTuple):
    """Which connections a listening socket takes: its port, the address families, and its
    address (None: every address of those families)."""

    port: int
    families: frozenset[int]
    host: str
    address: str | None

    def overlaps(self, other: Reach) -> bool:
        return (
            self.port == other.port
            and bool(self.families & other.families)
            and (self.address is None or other.address is None or self.address == other.address)
        )


def reach_of(sock: socket.socket) -> Reach:
    host, port = sock.getsockname()[:2]
    if sock.family == socket.AF_INET6:
        v6_only = sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)
        # "" binds "::" for both families; an explicit "::" binds IPv6 only.
        families = frozenset((socket.AF_INET6,) if v6_only else (socket.AF_INET6, socket.AF_INET))
        return Reach(port, families, host, None if host == "::" else host)
    return Reach(port, frozenset((socket.AF_INET,)), host, None if host == "0.0.0.0" else host)


def open_ledger(
    config: Config, hasher: PanHasher, *, demo: bool = False, serving: bool = False
) -> Ledger:
    """Open (create, migrate, replay its write-ahead log) the ledger, bind the PAN key; `demo`
    seeds an empty one. `serving`: the daemon's primary, which logs its writes ahead when it
    is the only process writing (server.workers = 1; workers commit through LMDB, whose lock
    orders them)."""
    logs = serving and config.server.workers == 1
    lock = claim_for_daemon(config.ledger.path) if serving else None
    try:
        ledger = Ledger(
            config.ledger.path,
            map_size_bytes=config.ledger.map_size_bytes,
            map_size_max_bytes=config.ledger.map_ceiling_bytes,
            durability=config.ledger.durability,
            write_ahead_log_bytes=config.ledger.write_ahead_log_bytes if logs else 0,
        )
    except BaseException:
        if lock is not None:
            os.close(lock)
        raise
    if lock is not None:
        ledger.keep_daemon_lock(lock)
    try:
        ledger.bind_pan_key(hasher.fingerprint)
        if demo:
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


def check_webhooks(config: Config) -> None:
    """The endpoints' URLs and signing secrets, before anything is opened or bound: a missing
    or unfit one stops the start with the config error that names it (checked once the ports
    were announced, links could be answered in between; the delivery process reads them
    again from the environment)."""
    from processor.webhooks.dispatcher import configured_endpoints

    if not config.webhooks.endpoints:
        return
    try:
        configured_endpoints(config.webhooks, os.environ)
    except ValueError as error:  # a secret (SecretError) or a URL, its key named
        raise ConfigError(str(error)) from None


async def start_webhooks(config: Config, metrics: Metrics) -> DeliveryProcess | None:
    """The webhook delivery process for the configured endpoints (check_webhooks has passed),
    once it delivers."""
    if not config.webhooks.endpoints:
        return None
    delivery = DeliveryProcess(config, metrics)
    try:
        await delivery.start()
    except DeliveryError as error:
        raise StartupError(str(error)) from None
    return delivery


_stdout_lost = False


def announce(text: str) -> None:
    """Lines on stdout that people and test harnesses read (ports are chosen at run time).
    Never in the way of serving: with stdout full or closed (a pipe whose reader left), the
    start went on failing with a traceback and a stop skipped its drain and checkpoint."""
    global _stdout_lost
    try:
        print(f"processor: {text}", flush=True)
    except OSError as error:
        if not _stdout_lost:
            _stdout_lost = True
            log.warning("stdout cannot be written (%s); its lines are lost", error.strerror)


async def serve(settings: StartSettings) -> int:
    config, hasher = settings.config, settings.hasher
    check_webhooks(config)
    # Signal handlers first: a SIGTERM or Ctrl-C during the start (opening the ledger, binding)
    # killed the process with a traceback, after links could be answered; now the start
    # completes and the stop is the orderly one (drain, checkpoint) at once.
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in stop_signals():
        loop.add_signal_handler(signum, stop.set)
    pin(config.server.cpus)  # before any process is started: they inherit it
    before, after = raise_open_files_limit()
    if after != before:
        log.info("open files limit raised from %d to %d (the hard limit)", before, after)
    rates = load_rates(config.programme.rates_file) if config.programme.rates_file else {}
    ledger = open_ledger(config, hasher, demo=settings.demo, serving=True)
    metrics = Metrics()
    metrics.watch_ledger(
        ledger.map_usage,
        ledger.map_size_max_bytes,
        lambda: [(s.name, s.entries, s.bytes, s.oldest_ms) for s in ledger.stats()],
    )
    floor = DeliveryFloor(config)
    if config.webhooks.endpoints:
        metrics.workers.stand_ins[DELIVERY_SAMPLES] = lambda: floor.stored_samples(ledger)
    daemon = Daemon(
        config,
        ledger,
        hasher,
        metrics,
        rates,
        delivery_floor=floor,
        card_keys=settings.card_keys,
        personal_data=settings.personal_data,
        pan_vault=settings.pan_vault,
    )
    locked = daemon.authorizer.apply_cvc2_limit(datetime.now(UTC))
    if locked:
        log.warning(
            "security.cvc2_attempts_max lowered to %d: %d cards at or past it are locked for "
            "card-not-present use (a card.cvc2_locked event each)",
            config.security.cvc2_attempts_max,
            locked,
        )
    shared = config.server.workers > 1
    sockets = []
    bound: list[tuple[Reach, str]] = []
    try:
        for each in config.listeners:
            sock = listen(each.host, each.port, shared=shared, name=f"listener {each.name}")
            sockets.append(sock)
            # Two listeners where one reaches the other's address: the config compares host
            # names, and SO_REUSEPORT (workers > 1) let "localhost" bind where "127.0.0.1"
            # had, or "0.0.0.0" where "" had, the kernel then handing each network's links to
            # one dialect or the other. Without workers the bind refuses.
            reach = reach_of(sock)
            for other_reach, other in bound:
                if reach.overlaps(other_reach):
                    raise StartupError(
                        f"listeners {other!r} and {each.name!r} both listen on port "
                        f"{reach.port} ({other_reach.host} and {reach.host}): give each its "
                        "own port"
                    )
            bound.append((reach, each.name))
    except StartupError:
        for sock in sockets:
            sock.close()
        raise
    servers = await start_listeners(daemon, sockets)
    pool = None
    if shared and not stop.is_set():
        from processor.server.workers import WorkerError, WorkerPool

        pool = WorkerPool(config, sockets, metrics)
        try:
            await pool.start()
        except WorkerError:
            if not stop.is_set():
                raise
            pool = None  # a stop signalled to every process (systemd's) reached it starting
    http_socket = listen(config.http.host, config.http.port, name="HTTP")
    http_port = http_socket.getsockname()[1]  # with port 0 the OS picked one
    http_runner = await start_http(accept_http(daemon, http_socket), daemon, settings.api_token)
    with ledger.read() as reader:
        accounts = reader.account_count()
    workers = f", {config.server.workers} worker processes" if pool is not None else ""
    for each, sock in zip(config.listeners, sockets, strict=True):
        host, port = sock.getsockname()[:2]
        announce(
            f"ISO 8583 listening on {host}:{port} (listener {each.name}: framing {each.framing}, "
            f"{each.bitmap} bitmap, header {each.header_bytes} bytes{workers})"
        )
    announce(f"HTTP listening on {config.http.host}:{http_port} (/metrics, /healthz, /readyz, /v1)")
    if settings.demo:
        made = [
            "demo cards in an empty ledger",
            "the INSECURE development PAN key" if hasher.insecure else "your PAN key",
            f"virtual cards in BIN {config.programme.card_issuing.bin_prefix}",
        ]
        announce("DEMO mode, never for real cards: " + ", ".join(made))
        if settings.generated_token:
            # Printed once, here only: the token of this run, made up because none was set.
            announce(f"demo control API token (this run only): {settings.api_token}")
    announce(
        f"ledger {config.ledger.path} (durability {config.ledger.durability}, {accounts} accounts)"
    )
    delivery = None
    if not stop.is_set():
        try:
            delivery = await start_webhooks(config, metrics)
        except StartupError:
            if not stop.is_set():
                raise  # as above: a stop that reached the delivery process too is no failure
    if delivery is not None:
        daemon.on_commit = delivery.notify
    exit_code = 0

    def fatal() -> None:
        nonlocal exit_code
        exit_code = EXIT_SOFTWARE
        stop.set()

    daemon.on_fatal = fatal
    freeze_setup()
    announce("ready")
    daemon.sweep()
    daemon.retain()
    daemon.supervise()
    await stop.wait()

    announce("stopping: no new links, finishing requests in flight")
    if pool is not None:
        pool.signal_stop()  # the workers drain theirs meanwhile
    await drain(daemon, servers)
    ledger.checkpoint()  # what the links were answered reaches LMDB (and delivery) now
    if pool is not None:
        await pool.stop()
    await http_runner.cleanup()  # the HTTP side port
    if delivery is not None:
        await delivery.stop()
    floor.close()
    ledger.close()
    announce("stopped" if exit_code == 0 else f"stopped after an assertion failed ({exit_code})")
    return exit_code


def run(config: Config, *, demo: bool = False) -> int:
    """Serve until SIGTERM; raises StartupError (one line, exit 2) for what keeps it from it."""
    try:
        settings = start_settings(config, dict(os.environ), demo=demo)
    except Unready as error:
        raise StartupError(str(error)) from None
    if not __debug__:
        print(
            "processor: refusing to run under python -O (assertions guard the ledger)",
            file=sys.stderr,
        )
        return 2
    import uvloop

    return uvloop.run(serve(settings))
