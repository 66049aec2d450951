"""The daemon: shared server state, request dispatch, group commit and shutdown.

Group commit runs on the event-loop thread: authorisations that arrive while a batch is being
committed queue up and form the next batch, so one fsync serves many requests. (A writer thread
measured worse: the two threads contend for the GIL for everything but the fsync, and the
loop waits for the disk only about a fifth of the time at saturation; bench/RESULTS.md,
2026-12-07 sixth session.)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import socket
import time
from collections import defaultdict, deque
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Final

import lmdb

from processor import limits
from processor.authorizer import Authorizer, Command, CommandRefused, Outcome
from processor.bad_peers import BadPeers
from processor.catalog import default_catalog
from processor.config import Config
from processor.cvc2 import CardVerificationKeys, keys_from_environment
from processor.engine import ProgrammeRules
from processor.ledger.retention import RECORDS, Retention
from processor.ledger.store import Ledger, LedgerError
from processor.lifecycle import ADVICE_CLASSES
from processor.log_budget import LogBudget
from processor.metrics import Metrics
from processor.pan_vault import PanVault
from processor.personal_data import PersonalDataCipher
from processor.security import PanHasher
from processor.server.acceptor import REFUSAL_REASONS, Acceptor, Reserve
from processor.server.link import Link, Listener, Queued
from processor.server.pacing import Pacer
from processor.wire.dialect import framing_cause, undecodable_cause
from processor.wire.errors import FramingError, InvalidMessage, UndecodableMessage, WireError
from processor.wire.messages import AuthorizationRequest, NetworkManagementRequest, rrn_key

log = logging.getLogger("processor.daemon")

EXIT_SOFTWARE = 70  # sysexits.h EX_SOFTWARE: an internal error (a failed assertion) stopped us

Pending = tuple[Link, bytes, AuthorizationRequest, int]
ProtocolFactory = Callable[[], asyncio.Protocol]
# Requests that refer to an earlier one (its original): never decided before a request that
# arrived before them on another link.
FOLLOW_UP_CLASSES: Final = frozenset(("0400", "0420", "0220"))


class Daemon:
    def __init__(
        self,
        config: Config,
        ledger: Ledger,
        hasher: PanHasher,
        metrics: Metrics,
        rates: dict[tuple[str, str], Decimal] | None = None,
        delivery_floor: Callable[[], int | None] | None = None,
        *,
        sweeps_ledger: bool = True,
        card_keys: CardVerificationKeys | None = None,
        personal_data: PersonalDataCipher | None = None,
        pan_vault: PanVault | None = None,
    ):
        self.config = config
        self.ledger = ledger
        self.hasher = hasher
        self.personal_data = personal_data  # the primary's, for the control API
        self.pan_vault = pan_vault  # the same
        # The primary's come checked from start-up; a worker reads the same variables.
        self.card_keys = (
            card_keys
            if card_keys is not None
            else keys_from_environment(config.security.card_verification_keys, os.environ)
        )
        self.metrics = metrics
        self.listeners = [Listener(each) for each in config.listeners]
        for listener in self.listeners:
            metrics.open_links.labels(listener.name)  # 0 from the start, not absent
        # Pruning past the horizons rides in each batch's transaction (Authorizer._sweep);
        # `delivery_floor` is the lowest event a webhook endpoint still needs. Worker processes
        # leave it, like the hold sweep, to the primary (`sweeps_ledger`): its steps' budget
        # counts the events every process makes.
        retention = None
        if config.retention.enabled and sweeps_ledger:
            retention = Retention(config.retention, rrn_key, delivery_floor or (lambda: None))
        horizons = dict(
            zip(
                RECORDS,
                (
                    config.retention.events_seconds,
                    config.retention.answers_seconds,
                    config.retention.clearing_seconds,
                    config.retention.idempotency_seconds,
                ),
                strict=True,
            )
        )
        for record, seconds in horizons.items():
            metrics.retention_horizon.labels(record).set(seconds if retention else 0)
        self.authorizer = Authorizer(
            ledger,
            hasher,
            ProgrammeRules(
                rates=rates or {},
                fx_markup_bps=config.programme.fx_markup_bps,
                catalog=default_catalog(),
            ),
            hold_lifetime_seconds=config.programme.hold_lifetime_seconds,
            hold_lifetime_by_mcc=config.programme.hold_lifetime_by_mcc,
            zone=config.programme.zone,
            retention=retention,
            # Every process releases due holds in its batches (LMDB serialises the writers,
            # each sees the others' releases), so expiry keeps up with worker processes too.
            expire_in_batches=True,
            card_keys=self.card_keys,
            cvc2_attempts_max=config.security.cvc2_attempts_max,
            cvc2_required_card_not_present=config.security.cvc2_required_card_not_present,
        )
        self.links: set[Link] = set()
        # Open links per (listener, peer address), for the per-address limit.
        self._links_per_address: dict[tuple[str, str], int] = {}
        self._bad_peers = BadPeers(limits.bad_peer_addresses_max)
        # Per peer address, so reconnecting does not reset a peer's budget (oldest forgotten).
        self._peer_logs: dict[str, LogBudget] = {}
        self._refusal_log = LogBudget()  # refused connections: logged, never a flood
        # 96s by reason: a full or failing ledger answers every request 96, and one ERROR line
        # each would flood the log; a few lines, then one per interval with the count.
        self._error_log = LogBudget()
        # The last batch found the ledger full at its ceiling (answered 96 ledger_full): not
        # ready (/readyz 503) until a batch commits again.
        self.ledger_full = False
        # The last batch's ledger failure (ledger_error:...), until a batch commits again:
        # /readyz is not ready meanwhile (every authorisation is answered 96).
        self.ledger_failing: str | None = None
        self._map_warned = False  # the 80 % warning was logged (again once below 75 %)
        self.stopping = False
        self.write_buffer_high_bytes = limits.write_buffer_high_bytes
        # Links with requests queued, in turn: batches take one request per link per round.
        self._ready: deque[Link] = deque()
        self._queued = 0  # requests queued on all links
        # Batch sizes bounded in time, and how long the queue would take to decide (for
        # admission at arrival), both from what batches measure.
        self._pacer = Pacer(
            config.ledger.batch_size_max, config.server.batch_seconds_max, limits.batch_size_min
        )
        self._light_about = True  # whether a light link is about (see _batch_size)
        self._light_checked_until = 0.0  # monotonic seconds; checked again from then
        # Links with more framed than their last turn took (Link._turn): reading lags behind
        # what arrives, so short batches, for turns of reading between them (_batch_size).
        self.backlogged_links = 0
        # Whether the last batch was cut for a light link: turns of reading are shorter then
        # (Link._turn), as its request waits for the busy link's turn as well as the batch.
        self.protecting_light_link = False
        # Since when every flush found more queued than a time-bounded batch takes (None: the
        # last one did not): the daemon saturated, not a moment's queue (_batch_size).
        self._saturated_since: float | None = None
        self._admission_seconds = (
            config.server.decision_deadline_seconds * limits.admission_deadline_share
        )
        self._commands: list[tuple[Command, asyncio.Future[object]]] = []
        self._flush_scheduled = False
        self._deadline_ns = int(config.server.decision_deadline_seconds * 1e9)
        self._sweep_handle: asyncio.TimerHandle | None = None
        self._retention_handle: asyncio.TimerHandle | None = None
        self._last_batch = time.monotonic()  # when the last batch ran (retention idles after)
        self._supervision_handle: asyncio.TimerHandle | None = None
        self.on_commit: Callable[[], None] | None = None  # e.g. wake the webhook dispatcher
        self._checkpoint_handle: asyncio.TimerHandle | None = None
        ledger.on_pending = self._checkpoint_pending
        ledger.on_checkpoint = self._checkpointed
        # Called when an assertion fails: a programmer error stops the daemon (after answering
        # the batch 96) rather than answering 96 forever with a ledger no check vouches for.
        self.on_fatal: Callable[[], None] | None = None

    # --- links -------------------------------------------------------------------------------

    def link_opened(self, link: Link) -> None:
        name = link.listener.name
        address = (name, link.peer_address)
        refused = None
        if self.stopping:
            refused = "stopping"
        elif len(self.links) >= limits.links_max:
            refused = "over_capacity"
        elif self._links_per_address.get(address, 0) >= link.listener.config.links_per_address_max:
            refused = "per_address_limit"
        elif self._bad_peers.refused(
            address,
            time.monotonic(),
            link.listener.config.bad_links_per_address_max,
            link.listener.config.bad_links_window_seconds,
        ):
            refused = "bad_peer"
        if refused is not None:
            self.links_refused(link.listener, refused, 1, link.peer)
            link.close()
            return
        self.links.add(link)
        self._links_per_address[address] = self._links_per_address.get(address, 0) + 1
        self.metrics.child(self.metrics.open_links, name).inc()
        self._link_line(link, "link_opened", "link opened from %s")

    def _close_for_what_it_sent(self, link: Link, reason: str, *, answered: bool = False) -> None:
        """Close a link for its peer's messages: counted under `reason`, and against the
        peer's address; `answered`: once the requests it sent are answered."""
        name, limit = link.listener.name, link.listener.config.bad_links_per_address_max
        self.metrics.child(self.metrics.links_closed, name, reason).inc()
        self._bad_peers.closed((name, link.peer_address), time.monotonic(), limit)
        if answered:
            link.close_when_answered()
        else:
            link.close()

    def log_budget_for(self, peer_address: str) -> LogBudget:
        """The log budget of everything links from `peer_address` cause."""
        budget = self._peer_logs.get(peer_address)
        if budget is None:
            if len(self._peer_logs) >= limits.log_budget_addresses_max:
                del self._peer_logs[next(iter(self._peer_logs))]
            budget = self._peer_logs[peer_address] = LogBudget()
        return budget

    def _link_line(self, link: Link, kind: str, message: str) -> None:
        """A link's opening or closing, at INFO, within its peer address's budget."""
        self._peer_line(link, logging.INFO, kind, limits.log_link_lines_burst, message)

    def links_refused(self, listener: Listener, reason: str, count: int, peer: str) -> None:
        """Count `count` links refused for `reason` (the latest from `peer`); log within a
        budget, so a flood of refusals writes a few lines that say how many."""
        self.metrics.child(self.metrics.links_closed, listener.name, reason).inc(count)
        self._refusal_line(f"link(s) refused on listener {listener.name}", reason, count, peer)

    def http_connections_refused(self, reason: str, count: int, peer: str) -> None:
        """The HTTP port's connections refused at the open-files limit: counted and logged
        like links (a scraper or the programme's backend is being turned away)."""
        self.metrics.child(self.metrics.http_connections_refused, reason).inc(count)
        self._refusal_line("HTTP connection(s) refused", reason, count, peer)

    def _refusal_line(self, what: str, reason: str, count: int, peer: str) -> None:
        suppressed = self._refusal_log.allow(reason, time.monotonic())
        if suppressed is None:
            self.metrics.child(self.metrics.log_lines_suppressed, reason).inc()
            return
        more = f" ({suppressed} more refusals left out of the log)" if suppressed else ""
        if reason in REFUSAL_REASONS.values():
            soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
            log.warning(
                "%d %s (latest from %s): %s, no file descriptor left (open files limit %d); "
                "accepting again once connections close%s",
                count,
                what,
                peer,
                reason,
                soft,
                more,
            )
        else:
            log.warning("link from %s refused: %s%s", peer, reason, more)

    def link_closed(self, link: Link) -> None:
        if link in self.links:
            self.links.discard(link)
            address = (link.listener.name, link.peer_address)
            left = self._links_per_address[address] - 1
            if left:
                self._links_per_address[address] = left
            else:
                del self._links_per_address[address]
            self.metrics.child(self.metrics.open_links, link.listener.name).dec()
            self._link_line(link, "link_closed", "link from %s closed")

    def framing_error(self, link: Link, error: FramingError) -> None:
        name = link.listener.name
        cause = None
        if not link.decoded_any:
            cause = framing_cause(link.framer.head(4), link.listener.config.framing)
        if cause is not None:
            self._peer_warning(
                link, "framing", "framing error, closing: %s; likely cause: %s", error, cause
            )
        else:
            self._peer_warning(link, "framing", "framing error, closing: %s", error)
        self.metrics.child(self.metrics.bad_messages, name, "framing", "").inc()
        self._close_for_what_it_sent(link, "framing_error", answered=True)

    # --- dispatch ----------------------------------------------------------------------------

    def on_message(self, link: Link, header: bytes, message: bytes, received_ns: int) -> None:
        try:
            request = link.listener.codec.decode(message)
        except UndecodableMessage as error:
            if not message and not header:  # a zero-length frame (no real frame lacks both)
                self._zero_length_frame(link)
                return
            self.metrics.child(
                self.metrics.bad_messages, link.listener.name, "undecodable", error.field or ""
            ).inc()
            # Not even an MTI of 4 ASCII digits as the first thing a link sends: whatever it
            # speaks, it is not this listener's dialect.
            certain = not message[:4].isdigit()
            if not link.decoded_any and self._wrong_dialect(link, header + message, error, certain):
                return
            self._peer_warning(link, "undecodable", "dropped undecodable message: %s", error)
            self._bad_message(link)
            return
        except InvalidMessage as error:
            self.metrics.child(
                self.metrics.bad_messages, link.listener.name, "format_error", error.field or ""
            ).inc()
            if (
                error.unparsed
                and not link.decoded_any
                and self._wrong_dialect(link, header + message, error, certain=False)
            ):
                return
            link.decoded_any = True
            self._peer_warning(link, "format_error", "format error (MTI %s): %s", error.mti, error)
            self._send(link, header, self.authorizer.format_error(error), received_ns)
            self._bad_message(link)
            return
        link.decoded_any = True
        if isinstance(request, AuthorizationRequest):
            if link.listener.config.sign_on_required and not link.signed_on:
                self._refuse_before_sign_on(link, header, request, received_ns)
                return
            if request.message_class not in ADVICE_CLASSES and (
                link.queue_full or self._pacer.queue_seconds(self._queued) > self._admission_seconds
            ):
                # It could not be decided within the deadline: 91 now, while the network can
                # still act on it, rather than after the deadline (or never, from a full queue).
                self._send(link, header, self.authorizer.overloaded(request), received_ns)
                return
            link.queue.append((header, request, received_ns))
            link.requested_at = link.last_received
            self._queued += 1
            if not link.ready:
                link.ready = True
                self._ready.append(link)
            link.request_started()
            if not self._flush_scheduled:
                self._flush_scheduled = True
                asyncio.get_running_loop().call_soon(self._flush)
        elif isinstance(request, NetworkManagementRequest):
            outcome = self.authorizer.network_management(request)
            if outcome.reason in ("sign_on", "sign_off"):
                link.signed_on = outcome.reason == "sign_on"
                # Within the address's budget: a peer may sign on and off as often as it likes.
                self._peer_line(
                    link,
                    logging.INFO,
                    outcome.reason,
                    limits.log_lines_per_kind_burst,
                    "link %s: %s",
                    outcome.reason.replace("_", "-"),
                )
            self._send(link, header, outcome, received_ns)
        else:
            self._send(link, header, self.authorizer.unsupported(request), received_ns)

    def _refuse_before_sign_on(
        self, link: Link, header: bytes, request: AuthorizationRequest, received_ns: int
    ) -> None:
        """91 to a financial message on a link of a `sign_on_required` listener that has not
        signed on; the ledger is not touched. Advices too: they are answered 91 rather than
        recorded, so the network keeps them in its store-and-forward queue and repeats them
        once signed on (specs/messages.md, sign-on). Counted as
        `processor_requests_total{response_code="91",reason="not_signed_on"}`."""
        self._peer_warning(
            link,
            "not_signed_on",
            "%s before sign-on (the listener requires it): answered 91",
            request.mti,
        )
        self._send(link, header, self.authorizer.not_signed_on(request), received_ns)

    def _zero_length_frame(self, link: Link) -> None:
        """A length prefix of 0: a bad message like any other (counted, logged within the
        link's budget, and the link closed past its listener's rate). Some channels send it as
        a keep-alive; ISO 8583's is the 0800 echo test, which is answered. It does not count as
        a first message: the link's dialect is still unknown."""
        self.metrics.child(self.metrics.bad_messages, link.listener.name, "zero_length", "").inc()
        self._peer_warning(
            link, "zero_length", "dropped a zero-length frame (keep-alives are 0800 echo tests)"
        )
        self._bad_message(link)

    def _peer_warning(self, link: Link, kind: str, message: str, *args: object) -> None:
        """A warning caused by what a peer sent, within its address's log budget for the kind."""
        burst = limits.log_lines_per_kind_burst
        self._peer_line(link, logging.WARNING, kind, burst, "link %s: " + message, *args)

    def _peer_line(
        self, link: Link, level: int, kind: str, burst: int, message: str, *args: object
    ) -> None:
        """Log `message` (its first argument the link's peer) within the address's budget;
        a line left out is counted in processor_log_lines_suppressed_total{kind}."""
        suppressed = link.log_budget.allow(kind, time.monotonic(), burst)
        if suppressed is None:
            self.metrics.child(self.metrics.log_lines_suppressed, kind).inc()
            return
        if suppressed:
            message += f" ({suppressed} more like it left out)"
        log.log(level, message, link.peer, *args)

    def _bad_message(self, link: Link) -> None:
        if link.bad_message(time.monotonic()):
            config = link.listener.config
            self._peer_warning(
                link,
                "bad_message_rate",
                "%d bad messages within %g s, closing",
                config.bad_messages_max,
                config.bad_message_window_seconds,
            )
            # Once what it queued before is answered: closed at once, its requests were still
            # decided and applied (a hold) and their answers dropped with the transport.
            self._close_for_what_it_sent(link, "bad_message_rate", answered=True)

    def _wrong_dialect(self, link: Link, frame: bytes, error: WireError, certain: bool) -> bool:
        """Close a link whose first message is in another dialect; True when it closed.

        Dropping its messages one by one would leave the peer waiting out its own timeout on
        every one of them; a closed link is what its operators notice and fix. It is closed
        when a neighbouring dialect reads the message, or (`certain`) when it does not even
        start with an MTI. Otherwise it is a bad message in the right dialect (a 20-digit PAN,
        a response MTI): dropped or answered 30 like any other, and the link stays up.
        """
        config = link.listener.config
        cause = None
        # The diagnosis decodes the frame in up to 260 neighbouring dialects: only when its line
        # will be written, or a peer that reconnects after each close makes us do it each time
        # (42 % of the loop, measured). Past the budget, a frame that starts like an MTI is a
        # bad message in the right dialect: counted, and the bad-message rate closes the link.
        # The diagnosis itself is budgeted too: a frame in which no neighbouring dialect finds a
        # cause writes no line, and would otherwise be diagnosed again on every bad frame.
        now, budget = time.monotonic(), link.log_budget
        if (
            budget.would_allow("dialect_mismatch", now)
            and budget.allow("dialect_diagnosis", now) is not None
        ):
            cause = undecodable_cause(
                frame,
                bitmap=config.bitmap,
                header_bytes=config.header_bytes,
                framing=config.framing,
            )
        if cause is None and not certain:
            return False
        self._peer_warning(
            link,
            "dialect_mismatch",
            "its first message does not decode (%s), closing; likely cause: %s",
            error,
            cause or "a framing, header_bytes or bitmap setting unlike the peer's",
        )
        self._close_for_what_it_sent(link, "dialect_mismatch")
        return True

    def _send(self, link: Link, header: bytes, outcome: Outcome, received_ns: int) -> None:
        data = self._wire(link, header, outcome)
        if data is not None:
            link.write(data)
        self.metrics.answered(
            outcome.mti,
            outcome.response_code,
            outcome.reason,
            (time.perf_counter_ns() - received_ns) / 1e9,
        )

    def _wire(self, link: Link, header: bytes, outcome: Outcome) -> bytes | None:
        """The answer encoded and framed; None, logged (within the address's budget) and
        counted as an internal error, when it cannot be: one answer that cannot leave must not
        take its batch's other answers with it, nor leave a request counted in flight."""
        try:
            return link.framer.frame(header, link.listener.codec.encode(outcome.fields))
        except (FramingError, ValueError) as error:  # neither quotes a field's value
            self.metrics.internal_errors.inc()
            self._peer_line(
                link,
                logging.ERROR,
                "unanswerable",
                limits.log_lines_per_kind_burst,
                "link %s: the answer to a %s (response code %s) cannot be sent: %s",
                outcome.mti,
                outcome.response_code,
                error,
            )
            return None

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
        if not self._queued and not self._commands:
            return
        self._answer_late(time.perf_counter_ns() - self._deadline_ns)
        batch = self._take(self._batch_size())
        commands = self._commands[: limits.commands_per_batch_max]
        del self._commands[: limits.commands_per_batch_max]
        if self._queued or self._commands:
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
        else:
            # A command's bug, left out of the batch (the batch ran again without it): counted
            # as the batch's own bug was, when it failed every request.
            operating = (CommandRefused, lmdb.Error, LedgerError)
            for result in results:
                if isinstance(result, Exception) and not isinstance(result, operating):
                    self.metrics.internal_errors.inc()
        for (_, future), result in zip(commands, results, strict=True):
            if future.done():
                continue  # the API caller went away; the change stands regardless
            if isinstance(result, Exception) and not isinstance(result, CommandRefused):
                future.set_exception(result)
            else:
                future.set_result(result)
        elapsed = time.perf_counter() - started
        self._last_batch = time.monotonic()
        self._count_retention()
        self.metrics.commit_seconds.observe(elapsed)
        commit = min(self.ledger.last_commit_seconds, elapsed)  # stale if the batch failed
        self._pacer.measured(len(batch), elapsed - commit, commit)
        if batch:  # a batch of control-API commands only is not a batch of requests
            self.metrics.batch_size.observe(len(batch))
        try:
            # One transport.write per link per batch.
            by_link: dict[Link, list[bytes | None]] = defaultdict(list)
            for (link, header, _, _), outcome in zip(batch, outcomes, strict=True):
                by_link[link].append(self._wire(link, header, outcome))
            for link, frames in by_link.items():
                data = b"".join(frame for frame in frames if frame is not None)
                if data:
                    link.write(data)
                link.requests_finished(len(frames))
            # The answers are written: their latency ends here, before the wake below.
            done_ns = time.perf_counter_ns()
        finally:
            # After the answers left (and whatever became of them: the batch is committed):
            # waking the delivery process (a pipe write, and the kernel waking a process on
            # the other core) is not the network's wait. A logged batch reaches LMDB, where
            # that process reads, at the checkpoint: the wake comes then (`_checkpointed`).
            if self.on_commit is not None and not self.ledger.last_write_logged:
                self.on_commit()
        self.metrics.answered_batch(
            [(outcome.mti, outcome.response_code, outcome.reason) for outcome in outcomes],
            [(done_ns - received_ns) / 1e9 for _, _, _, received_ns in batch],
        )
        self._ledger_errors(outcomes)

    def _checkpoint_pending(self) -> None:
        """The ledger logged a batch LMDB does not have yet: checkpoint within
        ledger.checkpoint_seconds, with whatever else is logged by then."""
        if self._checkpoint_handle is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (a tool, a test): the next read or the close checkpoints
        self._checkpoint_handle = loop.call_later(
            self.config.ledger.checkpoint_seconds, self._checkpoint_due
        )

    def _checkpoint_due(self) -> None:
        self._checkpoint_handle = None
        # A failure is said by the ledger (critical); its writes are refused then, answered 96.
        with contextlib.suppress(LedgerError):
            self.ledger.checkpoint()

    def _checkpointed(self) -> None:
        if self._checkpoint_handle is not None:
            self._checkpoint_handle.cancel()
            self._checkpoint_handle = None
        self.metrics.checkpoint_seconds.observe(self.ledger.last_checkpoint_seconds)
        if self.on_commit is not None:
            self.on_commit()

    def _batch_size(self) -> int:
        """How many requests the next batch may take: the pacer's time-bounded size; fewer
        while a light link is about beside a busy link; the count limit alone while the
        daemon is saturated and no light link is about.

        A light link (one that queued a request lately and has few in flight) is the one
        short batches protect: its request, arriving during a batch, waits for that batch and
        its own. So its own batch is cut to a few requests when a busy link's also wait, and,
        while it has nothing queued, a greedy link's batches are bounded to a shorter time (its
        next request will wait for one of them). With none about, every queued request waits
        behind the others anyway, and a larger batch shares its fsync among more of them:
        more decided per second, and so less time queued for each (bench/RESULTS.md,
        2026-12-07 sixth session). Unless reading lags (a link had more framed than its turn
        took): then the loop needs its turns of reading between batches more, so that what it
        cannot decide in time is still answered in time (a 91 at admission).
        """
        now = time.monotonic()
        light_max = limits.light_link_in_flight_max
        ready = self._ready
        self.protecting_light_link = False
        if any(link.in_flight > light_max for link in ready):
            if any(link.in_flight <= light_max for link in ready):
                # A light link's request waits beside a busy link's many: its batch short, so
                # it waits for little more than the batch under way (specs/messages.md).
                self.protecting_light_link = True
                return min(self._pacer.size, self._light_batch_size())
            greedy_min = limits.greedy_link_in_flight_min
            if any(link.in_flight > greedy_min for link in ready) and self._light_link_about(now):
                self.protecting_light_link = True
                return self._pacer.size_within(limits.light_batch_seconds)
        if self._queued <= self._pacer.size:
            self._saturated_since = None
            return self._pacer.size  # what is queued fits a time-bounded batch anyway
        if self._saturated_since is None:
            self._saturated_since = now
        if now - self._saturated_since < limits.saturated_seconds_min:
            return self._pacer.size  # a moment's queue: not yet worth a long batch
        if self._light_link_about(now) or self.backlogged_links:
            return self._pacer.size
        return self._pacer.size_max

    def _light_batch_size(self) -> int:
        """What a batch holding a light link's request beside a busy link's is cut to: while
        the ledger logs, few enough to be logged (one flush of the log where an LMDB commit
        is two; the busy link's next batch then commits it with its own, Ledger.write)."""
        if self.ledger.logging:
            return min(limits.light_batch_size, limits.logged_batch_requests_max - 1)
        return limits.light_batch_size

    def _light_link_about(self, now: float) -> bool:
        """Whether a link queued a request within limits.light_link_seconds and has few in
        flight now; looked for at most every limits.light_links_check_seconds."""
        if now >= self._light_checked_until:
            self._light_checked_until = now + limits.light_links_check_seconds
            recently = now - limits.light_link_seconds
            light_max = limits.light_link_in_flight_max
            self._light_about = any(
                link.in_flight <= light_max and link.requested_at >= recently for link in self.links
            )
        return self._light_about

    def _ledger_errors(self, outcomes: list[Outcome]) -> None:
        """Log a batch's 96s within the error budget, and note whether the ledger is full."""
        full = False
        failing: str | None = None
        now = time.monotonic()
        for outcome in outcomes:
            if outcome.response_code != "96":
                continue
            full = full or outcome.reason == "ledger_full"
            if outcome.reason.startswith("ledger_error"):
                failing = outcome.reason
            suppressed = self._error_log.allow(outcome.reason, now)
            if suppressed is None:
                self.metrics.child(self.metrics.log_lines_suppressed, "answered_96").inc()
                continue
            log.error(
                "answered 96: %s%s",
                outcome.reason,
                f" ({suppressed} more since the last line)" if suppressed else "",
            )
        if full and not self.ledger_full:
            log.error(
                "ledger full at its ceiling of %d MiB (ledger.map_size_max_bytes): answering 96 "
                "ledger_full, /readyz 503; reads and echoes go on, and the next batch that "
                "fits is committed as usual",
                self.ledger.map_size_max_bytes >> 20,
            )
        elif self.ledger_full and not full and outcomes:
            log.warning("ledger no longer full: batches commit again")
        if outcomes:
            self.ledger_full = full
            self.ledger_failing = failing
            # Summed over processes in /metrics, and what /readyz sees of a worker's batches.
            self.metrics.ledger_writes_failing.set(1 if full or failing else 0)

    def map_used_ratio(self) -> float:
        """The share of the map's ceiling in use; warns once when it passes 80 %."""
        used, _ = self.ledger.map_usage()
        ratio = used / self.ledger.map_size_max_bytes
        if ratio >= limits.map_used_warning_ratio and not self._map_warned:
            self._map_warned = True
            log.warning(
                "ledger %s: %.0f %% of its map ceiling in use (%d of %d MiB, "
                "ledger.map_size_max_bytes); at %.0f %% /readyz reports degraded, at 100 %% "
                "authorisations are answered 96",
                self.ledger.path,
                ratio * 100,
                used >> 20,
                self.ledger.map_size_max_bytes >> 20,
                limits.map_used_degraded_ratio * 100,
            )
        elif ratio < limits.map_used_warning_ratio - 0.05:
            self._map_warned = False
        return ratio

    def _take(self, size: int) -> list[Pending]:
        """Up to `size` queued requests, one per link per round, each link's oldest first.

        Round-robin must not reorder what refers to something else: a reversal or completion
        (0400, 0420, 0220) waits while any request that arrived before it is still queued on
        another link (its original may be that request: decided first, it is found). The
        oldest queued request is never held back, so a batch always takes something.
        """
        batch: list[Pending] = []
        ready = self._ready
        held: list[Link] = []  # links whose next request waits for an older one elsewhere
        while len(batch) < size:
            if not ready:
                if not held or not batch or not self._free_held(held):
                    break
                continue
            link = ready.popleft()
            queue = link.queue
            if queue[0][1].message_class in FOLLOW_UP_CLASSES and self._older_queued(
                queue[0][2], link, held
            ):
                held.append(link)
                continue
            header, request, received_ns = queue.popleft()
            batch.append((link, header, request, received_ns))
            if queue:
                ready.append(link)
            else:
                link.ready = False
        ready.extend(held)
        self._queued -= len(batch)
        return batch

    def _free_held(self, held: list[Link]) -> bool:
        """Give held links back to the round once something was taken; False if none is free."""
        free = [link for link in held if not self._older_queued(link.queue[0][2], link, held)]
        if not free:
            return False
        for link in free:
            held.remove(link)
            self._ready.append(link)
        return True

    def _older_queued(self, received_ns: int, link: Link, held: list[Link]) -> bool:
        """Whether a request that arrived before `received_ns` waits on another link."""
        return any(
            other is not link and other.queue[0][2] < received_ns
            for others in (self._ready, held)
            for other in others
        )

    def _answer_late(self, late_before: int) -> None:
        """Answer 91 to the requests that arrived before `late_before` (each link's oldest, at
        the front of its queue) without deciding them; advices stay queued: they are recorded
        anyway. Counted like every answer (`processor_requests_total{response_code="91"}`)."""
        emptied = False
        for link in self._ready:
            queue = link.queue
            if queue[0][2] >= late_before:
                continue
            kept: list[Queued] = []
            late = 0
            while queue and queue[0][2] < late_before:
                entry = queue.popleft()
                header, request, received_ns = entry
                if request.message_class in ADVICE_CLASSES:
                    kept.append(entry)
                    continue
                late += 1
                self._send(link, header, self.authorizer.deadline_missed(request), received_ns)
            queue.extendleft(reversed(kept))
            self._queued -= late
            link.requests_finished(late)
            emptied = emptied or not queue
        if emptied:
            for link in self._ready:
                link.ready = bool(link.queue)
            self._ready = deque(link for link in self._ready if link.ready)

    def sweep(self) -> None:
        """Release expired holds, one bounded transaction per call; reschedules itself."""
        loop = asyncio.get_running_loop()
        if self.stopping:
            return
        delay = float(self.config.programme.sweep_interval_seconds)
        try:
            released = self.authorizer.sweep_expired(datetime.now(UTC), limits.sweep_holds_max)
        except lmdb.MapFullError:
            released = 0
            if self.ledger.grow():
                delay = 0.0  # room now: at once
            elif self._error_log.allow("sweep_ledger_full", time.monotonic()) is not None:
                log.error("hold sweep: the ledger is full at its ceiling; retrying each interval")
        except Exception:
            log.exception("hold sweep failed; retrying at the next interval")
            released = 0
        if released:
            self.metrics.holds_expired.inc(released)
            log.info("released %d expired holds", released)
            if released == limits.sweep_holds_max:
                delay = 0.01  # more are due: continue soon, letting requests in between
        self._sweep_handle = loop.call_later(delay, self.sweep)

    def retain(self) -> None:
        """A retention step of its own when no batch carried one lately (reschedules).

        Batches carry the sweep while traffic flows; this keeps it going when it does not,
        soon again while it finds work, so a quiet ledger still shrinks to its horizons. With
        the ledger full at its ceiling, batches commit nothing, the sweep in them neither: then
        steps of its own run whatever the traffic, and what they free lets batches commit again.
        """
        if self.stopping:
            return
        delay = limits.retention_idle_seconds
        idle = time.monotonic() - self._last_batch >= limits.retention_idle_seconds
        if idle or self.ledger_full:
            try:
                done = self.authorizer.sweep_retention(
                    datetime.now(UTC), limits.retention_visits_idle
                )
            except (lmdb.Error, LedgerError) as error:
                done = None
                if self._error_log.allow("retention", time.monotonic()) is not None:
                    log.error("retention sweep: %s; retrying", error)
            except Exception:
                done = None
                log.exception("retention sweep failed; retrying")
            self._count_retention()
            if done is not None and done.busy:
                delay = limits.retention_busy_seconds
        self._retention_handle = asyncio.get_running_loop().call_later(delay, self.retain)

    def _count_retention(self) -> None:
        expired = self.authorizer.take_expired()
        if expired:
            self.metrics.holds_expired.inc(expired)
        done = self.authorizer.take_retention_step()
        if done is not None:
            self.metrics.count_retention(done.visited, done.pruned, done.kept, done.seconds)

    def stop_timers(self) -> None:
        """Stop the hold sweeper, retention and the link supervision (draining)."""
        if self._sweep_handle is not None:
            self._sweep_handle.cancel()
            self._sweep_handle = None
        if self._retention_handle is not None:
            self._retention_handle.cancel()
            self._retention_handle = None
        if self._supervision_handle is not None:
            self._supervision_handle.cancel()
            self._supervision_handle = None

    def supervise(self) -> None:
        """Close idle and stalled links and look at the ledger's room, now and every
        supervision interval (reschedules)."""
        if self.stopping:
            return
        self.close_stalled_links(time.monotonic())
        self.map_used_ratio()
        self._supervision_handle = asyncio.get_running_loop().call_later(
            limits.link_supervision_interval_seconds, self.supervise
        )

    def close_stalled_links(self, now: float) -> int:
        """Close every link idle past its listener's timeout or stuck in a half-sent frame."""
        closed = 0
        for link in list(self.links):
            reason = link.stalled(now)
            if reason is None or not link.open:
                continue
            self._peer_warning(link, reason, "%s, closing", reason.replace("_", " "))
            self.metrics.child(self.metrics.links_closed, link.listener.name, reason).inc()
            link.close()
            closed += 1
        return closed

    def flush_all(self) -> None:
        while self._queued or self._commands:
            self._flush()

    @property
    def pending(self) -> int:
        return self._queued

    @property
    def link_count(self) -> int:
        return len(self.links)


class StartupError(Exception):
    """What keeps the daemon from starting (a port in use, say): one line, exit code 2."""


def listen(host: str, port: int, *, shared: bool = False, name: str = "") -> socket.socket:
    """An ISO 8583 listening socket; `shared` ones (SO_REUSEPORT) split links between processes.

    Each worker process gets a socket of its own on the same port: the kernel then hands each
    new link to one of them, spread by address, where processes accepting on one shared socket
    race and the first awake takes a whole burst of links.
    """
    # An IPv6 literal binds IPv6; "" every interface of both families where the system can.
    everywhere = host == "" and socket.has_dualstack_ipv6()
    family = socket.AF_INET6 if ":" in host or everywhere else socket.AF_INET
    try:
        listener = socket.create_server(
            (host, port),
            family=family,
            backlog=limits.links_max,
            reuse_port=shared,
            dualstack_ipv6=everywhere,
        )
    except OSError as error:
        which = f" ({name})" if name else ""
        raise StartupError(f"cannot listen on {host}:{port}{which}: {error.strerror}") from None
    listener.setblocking(False)
    return listener


async def start_listeners(daemon: Daemon, sockets: list[socket.socket]) -> list[Acceptor]:
    """Accept links on each listener's socket (in config order), each link in its dialect.

    Accepted by processor/server/acceptor.py rather than loop.create_server, so that links
    refused at the open-files limit are counted and logged (neither loop reports them).
    """
    loop = asyncio.get_running_loop()
    reserve = Reserve()  # one descriptor held back for the process, shared by its listeners
    acceptors = []
    for listener, sock in zip(daemon.listeners, sockets, strict=True):
        acceptor = Acceptor(
            loop, sock, _link_factory(daemon, listener), reserve, _refusals(daemon, listener)
        )
        acceptor.start()
        acceptors.append(acceptor)
    return acceptors


def accept_http(daemon: Daemon, sock: socket.socket) -> Callable[[ProtocolFactory], Acceptor]:
    """How the HTTP port accepts: like the listeners (processor/server/acceptor.py), so that
    connections refused at the open-files limit are counted and logged there too, with a
    reserve descriptor of its own."""

    def accept(protocol_factory: ProtocolFactory) -> Acceptor:
        acceptor = Acceptor(
            asyncio.get_running_loop(),
            sock,
            protocol_factory,
            Reserve(),
            daemon.http_connections_refused,
        )
        acceptor.start()
        return acceptor

    return accept


def _link_factory(daemon: Daemon, listener: Listener) -> Callable[[], Link]:
    return lambda: Link(daemon, listener)


def _refusals(daemon: Daemon, listener: Listener) -> Callable[[str, int, str], None]:
    return lambda reason, count, peer: daemon.links_refused(listener, reason, count, peer)


async def drain(daemon: Daemon, acceptors: list[Acceptor]) -> None:
    """Stop accepting, answer what is in flight, then close the links."""
    loop = asyncio.get_running_loop()
    daemon.stopping = True
    daemon.stop_timers()
    for acceptor in acceptors:
        acceptor.close()
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
